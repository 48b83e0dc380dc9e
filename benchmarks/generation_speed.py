"""Sampling speed of the diffusion method: generated images per second, on CPU or a GPU.

    python benchmarks/generation_speed.py --config configs/fashion-mnist-diffusion-ipc10.yaml \\
        [--denoiser RUN_FOLDER/diffusion/denoiser.pt] [--images 100] [--device cpu|cuda] [--set KEY=VALUE ...]

Samples ``--images`` images of class 0 in batches of ``method.diffusion.sample_batch_size`` with the config's
DPM-Solver steps and guidance, after one warm-up batch, and prints one JSON line (images, seconds, images per
second, device, threads, model size). The speed does not depend on the weights, so without ``--denoiser`` a
freshly initialised UViT of the configured size is timed.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from ddpipe.config import load_config
from ddpipe.methods.diffusion.denoiser import Space, build_denoiser
from ddpipe.methods.diffusion.generation import generate_class
from ddpipe.store import torch_object
from ddpipe.train import apply_threads, resolve_device


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--config", required=True)
    p.add_argument("--denoiser", help="a run folder's diffusion/denoiser.pt (default: random weights)")
    p.add_argument("--images", type=int, default=100)
    p.add_argument("--classes", type=int, default=10, help="class count of a random-weight denoiser")
    p.add_argument("--device", default=None, help="overrides runtime.device")
    p.add_argument("--set", dest="overrides", action="append", default=[])
    args = p.parse_args()
    overrides = [*args.overrides, *([f"runtime.device={args.device}"] if args.device else [])]
    cfg = load_config(args.config, overrides)
    apply_threads(cfg.runtime)
    device, dc = resolve_device(cfg.runtime.device), cfg.method.diffusion
    space = Space(dc, cfg.image_size, cfg.channels, device)
    state = None
    if args.denoiser:
        with open(args.denoiser, "rb") as f:
            state = torch_object(f.read(), f"diffusion state {args.denoiser}")
    model = build_denoiser(dc, space, len(state["classes"]) if state else args.classes)
    if state:
        model.load_state_dict(state["ema"])
    model = model.to(device).eval()
    batch = dc.sample_batch_size
    generate_class(model, dc, space, 0, 0, min(batch, args.images), cfg.seed, device, cfg.runtime)  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for start in range(0, args.images, batch):
        generate_class(model, dc, space, 0, start, min(batch, args.images - start), cfg.seed, device, cfg.runtime)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    print(json.dumps({
        "config": args.config, "overrides": overrides, "images": args.images, "seconds": round(seconds, 3),
        "images_per_second": round(args.images / seconds, 3), "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "threads": torch.get_num_threads(), "parameters": sum(q.numel() for q in model.parameters()),
        "sampler_steps": dc.sampler_steps, "guidance": dc.guidance, "batch": batch, "amp": cfg.runtime.amp,
        "trained": bool(args.denoiser),
    }))


if __name__ == "__main__":
    main()
