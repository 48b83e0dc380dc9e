"""Whole runs of a preset: accuracy per regime and orchestration overhead.

    python benchmarks/pipeline_runs.py --config configs/fashion-mnist-rded-ipc10.yaml \\
        --engines prefect plain --out /tmp/ddpipe-bench

Each engine runs the preset from scratch (fresh store folder, fresh PREFECT_HOME) through the CLI:
``prefect`` is the distill flow on a temporary local Prefect server (ephemeral SQLite), ``plain`` is the same
stages as plain function calls. Prints one JSON object: wall seconds per engine, the orchestration overhead
(1 - plain / prefect), whether both wrote byte-identical stage manifests, and each run's report.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path


def run(config: str, engine: str, out: Path, overrides: list[str]) -> dict:
    store = out / engine
    shutil.rmtree(store, ignore_errors=True)
    home = out / f"prefect-home-{engine}"
    shutil.rmtree(home, ignore_errors=True)
    cmd = [sys.executable, "-m", "ddpipe.cli", "run", config, "--store", str(store), "--engine", engine, "--no-progress"]
    for o in overrides:
        cmd += ["--set", o]
    env = {**os.environ, "PREFECT_HOME": str(home)}
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{engine} run failed:\n{proc.stderr[-4000:]}")
    folder = next(p for p in store.iterdir() if p.is_dir())
    report = json.loads((folder / "report.json").read_text())
    manifests = {p.name: p.read_bytes() for p in (folder / "manifests").glob("*.parquet")}
    return {"wall_seconds": round(wall, 2), "folder": str(folder), "report": report, "_manifests": manifests,
            "stdout": proc.stdout}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--config", required=True)
    p.add_argument("--engines", nargs="+", default=["prefect", "plain"], choices=["prefect", "plain"])
    p.add_argument("--out", default="/tmp/ddpipe-bench")
    p.add_argument("--set", dest="overrides", action="append", default=[])
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = {e: run(args.config, e, out, args.overrides) for e in args.engines}
    summary = {"config": args.config, "overrides": args.overrides, "threads": os.cpu_count()}
    for e, r in results.items():
        summary[e] = {k: v for k, v in r.items() if not k.startswith("_") and k != "stdout"}
        print(r["stdout"], file=sys.stderr)
    if {"prefect", "plain"} <= results.keys():
        a, b = results["prefect"]["wall_seconds"], results["plain"]["wall_seconds"]
        summary["overhead_fraction"] = round(1 - b / a, 4)
        summary["identical_manifests"] = results["prefect"]["_manifests"] == results["plain"]["_manifests"]
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
