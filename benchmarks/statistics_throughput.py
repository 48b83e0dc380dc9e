"""Global statistic collection throughput against the teacher's bare forward pass on the same images.

    python benchmarks/statistics_throughput.py [--config configs/fashion-mnist-gvbsm-ipc10.yaml] [--images 20000]
        [--per-shape]

Collection (``ddpipe.methods.recovery.statistics.collect``: read the batch, normalise, forward with a hook on every conv input
that adds the channel and patch moments) is timed over the first ``--images`` training images, per teacher of
the config. The bare forward pass runs the same teacher at the same batch size over the same images,
normalised beforehand. Target: collection throughput >= 80% of the bare forward throughput. Teachers have
random weights: throughput does not depend on them. With ``--per-shape`` each teacher's entry also lists its
conv-input shapes, how many convolutions read each, and the milliseconds ``batch_sums`` takes on one such batch
(where the statistics' time goes). Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np
import torch

from ddpipe.config import load_config
from ddpipe.data import normalize
from ddpipe.methods.recovery.statistics import batch_sums, collect, conv_layers
from ddpipe.models import init_model
from ddpipe.pipeline import context_for
from ddpipe.train import batch_to, to_device


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--config", default="configs/fashion-mnist-gvbsm-ipc10.yaml")
    p.add_argument("--set", dest="overrides", action="append", default=[])
    p.add_argument("--images", type=int, default=20000)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--per-shape", action="store_true", help="also time the statistics per conv-input shape")
    args = p.parse_args()
    cfg = load_config(args.config, args.overrides)
    ctx = context_for(cfg)  # the device (after runtime.num_threads) and the data, as the stages get them
    device, source = ctx.device, ctx.source
    st, (mean, std) = cfg.statistics, cfg.normalization
    idx = np.arange(min(args.images, len(source.train)))
    inputs = [normalize(source.train.batch(idx[s : s + st.batch_size]), mean, std) for s in range(0, len(idx), st.batch_size)]

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    out = {"config": args.config, "images": len(idx), "batch_size": st.batch_size, "patch_size": st.patch_size,
           "device": str(device), "threads": torch.get_num_threads(), "teachers": []}
    for spec in cfg.teacher_models:
        model = to_device(init_model(spec, cfg.channels, source.num_classes, cfg.image_size, 0), device, cfg.runtime).eval()

        @torch.no_grad()
        def bare():
            for x in inputs:
                model(batch_to(x, device, cfg.runtime))
            sync()

        def collecting():
            collect(model, source.train, idx, st.patch_size, st.batch_size, mean, std, device, cfg.runtime)
            sync()

        bare(), collecting()  # warm-up
        times = {"bare": [], "collect": []}
        for _ in range(args.repeats):
            for name, fn in (("bare", bare), ("collect", collecting)):
                t = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t)
        b, c = statistics.median(times["bare"]), statistics.median(times["collect"])
        entry = {"model": spec.name, "bare_images_per_s": round(len(idx) / b, 1),
                 "collect_images_per_s": round(len(idx) / c, 1), "ratio": round(b / c, 3)}
        if args.per_shape:
            entry["per_shape"] = per_shape(model, inputs[0], st.patch_size, device, cfg.runtime, args.repeats)
        out["teachers"].append(entry)
    print(json.dumps(out, indent=1))


@torch.no_grad()
def per_shape(model, x, patch: int, device, runtime, repeats: int) -> list[dict]:
    """Each conv-input shape of one batch, how many convolutions read it, and ``batch_sums``'s milliseconds on it."""
    shapes: dict[tuple, int] = {}
    hooks = [m.register_forward_pre_hook(lambda m, i: shapes.update({tuple(i[0].shape): shapes.get(tuple(i[0].shape), 0) + 1}))
             for _, m in conv_layers(model)]
    model(batch_to(x, device, runtime))
    for h in hooks:
        h.remove()
    rows = []
    for shape, count in shapes.items():
        z = torch.randn(shape, device=device)
        batch_sums(z, patch)
        t = time.perf_counter()
        for _ in range(repeats):
            batch_sums(z, patch)
        if device.type == "cuda":
            torch.cuda.synchronize()
        rows.append({"shape": list(shape), "convs": count, "ms": round((time.perf_counter() - t) / repeats * 1000, 2)})
    return rows


if __name__ == "__main__":
    main()
