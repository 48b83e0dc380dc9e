"""Refinement: start from real images, then optimise them against the teachers, kept near their start.

The family that leads ImageNet-1K after RDED and G-VBSM (CIM, FADRM, EDC; docs/refine.md maps every field to
its paper). One call of :func:`refine` optimises one batch of starting images ``x0`` (normalised space):

- **start** (``method.refine.init``): RDED's stitched real patches (``rded``: the scoring stage's top-ranked
  patches, stitched as RDED does) or real patches drawn at random (``random``: the scoring stage's candidates in
  their random draw order, stitched the same way);
- **parameter** (``param``): a residual ``x = x0 + d`` (``d = bound/std * tanh(r)`` when ``bound`` > 0, else
  ``d = r``) or the pixels ``x`` themselves (projected back into ``|x - x0| <= bound`` after every step);
  either way the image stays in the valid pixel range;
- **kept near the start**: ``anchor_weight`` x mean((x - x0)^2), and FADRM's data-level residual: every
  ``mix_every`` steps ``x <- mix * x0 + (1 - mix) * x``;
- **loss**, on ``views`` augmented views of every image per step (random-resized crop per image, flip,
  jitter; the crop is differentiable):

  - ``ce_weight`` x CE(teacher(view), class);
  - ``method.recovery.r_bn`` x the global statistic match of SRe2L (BN running statistics; with
    ``conv_statistics`` also G-VBSM's conv channel/patch statistics from the statistics stage, EMA form);
  - ``class_bn_weight`` x EDC's category-aware match: each class's channel mean and variance at every BN
    input against the same statistics of that class's real anchors;
  - ``feature_weight`` x CIM's feature match: each class's mean feature (spatially pooled; the classifier's
    input with ``feature_layers: last``, every BN input with ``all``) against the mean over multi-crop views
    of the class's real anchors (mean squared difference per layer);

- **teachers** (``teachers``): the primary, or every teacher (primary + teacher.ensemble) round robin, one per
  step as G-VBSM does.

The optimiser, its schedule (Adam, cosine to 0), the step count, the crop range, flip, jitter and the batching
(``classes_per_batch`` x ``ipc_per_shard`` images, class-major) are ``method.recovery``'s. Anchors are
``anchors_per_class`` real training images per class drawn from (seed, class), seen under ``anchor_views``
random-resized crops each, drawn from (seed, class) too: a batch is reproducible from its seed.

The stages: ``scoring`` (RDED's), the statistics (as the recovery methods: ``moments`` + ``statistics`` with
``conv_statistics``, else the BN statistics), ``refinement`` (a shard per block of classes x ipc range, like
recovery: ``distilled/images/...png``, ``refinement/<shard>.parquet`` with the images' provenance, the real
patches they started from, and ``refinement/<shard>.json`` with the losses at the first and last step and the
mean absolute change from the start) and ``synthesis`` (the provenance joined per class).
"""

from __future__ import annotations

import json
import math

import numpy as np
import pyarrow as pa
import torch
import torch.nn.functional as F
from torch import nn

from ddpipe import progress
from ddpipe.augment import generator, quantize
from ddpipe.config import RecoveryConfig, RefineConfig, RunConfig, RuntimeConfig
from ddpipe.data import Split, normalize
from ddpipe.imageset import image_path, png_bytes, provenance_table
from ddpipe.methods import METHODS, Method
from ddpipe.methods.rded import SCORING, stitch_class
from ddpipe.methods.recovery.recover import (
    StatisticMatcher, augment_batch, matched_teachers, recovery_shards, recovery_units, run_assembly,
)
from ddpipe.methods.recovery.statistics import (
    BN_STATISTICS, MOMENTS, STATISTICS, bn_layers, channel_moments,
)
from ddpipe.pipeline import Context, Shard, Stage, class_groups
from ddpipe.store import FileRecord
from ddpipe.train import autocast, last_linear


def start_rows(scores: pa.Table, patches: int, init: str) -> list[dict]:
    """The ``patches`` (factor^2 x ipc) scored rows a class starts from: the ``rded`` ranking's best, or the first
    candidates of the random pre-selection (``random``), in the order RDED stitches them."""
    rows = scores.to_pylist()
    key = "rank" if init == "rded" else "candidate"
    rows = sorted(rows, key=lambda r: r[key])[:patches]
    if len(rows) != patches:
        raise ValueError(f"score table has {len(rows)} candidates, fewer than the {patches} patches to start from")
    return rows


