"""Evaluation: train a student from scratch on a small image set and measure top-1 on the real test split.

Three label regimes (Dey et al. 2026, "Hard truths about soft labels"):

- ``hard``: cross-entropy on the images' class labels;
- ``soft``: KL divergence to the stored soft labels (temperature T);
- ``soft_kd``: KL divergence to the teacher's output on every augmented view, computed online
  (the RDED / SRe2L evaluation).

With ``evaluation.loss: mse_gt`` the soft regimes use G-VBSM's loss instead of the KL: MSE between the
student's and the teacher's logits + gamma x cross-entropy on the class labels.

For stitched images (factor > 1) each sample shows one of its regions resized to the input size, with
that region's stored label (RDED Eq. 10), unless ``evaluation.region_views`` is off. Every batch is then
augmented by :class:`~ddpipe.augment.Augmenter` (crop, flip, CutMix; labels mixed by
area). A set's accuracy is taken at the final step; the same recipe and step count are used for the
distilled set and for the random subset it is compared with.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ddpipe.augment import Augmenter, crop_resize, generator, seed_for
from ddpipe.config import ModelSpec, RunConfig
from ddpipe.data import DataSource, normalize
from ddpipe.models import init_model
from ddpipe.train import Fitter, accuracy, autocast, batch_to, maybe_compile, to_device

REGIMES = ("hard", "soft", "soft_kd")


@dataclass
class ImageSet:
    """A labelled image set held in memory: the distilled set or a random subset."""

    images: torch.Tensor  # uint8 [N, C, S, S]
    classes: torch.Tensor  # int64 [N]
    soft: torch.Tensor | None = None  # float32 [N, R, K] stored soft labels per region
    regions: list[tuple[int, int, int, int]] | None = None  # R region boxes (top, left, h, w)
    budget_images: int | None = None  # the set size that sets batch size and steps (full-set reference: the ipc set's)

    def __len__(self) -> int:
        return len(self.images)

    @property
    def budget(self) -> int:
        return self.budget_images or len(self.images)


def student_batch_size(cfg: RunConfig, n: int) -> int:
    if cfg.evaluation.batch_size:
        return min(cfg.evaluation.batch_size, n)
    ipc = cfg.method.ipc
    return min(n, 10 if ipc == 1 else 50 if ipc <= 10 else 100)


def student_steps(cfg: RunConfig, n: int) -> int:
    """Training steps of a student on ``n`` images: ``evaluation.steps`` when set (a budget matched across
    sets and methods), else ``evaluation.epochs`` passes."""
    if cfg.evaluation.steps:
        return cfg.evaluation.steps
    return cfg.evaluation.epochs * math.ceil(n / student_batch_size(cfg, n))


def sample_regions(data: ImageSet, n: int, region_views: bool, gen: torch.Generator) -> torch.Tensor:
    """Which region each of ``n`` samples shows: 0 (the whole image) unless the images are stitched and
    ``region_views`` is on, then one grid cell (1..f^2) uniformly at random."""
    cells = len(data.regions) - 1 if data.regions else 0
    if cells <= 0 or not region_views:
        return torch.zeros(n, dtype=torch.int64)
    return torch.randint(1, cells + 1, (n,), generator=gen)


def kl_loss(student_logits: torch.Tensor, target_probs: torch.Tensor, cfg: RunConfig) -> torch.Tensor:
    t = cfg.labels.temperature
    loss = F.kl_div(F.log_softmax(student_logits / t, dim=1), target_probs, reduction="batchmean")
    return loss * (t * t) if cfg.evaluation.temperature_squared else loss


def centred(z: torch.Tensor) -> torch.Tensor:
    return z - z.mean(dim=1, keepdim=True)


def mse_loss(student_logits: torch.Tensor, target_probs: torch.Tensor, cfg: RunConfig) -> torch.Tensor:
    """G-VBSM's logit MSE. The teacher's logits are recovered from its softened probabilities as T log p, which
    equals them up to a per-row shift; both sides are centred per row, so the shift does not matter."""
    target = cfg.labels.temperature * torch.log(target_probs.clamp_min(1e-12))
    return F.mse_loss(centred(student_logits), centred(target))


def class_ce(logits: torch.Tensor, y: torch.Tensor, perm: torch.Tensor, lam: float) -> torch.Tensor:
    """Cross-entropy on class labels, mixed by area when the batch was CutMix-ed."""
    loss = lam * F.cross_entropy(logits, y)
    if lam < 1.0:
        loss = loss + (1 - lam) * F.cross_entropy(logits, y[perm])
    return loss


def student_models(cfg: RunConfig) -> tuple[ModelSpec, ...]:
    """Every student architecture: ``evaluation.model`` (index 0), then ``evaluation.cross_models``."""
    return (cfg.evaluation.model, *cfg.evaluation.cross_models)


def train_student(cfg: RunConfig, regime: str, data: ImageSet, num_classes: int, seed: int, device,
                  teacher: nn.Module | None = None, progress: Callable[[int, int], None] | None = None,
                  student_index: int = 0) -> nn.Module:
    """Train a fresh student (architecture ``student_models(cfg)[student_index]``) on ``data`` under ``regime``;
    returns the model in eval mode."""
    if regime not in REGIMES:
        raise ValueError(f"unknown regime {regime!r}")
    if regime == "soft" and data.soft is None:
        raise ValueError("the soft regime needs stored soft labels")
    if regime == "soft_kd" and teacher is None:
        raise ValueError("the soft_kd regime needs the teacher")
    ev = cfg.evaluation
    mean, std = cfg.normalization
    spec = student_models(cfg)[student_index]
    stream = ("student", seed) if student_index == 0 else ("student", seed, f"model{student_index}")
    student = init_model(spec, cfg.channels, num_classes, cfg.image_size, seed_for(cfg.seed, *stream))
    student = to_device(student, device, cfg.runtime).train()
    net = maybe_compile(student, cfg.runtime)
    if teacher is not None:
        teacher = maybe_compile(teacher, cfg.runtime)
    gen = generator(cfg.seed, "student", regime, seed)
    aug = Augmenter(ev.augment, gen)
    n = len(data)
    bs = student_batch_size(cfg, data.budget)
    total = student_steps(cfg, data.budget)
    fitter = Fitter(student, ev.optim, total)
    size = data.images.shape[-1]
    region_boxes = torch.tensor(data.regions) if data.regions else None
    step = 0
    while step < total:
        order = torch.randperm(n, generator=gen)
        for s in range(0, n, bs):
            if step >= total:
                break
            idx = order[s : s + bs]
            x = data.images[idx].float()
            r = sample_regions(data, len(idx), ev.region_views, gen)
            if bool((r > 0).any()):  # show each sample's region at full size
                x = crop_resize(x, region_boxes[r], size)
            target = data.soft[idx, r] if regime == "soft" else None
            x = batch_to(aug.views(normalize(x / 255.0, mean, std)), device, cfg.runtime)
            x, perm, lam = aug.mix(x)
            perm = perm.to(device)
            with autocast(device, cfg.runtime):
                logits = net(x).float()
                if regime == "soft_kd":
                    with torch.no_grad():
                        target = F.softmax(teacher(x).float() / cfg.labels.temperature, dim=1)
            y = data.classes[idx].to(device)
            if regime == "hard":
                loss = class_ce(logits, y, perm, lam)
            else:
                target = target.to(device)
                if regime == "soft" and lam < 1.0:
                    target = lam * target + (1 - lam) * target[perm]
                if ev.loss == "kl":
                    loss = kl_loss(logits, target, cfg)
                else:
                    loss = mse_loss(logits, target, cfg) + ev.gt_weight * class_ce(logits, y, perm, lam)
            fitter.step(loss)
            step += 1
            if progress:
                progress(step, total)
    return student.eval()


def evaluate(cfg: RunConfig, regime: str, data: ImageSet, source: DataSource, seed: int, device,
             teacher: nn.Module | None = None, progress=None, student_index: int = 0) -> dict:
    """Train one student and return its final top-1 on the test split (plus the recipe's step count)."""
    student = train_student(cfg, regime, data, source.num_classes, seed, device, teacher, progress, student_index)
    mean, std = cfg.normalization
    top1 = accuracy(student, source.test, mean, std, device, cfg.runtime, cfg.evaluation.test_batch_size)
    bs = student_batch_size(cfg, data.budget)
    return {
        "regime": regime,
        "seed": seed,
        "model": student_models(cfg)[student_index].model_dump(mode="json"),
        "top1": round(top1, 6),
        "images": len(data),
        "batch_size": bs,
        "steps": student_steps(cfg, data.budget),
        "test_images": len(source.test),
    }


def summarize(values: list[float]) -> dict:
    arr = np.asarray(values, dtype=np.float64)
    return {
        "mean": float(arr.mean()) if len(arr) else None,
        "std": float(arr.std(ddof=1)) if len(arr) > 1 else 0.0,
        "values": [float(v) for v in arr],
    }
