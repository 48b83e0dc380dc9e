"""The teacher ("squeeze" stage): training, the checkpoint format and the class-map check.

A checkpoint is a ``torch.save``'d dict that carries everything needed to use the teacher safely: the
model spec, the weights, the class map (ordered class names), the input format (size, channels,
normalisation), the dataset fingerprint and the top-1 accuracy measured on the test split.
:func:`load_teacher` refuses a checkpoint whose class map differs from the data's: with a shifted class
order every label the teacher gives is wrong and distillation silently collapses.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from torch import nn

from ddpipe.augment import generator, seed_for
from ddpipe.config import ModelSpec, RunConfig
from ddpipe.data import DataSource
from ddpipe.errors import CheckpointError, ClassMapMismatchError
from ddpipe.models import build_model, init_model
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
    val_accuracy: float


def train_teacher(cfg: RunConfig, source: DataSource, device: torch.device,
                  progress: Callable[[int, int], None] | None = None, member: int = 0) -> nn.Module:
    """Train teacher ``member`` (0: ``teacher.model``, k: ``teacher.ensemble[k-1]``) on the whole training split
    with the configured recipe."""
    t = cfg.teacher
    split = source.train
    spec = cfg.teacher_models[member]
    stream = ("teacher",) if member == 0 else ("teacher", f"member{member}")
    model = init_model(spec, cfg.channels, source.num_classes, cfg.image_size, seed_for(cfg.seed, *stream, "init"))
    model = to_device(model, device, cfg.runtime)
    mean, std = cfg.normalization
    total = max(1, round(t.epochs * math.ceil(len(split) / t.batch_size)))
    return fit_classifier(
        model, split, np.arange(len(split)), batch_size=t.batch_size, optim=t.optim, augment=t.augment,
        label_smoothing=t.label_smoothing, total_steps=total, gen=generator(cfg.seed, *stream, "data"), mean=mean,
        std=std, device=device, runtime=cfg.runtime, on_step=(lambda step: progress(step, total)) if progress else None,
    )


def checkpoint_bytes(model: nn.Module, cfg: RunConfig, source: DataSource, spec: ModelSpec, val_accuracy: float) -> bytes:
    mean, std = cfg.normalization
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    payload = {
        "format": CHECKPOINT_FORMAT,
        "model": spec.model_dump(mode="json"),
        "state_dict": state,
        "classes": list(source.classes),
        "image_size": cfg.image_size,
        "channels": cfg.channels,
        "mean": list(mean),
        "std": list(std),
        "dataset_fingerprint": source.fingerprint,
        "val_accuracy": float(val_accuracy),
    }
    buf = io.BytesIO()
    torch.save(payload, buf)
    return buf.getvalue()


def read_checkpoint(data: bytes, name: str) -> dict:
    try:
        payload = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"teacher checkpoint {name} is not readable: {e.__class__.__name__}") from None
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"teacher checkpoint {name} is not a ddpipe teacher checkpoint ({CHECKPOINT_FORMAT})")
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


def load_teacher(data: bytes, name: str, data_classes: list[str], cfg: RunConfig, device: torch.device) -> Teacher:
    """Load a checkpoint, check its class map and input format against the data, and return the teacher."""
    payload = read_checkpoint(data, name)
    check_class_map(payload["classes"], data_classes, name)
    if payload["channels"] != cfg.channels or payload["image_size"] != cfg.image_size:
        raise CheckpointError(
            f"teacher checkpoint {name} expects {payload['channels']}x{payload['image_size']}px inputs, the config gives "
            f"{cfg.channels}x{cfg.image_size}px"
        )
    spec = ModelSpec.model_validate(payload["model"])
    model = build_model(spec, payload["channels"], len(payload["classes"]), payload["image_size"])
    try:
        model.load_state_dict(payload["state_dict"])
    except RuntimeError as e:
        raise CheckpointError(f"teacher checkpoint {name} does not match its model spec: {str(e).splitlines()[0]}") from None
    model = to_device(model, device, cfg.runtime).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return Teacher(model, spec, list(payload["classes"]), payload["image_size"], payload["channels"],
                   tuple(payload["mean"]), tuple(payload["std"]), float(payload["val_accuracy"]))


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


def measure(model: nn.Module, cfg: RunConfig, source: DataSource, device) -> float:
    mean, std = cfg.normalization
    return accuracy(model, source.test, mean, std, device, cfg.runtime, cfg.evaluation.test_batch_size)

