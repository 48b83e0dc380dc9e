"""Generative distillation: a class-conditional UViT denoiser and its training (the stage that trains it is
:mod:`ddpipe.methods.diffusion.training`, sampling it :mod:`ddpipe.methods.diffusion.generation`).

The denoiser follows UViT (Bao et al. CVPR'23), the backbone of the ECCV'24 challenge winner
(``../shared/seeds/004_*``): the image (or an autoencoder's latent) is cut into patches, and the patch
tokens, a time token and a class token go through transformer blocks with long skip connections from each
shallow block to its deep mirror; a linear head turns the patch tokens back into pixels and a 3x3
convolution smooths patch borders. The class index ``num_classes`` is the null class of classifier-free
guidance (labels are dropped to it with probability ``class_dropout`` in training).

The noise schedule comes from ``diffusers`` (DDPMScheduler for the forward process). Training is resumable
bit for bit: every random draw of step ``s`` (batch, noise, timesteps, label dropout) comes from a generator
seeded by ``(seed, s)``, so a run restored from a checkpoint (step, weights, EMA weights, optimiser state) continues
exactly as if it had not stopped. Nothing in a step depends on the total number of steps (the learning rate is
constant after warm-up), so a longer run can also start from a shorter run's final state.
"""

from __future__ import annotations

import copy
import math
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ddpipe.augment import generator, seed_for
from ddpipe.config import DiffusionConfig, OptimConfig, RuntimeConfig
from ddpipe.data import Split, loader
from ddpipe.errors import CheckpointError, ConfigError
from ddpipe.train import autocast, batch_to, build_optimizer

# ---------------------------------------------------------------- the UViT denoiser


def timestep_embedding(t: torch.Tensor, dim: int, max_period: int = 10000) -> torch.Tensor:
    """Sinusoidal embedding of (float) timesteps, [n] -> [n, dim]."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return F.pad(emb, (0, dim % 2))


class Block(nn.Module):
    """Pre-norm transformer block; ``skip`` blocks first merge the long skip (concat + linear)."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float, skip: bool = False):
        super().__init__()
        self.heads = heads
        self.skip_linear = nn.Linear(2 * dim, dim) if skip else None
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
        if self.skip_linear is not None:
            x = self.skip_linear(torch.cat([x, skip], dim=-1))
        n, length, dim = x.shape
        q, k, v = self.qkv(self.norm1(x)).reshape(n, length, 3, self.heads, dim // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(n, length, dim)
        x = x + self.proj(a)
        return x + self.mlp(self.norm2(x))


class UViT(nn.Module):
    """Class-conditional UViT: ``forward(x, t, y)`` predicts the noise, v or clean image (``prediction``) of ``x``
    at timesteps ``t`` for classes ``y`` (``num_classes`` = the null class). ``depth`` counts every block:
    (depth-1)/2 in, one middle, (depth-1)/2 out, each out block fed by the long skip of its mirror in block."""

    def __init__(self, image_size: int, channels: int, num_classes: int, patch_size: int = 4, dim: int = 256,
                 depth: int = 9, heads: int = 4, mlp_ratio: float = 4.0):
        super().__init__()
        if image_size % patch_size:
            raise ConfigError(f"method.diffusion.patch_size ({patch_size}) must divide the input size ({image_size})")
        if depth % 2 == 0:
            raise ConfigError(f"method.diffusion.depth ({depth}) must be odd (in blocks, one middle, out blocks)")
        if dim % heads:
            raise ConfigError(f"method.diffusion.dim ({dim}) must be a multiple of method.diffusion.heads ({heads})")
        self.channels, self.patch_size, self.num_classes = channels, patch_size, num_classes
        self.grid = image_size // patch_size
        self.patch_embed = nn.Conv2d(channels, dim, patch_size, stride=patch_size)
        self.time_embed = nn.Sequential(nn.Linear(dim, 4 * dim), nn.SiLU(), nn.Linear(4 * dim, dim))
        self.label_embed = nn.Embedding(num_classes + 1, dim)
        self.pos_embed = nn.Parameter(torch.zeros(1, 2 + self.grid**2, dim))
        half = (depth - 1) // 2
        self.in_blocks = nn.ModuleList(Block(dim, heads, mlp_ratio) for _ in range(half))
        self.mid_block = Block(dim, heads, mlp_ratio)
        self.out_blocks = nn.ModuleList(Block(dim, heads, mlp_ratio, skip=True) for _ in range(half))
        self.norm = nn.LayerNorm(dim)
        self.decoder = nn.Linear(dim, patch_size**2 * channels)
        self.final = nn.Conv2d(channels, channels, 3, padding=1)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        self.apply(_init_weights)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        tokens = self.patch_embed(x).flatten(2).transpose(1, 2)
        t = t.expand(n) if t.dim() == 0 else t
        time_token = self.time_embed(timestep_embedding(t, tokens.shape[-1]))[:, None]
        x = torch.cat([time_token, self.label_embed(y)[:, None], tokens], dim=1) + self.pos_embed
        skips = []
        for block in self.in_blocks:
            x = block(x)
            skips.append(x)
        x = self.mid_block(x)
        for block in self.out_blocks:
            x = block(x, skips.pop())
        x = self.decoder(self.norm(x))[:, 2:]
        p, g, c = self.patch_size, self.grid, self.channels
        x = x.reshape(n, g, g, p, p, c).permute(0, 5, 1, 3, 2, 4).reshape(n, c, g * p, g * p)
        return self.final(x)


def _init_weights(m: nn.Module) -> None:
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


# ---------------------------------------------------------------- pixel or latent space


class Space:
    """Where diffusion happens: pixels scaled to [-1, 1], or an ``AutoencoderKL``'s scaled latents."""

    def __init__(self, cfg: DiffusionConfig, image_size: int, channels: int, device: torch.device):
        self.cfg, self.image_size, self.image_channels, self.device = cfg, image_size, channels, device
        self.vae = None
        if cfg.space == "latent":
            if not cfg.autoencoder:
                raise ConfigError("method.diffusion.space: latent needs method.diffusion.autoencoder (a diffusers "
                                  "AutoencoderKL folder or hub id)")
            from diffusers import AutoencoderKL

            try:
                self.vae = AutoencoderKL.from_pretrained(cfg.autoencoder).to(device).eval().requires_grad_(False)
            except (OSError, ValueError) as e:
                raise CheckpointError(f"method.diffusion.autoencoder '{cfg.autoencoder}' cannot be loaded: "
                                      f"{str(e).splitlines()[0]}") from None
            self.scale = float(self.vae.config.scaling_factor)
            down = 2 ** (len(self.vae.config.block_out_channels) - 1)
            self.size, self.channels = image_size // down, int(self.vae.config.latent_channels)
        else:
            self.size, self.channels = image_size, channels

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1] on the device -> what the denoiser sees."""
        x = images * 2 - 1
        if self.vae is None:
            return x
        if x.shape[1] == 1 and self.vae.config.in_channels == 3:
            x = x.expand(-1, 3, -1, -1)
        with torch.no_grad():
            return self.vae.encode(x).latent_dist.mean * self.scale

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Denoised samples -> images in [0, 1]."""
        if self.vae is not None:
            with torch.no_grad():
                z = self.vae.decode(z / self.scale).sample
            if self.image_channels == 1 and z.shape[1] == 3:
                z = z.mean(1, keepdim=True)
        return ((z + 1) / 2).clamp(0, 1)


