"""Patch scoring throughput against the teacher's bare forward pass on the same crops.

    python benchmarks/scoring_throughput.py [--config configs/fashion-mnist-rded-ipc10.yaml] [--repeats 3]
                                            [--set key=value ...]

Scoring (``ddpipe.methods.rded.score_classes``: draw candidates; read, decode and cut K crops each in the loader's
workers, ``runtime.loader_workers``; teacher forward, cross-entropy, best crop per image, ranking) is timed over
every class, as the scoring stage runs a shard. With ``configs/imagenet-shaped-rded.yaml`` on a GPU machine
(``--set runtime.device=cuda``) this is the GPU check of the ImageNet-geometry scoring path. The bare forward pass runs the same teacher, at the same
batch size, over the very same crops, prepared beforehand. Target: scoring throughput >= 80% of the bare
forward throughput. The teacher has random weights: throughput does not depend on them.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from ddpipe.augment import generator
from ddpipe.config import load_config
from ddpipe.methods.rded import candidate_crops, draw_candidates, score_classes, scoring_inputs
from ddpipe.models import init_model
from ddpipe.pipeline import context_for
from ddpipe.teacher import Teacher
from ddpipe.train import autocast, batch_to, to_device


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--config", default="configs/fashion-mnist-rded-ipc10.yaml")
    p.add_argument("--set", dest="overrides", action="append", default=[])
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    cfg = load_config(args.config, args.overrides)
    ctx = context_for(cfg)  # the device (after runtime.num_threads) and the data, as the stages get them
    device, source = ctx.device, ctx.source
    model = to_device(init_model(cfg.teacher.model, cfg.channels, source.num_classes, cfg.image_size, 0), device,
                      cfg.runtime).eval()
    mean, std = cfg.normalization
    teacher = Teacher(model, cfg.teacher.model, source.classes, cfg.image_size, cfg.channels, mean, std, 0.0)
    classes = range(source.num_classes)
    k = cfg.method.crops_per_image

    # The crops scoring will cut, prepared once for the bare forward pass.
    plans = [(c, *draw_candidates(source.train, c, cfg.method, cfg.factor, generator(cfg.seed, "scoring", c)))
             for c in classes]
    inputs = []
    for c, cands, draws in plans:
        patches = torch.cat([candidate_crops(source.train, int(i), tuple(d[j * k : (j + 1) * k] for d in draws),
                                             cfg.image_size // cfg.factor)[1] for j, i in enumerate(cands)])
        inputs.append(scoring_inputs(patches, cfg.method.patch_view, cfg.input_format))
    crops = sum(len(x) for x in inputs)
    bs = cfg.method.batch_size

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    @torch.no_grad()
    def bare():
        for x in inputs:
            for s in range(0, len(x), bs):
                with autocast(device, cfg.runtime):
                    model(batch_to(x[s : s + bs], device, cfg.runtime))
        sync()

    def scoring():
        for _ in score_classes(teacher, source.train, plans, cfg.method, cfg.factor, cfg.input_format, cfg.runtime,
                               device):
            pass
        sync()

    bare(), scoring()  # warm-up
    rows = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        bare()
        t1 = time.perf_counter()
        scoring()
        t2 = time.perf_counter()
        rows.append({"forward_crops_per_s": crops / (t1 - t0), "scoring_crops_per_s": crops / (t2 - t1)})
    fwd = statistics.median(r["forward_crops_per_s"] for r in rows)
    sco = statistics.median(r["scoring_crops_per_s"] for r in rows)
    print(json.dumps({
        "config": args.config, "device": str(device), "threads": torch.get_num_threads(), "classes": len(classes),
        "crops": crops, "batch_size": bs, "loader_workers": cfg.runtime.loader_workers, "teacher": cfg.teacher.model.model_dump(),
        "forward_crops_per_s": round(fwd, 1), "scoring_crops_per_s": round(sco, 1), "ratio": round(sco / fwd, 3),
        "runs": rows,
    }, indent=1))


if __name__ == "__main__":
    main()
