"""SIGKILL the smoke run at random moments, resume each to completion, compare with an uninterrupted run.

    python benchmarks/kill_resume.py --engine plain --kills 20 --out /tmp/kills-plain.json
    python benchmarks/kill_resume.py --engine prefect --kills 20 --out /tmp/kills-prefect.json

First one uninterrupted run (the reference, and its wall time T). Then, ``--kills`` times: a fresh store, the
same command started in its own process group, SIGKILLed at a moment drawn uniformly from [0.5 s, T] (seeded
with ``--seed``; the whole group: the CLI and, under Prefect, its temporary server), then the same command
run again to completion. Each resumed run folder is compared with the reference file by file, in four groups:
images (``distilled/images/``, ``random/images/``), labels (``distilled/labels/``, ``random/labels/``),
evaluation files (``evaluation/``) and manifests (``manifests/``), and searched for leftovers: temporary files (``*.tmp-*``), a run lock, and shard records
(``manifests/<stage>/<shard>.parquet``) that the stage manifest does not list. ``config.yaml``, ``run.json``
(a random token) and ``report.json`` (stage seconds) differ by design; the report's accuracies are compared.
Prints a Markdown table and writes everything as JSON to ``--out``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
GROUPS = {"images": ("distilled/images/", "random/images/"), "labels": ("distilled/labels/", "random/labels/"),
          "evaluation": ("evaluation/",), "manifests": ("manifests/",)}
VOLATILE = {"config.yaml", "run.json", "report.json"}


def command(store: Path, engine: str, overrides: list[str]) -> list[str]:
    cmd = [sys.executable, "-m", "ddpipe.cli", "run", str(ROOT / "configs" / "smoke.yaml"), "--engine", engine,
           "--no-progress", "--store", str(store)]
    for o in overrides:
        cmd += ["--set", o]
    return cmd


def run_folder(store: Path) -> Path:
    return next(p for p in store.iterdir() if p.name.startswith("smoke-"))


def digest(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name not in VOLATILE}


def leftovers(folder: Path) -> list[str]:
    found = [p.relative_to(folder).as_posix() for p in folder.rglob("*") if ".tmp-" in p.name or p.name == "run.lock"]
    for stage_manifest in (folder / "manifests").glob("*.parquet"):
        if stage_manifest.name == "plan.parquet":
            continue
        listed = set(pq.read_table(stage_manifest).column("shard").to_pylist())
        for record in (folder / "manifests" / stage_manifest.stem).glob("*.parquet"):
            if record.stem not in listed:
                found.append(record.relative_to(folder).as_posix())
    return found


def regimes(folder: Path) -> dict:
    return json.loads((folder / "report.json").read_text())["regimes"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--engine", choices=("plain", "prefect"), default="plain")
    ap.add_argument("--kills", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--set", action="append", default=[], dest="overrides", help="KEY=VALUE, as ddpipe run --set")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    rng = random.Random(args.seed)
    work = Path(tempfile.mkdtemp(prefix=f"ddpipe-kills-{args.engine}-"))
    env = {**os.environ, "PREFECT_HOME": str(work / "prefect"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}

    t0 = time.perf_counter()
    subprocess.run(command(work / "reference", args.engine, args.overrides), check=True, env=env, cwd=ROOT,
                   stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - t0
    ref_folder = run_folder(work / "reference")
    ref, ref_regimes = digest(ref_folder), regimes(ref_folder)
    print(f"reference: {wall:.1f} s, {len(ref)} files", flush=True)

    trials = []
    for i in range(args.kills):
        store = work / f"kill-{i:02d}"
        at = rng.uniform(0.5, wall)
        proc = subprocess.Popen(command(store, args.engine, args.overrides), env=env, cwd=ROOT,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        try:
            proc.wait(timeout=at)
            finished = True  # it ended before the kill (the draw fell after its end)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            finished = False
        killed_with = sorted(p.relative_to(store).as_posix() for p in store.rglob("manifests/*/*.parquet")) \
            if store.exists() else []
        t1 = time.perf_counter()
        resumed = subprocess.run(command(store, args.engine, args.overrides), env=env, cwd=ROOT,
                                 capture_output=True, text=True)
        trial = {"kill_at_s": round(at, 2), "finished_before_kill": finished, "records_at_kill": len(killed_with),
                 "resume_rc": resumed.returncode, "resume_s": round(time.perf_counter() - t1, 1)}
        if resumed.returncode != 0:
            trial["error"] = resumed.stderr.strip().splitlines()[-1:]
        else:
            folder = run_folder(store)
            got = digest(folder)
            for group, prefixes in GROUPS.items():
                want = {k: v for k, v in ref.items() if k.startswith(prefixes)}
                trial[group] = {k: v for k, v in got.items() if k.startswith(prefixes)} == want
            trial["all_files"] = got == ref
            trial["report_accuracies"] = regimes(folder) == ref_regimes
            trial["leftovers"] = leftovers(folder)
        trials.append(trial)
        print(json.dumps(trial), flush=True)

    ok = [t for t in trials if t["resume_rc"] == 0]
    summary = {"engine": args.engine, "kills": args.kills, "reference_s": round(wall, 1), "overrides": args.overrides,
               "resumed": len(ok), "killed_mid_run": sum(not t["finished_before_kill"] for t in trials)}
    for key in (*GROUPS, "all_files", "report_accuracies"):
        summary[key] = sum(bool(t.get(key)) for t in trials)
    summary["runs_with_leftovers"] = sum(bool(t.get("leftovers")) for t in ok)
    print(f"\n| engine | kills (mid-run) | resumed | images | labels | evaluation | manifests | all files | "
          f"report | runs with leftovers |\n|---|---|---|---|---|---|---|---|---|---|\n"
          f"| {args.engine} | {args.kills} ({summary['killed_mid_run']}) | {summary['resumed']}/{args.kills} | "
          f"{summary['images']}/{args.kills} | {summary['labels']}/{args.kills} | {summary['evaluation']}/{args.kills} | "
          f"{summary['manifests']}/{args.kills} | {summary['all_files']}/{args.kills} | "
          f"{summary['report_accuracies']}/{args.kills} | {summary['runs_with_leftovers']} |")
    if args.out:
        args.out.write_text(json.dumps({"summary": summary, "trials": trials}, indent=1))


if __name__ == "__main__":
    main()
