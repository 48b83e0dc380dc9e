"""The sha256 of what every run in a store computed, to check that two versions of the code give the same outputs.

    python benchmarks/output_hashes.py STORE

For each run folder of ``STORE`` (not ``shared/``) it prints the hash of every output together (path and sha256
of each file), then of ``distilled/``, ``random/``, ``evaluation/`` and ``teacher/`` alone, and the accuracies of
``report.json``. Left out, because they hold no result: ``manifests/`` (cache keys, which change with the code),
``run.json`` (the folder's random token), ``config.yaml`` (it names the store), ``report.json`` (timings and
the code version; its accuracies are printed), and the timing files ``generation/<shard>.json`` and
``diffusion/training.json``. Two stores that print the same lines hold byte-identical results.
"""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path

SKIPPED = {"run.json", "report.json", "config.yaml", "diffusion/training.json"}


def kept(rel: str) -> bool:
    timing = rel.startswith("generation/") and rel.endswith(".json") and rel != "generation/quality.json"
    return not (rel.startswith("manifests/") or rel in SKIPPED or timing)


def digest(run: Path, files: list[Path]) -> str:
    h = hashlib.sha256()
    for f in files:
        h.update(f.relative_to(run).as_posix().encode() + b"\0" + hashlib.sha256(f.read_bytes()).digest())
    return h.hexdigest()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("store")
    args = p.parse_args()
    for run in sorted(r for r in Path(args.store).iterdir() if r.is_dir() and r.name != "shared"):
        if not (run / "report.json").exists():
            print(f"{run.name}: not finished")
            continue
        files = [f for f in sorted(run.rglob("*")) if f.is_file() and kept(f.relative_to(run).as_posix())]
        print(f"{run.name}: {len(files)} files, sha256 {digest(run, files)}")
        for sub in ("distilled", "random", "evaluation", "teacher"):
            part = [f for f in files if f.relative_to(run).parts[0] == sub]
            print(f"{run.name}: {sub}/ {len(part)} files, sha256 {digest(run, part)}")
        report = json.loads((run / "report.json").read_text())
        accuracies = {r: {s: e[s]["values"] for s in ("distilled", "random")} for r, e in report["regimes"].items()}
        print(f"{run.name}: top-1 {json.dumps(accuracies)}")


if __name__ == "__main__":
    main()
