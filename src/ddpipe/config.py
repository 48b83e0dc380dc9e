"""Run configuration: pydantic models for a whole ddpipe run, loaded from YAML.

A config is one YAML file (see ``configs/``) validated by :class:`RunConfig`.
Every field has a description; ``docs/config.md`` is generated from them
(``python -m ddpipe.config`` prints it). Overrides use dotted keys,
``method.ipc=50`` or ``evaluation.seeds=[0,1]``; the value is parsed as YAML. A file may start from
others with ``base: other.yaml`` or ``base: [a.yaml, b.yaml]`` (paths relative to it), deep-merged in order
with its own keys last (``configs/base/`` holds the shared parts of the presets).

The run folder is ``<store.uri>/<name>-<hash>``, where the hash covers every
section that changes results (all but ``store``, ``orchestration`` and
``runtime``), so re-running the same config resumes in the same folder.
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args

import yaml
from pydantic import (
    BaseModel, ConfigDict, Field, ValidationError, field_validator, model_serializer, model_validator,
)

from ddpipe.errors import ConfigError
from ddpipe.formats import KINDS as SOURCE_KINDS
from ddpipe.methods import METHODS
from ddpipe.models import ModelSpec

METHOD_NAMES = tuple(METHODS)  # the registry is the only list of method names (ModelSpec: ddpipe.models)

# Sections that do not change what a run computes; left out of the run hash.
NON_RESULT_SECTIONS = ("store", "orchestration", "runtime")
_SECRETS = {"dataset": {"storage_options"}}  # fields that never enter a hash (credentials, endpoints)


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


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
    cosine_period: float = Field(
        1.0, ge=1, description="cosine only: the cosine spans this many times the run, so the rate ends at "
        "(1 + cos(pi / period)) / 2 of the peak: 1 decays to 0; EDC's smoothed schedule uses 2 (ends at half)."
    )


class _HidesCredentials(_Section):
    """A section with ``storage_options``: every JSON dump (config.yaml, the Prefect flow run's parameters, a
    deployment's) shows each credential in them as "***"; a "***" loaded back is dropped. Keys the filesystem does
    not take are refused where it can tell (local, memory and S3: :func:`ddpipe.store.unknown_storage_options`)."""

    def _check_storage_options(self, uri: str | None, field: str):
        from ddpipe.store import unknown_storage_options

        unknown, known = unknown_storage_options(uri or "", self.storage_options)
        if unknown:
            kind = uri.split("://", 1)[0] if uri and "://" in uri else "local"
            raise ValueError(f"{field} has key '{unknown[0]}', which the {kind} filesystem does not take (it takes: "
                             f"{', '.join(known)})")
        return self

    @field_validator("storage_options", mode="before", check_fields=False)
    @classmethod
    def _credentials_from_environment(cls, v):
        return _unredacted(v)

    @model_serializer(mode="wrap", when_used="json")
    def _hide_credentials(self, dump):
        data = dump(self)
        if data.get("storage_options"):
            data["storage_options"] = _redacted(data["storage_options"])
        return data


DsaOp = Literal["color", "crop", "cutout", "flip", "scale", "rotate"]
DSA_OPS: tuple[str, ...] = get_args(DsaOp)


class AugmentConfig(_Section):
    """Batched, seeded augmentation applied to every training batch."""

    crop_scale: tuple[float, float] | None = Field(
        None, description="RandomResizedCrop area range, e.g. [0.5, 1.0]; null for no crop."
    )
    flip: bool = Field(False, description="Random horizontal flip with probability 0.5.")
    cutmix: float = Field(0.0, ge=0, le=1, description="Probability of CutMix (Beta(1,1), one box per batch).")
    mixup: float = Field(
        0.0, ge=0, le=1, description="Probability of MixUp (a batch that was not CutMix-ed), lam ~ Beta(alpha, alpha)."
    )
    mixup_alpha: float = Field(0.8, gt=0, description="MixUp's alpha (SRe2L/CDA evaluation: 0.8).")
    dsa: bool = Field(
        False, description="DSA (DC/DSA evaluation, mode S): one of dsa_ops per batch with per-image parameters, "
        "after the crop and flip above."
    )
    dsa_ops: tuple[DsaOp, ...] = Field(
        DSA_OPS, min_length=1, description="The ops DSA draws from; dataset.flip false leaves out flip."
    )

    @field_validator("crop_scale")
    @classmethod
    def _scale_range(cls, v):
        if v is not None and not (0 < v[0] <= v[1] <= 1):
            raise ValueError("crop_scale must satisfy 0 < low <= high <= 1")
        return v


class DatasetConfig(_HidesCredentials):
    """Where the real images come from."""

    kind: Literal[("fashion-mnist", *SOURCE_KINDS)] = Field(
        "fashion-mnist",
        description="fashion-mnist: the four IDX files; image-folder: <root>/<split>/<class>/*.{jpg,jpeg,png} "
        "(the ImageNet-1K / ImageNet-21K-P layout); webdataset: <root>/<split>/*.tar with <key>.jpg and "
        "<key>.cls (or .json 'label') members; parquet: <root>/<split>/*.parquet with an image column and a label "
        "column (the Hugging Face layout). webdataset/parquet class names: <root>/classes.txt, or the Parquet "
        "files' ClassLabel metadata.",
    )
    root: str | None = Field(
        None,
        description="Where the data is. fashion-mnist: the folder of the IDX files (default: "
        "/usr/share/datasets/fashion-mnist, then ./data/FashionMNIST/raw); otherwise the local path or fsspec URL "
        "(s3://bucket/prefix, memory://...) holding the split folders.",
    )
    storage_options: dict[str, Any] | None = Field(
        None, description="fsspec options of dataset.root (endpoint, credentials); null: store.storage_options. "
        "Never part of a hash.",
    )
    image_column: str = Field("image", description="parquet: the image column (binary, or struct<bytes, path>).")
    label_column: str = Field("label", description="parquet: the integer label column.")
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
    val_fraction: float = Field(
        0.1, ge=0, lt=1, description="The validation split: this fraction of each class's training images (rounded, "
        "at least 1 where the class has 2 or more), drawn by a fixed seeded permutation and held out of every stage "
        "that trains or selects. The teacher gate and any choice of settings read it; the test split is read only "
        "by the final evaluation. 0: no validation split.",
    )
    val_per_class: int | None = Field(
        None, ge=0, description="The validation split as a count per class instead of val_fraction (at most all but "
        "one of a class's training images).",
    )
    flip: bool = Field(
        True, description="Mirrored images keep their class. false (digits, text, ...): no stage flips images; the "
        "teacher, student and recovery flips default to off, and turning one on is refused.",
    )

    @model_validator(mode="after")
    def _known_storage_options(self):
        return self._check_storage_options(self.root, "dataset.storage_options")


class TeacherConfig(_Section):
    """The teacher ("squeeze" stage): trained here, or loaded from a checkpoint."""

    model: ModelSpec = Field(
        default_factory=lambda: ModelSpec(width=64, norm="batch"), description="Teacher architecture."
    )
    ensemble: tuple[ModelSpec, ...] = Field(
        (), description="More backbones trained with the same recipe, each its own shard (G-VBSM's backbone "
        "matching and ensemble soft labels use them); the primary teacher is always `model`."
    )
    checkpoint: str | None = Field(
        None,
        description="Path or URI of a ddpipe teacher checkpoint to use instead of training the primary teacher. "
        "Its class map must equal the dataset's.",
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
        0.0, ge=0, le=1, description="Refuse to distill with a teacher whose accuracy on the validation split "
        "(dataset.val_fraction) is lower."
    )


class CurriculumConfig(_Section):
    """CDA's curriculum on RandomResizedCrop's lower scale bound (Yin & Shen, Algorithm 1)."""

    scheduler: Literal["step", "linear", "cosine"] = Field(
        "cosine", description="step: beta_u until the milestone; linear: beta_l + gamma (beta_u - s/T); cosine: "
        "beta_l + gamma (beta_u + cos(pi s/T)) / 2; beta_l after the milestone."
    )
    milestone: float = Field(1.0, ge=0, le=1, description="T as a fraction of the iterations (CDA README: 1.0).")
    beta_l: float = Field(0.08, gt=0, le=1, description="Default lower bound of the crop scale.")
    beta_u: float = Field(1.0, gt=0, le=1, description="Upper bound of the crop scale.")
    gamma: float = Field(0.92, ge=0, le=1, description="Decay of the lower bound.")

    @model_validator(mode="after")
    def _bounds(self):
        start = {"step": self.beta_u, "linear": self.beta_l + self.gamma * self.beta_u,
                 "cosine": self.beta_l + self.gamma * (self.beta_u + 1) / 2}[self.scheduler]
        if self.beta_l > self.beta_u or start > self.beta_u + 1e-9:
            raise ValueError(f"the {self.scheduler} curriculum starts at a lower bound of {start:.3f}, above beta_u "
                             f"({self.beta_u}); lower gamma or beta_l")
        return self


class RecoveryConfig(_Section):
    """Recovering images from noise against the teachers' statistics (SRe2L, CDA, G-VBSM)."""

    iterations: int = Field(1000, ge=1, description="Optimisation steps per batch.")
    lr: float = Field(0.25, gt=0, description="Adam learning rate on the pixels (cosine schedule to 0).")
    betas: tuple[float, float] = Field((0.5, 0.9), description="Adam betas.")
    r_bn: float = Field(0.01, ge=0, description="Weight of the statistic-matching loss (BN; G-VBSM: BN plus conv).")
    first_multiplier: float = Field(10.0, ge=0, description="Extra weight of the first matched layer.")
    crop_scale: tuple[float, float] = Field(
        (0.08, 1.0), description="RandomResizedCrop area range per step (CDA: the curriculum moves the lower bound)."
    )
    crop: Literal["batch", "sample"] = Field(
        "batch", description="batch: one crop and flip for the whole batch (reference code); sample: one per image."
    )
    flip: bool = Field(True, description="Random horizontal flip per step.")
    jitter: int = Field(4, ge=0, description="Random cyclic shift (pixels, both axes) per step.")
    classes_per_batch: int = Field(10, ge=1, description="Classes optimised together (SRe2L: 100 on ImageNet).")
    ipc_per_shard: int = Field(
        10, ge=1, description="Images per class in one shard. SRe2L/CDA optimise one batch per ipc index (distinct "
        "classes); G-VBSM optimises the shard's classes x ipc images as one class-major batch."
    )
    curriculum: CurriculumConfig = Field(default_factory=CurriculumConfig, description="CDA only: the crop curriculum.")
    ema_alpha: float = Field(0.8, ge=0, lt=1, description="G-VBSM: alpha of the EMA form of the matching losses (Eq. 6).")
    drop_rate: float = Field(0.4, ge=0, lt=1, description="G-VBSM: probability beta_dr of skipping a conv layer's match (Eq. 10).")
    dd_weight: float = Field(1.0, ge=0, description="G-VBSM: weight of the data densification loss (Eq. 5).")
    dd_tau: float = Field(4.0, gt=0, description="G-VBSM: temperature of the DD loss's target spectrum.")
    dd_pool: int | None = Field(
        None, ge=1, description="G-VBSM: side the batch is average-pooled to before the Gram matrix (reference: 32); "
        "null keeps the image size."
    )


class RefineConfig(_Section):
    """refine: real starting images optimised against the teachers and kept near their start (CIM, FADRM, EDC;
    docs/refine.md gives each field's paper and equation). The optimiser, its step count, crops, flip, jitter and
    batching are method.recovery's (for refine its iterations default to 200 and its lr to 0.05); r_bn there
    weighs the global statistic match."""

    init: Literal["rded", "random"] = Field(
        "rded", description="Start: rded (RDED's top-ranked patches, stitched as RDED does) or random (the "
        "scoring stage's random candidates in draw order, stitched the same way)."
    )
    param: Literal["residual", "pixels"] = Field(
        "residual", description="What is optimised: residual (x = x0 + d, d = bound/std x tanh(r) when bound > 0, "
        "CIM/FADRM) or pixels (x itself, projected back into the bound after every step, EDC)."
    )
    bound: float = Field(0.0, ge=0, le=1, description="Largest change of a pixel from its start, in [0, 1] units; 0: none.")
    anchor_weight: float = Field(0.0, ge=0, description="Weight of mean((x - x0)^2), a pull towards the start.")
    mix: float = Field(0.0, ge=0, lt=1, description="FADRM's data-level residual: the share of the start mixed "
                       "back in every mix_every steps (x <- mix x0 + (1 - mix) x).")
    mix_every: int = Field(0, ge=0, description="Steps between FADRM mixes; 0: never.")
    ce_weight: float = Field(1.0, ge=0, description="Weight of the teacher's cross-entropy on the image's class.")
    class_bn_weight: float = Field(
        0.0, ge=0, description="EDC's category-aware match: weight of each class's BN-input mean/variance against "
        "its real anchors' (added to the global match, weighted by method.recovery.r_bn)."
    )
    conv_statistics: bool = Field(
        False, description="Also match G-VBSM's conv channel/patch statistics (the moments stage, EMA form, "
        "method.recovery.ema_alpha and drop_rate)."
    )
    feature_weight: float = Field(
        0.0, ge=0, description="CIM's feature match: weight of the mean squared difference between each class's "
        "mean feature and its real anchors' mean over multi-crop views."
    )
    feature_layers: Literal["last", "all"] = Field(
        "last", description="Features matched: last (the classifier's input) or all (every BN input, pooled)."
    )
    anchors_per_class: int = Field(64, ge=1, description="Real anchor images per class (category-aware and feature terms).")
    anchor_views: int = Field(4, ge=1, description="Random-resized crops of every anchor the targets average over.")
    views: int = Field(1, ge=1, description="Augmented views of every image per step (CIM's multi-crop).")
    teachers: Literal["primary", "all"] = Field(
        "primary", description="primary, or all (primary + teacher.ensemble, one per step, round robin, G-VBSM)."
    )

    @model_validator(mode="after")
    def _mixing(self):
        if (self.mix > 0) != (self.mix_every > 0):
            raise ValueError("mix and mix_every are set together (FADRM's residual needs both)")
        return self


class SelectionConfig(_Section):
    """Coreset selection of real images (herding, kcenter, el2n, forgetting, cad) and CA2D's candidate pool.

    herding and kcenter work on the primary teacher's penultimate features of each class's images. el2n,
    forgetting, cad and ca2d read training dynamics: ``seeds`` proxy models trained on the full training set
    with the teacher's recipe, every training sample recorded (EL2N, correct or not) at ``checkpoints``
    evenly spaced steps."""

    proxy: ModelSpec | None = Field(None, description="Architecture of the dynamics proxies (default: the teacher's).")
    steps: int | Literal["matched"] = Field(
        "matched", description="Training steps of each proxy. matched: the samples the downstream students see "
        "(evaluation steps x student batch) divided by the proxy batch size, CAD-Prune's compute-matched budget "
        "(under an epoch at small ipc)."
    )
    batch_size: int = Field(256, ge=1, description="Proxy training batch size.")
    checkpoints: int = Field(8, ge=2, description="K: checkpoints per proxy run, evenly spaced, the last at the end.")
    seeds: int = Field(1, ge=1, description="Proxy runs (different seeds); scores are averaged over them.")
    window: int = Field(6, ge=2, description="cad: J, checkpoints per sliding window (paper, ImageNet-1K: 6).")
    last: int = Field(2, ge=1, description="cad: W, how many of the last windows are averaged (paper: 2).")
    el2n_checkpoint: int = Field(
        1, ge=1, description="el2n: which checkpoint (1 = the first) gives the score, 'early in training'."
    )
    keep: Literal["largest", "smallest"] = Field(
        "largest", description="el2n, forgetting, cad: keep the samples with the largest (hardest) or smallest scores; ca2d: the "
        "candidate pool's end."
    )

    @model_validator(mode="after")
    def _windows(self):
        if self.window > self.checkpoints:
            raise ValueError(f"window ({self.window}) must not exceed checkpoints ({self.checkpoints})")
        if self.last > self.checkpoints - self.window + 1:
            raise ValueError(f"last ({self.last}) exceeds the {self.checkpoints - self.window + 1} windows of "
                             f"{self.window} among {self.checkpoints} checkpoints")
        if self.el2n_checkpoint > self.checkpoints:
            raise ValueError(f"el2n_checkpoint ({self.el2n_checkpoint}) exceeds checkpoints ({self.checkpoints})")
        return self


class DiffusionConfig(_Section):
    """diffusion: a class-conditional UViT denoiser trained on the training split, then sampled with DPM-Solver
    per class until ``images_per_class`` or ``time_budget_s``; the generated pool is reduced to ``ipc`` per
    class by ``select``. Defaults fit 28 px images on a CPU (docs/diffusion.md)."""

    space: Literal["pixel", "latent"] = Field(
        "pixel", description="pixel: diffuse the images themselves (small images); latent: the latents of "
        "``autoencoder`` (large images)."
    )
    autoencoder: str | None = Field(
        None, description="latent: a diffusers AutoencoderKL (local folder or hub id) whose scaled latents are diffused."
    )
    patch_size: int = Field(4, ge=1, description="UViT patch side (in pixels, or latent cells).")
    dim: int = Field(256, ge=8, description="UViT token width.")
    depth: int = Field(9, ge=1, description="UViT blocks: (depth-1)/2 in, one middle, (depth-1)/2 out with long skips; odd.")
    heads: int = Field(4, ge=1, description="Attention heads.")
    mlp_ratio: float = Field(4.0, gt=0, description="MLP hidden width / token width.")
    timesteps: int = Field(1000, ge=2, description="Diffusion timesteps of the forward process.")
    beta_schedule: Literal["linear", "scaled_linear", "squaredcos_cap_v2"] = Field(
        "linear", description="diffusers beta schedule (linear: DDPM's 1e-4..0.02)."
    )
    prediction: Literal["v_prediction", "epsilon", "sample"] = Field(
        "v_prediction", description="What the denoiser predicts: v_prediction (sqrt(a) eps - sqrt(1-a) x0; keeps "
        "the class in the loss at high noise, where epsilon lets a small model ignore it), epsilon (DDPM's noise) "
        "or sample (x0)."
    )
    steps: int = Field(20000, ge=1, description="Training steps.")
    batch_size: int = Field(128, ge=1, description="Training batch size.")
    lr: float = Field(2e-4, gt=0, description="AdamW learning rate (paper: 2e-4, betas 0.99/0.999).")
    weight_decay: float = Field(0.03, ge=0, description="AdamW weight decay (paper: 0.03).")
    momentum: float = Field(0.99, ge=0, lt=1, description="AdamW beta1 (paper: 0.99; 0.9 learns faster in a short run).")
    warmup_steps: int = Field(500, ge=0, description="Linear learning-rate warm-up steps.")
    ema_decay: float = Field(0.999, ge=0, lt=1, description="Decay of the weights' moving average that sampling uses.")
    class_dropout: float = Field(0.1, ge=0, lt=1, description="Probability a training label is replaced by the null "
                                 "class (classifier-free guidance).")
    checkpoint_every: int = Field(500, ge=1, description="Steps between training checkpoints in the store (resume point).")
    sampler_steps: int = Field(50, ge=1, description="DPM-Solver steps per sample (paper: 50).")
    guidance: float = Field(2.0, ge=0, description="Classifier-free guidance scale: 1 conditional only, >1 stronger "
                            "class signal (two model calls per step).")
    guidance_interval: tuple[float, float] | None = Field(
        None, description="Guide only the sampler steps whose noise level sigma = sqrt((1 - alpha_bar) / alpha_bar) "
        "lies in [low, high] (Kynkaanniemi et al. 2024: guidance at high noise costs variety, at low noise it does "
        "little); the other steps are conditional only, one model call. null: guide every step."
    )
    images_per_class: int = Field(100, ge=1, description="Images generated per class (the pool ``select`` picks from).")
    time_budget_s: float | None = Field(
        None, gt=0, description="Wall-clock seconds of sampling for the whole run (each class-group shard gets its "
        "classes' share); generation stops at the budget or images_per_class, whichever comes first."
    )
    sample_batch_size: int = Field(50, ge=1, description="Images per class sampled in one batch.")
    select: Literal["random", "realism", "diversity"] = Field(
        "realism", description="How the pool is reduced to ipc per class: random (seeded), realism (lowest teacher "
        "cross-entropy, RDED's score) or diversity (k-center greedy on teacher features)."
    )
    reference_images: int = Field(
        10000, ge=2, description="Real test images whose teacher features the Frechet distance compares against."
    )

    @field_validator("guidance_interval")
    @classmethod
    def _interval(cls, v):
        if v is not None and not (0 <= v[0] < v[1]):
            raise ValueError("guidance_interval must satisfy 0 <= low < high")
        return v


class MethodConfig(_Section):
    """The distillation method and its settings.

    rded: Sun et al. CVPR'24, Algorithm 1 (scoring + stitching). sre2l, cda, gvbsm: recovery from noise against
    the teachers' statistics (the ``recovery`` sub-section). random, herding, kcenter, el2n, forgetting, cad:
    coreset selections of whole real images (the ``selection`` sub-section; cad is CAD-Prune). ca2d: RDED with
    the candidate pool chosen by CAD-Prune instead of at random. diffusion: images sampled from a class-conditional
    denoiser trained on the data (the ``diffusion`` sub-section). refine: RDED's start optimised against the
    teachers (the ``refine`` sub-section, with ``recovery``'s optimiser)."""

    name: Literal[METHOD_NAMES] = Field(
        "rded", description="Distillation method: " + "; ".join(f"{n}: {m.summary}" for n, m in METHODS.items()) + "."
    )
    ipc: int = Field(10, ge=1, description="Images per class in the distilled set.")
    candidates_per_class: int = Field(
        300, ge=1, description="|T'_c|: images drawn at random per class before scoring (paper: 300). Default: "
        "3 x ipc where crop_scale's default scores whole images, else 300."
    )
    crops_per_image: int = Field(
        5, ge=1, description="K: random-resized crops scored per candidate image (paper: 5). Default: 1 where "
        "crop_scale's default scores whole images, else 5."
    )
    factor: int | None = Field(
        None,
        ge=1,
        description="Patches per side of a distilled image (N = factor^2). Default: 1 for images <= 64 px, else 2.",
    )
    crop_scale: tuple[float, float] = Field(
        (0.08, 1.0), description="Area range of the scored random-resized crops (square crops, as the reference code). "
        "Default: [1, 1] (whole images, as the Fashion-MNIST presets found) at factor 1 on images of 64 px or less; "
        "else [0.08, 1], ImageNet's setting for patches stitched into 224 px images."
    )
    patch_view: Literal["pad", "resize"] = Field(
        "pad", description="How the teacher sees a patch smaller than its input when scoring: pad (zero-padded, "
        "centred, as the reference code) or resize (upsampled to the input size)."
    )
    batch_size: int = Field(512, ge=1, description="Teacher batch size while scoring crops.")
    recovery: RecoveryConfig = Field(default_factory=RecoveryConfig, description="sre2l, cda, gvbsm: recovery settings.")
    selection: SelectionConfig = Field(
        default_factory=SelectionConfig, description="Coreset selections and ca2d: proxies, checkpoints, CAD windows."
    )
    diffusion: DiffusionConfig = Field(
        default_factory=DiffusionConfig, description="diffusion: the denoiser, its training, sampling and selection."
    )
    refine: RefineConfig = Field(
        default_factory=RefineConfig, description="refine: the start, what is optimised, the losses, the teachers."
    )

    @property
    def recovers(self) -> bool:
        """True for the methods that recover images from noise against BatchNorm statistics (the registry's entry)."""
        return METHODS[self.name].recovers

    @property
    def stitches(self) -> bool:
        """True for the methods that score crops and stitch them (the registry's entry): factor and candidates apply."""
        return METHODS[self.name].stitches


class StatisticsConfig(_Section):
    """Global statistics of the real data seen by each teacher (recovery methods)."""

    patch_size: int = Field(
        4, ge=1, description="P of G-VBSM Eq. 9: conv inputs are resized up to multiples of P and cut into PxP patches "
        "(CIFAR/Tiny: 4, ImageNet: 16)."
    )
    images_per_shard: int = Field(10000, ge=1, description="Training images per statistics shard.")
    batch_size: int = Field(500, ge=1, description="Teacher batch size while collecting.")


class LabelsConfig(_Section):
    """Soft labels: the teacher's softened output for every region of every distilled image."""

    temperature: float = Field(20.0, gt=0, description="Softmax temperature of stored labels, and of the KL in training.")
    top_k: int | None = Field(
        None, ge=1, description="Store only the k largest probabilities per label (the rest is spread evenly when read); "
        "null stores all classes."
    )
    dtype: Literal["float16", "float32"] = Field("float16", description="Storage type of the probabilities.")
    crops: int = Field(
        0, ge=0, description="Random-resized crops labelled per image besides its regions (FKD/LPLD crop labels; "
        "boxes drawn from the run seed, class and image). The soft regime then shows, for each sample, one of the "
        "image's stored labels: its crop (or region) with that label."
    )
    crop_scale: tuple[float, float] = Field((0.5, 1.0), description="Area range of the labelled crops.")
    keep: float = Field(
        1.0, gt=0, le=1, description="LPLD's label pruning: the share of each image's stored labels (regions and "
        "crops) kept, drawn at random (at least one per image); the soft regime draws from the kept ones."
    )
    batch_size: int = Field(256, ge=1, description="Teacher batch size while labelling.")
    ensemble: bool = Field(
        False, description="Label with every teacher (primary + teacher.ensemble) combined, also for online KD; "
        "false uses the primary teacher."
    )
    logit_norm: bool = Field(
        True, description="Ensemble only: rescale each teacher's logits to the batch's mean Frobenius norm before "
        "averaging (G-VBSM Eq. 8); false averages raw logits."
    )


class EvaluationConfig(_Section):
    """Training students from scratch on the distilled set and on a random subset of the same size."""

    model: ModelSpec = Field(default_factory=ModelSpec, description="Student architecture (default ConvNet-3, width 128).")
    cross_models: tuple[ModelSpec, ...] = Field(
        (), description="More student architectures (cross-architecture evaluation), each trained with the same "
        "recipe on both sets; reported per architecture next to the main student."
    )
    regimes: tuple[Literal["hard", "soft", "soft_kd"], ...] = Field(
        ("hard", "soft", "soft_kd"),
        description="hard: cross-entropy on class labels; soft: KL to the stored soft labels; soft_kd: KL to the "
        "teacher's output on every augmented view.",
    )
    seeds: tuple[int, ...] = Field((0, 1, 2), min_length=1, description="One student per seed; mean and std reported. "
                                   "Distinct: a seed listed twice trains the same student twice.")
    full: bool = Field(
        False, description="Also train the main student on the whole training split with hard labels, with the "
        "same batch size and step budget as on the ipc sets (matched compute): the reference of hard-label "
        "recovery (HLR) and the label-robust score. The split is held in memory (fashion-mnist only)."
    )
    baseline: bool = Field(
        True, description="Also train students on the random subset (the baseline). Off when the same baseline "
        "was already measured (same data, teacher, labels, ipc and students): halves the evaluation time.",
    )
    baseline_draws: int = Field(
        3, ge=1, description="Independent random subsets per IPC, each evaluated with the same students and seeds "
        "as the distilled set; with 2 or more, the unit of the random side of every comparison is a subset (its mean "
        "over the seeds), so the verdict's interval carries the subset-to-subset spread (with 1 it does not). Draw 0 "
        "holds the images of the 'random' selection method.",
    )
    epochs: int = Field(300, ge=1, description="Passes over the distilled set (same step count for the random subset).")
    steps: int | None = Field(
        None, ge=1, description="A fixed budget of student steps (batches), the same for every set and method; "
        "overrides epochs when set."
    )
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
    loss: Literal["kl", "mse_gt"] = Field(
        "kl", description="Soft regimes: kl (KL to the soft labels with temperature) or mse_gt (G-VBSM: MSE between "
        "student and teacher logits, centred per row, + gt_weight x cross-entropy on the class labels)."
    )
    gt_weight: float = Field(0.15, ge=0, description="mse_gt only: gamma, the weight of the cross-entropy term.")
    ema: float = Field(
        0.0, ge=0, lt=1, description="EDC: measure an exponential moving average of the student's weights with this "
        "decay per step (running statistics too) instead of the student itself; 0: off. Applies to every set alike (the "
        "distilled set, the random subsets, the full set)."
    )
    test_batch_size: int = Field(1000, ge=1, description="Batch size for test accuracy.")

    @field_validator("seeds")
    @classmethod
    def _distinct_seeds(cls, v):
        twice = sorted({s for s in v if v.count(s) > 1})
        if twice:
            raise ValueError(f"seed {twice[0]} is listed twice: the same student would count twice in the mean and "
                             "its spread (list distinct seeds)")
        return v


class StoreConfig(_HidesCredentials):
    """Where run folders are written: any fsspec URI."""

    uri: str = Field("./runs", description="Local path, s3://bucket/prefix, or memory://... (tests).")
    storage_options: dict[str, Any] = Field(
        default_factory=dict,
        description="fsspec options, e.g. {client_kwargs: {endpoint_url: ...}, key: ..., secret: ...}. Empty: the "
        "standard AWS environment variables and files apply.",
    )
    lock_ttl_s: float = Field(
        120.0, gt=0, description="S3 stores: a run's lease on its run folder (and on a shared output it computes) is "
        "renewed every lock_ttl_s/4 seconds; one not renewed for lock_ttl_s is stale and another run may take it "
        "over. Local stores need none (the lock ends with its process).",
    )

    @model_validator(mode="after")
    def _known_storage_options(self):
        return self._check_storage_options(self.uri, "store.storage_options")


class OrchestrationConfig(_Section):
    """How the work is split and run; never changes the results."""

    classes_per_shard: int = Field(
        5, ge=1, description="Classes per shard of the per-class stages (grown when a stage would exceed "
        "max_shards_per_stage)."
    )
    max_shards_per_stage: int = Field(
        200, ge=1, description="Most shards of one stage: class groups, recovery batches and statistics image ranges "
        "grow to fit, so a run at 10,450 classes stays at a few hundred task runs per stage."
    )
    task_retries: int = Field(
        2, ge=0, description="Prefect engine: times a failed shard or index task is retried (after "
        "retry_delay_s seconds) when the failure may be transient (network, store); bad input is not retried. "
        "Each S3 request is retried first by the client (botocore standard mode, 10 attempts).",
    )
    retry_delay_s: float = Field(5.0, ge=0, description="Prefect engine: seconds before a task retry.")
    max_workers: int = Field(
        1, ge=1, description="Shards run at once. 1 runs them in the flow's own thread; more uses the task runner "
        "(local: threads; on CPU each brings its own torch thread pool, so keep 1 unless the work is I/O-bound or "
        "on GPU). dask/ray: the workers of the local cluster started when address is null."
    )
    task_runner: Literal["local", "dask", "ray"] = Field(
        "local", description="Where shards run: local (threads of the flow's process), dask (prefect-dask) or ray "
        "(prefect-ray). Never changes the results."
    )
    address: str | None = Field(
        None, description="dask/ray: address of an existing cluster (tcp://host:8786, ray://host:10001, auto); "
        "null starts a local cluster of max_workers workers."
    )
    gpus_per_shard: float = Field(
        0.0, ge=0, description="dask/ray: GPUs each shard task asks the cluster for (a Dask resource 'GPU', Ray "
        "num_gpus); 0 asks for none."
    )


class RuntimeConfig(_Section):
    """Devices and numeric settings; never part of the run hash."""

    device: str = Field("auto", pattern=r"^(auto|cpu|mps|cuda(:[0-9]+)?)$",
                        description="auto (cuda, then mps, then cpu), cpu, cuda, cuda:N or mps.")
    amp: bool = Field(False, description="Mixed precision (bfloat16 autocast) on CUDA; ignored on CPU.")
    channels_last: bool = Field(False, description="Use the channels_last memory format for the networks.")
    compile: bool = Field(
        False, description="torch.compile the networks that train and the teacher in online KD (needs a C++ "
        "compiler on CPU; falls back to eager on errors)."
    )
    num_threads: int | None = Field(None, ge=1, description="torch CPU threads (default: torch's choice).")
    loader_workers: int = Field(
        0, ge=0, description="Worker processes decoding images for every stage that reads them (0: the stage's own "
        "process). Fashion-MNIST is in memory and needs none."
    )
    prefetch: int = Field(2, ge=1, description="Batches each loader worker decodes ahead of the stage.")
    gpu_decode: bool = Field(
        False, description="Decode JPEGs on the CUDA device in batches (torchvision's nvJPEG); needs a cuda "
        "device. The CPU path is the default."
    )
    index_threads: int = Field(8, ge=1, description="Threads listing and indexing a source's shards.")


@dataclass(frozen=True)
class InputFormat:
    """What the networks of a run see: square images of ``size`` px with ``channels`` channels, normalised
    per channel by ``mean`` and ``std`` (on [0, 1] pixels)."""

    size: int
    channels: int
    mean: tuple[float, ...]
    std: tuple[float, ...]


class RunConfig(_Section):
    """A whole ddpipe run."""

    name: str = Field(..., pattern=r"^[a-z0-9][a-z0-9._-]*$", description="Run name; the run folder is <name>-<hash>.")
    seed: int = Field(0, description="Seed of every random choice; same config and seed give the same outputs on CPU.")
    dataset: DatasetConfig = Field(default_factory=DatasetConfig, description="Real data.")
    teacher: TeacherConfig = Field(default_factory=TeacherConfig, description="Teacher (observer) model.")
    method: MethodConfig = Field(default_factory=MethodConfig, description="Distillation method.")
    statistics: StatisticsConfig = Field(default_factory=StatisticsConfig, description="Global statistics (recovery methods).")
    labels: LabelsConfig = Field(default_factory=LabelsConfig, description="Soft labels.")
    evaluation: EvaluationConfig = Field(default_factory=EvaluationConfig, description="Student evaluation.")
    store: StoreConfig = Field(default_factory=StoreConfig, description="Output store.")
    orchestration: OrchestrationConfig = Field(default_factory=OrchestrationConfig, description="Sharding.")
    runtime: RuntimeConfig = Field(default_factory=RuntimeConfig, description="Device and threads.")

    @model_validator(mode="before")
    @classmethod
    def _data_defaults(cls, data):
        """The defaults that depend on the data, filled in where the config leaves them out, before validation
        (so that every stage, and the run hash, sees the values used)."""
        if not isinstance(data, dict):
            return data
        return _flip_defaults(_refine_defaults(_crop_defaults(data)))

    @model_validator(mode="after")
    def _consistent(self):
        d = self.dataset
        if d.kind != "fashion-mnist" and d.image_size is None:
            raise ValueError(f"dataset.image_size is required for {d.kind} datasets")
        if d.kind == "fashion-mnist" and d.image_size not in (None, 28):
            raise ValueError("dataset.image_size must be 28 for fashion-mnist")
        for field in ("mean", "std"):
            values = getattr(d, field)
            if values is not None and len(values) != self.channels:
                raise ValueError(f"dataset.{field} has {len(values)} values for {self.channels} channel(s)")
            if field == "std" and values is not None and min(values) <= 0:
                raise ValueError("dataset.std must be positive")
        if self.method.factor is not None and self.method.factor > self.image_size:
            raise ValueError("method.factor cannot exceed the image size")
        need = self.patches_per_class
        if self.method.factor is not None and self.method.factor > 1 and not self.method.stitches:
            raise ValueError(f"method.factor applies to rded, ca2d and refine only (method.name={self.method.name})")
        if self.method.recovers:
            for k, spec in enumerate(self.teacher_models):
                if spec.name == "convnet" and spec.norm != "batch":
                    where = "teacher.model" if k == 0 else f"teacher.ensemble[{k - 1}]"
                    raise ValueError(f"method {self.method.name} matches BatchNorm statistics: {where} needs norm: batch")
        if self.evaluation.full and d.kind != "fashion-mnist":
            raise ValueError("evaluation.full holds the whole training split in memory: fashion-mnist only for now")
        if self.teacher.min_val_accuracy > 0 and not self.has_val_split:
            raise ValueError("teacher.min_val_accuracy needs a validation split: dataset.val_fraction (or "
                             "val_per_class) is 0")
        if self.labels.ensemble and not self.teacher.ensemble:
            raise ValueError("labels.ensemble needs at least one backbone in teacher.ensemble")
        if self.method.stitches and self.method.candidates_per_class < need:
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
    def has_val_split(self) -> bool:
        d = self.dataset
        return (d.val_per_class or 0) > 0 if d.val_per_class is not None else d.val_fraction > 0

    def val_count(self, n: int) -> int:
        """How many of a class's ``n`` training images the validation split holds (at least 1 where n >= 2)."""
        d = self.dataset
        want = d.val_per_class if d.val_per_class is not None else round(d.val_fraction * n)
        if not self.has_val_split or n < 2:
            return 0
        return min(n - 1, max(1, want))

    @property
    def input_format(self) -> InputFormat:
        return InputFormat(self.image_size, self.channels, *self.normalization)

    @property
    def factor(self) -> int:
        if not self.method.stitches:
            return 1
        return self.method.factor or (1 if self.image_size <= 64 else 2)

    @property
    def teacher_models(self) -> tuple[ModelSpec, ...]:
        """Every teacher backbone: the primary (index 0), then ``teacher.ensemble``."""
        return (self.teacher.model, *self.teacher.ensemble)

    @property
    def patches_per_class(self) -> int:
        """Patches RDED selects per class, factor^2 x ipc, each cut from a distinct source image: also the
        training images every class must have (the random subset's ipc images are no more)."""
        return self.factor**2 * self.method.ipc

    def student_batch_size(self, n: int) -> int:
        """Batch size of a student trained on a set of ``n`` images."""
        if self.evaluation.batch_size:
            return min(self.evaluation.batch_size, n)
        ipc = self.method.ipc
        return min(n, 10 if ipc == 1 else 50 if ipc <= 10 else 100)

    def student_steps(self, n: int) -> int:
        """Training steps of a student on ``n`` images: ``evaluation.steps`` when set (a budget matched across
        sets and methods), else ``evaluation.epochs`` passes."""
        if self.evaluation.steps:
            return self.evaluation.steps
        return self.evaluation.epochs * math.ceil(n / self.student_batch_size(n))

    def hash(self) -> str:
        """Hash of everything that changes the results (all sections but store, orchestration, runtime)."""
        data = self.model_dump(mode="json", exclude={**{s: True for s in NON_RESULT_SECTIONS}, **_SECRETS})
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()

    @property
    def run_name(self) -> str:
        return f"{self.name}-{self.hash()[:10]}"

    def section_json(self, *sections: str) -> str:
        """Canonical JSON of some sections, for cache keys."""
        data = self.model_dump(mode="json", include=set(sections), exclude=_SECRETS)
        return json.dumps(data, sort_keys=True)

    def to_yaml(self) -> str:
        """The config as YAML (what the run folder's config.yaml holds). Like every JSON dump of the config (the
        Prefect flow run's parameters, a deployment's), it has each credential in the storage options replaced
        by "***"; loaded again, a "***" is dropped, so the environment's credentials apply."""
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


WHOLE_IMAGE_MAX_SIZE = 64  # at factor 1, RDED scores whole images of this size or less by default
WHOLE_IMAGE_POOL = 3  # ... from 3 x ipc random candidates per class


def _crop_defaults(data: dict) -> dict:
    """method.crop_scale and crops_per_image where absent: whole images (one crop each) at factor 1 on images of
    WHOLE_IMAGE_MAX_SIZE px or less, where a random crop of a small image is a fragment the teacher scores as
    "realistic" (the stroke of a 1); ImageNet's (0.08, 1) and 5 crops otherwise."""
    dataset, method = data.get("dataset") or {}, data.get("method") or {}
    if not isinstance(dataset, dict) or not isinstance(method, dict):
        return data
    entry = METHODS.get(method.get("name", "rded")) if isinstance(method.get("name", "rded"), str) else None
    if entry is None or not entry.stitches:
        return data  # the settings of scoring crops; an unknown name is named by field validation
    size = dataset.get("image_size") or (28 if dataset.get("kind", "fashion-mnist") == "fashion-mnist" else None)
    factor = method.get("factor")
    if not isinstance(size, int) or not (factor is None or isinstance(factor, int)):
        return data  # field validation names the problem
    factor = factor or (1 if size <= WHOLE_IMAGE_MAX_SIZE else 2)
    whole = factor == 1 and size <= WHOLE_IMAGE_MAX_SIZE
    method = dict(method)
    if method.get("crop_scale") is None:
        method["crop_scale"] = [1.0, 1.0] if whole else [0.08, 1.0]
        if method.get("crops_per_image") is None:
            method["crops_per_image"] = 1 if whole else 5
        ipc = method.get("ipc", 10)
        if whole and method.get("candidates_per_class") is None and isinstance(ipc, int) and ipc > 0:
            # Whole images ranked by the teacher: from a pool of the whole class the top ipc are its easiest,
            # most prototypical images (4.8 points below random on a 150-per-class folder); from 3 x ipc random
            # candidates the ranking only filters (level), docs/benchmarks.md "Reliability".
            method["candidates_per_class"] = WHOLE_IMAGE_POOL * ipc
    return {**data, "method": method}


REFINE_OPTIMISER = {"iterations": 40, "lr": 0.05}  # refine's method.recovery defaults: from a real start, not noise


def _refine_defaults(data: dict) -> dict:
    """method.recovery.iterations and lr where absent, for a method that starts from real images (its registry
    entry's variant says so): 40 steps at 0.05, not the 1000 at 0.25 that recovery from noise needs (which
    would wash the start out and take 25x as long). 40 was chosen on Fashion-MNIST's validation split against 80
    and 200 steps: as accurate, and the cheapest (benchmarks/refine_schedule.py)."""
    method = data.get("method") or {}
    if not isinstance(method, dict) or not isinstance(method.get("name", "rded"), str):
        return data
    entry = METHODS.get(method.get("name", "rded"))
    if entry is None or not getattr(entry.variant, "refine", False):
        return data
    recovery = method.get("recovery") or {}
    if not isinstance(recovery, dict):
        return data
    return {**data, "method": {**method, "recovery": {**REFINE_OPTIMISER, **recovery}}}


# Where a run flips images: (section, field) paths of the flip switches and the default of the section they sit in.
_FLIPS = (("teacher", "augment"), ("evaluation", "augment"), ("method", "recovery"))


def _flip_defaults(data: dict) -> dict:
    """With dataset.flip false, every flip switch defaults to off and an explicit ``flip: true`` is refused."""
    dataset = data.get("dataset") or {}
    if not isinstance(dataset, dict) or dataset.get("flip") is not False:
        return data
    data = dict(data)
    for outer, inner in _FLIPS:
        section = data.get(outer) or {}
        if not isinstance(section, dict):
            return data  # field validation names the problem
        owner = {"teacher": TeacherConfig, "evaluation": EvaluationConfig, "method": MethodConfig}[outer]
        sub = section.get(inner)
        if isinstance(sub, dict) and sub.get("flip") is True:
            raise ValueError(f"{outer}.{inner}.flip is true but dataset.flip is false (mirroring changes the class)")
        if isinstance(sub, dict) and isinstance(sub.get("dsa_ops"), (list, tuple)) and "flip" in sub["dsa_ops"]:
            raise ValueError(f"{outer}.{inner}.dsa_ops has flip but dataset.flip is false (mirroring changes the class)")
        if sub is None:  # the section's own default (a factory may differ from the class defaults)
            sub = owner.model_fields[inner].get_default(call_default_factory=True).model_dump(mode="json")
        if not isinstance(sub, dict):
            return data
        sub = {**sub, "flip": False}
        if "dsa_ops" in getattr(owner.model_fields[inner].annotation, "model_fields", {}) and "dsa_ops" not in sub:
            sub["dsa_ops"] = [op for op in DSA_OPS if op != "flip"]
        data[outer] = {**section, inner: sub}
    return data


_CREDENTIAL = ("key", "secret", "token", "password", "credential", "auth")
REDACTED = "***"


def _redacted(options):
    """Storage options with the value of every credential-like key ("key", "secret", "token", ...) replaced."""
    if isinstance(options, dict):
        return {k: REDACTED if any(w in str(k).lower() for w in _CREDENTIAL) and not isinstance(v, (dict, list))
                else _redacted(v) for k, v in options.items()}
    if isinstance(options, list):
        return [_redacted(v) for v in options]
    return options


def _unredacted(options):
    """Storage options without the "***" placeholders of :func:`_redacted` (a config dumped as JSON and loaded
    again takes its credentials from the environment)."""
    if isinstance(options, dict):
        return {k: _unredacted(v) for k, v in options.items() if v != REDACTED}
    if isinstance(options, list):
        return [_unredacted(v) for v in options]
    return options


def _one_line(text: str) -> str:
    return " ".join(text.split())


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
    parts = key.strip().split(".")
    if not key.strip():
        raise ConfigError(f"override '{assignment}' has an empty key")
    if not all(p.strip() for p in parts):
        raise ConfigError(f"override '{assignment}': the key '{key.strip()}' has an empty part")
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


def _merge(base: dict, top: dict) -> dict:
    out = dict(base)
    for k, v in top.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> dict:
    """A config file as a mapping. ``base: a.yaml`` or ``base: [a.yaml, b.yaml]`` (paths relative to the file) are
    read first and deep-merged in order, the file's own keys last."""
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    if path.resolve() in seen:
        raise ConfigError(f"config file {path} includes itself through 'base'")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError:
        raise ConfigError(f"config file {path} is not UTF-8 text") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path} is not valid YAML: {_one_line(str(e))}") from None
    except OSError as e:
        raise ConfigError(f"cannot read config file {path}: {e.strerror or e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping at the top level")
    base = data.pop("base", None)
    if base is None:
        return data
    bases = [base] if isinstance(base, str) else base
    if not isinstance(bases, list) or not all(isinstance(b, str) for b in bases):
        raise ConfigError(f"config file {path}: 'base' must be a file name or a list of file names")
    merged: dict = {}
    for b in bases:
        merged = _merge(merged, _read_yaml(path.parent / b, (*seen, path.resolve())))
    return _merge(merged, data)


def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Load a YAML config file (with its ``base`` chain) and apply dotted-key overrides."""
    return build_config(_read_yaml(Path(path)), overrides)


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
