"""Crash recovery: SIGKILL a run in the middle of a sharded stage, run the same command again."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from ddpipe.pipeline import run_store
from ddpipe.runner import run_pipeline

from conftest import ROOT, SMOKE, smoke_config

pytestmark = [pytest.mark.slow, pytest.mark.fmnist]  # end to end: a CLI run killed and resumed

SETTINGS = ["evaluation.epochs=60", "evaluation.seeds=[0, 1]"]  # 12 evaluation shards of ~1 s each
VOLATILE = {"report.json", "run.json", "config.yaml"}


def files(folder: Path) -> dict[str, tuple[bytes, int]]:
    return {
        p.relative_to(folder).as_posix(): (p.read_bytes(), p.stat().st_mtime_ns)
        for p in folder.rglob("*") if p.is_file() and p.name not in VOLATILE and ".tmp-" not in p.name
    }


def test_sigkill_mid_stage_then_resume(tmp_path):
    reference = smoke_config(tmp_path / "reference", *SETTINGS)
    run_pipeline(reference)

    store = tmp_path / "killed"
    cmd = [sys.executable, "-m", "ddpipe.cli", "run", str(SMOKE), "--store", str(store), "--no-progress"]
    for s in SETTINGS:
        cmd += ["--set", s]
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect")}
    folder = Path(run_store(smoke_config(store, *SETTINGS)).root)
    records = folder / "manifests" / "evaluation"
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None:
        if records.is_dir() and len(list(records.glob("*.parquet"))) >= 3:
            break
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)  # the CLI, its Prefect server, everything
    proc.wait()
    done_at_kill = sorted(p.name for p in records.glob("*.parquet"))
    assert 3 <= len(done_at_kill) < 12, f"kill did not land mid-stage ({len(done_at_kill)} of 12 shards done)"
    assert not (folder / "manifests" / "evaluation.parquet").exists()  # the stage does not look complete
    assert not (folder / "report.json").exists()
    before = files(folder)

    resumed = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    after = files(folder)

    # Finished shards were not recomputed: their records and outputs are untouched.
    untouched = set()
    for record in (folder / "manifests").glob("*/*.parquet"):
        rel = record.relative_to(folder).as_posix()
        if rel in before:
            assert after[rel] == before[rel], f"{rel} was rewritten"
            for path in pq.read_table(record).column("path").to_pylist():
                assert after[path] == before[path], f"{path} of a finished shard was recomputed"
                untouched.add(path)
    # At most one shard per stage was in flight when the process died: only it left outputs without a record.
    orphans = [p for p in before if p.startswith("evaluation/") and p not in untouched]
    assert len(orphans) <= 1, orphans

    # The final outputs equal those of an uninterrupted run with the same seed, byte for byte.
    ref = {k: v[0] for k, v in files(Path(run_store(reference).root)).items()}
    assert {k: v[0] for k, v in after.items()} == ref
