"""The teacher ("squeeze"): training, the checkpoint format, the class-map check, and the ``teacher`` stage.

A checkpoint is a ``torch.save``'d dict that carries everything needed to use the teacher safely: the
model spec, the weights, the class map (ordered class names), the input format (size, channels,
normalisation), the dataset fingerprint and the top-1 accuracy measured on the test split.
:func:`load_teacher` refuses a checkpoint whose class map differs from the data's: with a shifted class
order every label the teacher gives is wrong and distillation silently collapses.

The ``teacher`` stage has a shard per backbone (the primary ``teacher.model``, then ``teacher.ensemble``) and
writes ``teacher/teacher.pt`` + ``teacher/metrics.json`` (``teacher/memberK.pt`` + ``.json`` for the others).
A trained teacher is shared by every run in the store (``<store>/shared/teachers/<key>/``, :func:`teacher_key`).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Callable

import fsspec
import numpy as np
import torch
from pydantic import ValidationError as PydanticValidationError
from torch import nn

from ddpipe import progress
from ddpipe.augment import generator, seed_for
from ddpipe.config import InputFormat, RunConfig, RuntimeConfig, TeacherConfig
from ddpipe.data import DataSource
from ddpipe.dataset import dataset_classes
from ddpipe.errors import CheckpointError, ClassMapMismatchError, TeacherError
from ddpipe.manifests import StageManifest
from ddpipe.models import ModelSpec, build_model, init_model
from ddpipe.pipeline import Context, Shard, Stage, shared_key, shared_outputs
from ddpipe.store import FileRecord, fs_options, torch_bytes, torch_object
from ddpipe.train import accuracy, fit_classifier, to_device

CHECKPOINT_FORMAT = "ddpipe-teacher/1"


@dataclass
class Teacher:
    model: nn.Module
    spec: ModelSpec
    classes: list[str]
    image_size: int
    channels: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    val_accuracy: float | None  # on the validation split (None: a checkpoint measured without one)
    test_accuracy: float | None = None  # old-format checkpoints only: they measured the test split


def train_teacher(t: TeacherConfig, spec: ModelSpec, fmt: InputFormat, source: DataSource, seed: int,
                  device: torch.device, runtime: RuntimeConfig, progress: Callable[[int, int], None] | None = None,
                  member: int = 0) -> nn.Module:
    """Train backbone ``spec`` as teacher ``member`` (0: ``teacher.model``, k: ``teacher.ensemble[k-1]``; it names
    the random streams) on the whole training split with the recipe ``t``."""
    split = source.train
    stream = ("teacher",) if member == 0 else ("teacher", f"member{member}")
    model = init_model(spec, fmt.channels, source.num_classes, fmt.size, seed_for(seed, *stream, "init"))
    model = to_device(model, device, runtime)
    total = max(1, round(t.epochs * math.ceil(len(split) / t.batch_size)))
    return fit_classifier(
        model, split, np.arange(len(split)), batch_size=t.batch_size, optim=t.optim, augment=t.augment,
        label_smoothing=t.label_smoothing, total_steps=total, gen=generator(seed, *stream, "data"), mean=fmt.mean,
        std=fmt.std, device=device, runtime=runtime, on_step=(lambda step: progress(step, total)) if progress else None,
    )


def checkpoint_bytes(model: nn.Module, fmt: InputFormat, source: DataSource, spec: ModelSpec,
                     val_accuracy: float | None) -> bytes:
    mean, std = fmt.mean, fmt.std
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    payload = {
        "format": CHECKPOINT_FORMAT,
        "model": spec.model_dump(mode="json"),
        "state_dict": state,
        "classes": list(source.classes),
        "image_size": fmt.size,
        "channels": fmt.channels,
        "mean": list(mean),
        "std": list(std),
        "dataset_fingerprint": source.fingerprint,
        "val_accuracy": None if val_accuracy is None else float(val_accuracy),
        "val_images": len(source.val) if source.val is not None else 0,
    }
    return torch_bytes(payload)


def read_checkpoint(data: bytes, name: str) -> dict:
    """The payload of a teacher checkpoint, every field checked (a CheckpointError names the first bad one)."""
    payload = torch_object(data, f"teacher checkpoint {name}")
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"teacher checkpoint {name} is not a ddpipe teacher checkpoint ({CHECKPOINT_FORMAT})")

    def bad(field: str, what: str):
        raise CheckpointError(f"teacher checkpoint {name}: field '{field}' {what}")

    classes = payload.get("classes")
    if not isinstance(classes, (list, tuple)) or not classes or not all(isinstance(c, str) for c in classes):
        bad("classes", "must list the class names it was trained on")
    for field in ("image_size", "channels"):
        if not isinstance(payload.get(field), int) or isinstance(payload.get(field), bool) or payload[field] < 1:
            bad(field, "must be a positive integer")
    for field in ("mean", "std"):
        values = payload.get(field)
        if (not isinstance(values, (list, tuple)) or len(values) != payload["channels"]
                or not all(isinstance(v, (int, float)) for v in values)):
            bad(field, f"must hold {payload['channels']} number(s), one per channel")
    if "val_images" not in payload and isinstance(payload.get("val_accuracy"), (int, float)):
        # the old format (before the validation split) measured the test split and called it val_accuracy
        payload = {**payload, "test_accuracy": payload["val_accuracy"], "val_accuracy": None, "val_images": 0}
    if payload.get("val_accuracy") is not None and not isinstance(payload.get("val_accuracy"), (int, float)):
        bad("val_accuracy", "must be a number or null")
    if not isinstance(payload.get("state_dict"), dict):
        bad("state_dict", "must hold the model's weights")
    try:
        ModelSpec.model_validate(payload.get("model"))
    except PydanticValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        bad("model", f"is not a valid model spec ({where + ': ' if where else ''}{first['msg']})")
    return payload


def check_class_map(checkpoint_classes: list[str], data_classes: list[str], name: str) -> None:
    """Raise ClassMapMismatchError naming the first class that differs."""
    if list(checkpoint_classes) == list(data_classes):
        return
    for i, (a, b) in enumerate(zip(checkpoint_classes, data_classes)):
        if a != b:
            raise ClassMapMismatchError(
                f"teacher checkpoint {name} was trained on another class map: class {i} is '{a}' in the checkpoint "
                f"but '{b}' in the data"
            )
    raise ClassMapMismatchError(
        f"teacher checkpoint {name} was trained on another class map: {len(checkpoint_classes)} classes in the "
        f"checkpoint, {len(data_classes)} in the data"
    )


def load_teacher(data: bytes, name: str, data_classes: list[str], fmt: InputFormat, device: torch.device,
                 runtime: RuntimeConfig) -> Teacher:
    """Load a checkpoint, check its class map and input format against the data's (``fmt``), and return the
    teacher (eval mode, frozen, on ``device``)."""
    payload = read_checkpoint(data, name)
    check_class_map(payload["classes"], data_classes, name)
    if payload["channels"] != fmt.channels or payload["image_size"] != fmt.size:
        raise CheckpointError(
            f"teacher checkpoint {name} expects {payload['channels']}x{payload['image_size']}px inputs, the config gives "
            f"{fmt.channels}x{fmt.size}px"
        )
    spec = ModelSpec.model_validate(payload["model"])
    model = build_model(spec, payload["channels"], len(payload["classes"]), payload["image_size"])
    try:
        model.load_state_dict(payload["state_dict"])
    except RuntimeError as e:
        raise CheckpointError(f"teacher checkpoint {name} does not match its model spec: {str(e).splitlines()[0]}") from None
    model = to_device(model, device, runtime).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return Teacher(model, spec, list(payload["classes"]), payload["image_size"], payload["channels"],
                   tuple(payload["mean"]), tuple(payload["std"]), payload["val_accuracy"], payload.get("test_accuracy"))


def ensemble_logits(logits: torch.Tensor, logit_norm: bool) -> torch.Tensor:
    """Combine [M, B, C] logits of M teachers into [B, C] (G-VBSM Eq. 8).

    With ``logit_norm`` each teacher's logits are first rescaled to the same Frobenius norm over the batch,
    the mean of the M norms: ``z_m * mean_m(||z_m||_F) / ||z_m||_F``; then the M are averaged.
    """
    if logit_norm:
        norms = logits.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, 1, 1)
        logits = logits / norms * norms.mean()
    return logits.mean(0)


class Ensemble(nn.Module):
    """Several teachers as one network whose output is :func:`ensemble_logits` of theirs."""

    def __init__(self, models: list[nn.Module], logit_norm: bool):
        super().__init__()
        self.models = nn.ModuleList(models)
        self.logit_norm = logit_norm

    def forward(self, x):
        return ensemble_logits(torch.stack([m(x).float() for m in self.models]), self.logit_norm)


def measure(model: nn.Module, fmt: InputFormat, source: DataSource, device, runtime: RuntimeConfig,
            batch_size: int) -> float | None:
    """Top-1 of ``model`` on the validation split (None without one): teachers never read the test split."""
    if source.val is None or len(source.val) == 0:
        return None
    return accuracy(model, source.val, fmt.mean, fmt.std, device, runtime, batch_size)



# ---------------------------------------------------------------- the teacher stage


def teacher_files(k: int) -> tuple[str, str]:
    """(checkpoint, metrics) paths of teacher ``k`` (0: the primary teacher) in the run folder."""
    return ("teacher/teacher.pt", "teacher/metrics.json") if k == 0 else (f"teacher/member{k}.pt", f"teacher/member{k}.json")


def teacher_of(ctx: Context, manifests: dict[str, StageManifest], k: int = 0) -> Teacher:
    """Teacher ``k`` of the run (0: the primary), loaded once per process and checked against the data's class map."""
    sha = manifests["teacher"].sha256
    path = teacher_files(k)[0]

    def load():
        classes = dataset_classes(ctx.store, manifests["dataset"])
        return load_teacher(ctx.store.read_bytes(path), ctx.store.url(path), classes, ctx.cfg.input_format, ctx.device,
                            ctx.cfg.runtime)

    return ctx.cached(f"teacher:{sha}:{k}", load)


