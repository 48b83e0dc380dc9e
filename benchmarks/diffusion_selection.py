"""Selection rules on a finished diffusion run's generated pool, scored by soft + KD student top-1.

    python benchmarks/diffusion_selection.py RUN_FOLDER --rules realism,correct-spread --seeds 0,1,2

RUN_FOLDER is a ``ddpipe run`` folder of the diffusion method (its ``config.yaml``, ``generated/`` pool and
``random/`` subset are read, and ``teacher/teacher.pt``: the run's teacher, from teacher.checkpoint or trained). Each
rule keeps ``method.ipc`` images per class, then one student per seed is trained under the run's soft + KD recipe
(``ddpipe.evaluate.evaluate``, as the evaluation stage does) and its test top-1 printed as one JSON line.
``random``, ``realism`` and ``diversity`` are the product's rules (``method.diffusion.select``, the synthesis
stage's own code, so they give the evaluation stage's number exactly); the others are candidates, measured here
before any goes into the product:

- ``correct-random``: a seeded draw among the images the teacher classifies as their class;
- ``correct-spread``: among those, ``ipc`` images evenly spaced in realism rank, from the most to the least
  typical;
- ``correct-spread-inner``: the same, at the centres of ``ipc`` equal rank bins (skips both ends);
- ``spread``: evenly spaced in realism rank over the whole pool;
- ``hardest-correct``: the least typical images the teacher still classifies as their class;
- ``herding-correct`` / ``kmeans-correct`` / ``kmeans``: herding, or the image nearest each k-means centre,
  on teacher features;
- ``real-random``: the run's random subset of real images (the baseline), for the same seeds.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from ddpipe.config import load_config
from ddpipe.data import ArraySplit, normalize
from ddpipe.errors import StoreError
from ddpipe.evaluate import ImageSet, evaluate
from ddpipe.imageset import read_class
from ddpipe.methods.diffusion.pool import generated_picks
from ddpipe.methods.selection.coreset import herding
from ddpipe.pipeline import context_for
from ddpipe.teacher import load_teacher
from ddpipe.train import penultimate_features, predict_logits


def kmeans_nearest(features: torch.Tensor, k: int, seed: int = 0, iterations: int = 50) -> list[int]:
    """Index of the point nearest each of k (Lloyd's) k-means centres, distinct."""
    centres = features[torch.randperm(len(features), generator=torch.Generator().manual_seed(seed))[:k]].clone()
    for _ in range(iterations):
        assign = torch.cdist(features, centres).argmin(1)
        for j in range(k):
            if (assign == j).any():
                centres[j] = features[assign == j].mean(0)
    picks: list[int] = []
    for row in torch.cdist(centres, features):
        picks.append(next(i for i in row.argsort().tolist() if i not in picks))
    return picks


def evenly(order: torch.Tensor, k: int, inner: bool = False) -> list[int]:
    n = len(order)
    positions = ((torch.arange(k) + 0.5) * n / k).long() if inner else torch.linspace(0, n - 1, k).round().long()
    return order[positions].tolist()


PRODUCT_RULES = ("random", "realism", "diversity")
CANDIDATE_RULES = ("correct-random", "correct-spread", "correct-spread-inner", "spread", "hardest-correct",
                   "herding-correct", "kmeans-correct", "kmeans")


def candidate_rules(c: int, images: torch.Tensor, teacher, cfg, ctx) -> dict:
    """The candidate rules for class ``c``, each a function returning picks; the teacher runs once per class."""
    ipc, (mean, std) = cfg.method.ipc, cfg.normalization
    logits = predict_logits(teacher, normalize(images, mean, std), cfg.labels.batch_size, ctx.device, cfg.runtime)
    ce = torch.nn.functional.cross_entropy(logits, torch.full((len(images),), c), reduction="none")
    correct = torch.nonzero(logits.argmax(1) == c).flatten()
    pool = ArraySplit("generated", images.numpy(), np.full(len(images), c), ctx.source.num_classes, "generated")
    features = penultimate_features(teacher, pool, np.arange(len(images)), mean, std, ctx.device, cfg.runtime)
    by_realism = correct[ce[correct].argsort()]
    return {
        "correct-random": lambda: correct[torch.randperm(len(correct), generator=torch.Generator().manual_seed(c))
                                          [:ipc]].tolist(),
        "correct-spread": lambda: evenly(by_realism, ipc),
        "correct-spread-inner": lambda: evenly(by_realism, ipc, inner=True),
        "spread": lambda: evenly(ce.argsort(), ipc),
        "hardest-correct": lambda: by_realism.flip(0)[:ipc].tolist(),
        "herding-correct": lambda: correct[herding(features[correct], ipc)].tolist(),
        "kmeans-correct": lambda: correct[kmeans_nearest(features[correct], ipc)].tolist(),
        "kmeans": lambda: kmeans_nearest(features, ipc),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", help="a diffusion run folder")
    parser.add_argument("--rules", default="realism", help="comma-separated rule names")
    parser.add_argument("--seeds", default="0", help="comma-separated student seeds")
    args = parser.parse_args()
    rules = args.rules.split(",")
    known = (*PRODUCT_RULES, *CANDIDATE_RULES, "real-random")
    if unknown := [r for r in rules if r not in known]:
        raise SystemExit(f"unknown rule {unknown[0]!r} (choose from {', '.join(sorted(known))})")
    cfg = load_config(f"{args.run}/config.yaml")
    ctx = context_for(cfg)
    source = ctx.source
    # the teacher stage writes the run's teacher (loaded from teacher.checkpoint or trained) into the run folder
    path = "teacher/teacher.pt"
    try:
        teacher = load_teacher(ctx.store.read_bytes(path), ctx.store.url(path), source.classes, cfg.input_format,
                               ctx.device, cfg.runtime)
    except StoreError as e:
        raise SystemExit(f"{e} (pass a run folder whose teacher stage finished)") from None
    teacher = teacher.model.eval()
    pools = [read_class(ctx.store, "generated", c, cfg.channels)[1] for c in range(source.num_classes)]
    # the teacher's logits and features for the candidates only when one is asked for
    candidates = ([candidate_rules(c, p, teacher, cfg, ctx) for c, p in enumerate(pools)]
                  if set(rules) & set(CANDIDATE_RULES) else None)
    for rule in rules:
        images, classes = [], []
        for c, pool in enumerate(pools):
            if rule == "real-random":
                kept = read_class(ctx.store, "random", c, cfg.channels)[1]
            elif rule in PRODUCT_RULES:
                kept = pool[generated_picks(ctx, rule, c, pool, teacher)[0]]
            else:
                kept = pool[candidates[c][rule]()]
            images.append(kept)
            classes += [c] * len(kept)
        data = ImageSet(images=torch.cat(images), classes=torch.tensor(classes))
        for seed in [int(s) for s in args.seeds.split(",")]:
            start = time.perf_counter()
            # a choice of settings: read the validation split, never the test split
            acc = evaluate(cfg, "soft_kd", data, source, seed, ctx.device, teacher=teacher, on="val")["val_accuracy"]
            print(json.dumps({"rule": rule, "seed": seed, "soft_kd_val": acc,
                              "seconds": round(time.perf_counter() - start, 1)}), flush=True)


if __name__ == "__main__":
    main()
