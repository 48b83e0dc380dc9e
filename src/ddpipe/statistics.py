"""Global statistics of the real data as a teacher sees it (the recovery methods' targets).

For every ``nn.Conv2d`` of a teacher, at its *input* (G-VBSM Sec. 3.3, Eq. 9):

- channel mean and variance over (batch, height, width);
- patch mean and variance: the input is resized (bilinear) up to multiples of ``P`` on both sides and cut
  into a grid of P x P patches; each patch position gets one mean and one variance over (batch, channel,
  P, P);

plus every ``nn.BatchNorm2d``'s running mean and variance, read from the teacher.

Collection is sharded over the training images. Within a shard every batch adds its count, sum and sum of
squares (float32 per batch, accumulated in float64; a variance far smaller than the squared mean, such as a
near-constant background patch, keeps about 4 significant digits); the shard keeps, per statistic, the
count, the mean and the sum of squared deviations (float64). :func:`merge` joins shards with Chan et al.'s
pairwise formula, so the merged variance is the pooled variance of all images (not a mean of batch
variances, as the G-VBSM reference code computes it) and equals a single pass over all images up to float
rounding.
"""

from __future__ import annotations

import io
import math
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ddpipe.data import Split, normalize
from ddpipe.train import batch_to

STATISTICS_FORMAT = "ddpipe-statistics/1"


def conv_layers(model: nn.Module) -> list[tuple[str, nn.Conv2d]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]


def bn_layers(model: nn.Module) -> list[tuple[str, nn.BatchNorm2d]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)]