class Taps:
    """Forward pre-hooks that keep the inputs of a model's BN layers and of its last linear layer (with their
    graph) on every forward pass."""

    def __init__(self, model: nn.Module):
        self.seen: dict[str, torch.Tensor] = {}
        self.bn = [name for name, _ in bn_layers(model)]
        self.last = last_linear(model)
        modules = dict(model.named_modules())
        self.handles = [modules[n].register_forward_pre_hook(self._keep(n)) for n in self.bn + [self.last] if n]

    def _keep(self, name: str):
        def hook(module, inputs):
            self.seen[name] = inputs[0].float()
        return hook

    def take(self) -> dict[str, torch.Tensor]:
        seen, self.seen = self.seen, {}
        return seen

    def close(self) -> None:
        for h in self.handles:
            h.remove()


def pooled(x: torch.Tensor) -> torch.Tensor:
    """Per-image features: a conv map's channel means, or the vector itself."""
    return x.mean(dim=(2, 3)) if x.dim() == 4 else x.flatten(1)


def feature_names(taps: Taps, layers: str) -> list[str]:
    return [taps.last] if layers == "last" and taps.last else list(taps.bn)


def class_targets(model: nn.Module, anchors: dict[int, torch.Tensor], rc: RecoveryConfig, r: RefineConfig,
                  device, runtime: RuntimeConfig, gen: torch.Generator) -> dict[int, dict]:
    """What each class's real anchors look like to ``model``: per BN layer the channel mean and variance of its
    input, and per feature layer the mean pooled feature, over ``anchor_views`` random-resized crops (and flips)
    of every anchor (``anchors``: class -> normalised anchors [n, C, H, W])."""
    taps = Taps(model)
    out = {}
    try:
        with torch.no_grad():
            for c, x in anchors.items():
                sums: dict[str, list] = {}
                for _ in range(r.anchor_views):
                    xa = augment_batch(x, rc.crop_scale, True, rc.flip, 0, gen).to(device)
                    with autocast(device, runtime):
                        model(xa)
                    for name, t in taps.take().items():
                        sums.setdefault(name, []).append(t)
                targets = {"bn": {}, "feature": {}}
                for name in taps.bn:
                    targets["bn"][name] = channel_moments(torch.cat(sums[name]))
                for name in feature_names(taps, r.feature_layers):
                    targets["feature"][name] = pooled(torch.cat(sums[name])).mean(0)
                out[c] = targets
    finally:
        taps.close()
    return out