def teachers_of(ctx: Context, manifests: dict[str, StageManifest]) -> list[Teacher]:
    """Every teacher of the run: the primary, then ``teacher.ensemble``."""
    return [teacher_of(ctx, manifests, k) for k in range(len(ctx.cfg.teacher_models))]


def label_model(ctx: Context, manifests: dict[str, StageManifest]) -> nn.Module:
    """The network that gives soft labels and online-KD targets: the primary teacher, or with
    ``labels.ensemble`` every teacher combined (:class:`Ensemble`)."""
    if not ctx.cfg.labels.ensemble:
        return teacher_of(ctx, manifests).model
    return Ensemble([t.model for t in teachers_of(ctx, manifests)], ctx.cfg.labels.logit_norm)


def read_external(uri: str, storage_options: dict) -> bytes:
    try:
        with fsspec.open(uri, "rb", **(fs_options(uri, storage_options) if "://" in uri else {})) as f:
            return f.read()
    except FileNotFoundError:
        raise CheckpointError(f"teacher checkpoint not found: {uri} (teacher.checkpoint)") from None
    except OSError as e:
        raise CheckpointError(f"cannot read teacher checkpoint {uri}: {e}") from None


def check_teacher_checkpoint(cfg: RunConfig, classes: list[str]) -> None:
    """Fail early if ``teacher.checkpoint`` is missing, unreadable or for another class map."""
    if cfg.teacher.checkpoint:
        payload = read_checkpoint(read_external(cfg.teacher.checkpoint, cfg.store.storage_options), cfg.teacher.checkpoint)
        check_class_map(payload["classes"], classes, cfg.teacher.checkpoint)