def patch_grid(x: torch.Tensor, patch: int) -> torch.Tensor:
    """``x`` [B, C, H, W] resized up to multiples of ``patch`` and viewed as [B, C, U, P, V, P]."""
    b, c, h, w = x.shape
    hh, ww = math.ceil(h / patch) * patch, math.ceil(w / patch) * patch
    if (hh, ww) != (h, w):
        x = F.interpolate(x, size=(hh, ww), mode="bilinear", align_corners=False)
    return x.reshape(b, c, hh // patch, patch, ww // patch, patch)


def channel_moments(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel (mean, variance) over batch and positions (population variance)."""
    var, mean = torch.var_mean(x, dim=(0, 2, 3), correction=0)
    return mean, var


def patch_moments(x: torch.Tensor, patch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-patch-position (mean, variance) over batch, channels and the patch's pixels, flattened row-major."""
    var, mean = torch.var_mean(patch_grid(x, patch), dim=(0, 1, 3, 5), correction=0)
    return mean.flatten(), var.flatten()


class Moments:
    """Count, mean and sum of squared deviations of many values at once, merged exactly (float64)."""

    def __init__(self, n: float = 0.0, mean: torch.Tensor | None = None, m2: torch.Tensor | None = None):
        self.n, self.mean, self.m2 = n, mean, m2

    def merge(self, other: "Moments") -> None:
        if other.n == 0:
            return
        if self.n == 0:
            self.n, self.mean, self.m2 = other.n, other.mean.clone(), other.m2.clone()
            return
        n = self.n + other.n
        delta = other.mean - self.mean
        self.mean = self.mean + delta * (other.n / n)
        self.m2 = self.m2 + other.m2 + delta * delta * (self.n * other.n / n)
        self.n = n

    @property
    def var(self) -> torch.Tensor:
        return self.m2 / self.n

    def state(self) -> dict:
        return {"n": torch.tensor(self.n, dtype=torch.float64), "mean": self.mean, "m2": self.m2}

    @classmethod
    def from_state(cls, state: dict) -> "Moments":
        return cls(float(state["n"]), state["mean"], state["m2"])


def batch_sums(x: torch.Tensor, patch: int) -> tuple[tuple, tuple]:
    """(count, sum, sum of squares) per channel and per patch position of one batch. Float32 reductions over the
    leading dimensions of contiguous memory (several times faster than ``var_mean`` over strided ones)."""
    b, c, h, w = x.shape
    xx = x * x
    channel = (b * h * w, x.sum((0, 2, 3)), xx.sum((0, 2, 3)))
    if h % patch or w % patch:  # resize up to multiples of the patch first
        g = patch_grid(x, patch)
        h, w = g.shape[2] * patch, g.shape[4] * patch
        x = g.reshape(b, c, h, w)
        xx = x * x
    blocks = (h // patch, patch, w // patch, patch)
    s1 = x.sum((0, 1)).view(blocks).sum((1, 3)).flatten()
    s2 = xx.sum((0, 1)).view(blocks).sum((1, 3)).flatten()
    return channel, (b * c * patch * patch, s1, s2)


class ConvInputRecorder:
    """Forward pre-hooks on every conv input that add the batch's per-channel and per-patch count, sum and sum of
    squares (accumulated in float64); :meth:`moments` turns them into :class:`Moments`."""

    def __init__(self, model: nn.Module, patch: int):
        self.patch = patch
        self.sums: dict[str, dict[str, list]] = {}
        self.handles = [m.register_forward_pre_hook(self._hook(name)) for name, m in conv_layers(model)]

    def _hook(self, name: str):
        def hook(module, inputs):
            slot = self.sums.setdefault(name, {"channel": [0.0, 0.0, 0.0], "patch": [0.0, 0.0, 0.0]})
            for kind, (n, s1, s2) in zip(("channel", "patch"), batch_sums(inputs[0].float(), self.patch)):
                acc = slot[kind]
                acc[0] += n
                acc[1] = acc[1] + s1.double()
                acc[2] = acc[2] + s2.double()

        return hook

    def moments(self) -> dict[str, dict[str, "Moments"]]:
        out = {}
        for name, kinds in self.sums.items():
            out[name] = {}
            for kind, (n, s1, s2) in kinds.items():
                mean = (s1 / n).cpu()
                out[name][kind] = Moments(n, mean, (s2.cpu() - s1.cpu() * mean).clamp_min(0.0))
        return out

    def close(self) -> None:
        for h in self.handles:
            h.remove()


@torch.no_grad()
def collect(model: nn.Module, split: Split, indices: np.ndarray, patch: int, batch_size: int, mean, std, device,
            runtime, progress: Callable[[int, int], None] | None = None) -> dict[str, dict[str, Moments]]:
    """One no-grad pass of ``model`` over ``split[indices]``: the moments at every conv input."""
    model.eval()
    recorder = ConvInputRecorder(model, patch)
    try:
        total, done = len(indices), 0
        for images, _ in split.batches(indices, batch_size, runtime.loader_workers):
            model(batch_to(normalize(images, mean, std), device, runtime))
            done += len(images)
            if progress:
                progress(done, total)
    finally:
        recorder.close()
    return recorder.moments()


def merge(parts: list[dict[str, dict[str, Moments]]]) -> dict[str, dict[str, Moments]]:
    """Join shards' moments (in the given order) into the moments of all their images."""
    out: dict[str, dict[str, Moments]] = {}
    for part in parts:
        for layer, kinds in part.items():
            slot = out.setdefault(layer, {k: Moments() for k in kinds})
            for kind, m in kinds.items():
                slot[kind].merge(m)
    return out


def moments_bytes(moments: dict[str, dict[str, Moments]]) -> bytes:
    """A shard's partial moments, serialised (float64)."""
    state = {layer: {kind: m.state() for kind, m in kinds.items()} for layer, kinds in moments.items()}
    return statistics_bytes({"format": STATISTICS_FORMAT + "+moments", "moments": state})


def read_moments(data: bytes) -> dict[str, dict[str, Moments]]:
    payload = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    return {layer: {kind: Moments.from_state(s) for kind, s in kinds.items()} for layer, kinds in payload["moments"].items()}


def global_statistics(model: nn.Module, moments: dict[str, dict[str, Moments]], patch: int) -> dict:
    """The statistics file's content: conv-input channel/patch mean and variance, BN running statistics."""
    conv = {}
    for layer, _ in conv_layers(model):
        if layer in moments:
            m = moments[layer]
            conv[layer] = {
                "channel_mean": m["channel"].mean.float(), "channel_var": m["channel"].var.float(),
                "patch_mean": m["patch"].mean.float(), "patch_var": m["patch"].var.float(),
                "count": torch.tensor(m["channel"].n),  # values per channel (images x positions)
            }
    bn = {name: {"mean": m.running_mean.detach().float().cpu().clone(), "var": m.running_var.detach().float().cpu().clone()}
          for name, m in bn_layers(model)}
    return {"format": STATISTICS_FORMAT, "patch_size": patch, "conv": conv, "bn": bn}


def statistics_bytes(stats: dict) -> bytes:
    buf = io.BytesIO()
    torch.save(stats, buf)
    return buf.getvalue()


def read_statistics(data: bytes) -> dict:
    payload = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    if payload.get("format") != STATISTICS_FORMAT:
        raise ValueError(f"not a {STATISTICS_FORMAT} file")
    return payload
