"""Global statistics of the real data as a teacher sees it (the recovery methods' targets).

For every ``nn.Conv2d`` of a teacher, at its *input* (G-VBSM Sec. 3.3, Eq. 9):

- channel mean and variance over (batch, height, width);
- patch mean and variance: the input is resized (bilinear) up to multiples of ``P`` on both sides and cut
  into a grid of P x P patches; each patch position gets one mean and one variance over (batch, channel,
  P, P);

plus every ``nn.BatchNorm2d``'s running mean and variance, read from the teacher.

Collection is sharded over the training images. Within a shard every batch adds its count, sum and sum of
squares (float32 products, float64 sums; a variance far smaller than the squared mean, such as a
near-constant background patch, keeps about 4 significant digits); the shard keeps, per statistic, the
count, the mean and the sum of squared deviations (float64). :func:`merge` joins shards with Chan et al.'s
pairwise formula, so the merged variance is the pooled variance of all images (not a mean of batch
variances, as the G-VBSM reference code computes it) and equals a single pass over all images up to float
rounding.

The stages: ``moments`` (methods whose :class:`~ddpipe.methods.Recovery` variant matches conv statistics: a
shard per teacher x image range, ``statistics/moments/<shard>.pt``, shared across runs in
``<store>/shared/moments/``) and ``statistics`` (a shard per matched teacher, ``statistics/teacherK.pt``:
the moments merged, plus the BN running statistics).
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ddpipe import progress
from ddpipe.config import RunConfig
from ddpipe.data import Split, normalize
from ddpipe.errors import CheckpointError
from ddpipe.manifests import stage_files
from ddpipe.methods import METHODS
from ddpipe.pipeline import Context, Shard, Stage, grown, shared_key, shared_outputs
from ddpipe.store import FileRecord, torch_bytes, torch_object
from ddpipe.teacher import teacher_files, teacher_of
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
    """(count, sum, sum of squares) per channel and per patch position of one batch.

    The batch is reduced first, to per-(channel, pixel) float64 sums and sums of squares (:func:`_sums`);
    channel and patch sums are then sums of those small [C, H, W] tensors. A map that is not a multiple of the patch has the patch statistics of
    its bilinear resize (:func:`patch_grid`), computed in closed form when the map is small (see
    :func:`_resized_sums`) instead of resizing the batch."""
    b, c, h, w = x.shape
    s1, s2 = _sums(x)  # [C, H, W]
    channel = (b * h * w, s1.sum((1, 2)), s2.sum((1, 2)))
    hh, ww = math.ceil(h / patch) * patch, math.ceil(w / patch) * patch
    if (hh, ww) == (h, w):
        p1, p2 = s1.sum(0), s2.sum(0)
    elif h * w <= CLOSED_FORM_MAX_PIXELS:
        p1, p2 = _resized_sums(x, s1.sum(0), hh, ww)
    else:
        y = patch_grid(x, patch).reshape(b, c, hh, ww)
        p1, p2 = (t.sum(0) for t in _sums(y))
    blocks = (hh // patch, patch, ww // patch, patch)
    return channel, (b * c * patch * patch, p1.reshape(blocks).sum((1, 3)).flatten(), p2.reshape(blocks).sum((1, 3)).flatten())


def _sums(x: torch.Tensor, chunk_values: int = 1 << 18) -> tuple[torch.Tensor, torch.Tensor]:
    """``x.sum(0)`` and ``(x * x).sum(0)``, accumulated in float64, over ~1 MB chunks of the batch: the
    squares stay in cache and no float64 copy of the batch is made (several times faster on CPU than
    squaring or converting the whole batch; float32 sums of many equal background pixels drift)."""
    s1 = torch.zeros(x.shape[1:], dtype=torch.float64, device=x.device)
    s2 = torch.zeros_like(s1)
    for part in x.split(max(1, chunk_values // max(1, x[0].numel()))):
        s1 += part.sum(0, dtype=torch.float64)
        s2 += (part * part).sum(0, dtype=torch.float64)
    return s1, s2


CLOSED_FORM_MAX_PIXELS = 256  # maps up to 16 x 16: the Gram matrix below costs less than resizing the batch
GRAM_CHUNK_ROWS = 2048


def _resized_sums(x: torch.Tensor, pixel_sums: torch.Tensor, hh: int, ww: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-pixel sums over (batch, channel) of the bilinear resize of ``x`` to hh x ww, and of its square,
    without resizing: the resize is a linear map K [hh*ww, h*w] of each (image, channel) map z, so the sums
    are K (sum z) and diag(K G K^T) with G = sum z z^T, one [h*w, h*w] matrix product over the batch.
    ``pixel_sums`` is sum z, [H, W] (float64)."""
    b, c, h, w = x.shape
    k = _resize_matrix(h, w, hh, ww, x.device)
    z = x.reshape(b * c, h * w)
    gram = sum((part.t() @ part).double() for part in z.split(GRAM_CHUNK_ROWS))  # float32 products, float64 sum
    return (k @ pixel_sums.flatten()).view(hh, ww), ((k @ gram) * k).sum(1).view(hh, ww)


_RESIZE_MATRICES: dict = {}


