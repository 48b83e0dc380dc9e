"""Choose refine's schedule on the validation split: synthesis time per image and student top-1 on validation.

    python benchmarks/refine_schedule.py --store /tmp/ddpipe-schedule --config configs/fashion-mnist-refine-fadrm-ipc10.yaml \\
        --variant it80 method.recovery.iterations=80 method.refine.mix_every=20 \\
        --variant it40 method.recovery.iterations=40 method.refine.mix_every=10 \\
        --reference configs/fashion-mnist-rded-ipc10.yaml --set teacher.checkpoint=T.pt --seeds 0,1,2

Each variant is the config with its overrides. It runs its stages up to ``labels`` with the plain runner (fresh run
folders in ``--store``, so the stage times are this machine's, one process at a time), then one student per seed and
regime is trained as the evaluation stage does (``ddpipe.evaluate.evaluate``) and scored on the **validation split**
(``dataset.val_fraction``), never the test split: the test split is read once, by the matrix, for the chosen
schedule. ``--reference`` configs (RDED) run the same way; the first run's random subset (draw 0) is scored too.
Prints one JSON line per run and regime (mean, std and values over the seeds, seconds per image of the method's
own stages), then a summary object with each run's difference from the first (Welch's 95 % interval and verdict,
``ddpipe.scores.compare``).

``--split test`` reads the test split instead: once, for the schedule chosen on validation, with more seeds
(``--seeds 0-9``), to compare it with RDED where the matrix's 3 seeds cannot tell them apart.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

from ddpipe.config import load_config
from ddpipe.evaluate import evaluate, load_image_set, summarize
from ddpipe.imageset import random_sets
from ddpipe.methods import METHODS
from ddpipe.pipeline import context_for
from ddpipe.runner import run_stages
from ddpipe.scores import compare
from ddpipe.teacher import load_teacher


def students(cfg, ctx, data, teacher, regimes, seeds, split) -> dict:
    out = {}
    for regime in regimes:
        values = [evaluate(cfg, regime, data, ctx.source, seed, ctx.device, teacher=teacher, on=split)[f"{split}_accuracy"]
                  for seed in seeds]
        out[regime] = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in summarize(values).items()}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True, help="the refine config the variants change")
    p.add_argument("--variant", nargs="+", action="append", default=[], metavar=("NAME", "KEY=VALUE"),
                   help="a name, then the overrides of one variant (repeatable)")
    p.add_argument("--reference", nargs="*", default=[], help="configs run as they are (RDED)")
    p.add_argument("--store", default="/tmp/ddpipe-schedule")
    p.add_argument("--set", dest="overrides", action="append", default=[])
    p.add_argument("--seeds", default="0,1,2", help="comma-separated, or a range FIRST-LAST")
    p.add_argument("--split", choices=("val", "test"), default="val")
    p.add_argument("--regimes", default="hard,soft")
    p.add_argument("--no-random", action="store_true", help="leave the random subset out (measured already)")
    p.add_argument("--keep", action="store_true", help="keep earlier run folders (default: start each fresh)")
    args = p.parse_args()
    first, _, last = args.seeds.partition("-")
    seeds = list(range(int(first), int(last) + 1)) if last else [int(s) for s in args.seeds.split(",")]
    regimes = args.regimes.split(",")
    runs = [(Path(c).stem, c, []) for c in args.reference] + [(v[0], args.config, v[1:]) for v in args.variant]
    summary, random_done = [], args.no_random
    for name, path, changes in runs:
        cfg = load_config(path, [f"store.uri={args.store}", *args.overrides, *changes])
        ctx = context_for(cfg)
        if not args.keep:
            shutil.rmtree(Path(args.store) / cfg.run_name, ignore_errors=True)
        _, seconds = run_stages(cfg, until="labels")
        own = sum(seconds[s.name] for s in METHODS[cfg.method.name].stages(cfg))
        num_classes = ctx.source.num_classes
        teacher = load_teacher(ctx.store.read_bytes("teacher/teacher.pt"), "teacher/teacher.pt", ctx.source.classes,
                               cfg.input_format, ctx.device, cfg.runtime).model.eval()
        sets = [("distilled", name)] + ([] if random_done else [(random_sets(cfg)[0], "random")])
        random_done = True
        for set_name, label in sets:
            start = time.perf_counter()
            data = load_image_set(ctx, set_name, num_classes, with_labels=True)
            row = {"run": label, "changes": changes if set_name == "distilled" else [],
                   "seconds_per_image": round(own / len(data), 4) if set_name == "distilled" else None,
                   args.split: students(cfg, ctx, data, teacher, regimes, seeds, args.split),
                   "student_seconds": round(time.perf_counter() - start, 1)}
            summary.append(row)
            print(json.dumps(row), flush=True)
    base = summary[0]
    for row in summary[1:]:
        row["against_first"] = {
            regime: {k: ([round(x, 4) for x in v] if isinstance(v, list) else round(v, 4) if isinstance(v, float) else v)
                     for k, v in compare(row[args.split][regime]["values"], base[args.split][regime]["values"]).items()}
            for regime in regimes}
    print(json.dumps({"split": args.split, "seeds": seeds, "overrides": args.overrides, "first": base["run"],
                      "runs": summary}, indent=1))


if __name__ == "__main__":
    main()
