"""Run configuration: pydantic models for a whole ddpipe run, loaded from YAML.

A config is one YAML file (see ``configs/``) validated by :class:`RunConfig`.
Every field has a description; ``docs/config.md`` is generated from them
(``python -m ddpipe.config`` prints it). Overrides use dotted keys,
``method.ipc=50`` or ``evaluation.seeds=[0,1]``; the value is parsed as YAML.

The run folder is ``<store.uri>/<name>-<hash>``, where the hash covers every
section that changes results (all but ``store``, ``orchestration`` and
``runtime``), so re-running the same config resumes in the same folder.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ddpipe.errors import ConfigError

# Sections that do not change what a run computes; left out of the run hash.
NON_RESULT_SECTIONS = ("store", "orchestration", "runtime")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelSpec(_Section):
    """A network from the model registry (:mod:`ddpipe.models`)."""

    name: Literal[
        "convnet", "resnet18_small", "resnet18", "mobilenet_v2", "shufflenet_v2_x0_5", "efficientnet_b0"
    ] = Field("convnet", description="Architecture name in the model registry.")
    width: int = Field(128, ge=1, description="ConvNet only: channels of every conv layer.")
    depth: int = Field(3, ge=1, le=8, description="ConvNet only: number of conv-norm-relu-pool blocks.")
    norm: Literal["batch", "instance", "none"] = Field(
        "instance", description="ConvNet only: normalisation after each conv (instance = GroupNorm with one group per channel)."
    )
    pooling: Literal["avg", "max", "none"] = Field("avg", description="ConvNet only: 2x2 pooling after each block.")


class OptimConfig(_Section):
    """Optimiser and learning-rate schedule of a training loop."""

    optimizer: Literal["sgd", "adamw"] = Field("sgd", description="sgd (momentum, Nesterov off) or adamw.")
    lr: float = Field(0.01, gt=0, description="Peak learning rate.")
    momentum: float = Field(0.9, ge=0, lt=1, description="SGD momentum (adamw: beta1).")
    weight_decay: float = Field(5e-4, ge=0, description="Weight decay (not applied to norm and bias parameters).")
    schedule: Literal["cosine", "step", "constant"] = Field(
        "cosine", description="cosine: to 0 over the run; step: x0.1 at half the run (DC protocol); constant."
    )
    warmup_fraction: float = Field(0.0, ge=0, lt=1, description="Fraction of the steps with a linear warm-up.")


class AugmentConfig(_Section):
    """Batched, seeded augmentation applied to every training batch."""

    crop_scale: tuple[float, float] | None = Field(
        None, description="RandomResizedCrop area range, e.g. [0.5, 1.0]; null for no crop."
    )
    flip: bool = Field(False, description="Random horizontal flip with probability 0.5.")
    cutmix: float = Field(0.0, ge=0, le=1, description="Probability of CutMix (Beta(1,1), one box per batch).")

    @field_validator("crop_scale")
    @classmethod
    def _scale_range(cls, v):
        if v is not None and not (0 < v[0] <= v[1] <= 1):
            raise ValueError("crop_scale must satisfy 0 < low <= high <= 1")
        return v


class DatasetConfig(_Section):
    """Where the real images come from."""

    kind: Literal["fashion-mnist", "image-folder"] = Field(
        "fashion-mnist",
        description="fashion-mnist: the four IDX files; image-folder: <root>/<split>/<class>/*.{jpg,jpeg,png} "
        "(the ImageNet-1K / ImageNet-21K-P layout).",
    )
    root: str | None = Field(
        None,
        description="Folder of the data. fashion-mnist: the IDX files (default: /usr/share/datasets/fashion-mnist, "
        "then ./data/FashionMNIST/raw); image-folder: the folder holding the split folders.",
    )
    train_split: str = Field("train", description="image-folder: sub-folder of the training split.")
    test_split: str = Field("val", description="image-folder: sub-folder of the held-out split used for test accuracy.")
    image_size: int | None = Field(
        None, ge=8, description="Side of the square images the networks see (fashion-mnist: 28; image-folder: required)."
    )
    channels: Literal[1, 3] | None = Field(None, description="Input channels (default: 1 for fashion-mnist, 3 otherwise).")
    mean: tuple[float, ...] | None = Field(None, description="Per-channel normalisation mean (default per dataset).")
    std: tuple[float, ...] | None = Field(None, description="Per-channel normalisation std (default per dataset).")
    train_per_class: int | None = Field(
        None, ge=1, description="Keep only the first N training images of each class (a slice for quick runs)."
    )
    test_per_class: int | None = Field(None, ge=1, description="Keep only the first N test images of each class.")


class TeacherConfig(_Section):
    """The teacher ("squeeze" stage): trained here, or loaded from a checkpoint."""

    model: ModelSpec = Field(
        default_factory=lambda: ModelSpec(width=64, norm="batch"), description="Teacher architecture."
    )
    checkpoint: str | None = Field(
        None,
        description="Path or URI of a ddpipe teacher checkpoint to use instead of training one. Its class map "
        "must equal the dataset's.",
    )
    epochs: float = Field(10, gt=0, description="Training epochs over the training split.")
    batch_size: int = Field(256, ge=1, description="Training batch size.")
    optim: OptimConfig = Field(
        default_factory=lambda: OptimConfig(optimizer="sgd", lr=0.1, weight_decay=5e-4, warmup_fraction=0.1),
        description="Optimiser and schedule.",
    )
    label_smoothing: float = Field(0.1, ge=0, lt=1, description="Label smoothing of the cross-entropy.")
    augment: AugmentConfig = Field(
        default_factory=lambda: AugmentConfig(crop_scale=(0.6, 1.0), flip=True), description="Training augmentation."
    )
    min_val_accuracy: float = Field(
        0.0, ge=0, le=1, description="Refuse to distill with a teacher whose measured test accuracy is lower."
    )


class MethodConfig(_Section):
    """The distillation method and its settings (RDED, Sun et al. CVPR'24, Algorithm 1)."""

    name: Literal["rded"] = Field("rded", description="Distillation method.")
    ipc: int = Field(10, ge=1, description="Images per class in the distilled set.")
    candidates_per_class: int = Field(
        300, ge=1, description="|T'_c|: images drawn at random per class before scoring (paper: 300)."
    )
    crops_per_image: int = Field(5, ge=1, description="K: random-resized crops scored per candidate image (paper: 5).")
    factor: int | None = Field(
        None,
        ge=1,
        description="Patches per side of a distilled image (N = factor^2). Default: 1 for images <= 64 px, else 2.",
    )
    crop_scale: tuple[float, float] = Field(
        (0.08, 1.0), description="Area range of the scored random-resized crops (square crops, as the reference code)."
    )
    patch_view: Literal["pad", "resize"] = Field(
        "pad", description="How the teacher sees a patch smaller than its input when scoring: pad (zero-padded, "
        "centred, as the reference code) or resize (upsampled to the input size)."
    )
    batch_size: int = Field(512, ge=1, description="Teacher batch size while scoring crops.")


class LabelsConfig(_Section):
    """Soft labels: the teacher's softened output for every region of every distilled image."""

    temperature: float = Field(20.0, gt=0, description="Softmax temperature of stored labels, and of the KL in training.")
    top_k: int | None = Field(
        None, ge=1, description="Store only the k largest probabilities per label (the rest is spread evenly when read); "
        "null stores all classes."
    )
    dtype: Literal["float16", "float32"] = Field("float16", description="Storage type of the probabilities.")
    batch_size: int = Field(256, ge=1, description="Teacher batch size while labelling.")


class EvaluationConfig(_Section):
    """Training students from scratch on the distilled set and on a random subset of the same size."""

    model: ModelSpec = Field(default_factory=ModelSpec, description="Student architecture (default ConvNet-3, width 128).")
    regimes: tuple[Literal["hard", "soft", "soft_kd"], ...] = Field(
        ("hard", "soft", "soft_kd"),
        description="hard: cross-entropy on class labels; soft: KL to the stored soft labels; soft_kd: KL to the "
        "teacher's output on every augmented view.",
    )
    seeds: tuple[int, ...] = Field((0, 1, 2), min_length=1, description="One student per seed; mean and std reported.")
    epochs: int = Field(300, ge=1, description="Passes over the distilled set (same step count for the random subset).")
    batch_size: int | None = Field(
        None, ge=1, description="Student batch size (default as RDED: 10 for ipc 1, 50 for ipc <= 10, else 100; "
        "at most the set size)."
    )
    optim: OptimConfig = Field(
        default_factory=lambda: OptimConfig(optimizer="adamw", lr=1e-3, weight_decay=0.01),
        description="Optimiser and schedule.",
    )
    augment: AugmentConfig = Field(
        default_factory=lambda: AugmentConfig(crop_scale=(0.5, 1.0), flip=True, cutmix=1.0),
        description="Augmentation of every student batch (labels are mixed with CutMix).",
    )
    region_views: bool = Field(
        True, description="For stitched images (factor > 1) each training sample shows one of its regions, resized "
        "to the input size, with that region's label (RDED Eq. 10); false shows whole stitched images."
    )
    temperature_squared: bool = Field(
        True, description="Multiply the KL loss by T^2 (Hinton et al.); the RDED reference code does not."
    )
    test_batch_size: int = Field(1000, ge=1, description="Batch size for test accuracy.")


class StoreConfig(_Section):
    """Where run folders are written: any fsspec URI."""

    uri: str = Field("./runs", description="Local path, s3://bucket/prefix, or memory://... (tests).")
    storage_options: dict[str, Any] = Field(
        default_factory=dict,
        description="fsspec options, e.g. {client_kwargs: {endpoint_url: ...}, key: ..., secret: ...}. Empty: the "
        "standard AWS environment variables and files apply.",
    )


class OrchestrationConfig(_Section):
    """How the work is split and run; never changes the results."""

    classes_per_shard: int = Field(5, ge=1, description="Classes per shard of the per-class stages.")
    max_workers: int = Field(1, ge=1, description="Shards run at once. 1 runs them in the flow's own thread; more uses task-runner threads (on CPU each thread brings its own torch thread pool, so keep 1 unless the work is I/O-bound or on GPU).")


class RuntimeConfig(_Section):
    """Devices and numeric settings; never part of the run hash."""

    device: str = Field("auto", description="auto (cuda, then mps, then cpu), cpu, cuda, cuda:N or mps.")
    amp: bool = Field(False, description="Mixed precision (bfloat16 autocast) on CUDA; ignored on CPU.")
    channels_last: bool = Field(False, description="Use the channels_last memory format for the networks.")
    compile: bool = Field(
        False, description="torch.compile the networks that train and the teacher in online KD (needs a C++ "
        "compiler on CPU; falls back to eager on errors)."
    )
    num_threads: int | None = Field(None, ge=1, description="torch CPU threads (default: torch's choice).")
    loader_workers: int = Field(0, ge=0, description="Worker processes decoding image-folder files.")


class RunConfig(_Section):
    """A whole ddpipe run."""

    name: str = Field(..., pattern=r"^[a-z0-9][a-z0-9._-]*$", description="Run name; the run folder is <name>-<hash>.")
    seed: int = Field(0, description="Seed of every random choice; same config and seed give the same outputs on CPU.")
    dataset: DatasetConfig = Field(default_factory=DatasetConfig, description="Real data.")
    teacher: TeacherConfig = Field(default_factory=TeacherConfig, description="Teacher (observer) model.")
    method: MethodConfig = Field(default_factory=MethodConfig, description="Distillation method.")
    labels: LabelsConfig = Field(default_factory=LabelsConfig, description="Soft labels.")
    evaluation: EvaluationConfig = Field(default_factory=EvaluationConfig, description="Student evaluation.")
    store: StoreConfig = Field(default_factory=StoreConfig, description="Output store.")
    orchestration: OrchestrationConfig = Field(default_factory=OrchestrationConfig, description="Sharding.")
    runtime: RuntimeConfig = Field(default_factory=RuntimeConfig, description="Device and threads.")

    @model_validator(mode="after")
    def _consistent(self):
        d = self.dataset
        if d.kind == "image-folder" and d.image_size is None:
            raise ValueError("dataset.image_size is required for image-folder datasets")
        if d.kind == "fashion-mnist" and d.image_size not in (None, 28):
            raise ValueError("dataset.image_size must be 28 for fashion-mnist")
        if d.mean is not None and d.std is not None and len(d.mean) != len(d.std):
            raise ValueError("dataset.mean and dataset.std must have the same length")
        if self.method.factor is not None and self.method.factor > self.image_size:
            raise ValueError("method.factor cannot exceed the image size")
        need = self.patches_per_class
        if self.method.candidates_per_class < need:
            raise ValueError(
                f"method.candidates_per_class ({self.method.candidates_per_class}) must be at least factor^2 x ipc "
                f"({need})"
            )
        return self

    # Derived values: one place decides every default that depends on the dataset.
    @property
    def image_size(self) -> int:
        return self.dataset.image_size or 28

    @property
    def channels(self) -> int:
        return self.dataset.channels or (1 if self.dataset.kind == "fashion-mnist" else 3)

    @property
    def normalization(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        if self.dataset.kind == "fashion-mnist":
            mean, std = (0.2861,), (0.3530,)
        else:
            mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
        if self.channels != len(mean):
            mean, std = (sum(mean) / len(mean),) * self.channels, (sum(std) / len(std),) * self.channels
        return tuple(self.dataset.mean or mean), tuple(self.dataset.std or std)

    @property
    def factor(self) -> int:
        return self.method.factor or (1 if self.image_size <= 64 else 2)

    @property
    def patches_per_class(self) -> int:
        """Patches RDED selects per class, factor^2 x ipc, each cut from a distinct source image: also the
        training images every class must have (the random subset's ipc images are no more)."""
        return self.factor**2 * self.method.ipc

    def hash(self) -> str:
        """Hash of everything that changes the results (all sections but store, orchestration, runtime)."""
        data = self.model_dump(mode="json", exclude=set(NON_RESULT_SECTIONS))
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()

    @property
    def run_name(self) -> str:
        return f"{self.name}-{self.hash()[:10]}"

    def section_json(self, *sections: str) -> str:
        """Canonical JSON of some sections, for cache keys."""
        data = self.model_dump(mode="json", include=set(sections))
        return json.dumps(data, sort_keys=True)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def _describe_error(err: ValidationError) -> str:
    first = err.errors()[0]
    loc = ".".join(str(p) for p in first["loc"])
    msg = first["msg"]
    if first["type"] == "extra_forbidden":
        return f"unknown config field '{loc}'"
    if first["type"] == "missing":
        return f"missing config field '{loc}'"
    value = first.get("input")
    shown = "" if isinstance(value, dict) else f" (got {value!r})"
    where = f"invalid config field '{loc}'" if loc else "invalid config"
    return f"{where}: {msg}{shown}"


def apply_override(data: dict, assignment: str) -> None:
    """Apply one ``dotted.key=value`` override to a raw config mapping (value parsed as YAML)."""
    if "=" not in assignment:
        raise ConfigError(f"override '{assignment}' must look like key=value")
    key, raw = assignment.split("=", 1)
    parts = [p for p in key.strip().split(".") if p]
    if not parts:
        raise ConfigError(f"override '{assignment}' has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as e:
        raise ConfigError(f"override '{assignment}': value is not valid YAML ({e.problem})") from None
    node = data
    for p in parts[:-1]:
        child = node.get(p)
        if child is None:
            child = node[p] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"override '{assignment}': '{p}' is not a section")
        node = child
    node[parts[-1]] = value


def build_config(data: dict, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Validate a raw mapping (plus overrides) into a :class:`RunConfig`; errors become one-line ConfigErrors."""
    data = json.loads(json.dumps(data))  # deep copy, plain types
    for o in overrides:
        apply_override(data, o)
    try:
        return RunConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_describe_error(e)) from None


def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Load a YAML config file and apply dotted-key overrides."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping at the top level")
    return build_config(data, overrides)


def config_reference() -> str:
    """Markdown reference of every config field, generated from the models."""
    lines = ["# Config reference", "", "Generated by `python -m ddpipe.config` from `src/ddpipe/config.py`.", ""]

    def walk(model: type[BaseModel], defaults: BaseModel | None, prefix: str):
        rows, subs = [], []
        for name, f in model.model_fields.items():
            if defaults is not None:
                value = getattr(defaults, name)
            else:
                value = None if f.is_required() else f.get_default(call_default_factory=True)
            if isinstance(value, BaseModel):
                subs.append((f"{prefix}{name}", value, f.description))
                continue
            shown = "required" if value is None and f.is_required() else json.dumps(value, default=str)
            rows.append(f"| `{prefix}{name}` | `{shown}` | {f.description or ''} |")
        if rows:
            lines.extend(["| field | default | meaning |", "| --- | --- | --- |", *rows, ""])
        for path, sub, desc in subs:
            lines.extend([f"## `{path}`", "", desc or "", ""])
            walk(type(sub), sub, f"{path}.")

    walk(RunConfig, None, "")
    return "\n".join(lines)


if __name__ == "__main__":  # pragma: no cover
    sys.stdout.write(config_reference())