def teacher_key(cfg: RunConfig, source: DataSource, k: int) -> str:
    """What a trained teacher depends on: data, recipe, backbone, seed, and the training code."""
    recipe = json.loads(cfg.section_json("teacher"))["teacher"]
    for field in ("ensemble", "checkpoint", "min_val_accuracy", "model"):
        recipe.pop(field)
    payload = {
        "data": source.fingerprint, "dataset": json.loads(cfg.section_json("dataset")), "recipe": recipe,
        "model": cfg.teacher_models[k].model_dump(mode="json"), "member": k, "seed": cfg.seed,
    }
    return shared_key(payload, code=run_teacher)


def run_teacher(ctx: Context, shard: Shard, inputs) -> list[FileRecord]:
    """Teacher ``shard.teacher``: loaded from ``teacher.checkpoint`` (primary only) or trained, shared across runs."""
    cfg, src, store = ctx.cfg, ctx.source, ctx.store
    k, fmt = shard.teacher, cfg.input_format
    spec = cfg.teacher_models[k]
    classes = dataset_classes(store, inputs["dataset"])
    test_batch = cfg.evaluation.test_batch_size
    if k == 0 and cfg.teacher.checkpoint:
        data = read_external(cfg.teacher.checkpoint, cfg.store.storage_options)
        teacher = load_teacher(data, cfg.teacher.checkpoint, classes, fmt, ctx.device, cfg.runtime)
        acc, origin = measure(teacher.model, fmt, src, ctx.device, cfg.runtime, test_batch), cfg.teacher.checkpoint
    else:
        def train() -> dict[str, bytes]:
            model = train_teacher(cfg.teacher, spec, fmt, src, cfg.seed, ctx.device, cfg.runtime,
                                  progress.stepper("teacher", shard.id, every=10), k)
            acc = measure(model, fmt, src, ctx.device, cfg.runtime, test_batch)
            return {"teacher.pt": checkpoint_bytes(model, fmt, src, spec, acc)}

        data = shared_outputs(cfg, "teachers", teacher_key(cfg, src, k), train)["teacher.pt"]
        acc, origin = read_checkpoint(data, "teacher.pt")["val_accuracy"], "trained"
    if acc is not None and acc < cfg.teacher.min_val_accuracy:
        raise TeacherError(
            f"teacher {spec.name} validation accuracy {acc:.4f} is below teacher.min_val_accuracy="
            f"{cfg.teacher.min_val_accuracy}"
        )
    metrics = {"val_accuracy": None if acc is None else round(acc, 6), "origin": origin,
               "val_images": len(src.val) if src.val is not None else 0, "model": spec.name}
    ckpt, metrics_path = teacher_files(k)
    return [
        store.write_bytes(ckpt, data),
        store.write_bytes(metrics_path, json.dumps(metrics, indent=1, sort_keys=True).encode()),
    ]


def _teacher_shards(ctx: Context, num_classes: int) -> list[Shard]:
    return [Shard(id="teacher" if k == 0 else f"member{k}-{spec.name}", teacher=k)
            for k, spec in enumerate(ctx.cfg.teacher_models)]


TEACHER = Stage("teacher", ("dataset",), ("dataset", "teacher"), _teacher_shards, run_teacher,
                doc="train (or load) and measure each teacher (shared across runs in the store's shared/teachers)")
