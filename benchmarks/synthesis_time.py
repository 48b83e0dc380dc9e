"""Synthesis time per distilled image, method against method, on the same teacher and machine.

    python benchmarks/synthesis_time.py --store /tmp/ddpipe-synth \\
        --config configs/fashion-mnist-rded-ipc10.yaml configs/fashion-mnist-sre2l-ipc10.yaml \\
        configs/fashion-mnist-cda-ipc10.yaml configs/fashion-mnist-gvbsm-ipc10.yaml --set teacher.checkpoint=T.pt

Each config runs its stages up to ``synthesis`` with the plain runner (fresh run folders in ``--store``) and
times every stage. A method's synthesis time is the sum of its own stages (RDED: scoring + synthesis;
SRe2L/CDA: statistics + recovery + synthesis; G-VBSM: moments + statistics + recovery + synthesis), per
distilled image; the teacher stage (training the extra G-VBSM backbones, loading the checkpoint) is reported
apart. Prints one JSON line per method as soon as it finishes (so a run stopped early keeps what it measured),
then one JSON object with each method's seconds per image and its ratio to the first config's.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from ddpipe.config import load_config
from ddpipe.methods import METHODS
from ddpipe.pipeline import context_for
from ddpipe.runner import run_stages


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--config", nargs="+", required=True)
    p.add_argument("--store", default="/tmp/ddpipe-synth")
    p.add_argument("--set", dest="overrides", action="append", default=[])
    p.add_argument("--keep", action="store_true", help="keep earlier run folders (default: start each fresh)")
    args = p.parse_args()
    out = {"overrides": args.overrides, "methods": []}
    for path in args.config:
        cfg = load_config(path, [f"store.uri={args.store}", *args.overrides])
        folder = Path(args.store) / cfg.run_name
        if not args.keep:
            shutil.rmtree(folder, ignore_errors=True)
        _, seconds = run_stages(cfg, until="synthesis")
        own = [s.name for s in METHODS[cfg.method.name].stages(cfg)]
        images = cfg.method.ipc * len(context_for(cfg).source.classes)
        method_seconds = sum(seconds[s] for s in own)
        out["methods"].append({
            "config": path, "method": cfg.method.name, "images": images, "stages": {k: round(v, 2) for k, v in seconds.items()},
            "method_seconds": round(method_seconds, 2), "seconds_per_image": round(method_seconds / images, 4),
        })
        print(json.dumps(out["methods"][-1]), flush=True)
    base = out["methods"][0]["seconds_per_image"]
    for m in out["methods"]:
        m["ratio_to_first"] = round(m["seconds_per_image"] / base, 2)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
