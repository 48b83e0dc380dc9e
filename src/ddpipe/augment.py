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
import torch.nn.functional as F
from torchvision.ops import roi_align

from ddpipe.config import DSA_OPS, AugmentConfig


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
    return boxes_from_draws(box_draws(n, gen, scale, ratio, attempts), height, width, ratio)


def box_draws(n: int, gen: torch.Generator, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3),
              attempts: int = 10) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The random part of :func:`sample_boxes` for ``n`` boxes, which needs no image size: area fractions and
    aspect ratios [n, attempts] and positions [n, attempts, 2]. Rows can be turned into boxes apart (a loader
    worker per image) with :func:`boxes_from_draws`, giving the same boxes as one call would."""
    area = torch.empty(n, attempts).uniform_(scale[0], scale[1], generator=gen)
    log_r = torch.empty(n, attempts).uniform_(math.log(ratio[0]), math.log(ratio[1]), generator=gen)
    return area, torch.exp(log_r), torch.rand(n, attempts, 2, generator=gen)


def boxes_from_draws(draws, height: int, width: int, ratio=(3 / 4, 4 / 3)) -> torch.Tensor:
    """int64 boxes [n, 4] of ``draws`` (:func:`box_draws`, or rows of it) in a ``height`` x ``width`` image."""
    area, r, u = draws
    a = area * (height * width)
    w = torch.round(torch.sqrt(a * r))
    h = torch.round(torch.sqrt(a / r))
    ok = (w > 0) & (h > 0) & (w <= width) & (h <= height)
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


def dsa(x: torch.Tensor, gen: torch.Generator, op: str | None = None, ops: tuple[str, ...] = DSA_OPS) -> torch.Tensor:
    """Differentiable Siamese Augmentation as the DC/DSA evaluation applies it (``ParamDiffAug``, mode 'S'):
    one op of ``ops`` (color / crop / cutout / flip / scale / rotate), chosen per batch (or ``op``), with per-image
    parameters: brightness +-0.5, saturation x[0, 2], contrast x[0.5, 1.5]; translation by up to 12.5 % of
    the side (zero fill); a cutout square of half the side; flip with p 0.5; scale x[1/1.2, 1.2] per axis;
    rotation +-15 degrees."""
    n, c, h, w = x.shape
    if op is None:
        op = ops[int(torch.randint(len(ops), (1,), generator=gen))]
    dev = x.device
    if op == "color":
        x = x + (torch.rand(n, 1, 1, 1, generator=gen).to(dev) - 0.5)
        mean = x.mean(dim=1, keepdim=True)
        x = (x - mean) * (torch.rand(n, 1, 1, 1, generator=gen).to(dev) * 2.0) + mean
        mean = x.mean(dim=[1, 2, 3], keepdim=True)
        return (x - mean) * (torch.rand(n, 1, 1, 1, generator=gen).to(dev) + 0.5) + mean
    if op == "crop":
        sy, sx = int(h * 0.125 + 0.5), int(w * 0.125 + 0.5)
        ty = torch.randint(-sy, sy + 1, (n,), generator=gen)
        tx = torch.randint(-sx, sx + 1, (n,), generator=gen)
        padded = F.pad(x, (sx, sx, sy, sy))
        rows = (torch.arange(h).view(1, h) + sy - ty.view(n, 1)).to(dev)  # output row i shows input row i - ty
        cols = (torch.arange(w).view(1, w) + sx - tx.view(n, 1)).to(dev)
        idx = torch.arange(n, device=dev).view(n, 1, 1)
        return padded.permute(0, 2, 3, 1)[idx, rows.view(n, h, 1), cols.view(n, 1, w)].permute(0, 3, 1, 2)
    if op == "cutout":
        ch, cw = int(h * 0.5 + 0.5), int(w * 0.5 + 0.5)
        cy = torch.randint(0, h + (1 - ch % 2), (n, 1, 1), generator=gen).to(dev)
        cx = torch.randint(0, w + (1 - cw % 2), (n, 1, 1), generator=gen).to(dev)
        ys, xs = torch.arange(h, device=dev).view(1, h, 1), torch.arange(w, device=dev).view(1, 1, w)
        inside = (ys >= cy - ch // 2) & (ys < cy - ch // 2 + ch) & (xs >= cx - cw // 2) & (xs < cx - cw // 2 + cw)
        return x * (~inside).unsqueeze(1).to(x.dtype)
    if op == "flip":
        flip = (torch.rand(n, generator=gen) < 0.5).to(dev)
        return torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)
    theta = torch.zeros(n, 2, 3)
    if op == "scale":
        theta[:, 0, 0] = torch.rand(n, generator=gen) * (1.2 - 1 / 1.2) + 1 / 1.2
        theta[:, 1, 1] = torch.rand(n, generator=gen) * (1.2 - 1 / 1.2) + 1 / 1.2
    elif op == "rotate":
        angle = (torch.rand(n, generator=gen) - 0.5) * 2 * 15 / 180 * math.pi
        theta[:, 0, 0], theta[:, 0, 1] = torch.cos(angle), torch.sin(-angle)
        theta[:, 1, 0], theta[:, 1, 1] = torch.sin(angle), torch.cos(angle)
    else:
        raise ValueError(f"unknown DSA op {op!r} (one of {', '.join(DSA_OPS)})")
    grid = F.affine_grid(theta.to(dev, x.dtype), list(x.shape), align_corners=True)
    return F.grid_sample(x, grid, align_corners=True)


class Augmenter:
    """Applies an :class:`AugmentConfig` to float batches: random-resized crop, flip, DSA, then CutMix or MixUp."""

    def __init__(self, cfg: AugmentConfig, gen: torch.Generator):
        self.cfg, self.gen = cfg, gen

    def views(self, x: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        """Random-resized crop and flip, per image; then one DSA op per batch when ``dsa`` is on. ``keep`` (bool
        [N]): images that are already a crop (a stored crop label's box) and are not cropped again; the draws
        are the same either way."""
        n, _, h, w = x.shape
        if self.cfg.crop_scale is not None:
            boxes = random_boxes(n, h, w, self.cfg.crop_scale, self.gen)
            if keep is not None and bool(keep.any()):
                boxes[keep] = torch.tensor([0, 0, h, w], dtype=boxes.dtype)
            x = crop_resize(x, boxes, (h, w))
        if self.cfg.flip:
            flip = (torch.rand(n, generator=self.gen) < 0.5).to(x.device)
            x = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)
        if self.cfg.dsa:
            x = dsa(x, self.gen, ops=self.cfg.dsa_ops)
        return x

    def mix(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
        """CutMix with probability ``cfg.cutmix``, else MixUp with probability ``cfg.mixup``: returns (mixed,
        partner index, lam), lam = the share of x kept (the caller mixes the labels with the same lam)."""
        mixed, perm, lam = self.cutmix(x)
        if lam < 1.0 or self.cfg.mixup <= 0 or len(x) < 2:
            return mixed, perm, lam
        draw = torch.rand(1, generator=self.gen)
        if float(draw[0]) >= self.cfg.mixup:
            return x, perm, 1.0
        # Beta(alpha, alpha) as the first coordinate of a Dirichlet draw (what torch.distributions.Beta samples), from gen
        lam = float(torch._sample_dirichlet(torch.tensor([self.cfg.mixup_alpha] * 2, dtype=torch.float64), generator=self.gen)[0])
        return lam * x + (1.0 - lam) * x[perm.to(x.device)], perm, lam

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

