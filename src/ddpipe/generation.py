"""Sampling a trained denoiser (DPM-Solver with classifier-free guidance), the generation plan of a class group,
and the Frechet distance that says how real the generated images look.

Kept apart from :mod:`ddpipe.diffusion` (the denoiser and its training) so that the trained weights' cache key
does not depend on this code: a change to how images are sampled re-samples, it does not retrain.
"""

from __future__ import annotations

import time
from typing import Callable

import numpy as np
import torch
from torch import nn

from ddpipe.augment import generator
from ddpipe.config import DiffusionConfig, RuntimeConfig
from ddpipe.diffusion import Space
from ddpipe.train import autocast

# ---------------------------------------------------------------- sampling


def sampler(cfg: DiffusionConfig):
    """DPM-Solver++ (2nd order, multistep), deterministic given the starting noise."""
    from diffusers import DPMSolverMultistepScheduler

    return DPMSolverMultistepScheduler(num_train_timesteps=cfg.timesteps, beta_schedule=cfg.beta_schedule,
                                       prediction_type=cfg.prediction, algorithm_type="dpmsolver++", solver_order=2)


@torch.no_grad()
def sample(model: nn.Module, cfg: DiffusionConfig, space: Space, classes: torch.Tensor, noise: torch.Tensor,
           device: torch.device, runtime: RuntimeConfig) -> torch.Tensor:
    """Images in [0, 1] for ``classes``, from the starting ``noise`` (shape of the diffusion space), with
    ``cfg.sampler_steps`` DPM-Solver steps and classifier-free guidance ``cfg.guidance`` (1: conditional
    only; above 1 pushes away from the unconditional prediction; such a step calls the model on a doubled
    batch). With ``cfg.guidance_interval`` only the steps whose noise level lies in it are guided."""
    solver = sampler(cfg)
    solver.set_timesteps(cfg.sampler_steps, device=device)
    guided = guided_steps(cfg, solver.timesteps, solver.alphas_cumprod)
    x = noise.to(device) * solver.init_noise_sigma
    y = classes.to(device)
    null = torch.full_like(y, model.num_classes)
    for t, guide in zip(solver.timesteps, guided):
        with autocast(device, runtime):
            if not guide:
                out = model(x, t, y).float()
            else:
                both = model(torch.cat([x, x]), t, torch.cat([y, null])).float()
                cond, uncond = both.chunk(2)
                out = uncond + cfg.guidance * (cond - uncond)
        x = solver.step(out, t, x).prev_sample
    return space.decode(x)


def noise_level(alpha_bar: torch.Tensor) -> torch.Tensor:
    """sigma = sqrt((1 - alpha_bar) / alpha_bar): the noise-to-signal ratio of x_t (EDM's sigma)."""
    alpha_bar = alpha_bar.double()
    return ((1 - alpha_bar) / alpha_bar).sqrt()


def guided_steps(cfg: DiffusionConfig, timesteps: torch.Tensor, alphas_cumprod: torch.Tensor) -> list[bool]:
    """Which sampler steps apply guidance: none at ``guidance`` 1, else those whose noise level
    :func:`noise_level` lies in ``cfg.guidance_interval`` [low, high] (every step when it is None). Guidance at
    high noise pulls every sample of a class towards one mode; at low noise it barely changes the image
    (Kynkaanniemi et al., NeurIPS'24, "Applying guidance in a limited interval")."""
    if cfg.guidance == 1.0:
        return [False] * len(timesteps)
    if cfg.guidance_interval is None:
        return [True] * len(timesteps)
    low, high = cfg.guidance_interval
    sigma = noise_level(alphas_cumprod[timesteps.cpu().long()])
    return [bool(low <= s <= high) for s in sigma]


def generate_class(model: nn.Module, cfg: DiffusionConfig, space: Space, c: int, start: int, count: int, seed: int,
                   device: torch.device, runtime: RuntimeConfig) -> torch.Tensor:
    """Images ``start .. start+count-1`` of class ``c``: image ``j``'s starting noise depends only on
    (seed, c, j), so a class's images are the same whatever the batch size or time budget."""
    noise = start_noise(space, seed, c, range(start, start + count))
    return sample(model, cfg, space, torch.full((count,), c, dtype=torch.int64), noise, device, runtime).cpu()


def start_noise(space: Space, seed: int, c: int, indices) -> torch.Tensor:
    """The starting noise of images ``indices`` of class ``c``; image j's depends only on (seed, c, j)."""
    return torch.stack([torch.randn(space.channels, space.size, space.size, generator=generator(seed, "generate", c, j))
                        for j in indices])


def generation_plan(cfg: DiffusionConfig, classes: tuple[int, ...], num_classes: int,
                    clock: Callable[[], float] = time.perf_counter):
    """Yield ``(class, start, count)`` batches, round robin over ``classes``, until every class has
    ``cfg.images_per_class`` images or this shard's share of ``cfg.time_budget_s`` is spent (at least one
    round always runs, so every class gets images)."""
    budget = None if cfg.time_budget_s is None else cfg.time_budget_s * len(classes) / num_classes
    t0, made = clock(), 0
    while made < cfg.images_per_class:
        count = min(cfg.sample_batch_size, cfg.images_per_class - made)
        for c in classes:
            yield c, made, count
        made += count
        if budget is not None and clock() - t0 >= budget:
            return


# ---------------------------------------------------------------- quality


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Frechet distance between Gaussians fitted to two feature sets [n, d] (FID's formula on any features):
    |mu_a - mu_b|^2 + tr(S_a) + tr(S_b) - 2 tr((S_a S_b)^1/2), in float64 via symmetric eigendecompositions."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1] or min(len(a), len(b)) < 2:
        raise ValueError(f"frechet_distance needs two [n>=2, d] feature sets of the same d (got {a.shape}, {b.shape})")
    mu = a.mean(0) - b.mean(0)
    sa, sb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    w, v = np.linalg.eigh(sa)
    root_a = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    cross = np.linalg.eigvalsh(root_a @ sb @ root_a)
    value = mu @ mu + np.trace(sa) + np.trace(sb) - 2 * np.sqrt(np.clip(cross, 0, None)).sum()
    return float(max(value, 0.0))
