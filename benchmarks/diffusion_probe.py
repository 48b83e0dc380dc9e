"""What a diffusion denoiser has learned, measured by the project's teacher: one-step denoising and samples.

    python benchmarks/diffusion_probe.py --config configs/fashion-mnist-diffusion-ipc10.yaml \\
        --teacher TEACHER.pt (--denoiser DENOISER.pt | --train-steps N) [--set KEY=VALUE ...] [--grid OUT.png]

``--denoiser`` probes a trained ``diffusion/denoiser.pt`` (EMA weights); ``--train-steps N`` first trains the
config's denoiser for N steps on the whole training split (how recipes were compared). Prints one JSON line:

- ``loss``: the training loss of the first and last 50 steps (with ``--train-steps``);
- ``target_mse``: at t = 200/400/600/800 on 200 real test images, the MSE of the denoiser's output against the
  training target with the true class and with the null class (equal values: the class token is ignored);
- ``x0_accuracy``: the teacher's top-1 on the denoiser's one-step estimate of the clean image at each t;
- ``real_frechet_distance``: the run's Frechet distance (teacher features against the test split) of 100 real
  training images per class, the value a perfect generator's pool would get;
- ``sample_accuracy``: the teacher's top-1 on 10 samples per class at each ``--guidance`` (``--sampler-steps``, default
  the config's), with a grid of the first guidance's samples (a row per class) at ``--grid``.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch
from torchvision.utils import save_image

from ddpipe.config import load_config
from ddpipe.data import normalize  # noqa: E402
from ddpipe.dataindex import open_source  # noqa: E402
from ddpipe.methods.diffusion.denoiser import (
    Space, build_denoiser, clean_estimate, loss_log, noise_scheduler, noised, train_denoiser,
)
from ddpipe.methods.diffusion.generation import sample
from ddpipe.methods.diffusion.pool import frechet_distance
from ddpipe.store import torch_object
from ddpipe.teacher import load_teacher
from ddpipe.train import apply_threads, penultimate_features, predict_logits

CPU = torch.device("cpu")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--config", required=True)
    p.add_argument("--teacher", required=True, help="a teacher.pt of the config's dataset")
    p.add_argument("--denoiser", help="a diffusion/denoiser.pt to probe")
    p.add_argument("--train-steps", type=int, help="train the config's denoiser for this many steps instead")
    p.add_argument("--guidance", type=float, action="append", help="guidance scales to sample with (default 1, 2)")
    p.add_argument("--sampler-steps", type=int, help="DPM-Solver steps of the samples (default: the config's)")
    p.add_argument("--grid", help="PNG path for the samples of the first guidance")
    p.add_argument("--set", dest="overrides", action="append", default=[])
    args = p.parse_args()
    if bool(args.denoiser) == bool(args.train_steps):
        p.error("give exactly one of --denoiser and --train-steps")
    cfg = load_config(args.config, args.overrides)
    apply_threads(cfg.runtime)
    dc = cfg.method.diffusion
    source = open_source(cfg)
    with open(args.teacher, "rb") as f:
        teacher = load_teacher(f.read(), args.teacher, source.classes, cfg.input_format, CPU, cfg.runtime)
    space = Space(dc, cfg.image_size, cfg.channels, CPU)
    result: dict = {"config": args.config, "overrides": args.overrides}
    if args.denoiser:
        with open(args.denoiser, "rb") as f:
            weights = torch_object(f.read(), f"diffusion state {args.denoiser}")["ema"]
        result["denoiser"] = args.denoiser
    else:
        dc = dc.model_copy(update={"steps": args.train_steps})
        t0 = time.perf_counter()
        state = train_denoiser(dc, source.train, space, source.num_classes, cfg.seed, CPU, cfg.runtime)
        weights, log = state["ema"], loss_log(state)
        result.update(train_steps=args.train_steps, train_seconds=round(time.perf_counter() - t0, 1),
                      loss=[round(log[0], 4), round(log[-1], 4)])
    model = build_denoiser(dc, space, source.num_classes)
    model.load_state_dict(weights)
    model.eval()

    def accuracy(images: torch.Tensor, labels: torch.Tensor) -> float:
        logits = predict_logits(teacher.model, normalize(images, teacher.mean, teacher.std), 500, CPU, cfg.runtime)
        return round(float((logits.argmax(1) == labels).float().mean()), 3)

    idx = np.arange(0, len(source.test), max(1, len(source.test) // 200))[:200]
    images = source.test.batch(idx).float() / 255
    labels = torch.as_tensor(source.test.labels[idx])
    x0, null = space.encode(images), torch.full_like(labels, source.num_classes)
    alphas, gen = noise_scheduler(dc).alphas_cumprod, torch.Generator().manual_seed(0)
    result.update(target_mse={}, x0_accuracy={})
    for t in (200, 400, 600, 800):
        a = alphas[t].view(1, 1, 1, 1)
        xt, target = noised(x0, torch.randn(x0.shape, generator=gen), a, dc.prediction)
        steps = torch.full((len(labels),), t)
        with torch.no_grad():
            cond, uncond = model(xt, steps, labels), model(xt, steps, null)
        result["target_mse"][t] = [round(float(((o - target) ** 2).mean()), 4) for o in (cond, uncond)]
        estimate = clean_estimate(cond, xt, a, dc.prediction).clamp(-1, 1)
        result["x0_accuracy"][t] = accuracy(space.decode(estimate), labels)
    mean, std = cfg.normalization
    per_class = np.concatenate([np.flatnonzero(source.train.labels == c)[:100] for c in range(source.num_classes)])
    n_ref = min(dc.reference_images, len(source.test))
    features = [penultimate_features(teacher.model, split, ix, mean, std, CPU, cfg.runtime).numpy()
                for split, ix in ((source.train, per_class), (source.test, np.arange(n_ref)))]
    result["real_frechet_distance"] = round(frechet_distance(*features), 3)
    classes = torch.arange(source.num_classes).repeat_interleave(10)
    shape = (len(classes), space.channels, space.size, space.size)
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    result["sample_accuracy"] = {}
    for k, g in enumerate(args.guidance or [1.0, 2.0]):
        solver_steps = args.sampler_steps or dc.sampler_steps
        settings = dc.model_copy(update={"guidance": g, "sampler_steps": solver_steps})
        samples = sample(model, settings, space, classes, noise, CPU, cfg.runtime)
        result["sample_accuracy"][g] = accuracy(samples, classes)
        if k == 0 and args.grid:
            save_image(samples, args.grid, nrow=10)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