def build_denoiser(cfg: DiffusionConfig, space: Space, num_classes: int) -> UViT:
    return UViT(space.size, space.channels, num_classes, cfg.patch_size, cfg.dim, cfg.depth, cfg.heads, cfg.mlp_ratio)


def noise_scheduler(cfg: DiffusionConfig):
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=cfg.timesteps, beta_schedule=cfg.beta_schedule)


def noised(x0: torch.Tensor, noise: torch.Tensor, alpha_bar: torch.Tensor, prediction: str):
    """``(x_t, target)``: the forward process at cumulative alphas ``alpha_bar`` ([n, 1, 1, 1]) and what a
    denoiser of type ``prediction`` must output for it."""
    a, s = alpha_bar.sqrt(), (1 - alpha_bar).sqrt()
    target = {"epsilon": noise, "v_prediction": a * noise - s * x0, "sample": x0}[prediction]
    return a * x0 + s * noise, target


def clean_estimate(out: torch.Tensor, xt: torch.Tensor, alpha_bar: torch.Tensor, prediction: str) -> torch.Tensor:
    """The clean image a denoiser of type ``prediction`` implies from its output ``out`` at ``x_t`` (the inverse
    of :func:`noised`'s target)."""
    a, s = alpha_bar.sqrt(), (1 - alpha_bar).sqrt()
    if prediction == "epsilon":
        return (xt - s * out) / a
    if prediction == "v_prediction":
        return a * xt - s * out
    return out


# ---------------------------------------------------------------- training