def class_losses(seen: dict[str, torch.Tensor], y: torch.Tensor, targets: dict[int, dict], taps: Taps,
                 r: RefineConfig, first_multiplier: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(EDC's category-aware BN match, CIM's feature match) of one forward pass, averaged over the classes."""
    zero = next(iter(seen.values())).new_zeros(())
    bn, feat = zero, zero
    classes = [int(c) for c in torch.unique(y)]
    if r.class_bn_weight > 0:
        for i, name in enumerate(taps.bn):
            x, weight = seen[name], first_multiplier if i == 0 else 1.0
            for c in classes:
                mean, var = channel_moments(x[y == c])
                t_mean, t_var = targets[c]["bn"][name]
                bn = bn + weight * (torch.norm(t_mean - mean) + torch.norm(t_var - var)) / len(classes)
    if r.feature_weight > 0:
        for name in feature_names(taps, r.feature_layers):
            f = pooled(seen[name])
            for c in classes:
                feat = feat + F.mse_loss(f[y == c].mean(0), targets[c]["feature"][name]) / len(classes)
    return bn, feat


def refine(rc: RecoveryConfig, r: RefineConfig, teachers: list[tuple[nn.Module, dict]], classes: torch.Tensor,
           start: torch.Tensor, anchors: dict[int, torch.Tensor], mean, std, device, runtime: RuntimeConfig,
           gen: torch.Generator, conv_statistics: bool = False, progress=None) -> tuple[torch.Tensor, dict]:
    """Optimise ``start`` (uint8 real images [B, C, H, W]) for ``classes``; returns (uint8 images, info).

    ``teachers`` pairs each model (eval mode, frozen) with its statistics; all of them take turns (one per
    step) when ``r.teachers`` is ``all``, else only the first. ``anchors`` holds each class's real anchors
    (uint8) for the category-aware and feature terms."""
    models = teachers if r.teachers == "all" else teachers[:1]
    matchers = [
        StatisticMatcher(m, stats, device, rc.first_multiplier, conv=conv_statistics,
                         ema_alpha=rc.ema_alpha if conv_statistics else None,
                         drop_rate=rc.drop_rate if conv_statistics else 0.0, patch=int(stats.get("patch_size", 1)),
                         gen=gen)
        for m, stats in models
    ]
    need_classes = r.class_bn_weight > 0 or r.feature_weight > 0
    taps = [Taps(m) for m, _ in models] if need_classes else []
    m_ = torch.tensor(mean, device=device).view(1, -1, 1, 1)
    s_ = torch.tensor(std, device=device).view(1, -1, 1, 1)
    lo, hi = (0 - m_) / s_, (1 - m_) / s_
    scale = r.bound / s_  # the bound in normalised units, per channel
    try:
        targets = []
        if need_classes:
            real = {c: normalize(a, mean, std) for c, a in anchors.items()}
            targets = [class_targets(m, real, rc, r, device, runtime, gen) for m, _ in models]
        x0 = normalize(start, mean, std).to(device)
        y = classes.to(device)
        p = (torch.zeros_like(x0) if r.param == "residual" else x0.clone()).requires_grad_(True)

        def image() -> torch.Tensor:
            if r.param == "pixels":
                return p
            return x0 + (scale * torch.tanh(p) if r.bound > 0 else p)

        def set_change(d: torch.Tensor) -> None:
            """Make the image ``x0 + d`` (``d`` within the bound, ``x0 + d`` in range)."""
            d = torch.maximum(torch.minimum(x0 + d, hi), lo) - x0
            if r.bound > 0:
                d = torch.maximum(torch.minimum(d, scale), -scale)
            if r.param == "pixels":
                p.copy_(x0 + d)
            elif r.bound > 0:
                p.copy_(torch.atanh((d / scale).clamp(-1 + 1e-6, 1 - 1e-6)))
            else:
                p.copy_(d)

        opt = torch.optim.Adam([p], lr=rc.lr, betas=rc.betas, eps=1e-8)
        info = {"ce": [], "bn": [], "conv": [], "class_bn": [], "feature": [], "anchor": []}
        for step in range(rc.iterations):
            for group in opt.param_groups:
                group["lr"] = 0.5 * (1 + math.cos(math.pi * step / rc.iterations)) * rc.lr
            k = step % len(models)
            model, matcher = models[k][0], matchers[k]
            x = image()
            xa = torch.cat([augment_batch(x, rc.crop_scale, True, rc.flip, rc.jitter, gen) for _ in range(r.views)])
            ya = y.repeat(r.views)
            with autocast(device, runtime):
                logits = model(xa.contiguous(memory_format=torch.channels_last) if runtime.channels_last else xa)
            ce = F.cross_entropy(logits.float(), ya)
            match = matcher.take().to(device)
            class_bn = feature = torch.zeros((), device=device)
            if need_classes:
                class_bn, feature = class_losses(taps[k].take(), ya, targets[k], taps[k], r, rc.first_multiplier)
            anchor = ((x - x0) ** 2).mean()
            loss = (r.ce_weight * ce + rc.r_bn * match + r.class_bn_weight * class_bn + r.feature_weight * feature
                    + r.anchor_weight * anchor)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            with torch.no_grad():
                d = image() - x0
                if r.mix > 0 and r.mix_every and (step + 1) % r.mix_every == 0 and step + 1 < rc.iterations:
                    d = (1 - r.mix) * d  # FADRM: mix the start back in
                set_change(d)
            for name, v in (("ce", ce), ("class_bn", class_bn), ("feature", feature), ("anchor", anchor)):
                info[name].append(float(v.detach()))
            info["bn"].append(matcher.last["bn"])
            info["conv"].append(matcher.last["conv"])
            if progress:
                progress(step + 1, rc.iterations)
        with torch.no_grad():
            x = image()
            info["change"] = float(((x - x0) * s_).abs().mean())  # mean |pixel change|, in [0, 1] units
            pixels = quantize((x * s_ + m_) * 255.0).cpu()
    finally:
        for m in matchers:
            m.close()
        for t in taps:
            t.close()
    return pixels, info


# ---------------------------------------------------------------- stages


def draw_anchors(split: Split, c: int, n: int, seed: int) -> torch.Tensor:
    """``n`` real training images (uint8) of class ``c`` (all of them when it has fewer), drawn from (seed, class)."""
    pool = split.class_indices(c)
    pick = pool[torch.randperm(len(pool), generator=generator(seed, "anchors", c))[:n].numpy()]
    return split.batch(np.sort(pick))


def conv_statistics(cfg: RunConfig) -> bool:
    return METHODS[cfg.method.name].variant_for(cfg.method).conv_statistics


def run_refinement(ctx: Context, shard: Shard, inputs) -> list[FileRecord]:
    """Refine the shard's images from their real starts; each unit's draws depend only on (seed, unit)."""
    cfg, store = ctx.cfg, ctx.store
    rc, r, fmt = cfg.method.recovery, cfg.method.refine, cfg.input_format
    split = ctx.source.train
    pairs = matched_teachers(ctx, inputs)
    j0, j1 = shard.ipc
    starts = {}  # the shard's IPC range only
    for c in shard.classes:
        scores = store.read_table(f"scoring/class={c:05d}.parquet")
        rows = start_rows(scores, cfg.patches_per_class, r.init)
        starts[c] = stitch_class(split, rows, cfg.method.ipc, cfg.factor, fmt, cfg.runtime, span=(j0, j1))
    files, prov, losses = [], [], []
    units = recovery_units(rc, shard.classes, shard.ipc)
    for u, (unit, classes) in enumerate(units):
        gen = generator(cfg.seed, "refinement", unit)
        batch = [(c, j) for c in classes for j in range(j0, j1)]
        start = torch.stack([starts[c][0][j - j0] for c, j in batch])
        anchors = {c: draw_anchors(split, c, r.anchors_per_class, cfg.seed) for c in classes}
        y = torch.tensor([c for c, _ in batch], dtype=torch.int64)
        step = progress.stepper("refinement", shard.id, every=20)
        images, info = refine(rc, r, pairs, y, start, anchors, fmt.mean, fmt.std, ctx.device, cfg.runtime,
                              gen, conv_statistics(cfg),
                              lambda done, total: step(u * total + done, len(units) * total))
        for (c, j), img in zip(batch, images):
            files.append(store.write_bytes(image_path("distilled", c, j), png_bytes(img)))
            prov += [{**p, "class_index": c} for p in starts[c][1] if p["ipc_index"] == j]
        losses.append({"classes": list(classes), "ipc": [j0, j1], "change": info["change"],
                       **{f"{name}_first": v[0] for name, v in info.items() if isinstance(v, list)},
                       **{f"{name}_last": v[-1] for name, v in info.items() if isinstance(v, list)}})
    files.append(store.write_table(f"refinement/{shard.id}.parquet", provenance_table("distilled", prov)))
    files.append(store.write_bytes(f"refinement/{shard.id}.json", json.dumps(losses, indent=1, sort_keys=True).encode()))
    return files


REFINEMENT = Stage("refinement", ("dataset", "teacher", "scoring", "statistics"), ("dataset", "method", "statistics"),
                   recovery_shards, run_refinement, doc="optimise the real starting images against the teachers")
def run_refined_assembly(ctx: Context, shard: Shard, inputs) -> list[FileRecord]:
    """The distilled set's per-class provenance, joined from the refinement shards."""
    return run_assembly(ctx, shard, inputs, stage="refinement")


ASSEMBLY = Stage("synthesis", ("dataset", "refinement"), ("dataset", "method"), class_groups, run_refined_assembly,
                 doc="join the refined images' provenance per class")


def stages(method: Method, cfg: RunConfig | None = None) -> tuple[Stage, ...]:
    """scoring, the statistics (the moments too with ``conv_statistics``), refinement, synthesis; for ``cfg`` None
    the stages of the default settings (BN statistics only)."""
    statistics = (MOMENTS, STATISTICS) if cfg is not None and conv_statistics(cfg) else (BN_STATISTICS,)
    return (SCORING, *statistics, REFINEMENT, ASSEMBLY)
