"""Recovering images from noise against the teachers' statistics: SRe2L, CDA and G-VBSM.

One call of :func:`recover` optimises one batch of images (pixels in normalised space, Adam with betas
(0.5, 0.9), cosine learning rate to 0, pixels clipped to the valid range after every step). Every step the
batch is augmented (random-resized crop, flip, cyclic jitter; gradients flow back through the crop, CDA's
"ReverseRandomResizedCrop") and the loss is

- ``sre2l``: CE(teacher(x), y) + r_bn * sum_l m_l (||mu_l - mu(x)||_2 + ||var_l - var(x)||_2) over the
  inputs of every BatchNorm layer, mu_l / var_l the running statistics (m_1 = ``first_multiplier``);
- ``cda``: the same, with the crop's lower scale bound following :func:`crop_lower_bound`;
- ``gvbsm``: CE + r_bn * (BN matching + convolution matching of the channel and patch mean/variance against
  the collected statistics, each conv layer skipped with probability ``drop_rate``), both in the EMA form of
  Eq. 6 (the value compared is ema + s - stopgrad(s)), + ``dd_weight`` * the data densification loss
  (:func:`dd_loss`); the backbone changes every step, round robin over the teachers.

Which of these a method does is its :class:`~ddpipe.methods.Recovery` variant (registry data), not its name.
Every random draw comes from the generator passed in, so a batch is reproducible from its seed. On CUDA,
``runtime.amp`` runs the teachers' forward passes under bfloat16 autocast (the matched statistics, the
cross-entropy and the pixels stay float32) and ``runtime.channels_last`` feeds them channels-last batches.

The stages: ``recovery`` (a shard per block of classes x ipc range: ``distilled/images/...png``,
``recovery/<shard>.parquet`` with the images' provenance and ``recovery/<shard>.json`` with the losses at the
first and last step) and ``synthesis`` (the provenance joined per class, ``distilled/provenance/...``).
"""

from __future__ import annotations

import json
import math

import pyarrow as pa
import pyarrow.compute as pc
import torch
import torch.nn.functional as F
from torch import nn

from ddpipe import progress
from ddpipe.augment import crop_resize, generator, quantize, random_boxes
from ddpipe.config import CurriculumConfig, InputFormat, RecoveryConfig, RuntimeConfig
from ddpipe.imageset import image_path, png_bytes, provenance_table, synthetic_row
from ddpipe.methods import METHODS, Recovery
from ddpipe.methods.recovery.statistics import (
    bn_layers, channel_moments, conv_layers, patch_moments, read_statistics, statistic_teachers,
)
from ddpipe.pipeline import Context, Shard, Stage, class_groups, grown
from ddpipe.store import FileRecord
from ddpipe.teacher import teacher_of
from ddpipe.train import autocast


def crop_lower_bound(cur: CurriculumConfig, step: int, iterations: int) -> float:
    """CDA Algorithm 1: the lower bound alpha of the crop scale at ``step`` (T = milestone x iterations)."""
    t_end = cur.milestone * iterations
    if step >= t_end:
        return cur.beta_l
    if cur.scheduler == "step":
        return cur.beta_u
    s = step / t_end
    if cur.scheduler == "linear":
        return cur.beta_l + cur.gamma * (cur.beta_u - s)
    return cur.beta_l + cur.gamma * (cur.beta_u + math.cos(math.pi * s)) / 2


def dd_loss(x: torch.Tensor, classes: torch.Tensor, tau: float, pool: int | None = None) -> torch.Tensor:
    """G-VBSM Eq. 5: sum over classes of KL(stopgrad(softmax(eig/tau)) || softmax(eig)), eig the eigenvalues of
    the class's Gram matrix X_y X_y^T (X_y: the class's images, average-pooled to ``pool`` and flattened)."""
    if pool is not None:
        x = F.adaptive_avg_pool2d(x, pool)
    feats = x.flatten(1)
    total = feats.new_zeros(())
    for c in torch.unique(classes):
        xc = feats[classes == c]
        if len(xc) < 2:
            continue
        eig = torch.linalg.eigvalsh(xc @ xc.T)
        target = F.softmax(eig.detach() / tau, dim=0)
        total = total + F.kl_div(F.log_softmax(eig, dim=0), target, reduction="sum")
    return total


