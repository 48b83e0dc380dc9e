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

Every random draw comes from the generator passed in, so a batch is reproducible from its seed. On CUDA,
``runtime.amp`` runs the teachers' forward passes under bfloat16 autocast (the matched statistics, the
cross-entropy and the pixels stay float32) and ``runtime.channels_last`` feeds them channels-last batches.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ddpipe.augment import crop_resize, quantize, random_boxes
from ddpipe.config import CurriculumConfig, RunConfig
from ddpipe.statistics import bn_layers, channel_moments, conv_layers, patch_moments
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


def recover(cfg: RunConfig, teachers: list[tuple[nn.Module, dict]], classes: torch.Tensor, init: torch.Tensor,
            device, gen: torch.Generator, progress=None) -> tuple[torch.Tensor, dict]:
    """Optimise ``init`` (normalised noise [B, C, H, W]) into images of ``classes``; returns (uint8 images, info).

    ``teachers`` pairs each model (eval mode, frozen) with its statistics (:mod:`ddpipe.statistics`); sre2l and
    cda use the first only.
    """
    rc, method = cfg.method.recovery, cfg.method.name
    gvbsm = method == "gvbsm"
    models = teachers if gvbsm else teachers[:1]
    matchers = [
        StatisticMatcher(m, stats, device, rc.first_multiplier, conv=gvbsm, ema_alpha=rc.ema_alpha if gvbsm else None,
                         drop_rate=rc.drop_rate if gvbsm else 0.0, patch=int(stats.get("patch_size", 1)), gen=gen)
        for m, stats in models
    ]
    mean, std = cfg.normalization
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
            if method == "cda":
                cur = rc.curriculum
                scale = (crop_lower_bound(cur, step, rc.iterations), cur.beta_u)
            else:
                scale = rc.crop_scale
            xa = augment_batch(x, scale, rc.crop == "sample", rc.flip, rc.jitter, gen)
            with autocast(device, cfg.runtime):
                logits = model(xa.contiguous(memory_format=torch.channels_last) if cfg.runtime.channels_last else xa)
            ce = F.cross_entropy(logits.float(), y)
            match = matcher.take().to(device)
            loss = ce + rc.r_bn * match
            dd = torch.zeros((), device=device)
            if gvbsm and rc.dd_weight > 0:
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