def train_denoiser(cfg: DiffusionConfig, split: Split, space: Space, num_classes: int, seed: int,
                   device: torch.device, runtime: RuntimeConfig, resume: dict | None = None,
                   save: Callable[[dict], None] | None = None,
                   progress: Callable[[int, int], None] | None = None) -> dict:
    """Train the denoiser on every image of ``split``; return the final state.

    ``resume``: a state from ``save`` (``step``, ``model``, ``ema``, ``optimizer``, ``losses``, ``window``) to
    continue from: a checkpoint of this run, or the final state of a shorter run of the same recipe and seed.
    ``save(state)`` is called every ``cfg.checkpoint_every`` steps and at the end. The state's ``ema`` holds the
    exponential moving average of the weights (what sampling uses; decay warmed up by :func:`ema_decay`),
    ``losses`` the mean loss of every completed 50 steps and ``window`` the losses since (see :func:`loss_log`).
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed_for(seed, "diffusion", "init"))
        model = build_denoiser(cfg, space, num_classes).to(device)
    ema = copy.deepcopy(model).requires_grad_(False)
    # AdamW with betas (momentum, 0.999); no decay on norm weights and biases, as every ddpipe optimiser
    opt = build_optimizer(model, OptimConfig(optimizer="adamw", lr=cfg.lr, momentum=cfg.momentum,
                                             weight_decay=cfg.weight_decay))
    sched = noise_scheduler(cfg)
    alphas = sched.alphas_cumprod.to(device)
    start, losses = 0, []
    if resume is not None:
        model.load_state_dict(resume["model"])
        ema.load_state_dict(resume["ema"])
        opt.load_state_dict(resume["optimizer"])
        start, losses, window = int(resume["step"]), list(resume["losses"]), list(resume.get("window", []))
    else:
        window = []
    n = len(split)

    def step_indices(step: int) -> tuple[torch.Generator, np.ndarray]:
        gen = generator(seed, "diffusion", step)
        return gen, np.sort(torch.randint(0, n, (cfg.batch_size,), generator=gen).numpy())

    # Each step's images are drawn from the step alone, so loader workers decode them ahead of the step.
    steps = list(range(start, cfg.steps))
    images = (b[0] for b in loader(steps, lambda step: split.batch(step_indices(step)[1]), 1, runtime))
    for step, batch in zip(steps, images):
        gen, idx = step_indices(step)
        x0 = space.encode(batch_to(batch.float() / 255, device, runtime))
        y = torch.from_numpy(split.labels[idx]).to(device)
        drop = torch.rand(len(y), generator=gen) < cfg.class_dropout
        y = torch.where(drop.to(device), torch.full_like(y, num_classes), y)
        noise = torch.randn(x0.shape, generator=gen).to(device)
        t = torch.randint(0, cfg.timesteps, (len(y),), generator=gen).to(device)
        xt, target = noised(x0, noise, alphas[t].view(-1, 1, 1, 1), cfg.prediction)
        for g in opt.param_groups:
            g["lr"] = cfg.lr * min(1.0, (step + 1) / max(1, cfg.warmup_steps))
        with autocast(device, runtime):
            loss = F.mse_loss(model(xt, t, y).float(), target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            for pe, pm in zip(ema.parameters(), model.parameters()):
                pe.lerp_(pm, 1 - ema_decay(cfg.ema_decay, step))
        window.append(loss.item())
        if len(window) == 50:
            losses.append(sum(window) / len(window))
            window = []
        if progress:
            progress(step + 1, cfg.steps)
        done = step + 1
        if save and (done % cfg.checkpoint_every == 0 or done == cfg.steps):
            save(_state(done, model, ema, opt, losses, window))
    return _state(max(start, cfg.steps), model, ema, opt, losses, window)


def loss_log(state: dict) -> list[float]:
    """The mean training loss of every 50 steps of ``state``, the last entry over the steps since (if any)."""
    window = state.get("window", [])
    return list(state["losses"]) + ([sum(window) / len(window)] if window else [])


def ema_decay(target: float, step: int) -> float:
    """The EMA decay at (0-based) ``step``: (1 + step) / (10 + step), capped at ``target``. Without this warm-up
    the average keeps most of the random initial weights for thousands of steps (0.999^2500 = 8 %), and
    samples from it are noise long after the trained weights denoise well."""
    return min(target, (1 + step) / (10 + step))


def _state(step: int, model: nn.Module, ema: nn.Module, opt: torch.optim.Optimizer, losses: list[float],
           window: list[float]) -> dict:
    cpu = lambda sd: {k: v.detach().cpu().clone() for k, v in sd.items()}  # noqa: E731
    return {"step": step, "model": cpu(model.state_dict()), "ema": cpu(ema.state_dict()),
            "optimizer": opt.state_dict(), "losses": list(losses), "window": list(window)}