class StatisticMatcher:
    """Hooks on one teacher that add statistic-matching terms to ``terms`` on every forward pass.

    BN layers are matched against their running statistics; with ``conv`` statistics (G-VBSM) every conv
    input is matched against the collected channel and patch mean/variance. With ``ema_alpha`` the compared
    value is the EMA form of Eq. 6; ``drop_rate`` skips a conv layer's terms at random.
    """

    def __init__(self, model: nn.Module, stats: dict, device, first_multiplier: float, conv: bool,
                 ema_alpha: float | None = None, drop_rate: float = 0.0, patch: int = 1,
                 gen: torch.Generator | None = None):
        self.ema_alpha, self.drop_rate, self.patch, self.gen = ema_alpha, drop_rate, patch, gen
        self.terms: list[tuple[str, torch.Tensor]] = []
        self.last = {"bn": 0.0, "conv": 0.0}  # the last pass's BN and conv terms (weighted sums)
        self.ema: dict[tuple[str, str], torch.Tensor] = {}
        layers = [(n, m, "bn") for n, m in bn_layers(model)]
        if conv:
            layers += [(n, m, "conv") for n, m in conv_layers(model) if n in stats["conv"]]
        order = {n: i for i, (n, _) in enumerate(model.named_modules())}
        layers.sort(key=lambda t: order[t[0]])
        self.handles = []
        for i, (name, module, kind) in enumerate(layers):
            weight = first_multiplier if i == 0 else 1.0
            if kind == "bn":
                target = {k: v.to(device) for k, v in stats["bn"][name].items()}
            else:
                target = {k: stats["conv"][name][k].to(device)
                          for k in ("channel_mean", "channel_var", "patch_mean", "patch_var")}
            self.handles.append(module.register_forward_pre_hook(self._hook(name, kind, target, weight)))

    def _value(self, key: tuple[str, str], s: torch.Tensor) -> torch.Tensor:
        if self.ema_alpha is None:
            return s
        prev = self.ema.get(key)
        ema = s.detach() if prev is None else self.ema_alpha * prev + (1 - self.ema_alpha) * s.detach()
        self.ema[key] = ema
        return ema + s - s.detach()

    def _hook(self, name: str, kind: str, target: dict, weight: float):
        def hook(module, inputs):
            x = inputs[0].float()  # bfloat16 under autocast: the statistics are matched in float32
            if kind == "bn":
                mean, var = channel_moments(x)
                loss = (torch.norm(target["mean"] - self._value((name, "mean"), mean))
                        + torch.norm(target["var"] - self._value((name, "var"), var)))
            else:
                if self.drop_rate > 0 and float(torch.rand(1, generator=self.gen)) < self.drop_rate:
                    return
                cm, cv = channel_moments(x)
                pm, pv = patch_moments(x, self.patch)
                loss = (torch.norm(target["channel_mean"] - self._value((name, "cm"), cm))
                        + torch.norm(target["channel_var"] - self._value((name, "cv"), cv))
                        + torch.norm(target["patch_mean"] - self._value((name, "pm"), pm))
                        + torch.norm(target["patch_var"] - self._value((name, "pv"), pv)))
            self.terms.append((kind, weight * loss))

        return hook

    def take(self) -> torch.Tensor:
        """The sum of the terms of the last forward pass (and forget them); per kind in ``last``."""
        terms, self.terms = self.terms, []
        self.last = {k: float(sum(float(v.detach()) for kind, v in terms if kind == k)) for k in ("bn", "conv")}
        return torch.stack([v for _, v in terms]).sum() if terms else torch.zeros(())

    def close(self) -> None:
        for h in self.handles:
            h.remove()


def augment_batch(x: torch.Tensor, scale: tuple[float, float], per_sample: bool, flip: bool, jitter: int,
                  gen: torch.Generator) -> torch.Tensor:
    """Random-resized crop (differentiable), flip and cyclic jitter, one draw per batch or per image."""
    n, _, h, w = x.shape
    draws = n if per_sample else 1
    boxes = random_boxes(draws, h, w, scale, gen).expand(n, 4)
    x = crop_resize(x, boxes, (h, w))
    if flip:
        coin = (torch.rand(draws, generator=gen) < 0.5).expand(n).to(x.device)
        x = torch.where(coin.view(-1, 1, 1, 1), x.flip(-1), x)
    if jitter > 0:
        dy, dx = (int(v) for v in torch.randint(-jitter, jitter + 1, (2,), generator=gen))
        x = torch.roll(x, shifts=(dy, dx), dims=(2, 3))
    return x


