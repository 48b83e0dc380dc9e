"""Training helpers shared by the teacher and the students: device, optimiser, schedule, accuracy."""

from __future__ import annotations

import contextlib
import math
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ddpipe.config import AugmentConfig, OptimConfig, RuntimeConfig
from ddpipe.data import Split, normalize
from ddpipe.errors import ConfigError


def resolve_device(spec: str) -> torch.device:
    """``auto`` picks cuda, then mps, then cpu; anything else is passed to torch.device."""
    if spec == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if _mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    device = torch.device(spec)
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ConfigError(f"runtime.device={spec}: torch sees no CUDA device on this machine (use auto or cpu)")
        if device.index is not None and device.index >= count:
            raise ConfigError(f"runtime.device={spec}: this machine has {count} CUDA device(s)")
    if device.type == "mps" and not _mps_available():
        raise ConfigError(f"runtime.device={spec}: MPS is not available on this machine (use auto or cpu)")
    return device


def _mps_available() -> bool:
    return getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()


def apply_threads(runtime: RuntimeConfig) -> None:
    if runtime.num_threads:
        torch.set_num_threads(runtime.num_threads)


def to_device(model: nn.Module, device: torch.device, runtime: RuntimeConfig) -> nn.Module:
    model = model.to(device)
    if runtime.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def maybe_compile(model: nn.Module, runtime: RuntimeConfig) -> nn.Module:
    """``torch.compile(model)`` when ``runtime.compile`` (eager fallback on compiler errors); else the model."""
    if not runtime.compile:
        return model
    import logging

    import torch._dynamo

    torch._dynamo.config.suppress_errors = True
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)  # "no CUDA runtime" on CPU hosts
    return torch.compile(model)


def batch_to(x: torch.Tensor, device: torch.device, runtime: RuntimeConfig) -> torch.Tensor:
    x = x.to(device, non_blocking=True)
    if runtime.channels_last and x.dim() == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    return x


def autocast(device: torch.device, runtime: RuntimeConfig):
    """bfloat16 autocast on CUDA when ``runtime.amp``; a no-op elsewhere (CPU results stay exact)."""
    if runtime.amp and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    """Weight decay on weights of conv/linear layers only, not on norm parameters and biases."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.momentum, 0.999))


def lr_factor(cfg: OptimConfig, total_steps: int):
    """Multiplier of the peak learning rate at each step (for LambdaLR)."""
    warm = int(cfg.warmup_fraction * total_steps)

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        if cfg.schedule == "constant":
            return 1.0
        if cfg.schedule == "step":
            return 1.0 if step < total_steps // 2 + 1 else 0.1
        t = (step - warm) / max(1, total_steps - warm)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, t) / cfg.cosine_period))

    return factor


class Fitter:
    """Optimiser + schedule + one ``step(loss)``; the caller computes the loss."""

    def __init__(self, model: nn.Module, cfg: OptimConfig, total_steps: int):
        self.model = model
        self.opt = build_optimizer(model, cfg)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lr_factor(cfg, total_steps))

    def step(self, loss: torch.Tensor) -> None:
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        self.sched.step()


def fit_classifier(model: nn.Module, split: Split, indices: np.ndarray, *, batch_size: int, optim: OptimConfig,
                   augment: AugmentConfig, label_smoothing: float, total_steps: int, gen: torch.Generator, mean, std,
                   device, runtime: RuntimeConfig, on_step: Callable[[int], None] | None = None) -> nn.Module:
    """Train ``model`` (already on ``device``) with cross-entropy on ``split[indices]`` for ``total_steps``
    steps, reshuffling every pass; ``on_step(step)`` runs after each step (the model is back in train mode
    after it). The teacher and the training-dynamics proxies both train here."""
    from ddpipe.augment import Augmenter

    aug = Augmenter(augment, gen)
    fitter = Fitter(model, optim, total_steps)
    model.train()
    net = maybe_compile(model, runtime)
    step = 0
    indices = np.asarray(indices)
    while step < total_steps:
        order = indices[torch.randperm(len(indices), generator=gen).numpy()]
        order = order[: (total_steps - step) * batch_size]  # the last pass ends with the steps: its loader finishes
        for images, labels in split.batches(order, batch_size, runtime, device):
            x = batch_to(aug.views(normalize(images, mean, std)), device, runtime)
            y = labels.to(device)
            x, perm, lam = aug.mix(x)
            with autocast(device, runtime):
                logits = net(x).float()
            loss = lam * F.cross_entropy(logits, y, label_smoothing=label_smoothing)
            if lam < 1.0:
                loss = loss + (1 - lam) * F.cross_entropy(logits, y[perm.to(device)], label_smoothing=label_smoothing)
            fitter.step(loss)
            step += 1
            if on_step:
                on_step(step)
                model.train()
            if step >= total_steps:
                break
    return model.eval()


@torch.no_grad()
def predict_logits(model: nn.Module, x: torch.Tensor, batch_size: int, device, runtime) -> torch.Tensor:
    """Logits (float32, on CPU) for normalised inputs ``x``, in batches."""
    model.eval()
    out = []
    for s in range(0, len(x), batch_size):
        with autocast(device, runtime):
            out.append(model(batch_to(x[s : s + batch_size], device, runtime)).float().cpu())
    return torch.cat(out) if out else torch.empty(0)


@torch.no_grad()
def last_linear(model: nn.Module) -> str | None:
    """The name of ``model``'s last ``nn.Linear`` (its classifier; its input is the penultimate features)."""
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    return names[-1] if names else None


def penultimate_features(model: nn.Module, split: Split, indices, mean, std, device, runtime: RuntimeConfig,
                         batch_size: int = 1000) -> torch.Tensor:
    """The input of ``model``'s last ``nn.Linear`` (its penultimate features, float32 on CPU) for every image
    of ``split[indices]``."""
    name = last_linear(model)
    if name is None:
        raise ValueError(f"{model.__class__.__name__} has no linear layer to take penultimate features from")
    seen: list[torch.Tensor] = []
    handle = model.get_submodule(name).register_forward_pre_hook(lambda mod, inputs: seen.append(inputs[0].detach().float().cpu()))
    model.eval()
    try:
        for images, _ in split.batches(np.asarray(indices), batch_size, runtime, device):
            with autocast(device, runtime):
                model(batch_to(normalize(images, mean, std), device, runtime))
    finally:
        handle.remove()
    return torch.cat(seen).flatten(1) if seen else torch.empty(0)


@torch.no_grad()
def accuracy(model: nn.Module, split: Split, mean, std, device, runtime: RuntimeConfig, batch_size=1000) -> float:
    """Top-1 accuracy on a whole split."""
    model.eval()
    correct = 0
    for images, labels in split.batches(np.arange(len(split)), batch_size, runtime, device):
        with autocast(device, runtime):
            logits = model(batch_to(normalize(images, mean, std), device, runtime))
        correct += int((logits.argmax(1).cpu() == labels).sum())
    return correct / max(1, len(split))
