"""Sampling a trained denoiser (DPM-Solver with classifier-free guidance), the generation plan of a class group,
and the ``generation`` stage.

Kept apart from :mod:`ddpipe.methods.diffusion.training` (the denoiser's stage) so that the trained weights'
cache key does not depend on this code: a change to how images are sampled re-samples, it does not retrain.

The ``generation`` stage samples a class group's images until ``images_per_class`` or its share of
``time_budget_s``: ``generated/images/...png``, ``generated/provenance/class=C.parquet`` (the image-set format,
:mod:`ddpipe.imageset`), ``generation/<shard>.json`` (images and seconds). Without a time budget the images
depend only on the denoiser, the sampling fields, the classes, the seed and the runtime, so they are shared
across runs in ``<store>/shared/generated/<key>/`` (:func:`generation_key`; runs that differ in selection,
labels or evaluation sample once, and ``generation/<shard>.json`` keeps the first run's timing).
"""

from __future__ import annotations

import json
import time
from typing import Callable

import torch
from torch import nn

from ddpipe import progress
from ddpipe.augment import generator
from ddpipe.config import DiffusionConfig, RuntimeConfig
from ddpipe.imageset import image_path, png_bytes, provenance_table, synthetic_row
from ddpipe.methods.diffusion.denoiser import Space
from ddpipe.methods.diffusion.training import denoiser_of, diffusion_key, diffusion_space
from ddpipe.pipeline import Context, Shard, Stage, class_groups, shared_key, shared_outputs
from ddpipe.store import FileRecord
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


# ---------------------------------------------------------------- the generation stage

SAMPLING_FIELDS = ("sampler_steps", "guidance", "guidance_interval", "images_per_class", "sample_batch_size",
                   "time_budget_s")


def generation_key(ctx: Context, shard: Shard) -> str:
    """What a class group's generated images depend on: the denoiser, the sampling fields, the classes, seed,
    runtime and code."""
    cfg = ctx.cfg
    payload = {"denoiser": diffusion_key(ctx), "classes": list(shard.classes),
               "sampling": cfg.method.diffusion.model_dump(mode="json", include=set(SAMPLING_FIELDS)),
               "num_classes": ctx.source.num_classes, "seed": cfg.seed, "device": str(ctx.device),
               "runtime": json.loads(cfg.section_json("runtime"))}
    return shared_key(payload, code=run_generation)


def to_uint8(image: torch.Tensor) -> torch.Tensor:
    return (image * 255).round().clamp(0, 255).to(torch.uint8)


def run_generation(ctx: Context, shard: Shard, inputs) -> list[FileRecord]:
    """Sample a class group's images until ``images_per_class`` or its share of ``time_budget_s``."""
    cfg, dc = ctx.cfg, ctx.cfg.method.diffusion

    def sample_group() -> dict[str, bytes]:
        model, space = denoiser_of(ctx, inputs), diffusion_space(ctx)
        made, out = {c: 0 for c in shard.classes}, {}
        t0 = time.perf_counter()
        for c, start, count in generation_plan(dc, shard.classes, ctx.source.num_classes):
            images = generate_class(model, dc, space, c, start, count, cfg.seed, ctx.device, cfg.runtime)
            for j, img in enumerate(images):
                out[image_path("generated", c, start + j)] = png_bytes(to_uint8(img))
            made[c] = start + count
            progress.emit("step", "generation", shard.id, sum(made.values()), dc.images_per_class * len(made))
        seconds = time.perf_counter() - t0
        info = {"images": {str(c): n for c, n in made.items()}, "seconds": round(seconds, 3),
                "images_per_second": round(sum(made.values()) / max(seconds, 1e-9), 3), "device": str(ctx.device)}
        return {**out, f"generation/{shard.id}.json": json.dumps(info, indent=1).encode()}

    if dc.time_budget_s is None:
        out = shared_outputs(cfg, "generated", generation_key(ctx, shard), sample_group)
    else:  # how many images fit the budget depends on the machine and its load: always sample
        out = sample_group()
    files = [ctx.store.write_bytes(name, data) for name, data in sorted(out.items())]
    made = json.loads(out[f"generation/{shard.id}.json"])["images"]
    for c, n in made.items():
        table = provenance_table("generated", [synthetic_row(int(c), j, cfg.image_size) for j in range(n)])
        files.append(ctx.store.write_table(f"generated/provenance/class={int(c):05d}.parquet", table))
    return files


GENERATION = Stage("generation", ("dataset", "diffusion"), ("dataset", "method"), class_groups, run_generation,
                   doc="sample images per class with DPM-Solver until the count or the time budget")