def recover(rc: RecoveryConfig, variant: Recovery, teachers: list[tuple[nn.Module, dict]], classes: torch.Tensor,
            init: torch.Tensor, mean, std, device, runtime: RuntimeConfig, gen: torch.Generator,
            progress=None) -> tuple[torch.Tensor, dict]:
    """Optimise ``init`` (normalised noise [B, C, H, W]) into images of ``classes``; returns (uint8 images, info).

    ``teachers`` pairs each model (eval mode, frozen) with its statistics
    (:mod:`ddpipe.methods.recovery.statistics`); without ``variant.all_teachers`` only the first is matched.
    """
    conv = variant.conv_statistics
    models = teachers if variant.all_teachers else teachers[:1]
    matchers = [
        StatisticMatcher(m, stats, device, rc.first_multiplier, conv=conv, ema_alpha=rc.ema_alpha if conv else None,
                         drop_rate=rc.drop_rate if conv else 0.0, patch=int(stats.get("patch_size", 1)), gen=gen)
        for m, stats in models
    ]
    lo = torch.tensor([(0 - m) / s for m, s in zip(mean, std)], device=device).view(1, -1, 1, 1)
    hi = torch.tensor([(1 - m) / s for m, s in zip(mean, std)], device=device).view(1, -1, 1, 1)
    x = init.to(device).clone().requires_grad_(True)
    y = classes.to(device)
    opt = torch.optim.Adam([x], lr=rc.lr, betas=rc.betas, eps=1e-8)
    info = {"ce": [], "bn": [], "conv": [], "dd": []}
    try:
        for step in range(rc.iterations):
            for group in opt.param_groups:
                group["lr"] = 0.5 * (1 + math.cos(math.pi * step / rc.iterations)) * rc.lr
            k = step % len(models)
            model, matcher = models[k][0], matchers[k]
            if variant.curriculum:
                cur = rc.curriculum
                scale = (crop_lower_bound(cur, step, rc.iterations), cur.beta_u)
            else:
                scale = rc.crop_scale
            xa = augment_batch(x, scale, rc.crop == "sample", rc.flip, rc.jitter, gen)
            with autocast(device, runtime):
                logits = model(xa.contiguous(memory_format=torch.channels_last) if runtime.channels_last else xa)
            ce = F.cross_entropy(logits.float(), y)
            match = matcher.take().to(device)
            loss = ce + rc.r_bn * match
            dd = torch.zeros((), device=device)
            if conv and rc.dd_weight > 0:
                dd = dd_loss(xa, y, rc.dd_tau, rc.dd_pool)
                loss = loss + rc.dd_weight * dd
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            with torch.no_grad():
                x.copy_(torch.maximum(torch.minimum(x, hi), lo))
            info["ce"].append(float(ce.detach()))
            info["bn"].append(matcher.last["bn"])
            info["conv"].append(matcher.last["conv"])
            info["dd"].append(float(dd.detach()))
            if progress:
                progress(step + 1, rc.iterations)
    finally:
        for m in matchers:
            m.close()
    m_ = torch.tensor(mean, device=device).view(1, -1, 1, 1)
    s_ = torch.tensor(std, device=device).view(1, -1, 1, 1)
    pixels = quantize((x.detach() * s_ + m_) * 255.0).cpu()
    return pixels, info


# ---------------------------------------------------------------- stages


def _range_id(c0: int, c1: int, j0: int, j1: int) -> str:
    """Name of classes [c0, c1) x ipc indices [j0, j1): a recovery shard's id, and a unit's random-stream id."""
    return f"classes-{c0:05d}-{c1 - 1:05d}-ipc-{j0:05d}-{j1 - 1:05d}"


def recovery_units(rc: RecoveryConfig, classes: tuple[int, ...],
                   ipc: tuple[int, int]) -> list[tuple[str, tuple[int, ...]]]:
    """The recovery units (``classes_per_batch`` classes x one ``ipc_per_shard`` range) among ``classes`` (which
    start at a multiple of classes_per_batch): (unit id, its classes). A unit's random draws depend on its id
    only, so grouping units into shards never changes the images."""
    size, (j0, j1) = rc.classes_per_batch, ipc
    return [(_range_id(c0, min(c0 + size, classes[-1] + 1), j0, j1), tuple(c for c in classes if c0 <= c < c0 + size))
            for c0 in range(classes[0], classes[-1] + 1, size)]


