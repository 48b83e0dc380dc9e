"""The ``diffusion`` stage: train the class-conditional denoiser (:mod:`ddpipe.methods.diffusion.denoiser`)
once per data, recipe and seed, shared by every run in the store.

The trained EMA weights live in ``<store>/shared/diffusion/<key>/`` (:func:`diffusion_key`) and are copied to
the run's ``diffusion/denoiser.pt`` with ``diffusion/training.json`` (steps, loss per 50 steps, seconds).
Training states go to ``<store>/shared/diffusion-states/<trajectory key>/step-<step>.pt``: every
``checkpoint_every`` steps (replacing the previous checkpoint) and at the end (kept). Training starts from the
latest state at or below ``steps``: the last checkpoint of a run that stopped, or the final state of a shorter
run of the same recipe, so 12,000 steps after a 7,000-step run train 5,000 more. Sampling is not imported
here, so a change to how images are sampled re-samples; it does not retrain.
"""

from __future__ import annotations

import json
import re
import time

import torch

from ddpipe import progress
from ddpipe.methods.diffusion.denoiser import Space, build_denoiser, loss_log, train_denoiser
from ddpipe.pipeline import Context, Shard, Stage, shared_key, shared_outputs, single_shard
from ddpipe.store import FileRecord, Store, torch_bytes, torch_object

TRAINING_FIELDS = ("space", "autoencoder", "patch_size", "dim", "depth", "heads", "mlp_ratio", "timesteps",
                   "beta_schedule", "prediction", "steps", "batch_size", "lr", "weight_decay", "momentum",
                   "warmup_steps", "ema_decay", "class_dropout")


def _diffusion_payload(ctx: Context) -> dict:
    cfg = ctx.cfg
    recipe = cfg.method.diffusion.model_dump(mode="json", include=set(TRAINING_FIELDS))
    return {"data": ctx.source.train.fingerprint, "dataset": json.loads(cfg.section_json("dataset")),
            "diffusion": recipe, "seed": cfg.seed}


def diffusion_key(ctx: Context) -> str:
    """What a trained denoiser depends on: data, the training fields of ``method.diffusion``, seed, code."""
    return shared_key(_diffusion_payload(ctx), code=run_diffusion)


def trajectory_key(ctx: Context) -> str:
    """The denoiser key without ``steps``: runs that differ only in their length follow one training
    trajectory (no step depends on the total), so they share its saved states."""
    payload = _diffusion_payload(ctx)
    del payload["diffusion"]["steps"]
    return shared_key(payload, code=run_diffusion)


def diffusion_space(ctx: Context) -> Space:
    return ctx.cached("diffusion-space", lambda: Space(ctx.cfg.method.diffusion, ctx.cfg.image_size, ctx.cfg.channels,
                                                      ctx.device))


def state_name(step: int) -> str:
    return f"step-{step:08d}.pt"


def latest_state(names: list[str], steps: int) -> str | None:
    """The saved training state with the most steps at or below ``steps`` among file ``names``."""
    found = [n for n in names if (m := re.fullmatch(r"step-(\d{8})\.pt", n)) and int(m[1]) <= steps]
    return max(found, default=None)


def run_diffusion(ctx: Context, shard: Shard, inputs) -> list[FileRecord]:
    """Train the denoiser (or take it from the store's shared folder), resuming from the latest saved state."""
    cfg, dc = ctx.cfg, ctx.cfg.method.diffusion
    store = Store(cfg.store.uri, cfg.store.storage_options)
    states = store.child(f"shared/diffusion-states/{trajectory_key(ctx)}")

    def train() -> dict[str, bytes]:
        start = latest_state(states.list(""), dc.steps)
        resume = torch_object(states.read_bytes(start), f"diffusion state {states.url(start)}") if start else None
        written = [start] if resume and not resume.get("final") else []  # a stopped run's checkpoint is replaced

        def save(state: dict) -> None:
            final = state["step"] == dc.steps
            name = state_name(state["step"])
            states.write_bytes(name, torch_bytes({**state, "final": final}))
            for old in written:
                if old != name:
                    states.remove(old)
            written[:] = [] if final else [name]

        t0 = time.perf_counter()
        state = train_denoiser(dc, ctx.source.train, diffusion_space(ctx), ctx.source.num_classes, cfg.seed,
                               ctx.device, cfg.runtime, resume=resume, save=save,
                               progress=progress.stepper("diffusion", shard.id, every=10))
        info = {"steps": state["step"], "resumed_from_step": resume["step"] if resume else 0,
                "loss_every_50_steps": [round(v, 6) for v in loss_log(state)],
                "seconds": round(time.perf_counter() - t0, 3),
                "parameters": sum(v.numel() for v in state["ema"].values())}
        return {"denoiser.pt": torch_bytes({"ema": state["ema"], "classes": ctx.source.classes}),
                "training.json": json.dumps(info, indent=1).encode()}

    out = shared_outputs(cfg, "diffusion", diffusion_key(ctx), train)
    return [ctx.store.write_bytes(f"diffusion/{name}", data) for name, data in sorted(out.items())]


def denoiser_of(ctx: Context, inputs) -> torch.nn.Module:
    """The trained denoiser's EMA weights, on the run's device, memoised per context."""
    def load():
        path = "diffusion/denoiser.pt"
        state = torch_object(ctx.store.read_bytes(path), f"diffusion state {ctx.store.url(path)}")
        model = build_denoiser(ctx.cfg.method.diffusion, diffusion_space(ctx), ctx.source.num_classes)
        model.load_state_dict(state["ema"])
        return model.to(ctx.device).eval()

    return ctx.cached(f"denoiser:{inputs['diffusion'].sha256}", load)


DIFFUSION = Stage("diffusion", ("dataset",), ("dataset",), single_shard("diffusion"), run_diffusion,
                  fingerprint=diffusion_key,
                  doc="train the class-conditional denoiser (shared across runs; resumes from its last checkpoint)")
