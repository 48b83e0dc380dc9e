"""Batched, seeded image operations shared by scoring, synthesis and training.

Every random choice draws from an explicit CPU ``torch.Generator`` (never the
global RNG), so results depend on the seed alone, also when the flow runs
shards in threads, and match between CPU and GPU runs up to float rounding.
Crops use ``torchvision.ops.roi_align``: one batched bilinear crop-and-resize
(area-averaged when shrinking) for many boxes at once, on any device.
"""

from __future__ import annotations

import hashlib
import math

import torch
from torchvision.ops import roi_align

from ddpipe.config import AugmentConfig


def seed_for(*parts) -> int:
    """A 63-bit seed derived from any printable parts (run seed, stage, class, ...)."""
    digest = hashlib.sha256("/".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def generator(*parts) -> torch.Generator:
    return torch.Generator().manual_seed(seed_for(*parts))


def sample_boxes(n: int, height: int, width: int, gen: torch.Generator, scale=(0.08, 1.0),
                 ratio=(3 / 4, 4 / 3), attempts: int = 10) -> torch.Tensor:
    """``n`` integer crop boxes ``[top, left, h, w]`` drawn as torchvision's RandomResizedCrop does.

    Each box tries ``attempts`` (area, aspect) draws and keeps the first that fits; if none fits it
    falls back to the largest centred crop within the ratio range. Returns int64 [n, 4].
    """
    area = height * width
    a = torch.empty(n, attempts).uniform_(scale[0], scale[1], generator=gen) * area
    log_r = torch.empty(n, attempts).uniform_(math.log(ratio[0]), math.log(ratio[1]), generator=gen)
    r = torch.exp(log_r)
    w = torch.round(torch.sqrt(a * r))
    h = torch.round(torch.sqrt(a / r))
    ok = (w > 0) & (h > 0) & (w <= width) & (h <= height)
    u = torch.rand(n, attempts, 2, generator=gen)
    k = ok.float().argmax(1, keepdim=True)  # first attempt that fits
    hh, ww = h.gather(1, k).squeeze(1), w.gather(1, k).squeeze(1)
    top = torch.floor(u[:, :, 0].gather(1, k).squeeze(1) * (height - hh + 1))
    left = torch.floor(u[:, :, 1].gather(1, k).squeeze(1) * (width - ww + 1))
    # fallback: the largest centred crop within the ratio range
    in_ratio = width / height
    if in_ratio < ratio[0]:
        fw, fh = width, round(width / ratio[0])
    elif in_ratio > ratio[1]:
        fw, fh = round(height * ratio[1]), height
    else:
        fw, fh = width, height
    fallback = torch.tensor([(height - fh) // 2, (width - fw) // 2, fh, fw], dtype=torch.float32)
    boxes = torch.stack([top, left, hh, ww], dim=1)
    boxes = torch.where(ok.any(1, keepdim=True), boxes, fallback)
    return boxes.to(torch.int64)


def random_boxes(n: int, h: int, w: int, scale: tuple[float, float], gen: torch.Generator) -> torch.Tensor:
    """``n`` float crop boxes ``[top, left, h, w]`` for a differentiable random-resized crop: area fraction
    uniform in ``scale``, log-aspect uniform in [3/4, 4/3], sides clipped to the image."""
    lo, hi = scale
    area = torch.empty(n).uniform_(lo, hi, generator=gen)
    log_r = torch.empty(n).uniform_(math.log(3 / 4), math.log(4 / 3), generator=gen)
    r = torch.exp(log_r)
    bw = torch.sqrt(area * r).clamp(max=1.0) * w
    bh = torch.sqrt(area / r).clamp(max=1.0) * h
    top = torch.rand(n, generator=gen) * (h - bh)
    left = torch.rand(n, generator=gen) * (w - bw)
    return torch.stack([top, left, bh, bw], dim=1)


def crop_resize(images: torch.Tensor, boxes: torch.Tensor, size: int | tuple[int, int],
                image_index: torch.Tensor | None = None) -> torch.Tensor:
    """Crop ``boxes`` ([K, 4] top, left, h, w; int or float) out of float ``images`` [N, C, H, W] and resize
    each crop to ``size``. ``image_index`` [K] says which image each box is cut from (default: box k from
    image k). Bilinear, half-pixel aligned like ``F.interpolate(align_corners=False)``."""
    if isinstance(size, int):
        size = (size, size)
    boxes = boxes.to(images.device, torch.float32)
    if image_index is None:
        image_index = torch.arange(len(boxes), device=images.device)
    rois = torch.stack(
        [image_index.to(images.device, torch.float32), boxes[:, 1], boxes[:, 0],
         boxes[:, 1] + boxes[:, 3], boxes[:, 0] + boxes[:, 2]], dim=1,
    )
    return roi_align(images, rois, output_size=size, spatial_scale=1.0, sampling_ratio=-1, aligned=True)


def quantize(x: torch.Tensor) -> torch.Tensor:
    """float in [0, 255] to uint8, rounding half to even."""
    return x.round().clamp_(0, 255).to(torch.uint8)


class Augmenter:
    """Applies an :class:`AugmentConfig` to float batches: random-resized crop, flip, CutMix."""

    def __init__(self, cfg: AugmentConfig, gen: torch.Generator):
        self.cfg, self.gen = cfg, gen

    def views(self, x: torch.Tensor) -> torch.Tensor:
        """Random-resized crop and flip, per image."""
        n, _, h, w = x.shape
        if self.cfg.crop_scale is not None:
            boxes = random_boxes(n, h, w, self.cfg.crop_scale, self.gen)
            x = crop_resize(x, boxes, (h, w))
        if self.cfg.flip:
            flip = (torch.rand(n, generator=self.gen) < 0.5).to(x.device)
            x = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)
        return x

    def cutmix(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
        """CutMix with probability ``cfg.cutmix``: returns (mixed, partner index, lam), lam = share of x kept."""
        n, _, h, w = x.shape
        perm = torch.randperm(n, generator=self.gen)
        draw = torch.rand(4, generator=self.gen)
        if self.cfg.cutmix <= 0 or float(draw[0]) >= self.cfg.cutmix or n < 2:
            return x, perm, 1.0
        lam = float(draw[1])
        cut = math.sqrt(1.0 - lam)
        ch, cw = int(h * cut), int(w * cut)
        cy, cx = int(draw[2] * h), int(draw[3] * w)
        y1, y2 = max(cy - ch // 2, 0), min(cy + ch // 2, h)
        x1, x2 = max(cx - cw // 2, 0), min(cx + cw // 2, w)
        mixed = x.clone()
        mixed[:, :, y1:y2, x1:x2] = x[perm.to(x.device)][:, :, y1:y2, x1:x2]
        lam = 1.0 - (y2 - y1) * (x2 - x1) / (h * w)
        return mixed, perm, lam