def _resize_matrix(h: int, w: int, hh: int, ww: int, device) -> torch.Tensor:
    """The matrix (float64) of ``F.interpolate(size=(hh, ww), mode="bilinear", align_corners=False)`` on h x w
    maps."""
    key = (h, w, hh, ww, str(device))
    if key not in _RESIZE_MATRICES:
        basis = torch.eye(h * w, dtype=torch.float64).view(h * w, 1, h, w)
        k = F.interpolate(basis, size=(hh, ww), mode="bilinear", align_corners=False).view(h * w, hh * ww)
        _RESIZE_MATRICES[key] = k.t().contiguous().to(device)
    return _RESIZE_MATRICES[key]


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
                acc[1] = acc[1] + s1
                acc[2] = acc[2] + s2

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
        for images, _ in split.batches(indices, batch_size, runtime, device):
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
    return torch_bytes({"format": STATISTICS_FORMAT + "+moments", "moments": state})


def read_moments(data: bytes, name: str = "moments file") -> dict[str, dict[str, Moments]]:
    payload = torch_object(data, name)
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
    return torch_bytes(stats)


def read_statistics(data: bytes, name: str = "statistics file") -> dict:
    payload = torch_object(data, name)
    if not isinstance(payload, dict) or payload.get("format") != STATISTICS_FORMAT:
        raise CheckpointError(f"{name} is not a {STATISTICS_FORMAT} file")
    return payload


# ---------------------------------------------------------------- stages


def statistic_teachers(cfg: RunConfig) -> range:
    """The teachers a recovery method matches: every one with ``Recovery.all_teachers``, else the primary."""
    return range(len(cfg.teacher_models) if METHODS[cfg.method.name].variant_for(cfg.method).all_teachers else 1)


def _moment_shards(ctx: Context, num_classes: int) -> list[Shard]:
    n = len(ctx.source.train)
    step = grown(ctx.cfg.statistics.images_per_shard, n, ctx.cfg.orchestration.max_shards_per_stage)
    return [
        Shard(id=f"teacher{k}-images-{a:09d}-{min(a + step, n) - 1:09d}", teacher=k, images=(a, min(a + step, n)))
        for k in statistic_teachers(ctx.cfg) for a in range(0, n, step)
    ]


def _teacher_sha(ctx: Context, inputs, k: int) -> str:
    path = teacher_files(k)[0]
    return next(f.sha256 for f in stage_files(ctx.store, inputs["teacher"]) if f.path == path)


def run_moments(ctx: Context, shard: Shard, inputs) -> list[FileRecord]:
    """Moments at every conv input of teacher ``shard.teacher`` over a range of training images."""
    cfg = ctx.cfg
    st = cfg.statistics
    teacher = teacher_of(ctx, inputs, shard.teacher)
    a, b = shard.images
    key = shared_key({
        "teacher": _teacher_sha(ctx, inputs, shard.teacher), "data": ctx.source.train.fingerprint, "images": [a, b],
        "patch_size": st.patch_size, "batch_size": st.batch_size,
    }, code=run_moments)

    def compute() -> dict[str, bytes]:
        mean, std = cfg.normalization
        moments = collect(teacher.model, ctx.source.train, np.arange(a, b), st.patch_size, st.batch_size, mean, std,
                          ctx.device, cfg.runtime, progress.stepper("moments", shard.id, every=st.batch_size))
        return {"moments.pt": moments_bytes(moments)}

    data = shared_outputs(cfg, "moments", key, compute)["moments.pt"]
    return [ctx.store.write_bytes(f"statistics/moments/{shard.id}.pt", data)]


def _statistic_shards(ctx: Context, num_classes: int) -> list[Shard]:
    return [Shard(id=f"teacher{k}", teacher=k) for k in statistic_teachers(ctx.cfg)]


def run_statistics(ctx: Context, shard: Shard, inputs) -> list[FileRecord]:
    """Teacher ``shard.teacher``'s global statistics: its BN running statistics, and the conv-input statistics
    merged exactly from the moments shards when the method matches them."""
    k = shard.teacher
    teacher = teacher_of(ctx, inputs, k)
    moments = {}
    if METHODS[ctx.cfg.method.name].variant_for(ctx.cfg.method).conv_statistics:
        parts = [s for s in _moment_shards(ctx, 0) if s.teacher == k]
        moments = merge([read_moments(ctx.store.read_bytes(path), ctx.store.url(path))
                         for path in (f"statistics/moments/{s.id}.pt" for s in parts)])
    stats = global_statistics(teacher.model, moments, ctx.cfg.statistics.patch_size)
    return [ctx.store.write_bytes(f"statistics/teacher{k}.pt", statistics_bytes(stats))]


BN_STATISTICS = Stage("statistics", ("dataset", "teacher"), ("dataset", "method", "statistics"), _statistic_shards,
                      run_statistics, doc="the teacher's BatchNorm running statistics")
MOMENTS = Stage("moments", ("dataset", "teacher"), ("dataset", "statistics"), _moment_shards, run_moments,
                doc="one no-grad pass per teacher over the training images: moments at every conv input")
STATISTICS = Stage("statistics", ("dataset", "teacher", "moments"), ("dataset", "method", "statistics"),
                   _statistic_shards, run_statistics, doc="merge the moments exactly; add BN running statistics")
