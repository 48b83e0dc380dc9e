"""Several ``ddpipe run`` jobs at once on one machine (a GPU box, or a many-core CPU box), one table of results.

    python benchmarks/concurrent_runs.py --store /tmp/cmp --deadline 540 --out results.json \\
        --set runtime.device=cuda --set 'evaluation.seeds=[0]' \\
        --run rded configs/fashion-mnist-rded-ipc10.yaml evaluation.baseline=false \\
        --run sre2l configs/fashion-mnist-sre2l-ipc10.yaml evaluation.baseline=false

Each ``--run LABEL CONFIG [KEY=VALUE ...]`` is one ``ddpipe run CONFIG --engine plain`` process (the global
``--set`` options first, then the job's own), all sharing ``--store``, so teachers, moments and baseline
students one job finishes are reused by the others (``<store>/shared/``). ``--first`` jobs run, one after the
other, before the concurrent ones start (e.g. one job that trains the shared teacher, so that the concurrent
jobs do not all train it). At ``--deadline`` seconds every job still running is stopped (SIGTERM to its
process group). Every finished evaluation shard counts: the table lists each job's accuracy per regime (mean
over the seeds finished), its stage seconds when the run completed, and its wall time. Prints the Markdown
table and writes everything as JSON to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from ddpipe.report import test_accuracy


def _command(store: str, config: str, overrides: list[str]) -> list[str]:
    cmd = [sys.executable, "-m", "ddpipe.cli", "run", config, "--engine", "plain", "--no-progress", "--store", store]
    for o in overrides:
        cmd += ["--set", o]
    return cmd


def _collect(log: Path) -> dict:
    """The run folder (from the job's first line), its finished evaluation shards and, when complete, its report."""
    text = log.read_text() if log.exists() else ""
    folder = next((line.split(": ", 1)[1].strip() for line in text.splitlines() if line.startswith("run folder: ")), None)
    out: dict = {"run": folder, "evaluations": [], "stages": None, "error": None}
    if folder is None:
        out["error"] = text.strip().splitlines()[-1] if text.strip() else "no output"
        return out
    for f in sorted(Path(folder, "evaluation").glob("*.json")):
        out["evaluations"].append(json.loads(f.read_text()))
    report = Path(folder, "report.json")
    if report.exists():
        out["stages"] = {k: v["seconds"] for k, v in json.loads(report.read_text())["stages"].items()}
    return out


def _table(jobs: list[dict]) -> str:
    regimes = ["hard", "soft", "soft_kd"]
    lines = ["| job | set | " + " | ".join(regimes) + " | wall (s) |", "| --- | --- |" + " --- |" * (len(regimes) + 1)]
    for job in jobs:
        by_set: dict[str, dict[str, list[float]]] = {}
        for e in job["evaluations"]:
            by_set.setdefault(e["set"], {}).setdefault(e["regime"], []).append(test_accuracy(e))
        for set_name, regs in sorted(by_set.items()):
            cells = []
            for r in regimes:
                v = regs.get(r)
                cells.append(f"{100 * sum(v) / len(v):.2f} (n={len(v)})" if v else "")
            lines.append(f"| {job['label']} | {set_name} | " + " | ".join(cells) + f" | {job['wall_s']} |")
        if not by_set:
            lines.append(f"| {job['label']} | none finished | | | | {job['wall_s']} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--store", required=True)
    p.add_argument("--set", dest="overrides", action="append", default=[], help="applied to every job first")
    p.add_argument("--run", nargs="+", action="append", default=[], metavar="LABEL CONFIG [KEY=VALUE]",
                   help="a concurrent job")
    p.add_argument("--first", nargs="+", action="append", default=[], metavar="LABEL CONFIG [KEY=VALUE]",
                   help="a job run to the end before the concurrent ones start")
    p.add_argument("--deadline", type=float, default=None, help="stop every job still running after this many seconds")
    p.add_argument("--logs", default=None, help="folder of the jobs' logs (default: <store>/logs)")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    args = p.parse_args()
    logs = Path(args.logs or Path(args.store) / "logs")
    logs.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    jobs = []

    def launch(spec: list[str]) -> dict:
        label, config, *own = spec
        log = logs / f"{label}.log"
        proc = subprocess.Popen(_command(args.store, config, [*args.overrides, *own]), stdout=log.open("w"),
                                stderr=subprocess.STDOUT, env=env, start_new_session=True)
        job = {"label": label, "config": config, "overrides": own, "log": str(log), "proc": proc,
               "started": time.monotonic()}
        jobs.append(job)
        return job

    def finish(job: dict, timed_out: bool) -> None:
        job["returncode"] = job["proc"].returncode
        job["timed_out"] = timed_out
        job["wall_s"] = round(time.monotonic() - job["started"], 1)

    def remaining() -> float | None:
        return None if args.deadline is None else max(0.0, args.deadline - (time.monotonic() - start))

    for spec in args.first:
        job = launch(spec)
        try:
            job["proc"].wait(timeout=remaining())
            finish(job, False)
        except subprocess.TimeoutExpired:
            os.killpg(job["proc"].pid, signal.SIGTERM)
            job["proc"].wait()
            finish(job, True)
    running = [launch(spec) for spec in args.run]
    while running:
        time.sleep(1.0)
        for job in list(running):
            if job["proc"].poll() is not None:
                finish(job, False)
                running.remove(job)
        if remaining() == 0.0:
            for job in running:
                os.killpg(job["proc"].pid, signal.SIGTERM)
            for job in running:
                job["proc"].wait()
                finish(job, True)
            running = []
    results = []
    for job in jobs:
        job.pop("proc")
        job.pop("started")
        results.append({**job, **_collect(Path(job["log"]))})
    table = _table(results)
    print(table)
    if args.out:
        Path(args.out).write_text(json.dumps({"overrides": args.overrides, "jobs": results, "table": table}, indent=1))


if __name__ == "__main__":
    main()