def recovery_shards(ctx: Context, num_classes: int) -> list[Shard]:
    """One shard per recovery unit; with more units than ``orchestration.max_shards_per_stage``, consecutive
    class batches of one ipc range are grouped into a shard."""
    cfg = ctx.cfg
    rc, ipc = cfg.method.recovery, cfg.method.ipc
    ranges = [(j0, min(j0 + rc.ipc_per_shard, ipc)) for j0 in range(0, ipc, rc.ipc_per_shard)]
    batches = -(-num_classes // rc.classes_per_batch)
    per_shard = grown(1, batches * len(ranges), cfg.orchestration.max_shards_per_stage)
    step = rc.classes_per_batch * per_shard
    out = []
    for j0, j1 in ranges:
        for c0 in range(0, num_classes, step):
            c1 = min(c0 + step, num_classes)
            out.append(Shard(id=_range_id(c0, c1, j0, j1), classes=tuple(range(c0, c1)), ipc=(j0, j1)))
    return out


def recovery_batches(variant: Recovery, classes: tuple[int, ...], ipc: tuple[int, int]) -> list[list[tuple[int, int]]]:
    """The (class, ipc index) pairs of one recovery unit optimised together: one batch of distinct classes per
    ipc index, or with ``variant.class_major`` one class-major batch of the whole unit."""
    j0, j1 = ipc
    if variant.class_major:
        return [[(c, j) for c in classes for j in range(j0, j1)]]
    return [[(c, j) for c in classes] for j in range(j0, j1)]


def matched_teachers(ctx: Context, inputs) -> list[tuple[nn.Module, dict]]:
    """Each statistics teacher with its stored statistics, in round-robin order (loaded once per process)."""
    pairs = []
    for k in statistic_teachers(ctx.cfg):
        stats = ctx.cached(f"statistics:{inputs['statistics'].sha256}:{k}",
                           lambda k=k: read_statistics(ctx.store.read_bytes(f"statistics/teacher{k}.pt")))
        pairs.append((teacher_of(ctx, inputs, k).model, stats))
    return pairs


def run_recovery(ctx: Context, shard: Shard, inputs) -> list[FileRecord]:
    """Recover the shard's images from noise; each image's starting noise depends only on (seed, class, ipc index)."""
    cfg, store = ctx.cfg, ctx.store
    variant: Recovery = METHODS[cfg.method.name].variant_for(cfg.method)
    fmt: InputFormat = cfg.input_format
    pairs = matched_teachers(ctx, inputs)
    files, rows, losses = [], [], []
    batches = []
    for unit, classes in recovery_units(cfg.method.recovery, shard.classes, shard.ipc):
        gen = generator(cfg.seed, "recovery", unit)  # one stream per unit, whichever shard holds it
        batches += [(gen, batch) for batch in recovery_batches(variant, classes, shard.ipc)]
    for b, (gen, batch) in enumerate(batches):
        init = torch.stack([torch.randn(fmt.channels, fmt.size, fmt.size, generator=generator(cfg.seed, "recovery-init", c, j))
                            for c, j in batch])
        classes = torch.tensor([c for c, _ in batch], dtype=torch.int64)
        step = progress.stepper("recovery", shard.id, every=20)
        images, info = recover(cfg.method.recovery, variant, pairs, classes, init, fmt.mean, fmt.std, ctx.device,
                               cfg.runtime, gen, lambda done, total: step(b * total + done, len(batches) * total))
        for (c, j), img in zip(batch, images):
            files.append(store.write_bytes(image_path("distilled", c, j), png_bytes(img)))
            rows.append(synthetic_row(c, j, fmt.size))
        losses.append({"classes": sorted({c for c, _ in batch}), "ipc": sorted({j for _, j in batch}),
                       **{f"{name}_first": v[0] for name, v in info.items()},
                       **{f"{name}_last": v[-1] for name, v in info.items()}})
    files.append(store.write_table(f"recovery/{shard.id}.parquet", provenance_table("distilled", rows)))
    files.append(store.write_bytes(f"recovery/{shard.id}.json", json.dumps(losses, indent=1, sort_keys=True).encode()))
    return files


def run_assembly(ctx: Context, shard: Shard, inputs, stage: str = "recovery") -> list[FileRecord]:
    """The distilled set's per-class provenance, joined from the shards of ``stage`` (recovery, refinement)."""
    parts = ctx.cached(
        f"{stage}-rows:{inputs[stage].sha256}",
        lambda: pa.concat_tables([ctx.store.read_table(f"{stage}/{s.id}.parquet")
                                  for s in recovery_shards(ctx, len(ctx.source.classes))]),
    )
    files = []
    for c in shard.classes:
        rows = parts.filter(pc.equal(parts["class_index"], c)).sort_by("ipc_index")
        files.append(ctx.store.write_table(f"distilled/provenance/class={c:05d}.parquet", rows))
    return files


RECOVERY = Stage("recovery", ("dataset", "teacher", "statistics"), ("dataset", "method", "statistics"),
                 recovery_shards, run_recovery, doc="recover images from noise against the teachers' statistics")
ASSEMBLY = Stage("synthesis", ("dataset", "recovery"), ("dataset", "method"), class_groups, run_assembly,
                 doc="join the recovered images' provenance per class")
