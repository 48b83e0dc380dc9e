"""The recovery methods through the pipeline: stages, shared teachers, shard resume after SIGKILL."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from ddpipe.config import load_config
from ddpipe.methods.recovery.statistics import read_statistics
from ddpipe.pipeline import run_store
from ddpipe.runner import run_pipeline

from conftest import CONFIGS, ROOT

pytestmark = [pytest.mark.slow, pytest.mark.fmnist]  # end to end: the recovery pipelines

FAST = ["evaluation.epochs=5", "evaluation.seeds=[0]"]


def preset(name: str, store: Path, *overrides: str):
    return load_config(CONFIGS / f"{name}.yaml", [f"store.uri={store}", *FAST, *overrides])


def test_gvbsm_runs_every_stage_with_an_ensemble(tmp_path):
    cfg = preset("smoke-gvbsm", tmp_path / "runs", "evaluation.regimes=[soft, soft_kd]")
    report = run_pipeline(cfg)
    folder = Path(run_store(cfg).root)
    assert list(report["stages"]) == ["dataset", "teacher", "moments", "statistics", "recovery", "synthesis",
                                      "random_subset", "labels", "evaluation"]
    assert report["stages"]["teacher"]["shards"] == 2 and report["ensemble"][0]["model"] == "convnet"
    assert report["stages"]["moments"]["shards"] == 2 * 2  # 2 teachers x 1000 images in shards of 500
    for k in (0, 1):
        stats = read_statistics((folder / f"statistics/teacher{k}.pt").read_bytes())
        assert stats["conv"] and stats["bn"]
    provenance = pq.read_table(folder / "distilled/provenance/class=00003.parquet").to_pylist()
    assert [r["ipc_index"] for r in provenance] == [0, 1] and all(r["source_index"] == -1 for r in provenance)
    assert all((folder / r["image"]).is_file() for r in provenance)
    losses = json.loads((folder / "recovery/classes-00000-00004-ipc-00000-00001.json").read_text())
    assert len(losses) == 1 and losses[0]["classes"] == [0, 1, 2, 3, 4] and losses[0]["ipc"] == [0, 1]
    assert set(report["regimes"]) == {"soft", "soft_kd"}
    assert all(0.0 <= report["regimes"][r]["distilled"]["mean"] <= 1.0 for r in report["regimes"])


def test_a_trained_teacher_is_shared_by_later_runs_in_the_store(tmp_path, monkeypatch):
    store = tmp_path / "runs"
    first = preset("smoke-sre2l", store, "evaluation.regimes=[hard]")
    run_pipeline(first)

    import ddpipe.teacher

    def no_training(*args, **kwargs):
        raise AssertionError("the teacher was trained again")

    monkeypatch.setattr(ddpipe.teacher, "train_teacher", no_training)
    second = preset("smoke-sre2l", store, "evaluation.regimes=[hard]", "method.ipc=1")  # another run folder
    assert second.run_name != first.run_name
    run_pipeline(second)
    a, b = Path(run_store(first).root), Path(run_store(second).root)
    assert (a / "teacher/teacher.pt").read_bytes() == (b / "teacher/teacher.pt").read_bytes()
    assert len(list((store / "shared" / "teachers").iterdir())) == 1


def test_a_recovery_shard_killed_and_run_again_gives_the_same_images(tmp_path):
    settings = [*FAST, "evaluation.regimes=[hard]", "method.recovery.iterations=300"]
    reference = preset("smoke-sre2l", tmp_path / "reference", *settings)
    run_pipeline(reference)

    store = tmp_path / "killed"
    cmd = [sys.executable, "-m", "ddpipe.cli", "run", str(CONFIGS / "smoke-sre2l.yaml"), "--store", str(store),
           "--engine", "plain", "--no-progress"]
    for s in settings:
        cmd += ["--set", s]
    folder = Path(run_store(preset("smoke-sre2l", store, *settings)).root)
    records = folder / "manifests" / "recovery"
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if records.is_dir() and len(list(records.glob("*.parquet"))) >= 1:  # a shard done, the next one running
            break
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done_at_kill = sorted(p.name for p in records.glob("*.parquet"))
    assert 1 <= len(done_at_kill) < 4, f"kill did not land mid-stage ({len(done_at_kill)} of 4 shards done)"
    assert not (folder / "manifests" / "recovery.parquet").exists()
    before = {p: p.stat().st_mtime_ns for p in records.glob("*.parquet")}

    resumed = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert all(p.stat().st_mtime_ns == t for p, t in before.items())  # finished shards were not recomputed
    ref = Path(run_store(reference).root)
    for sub in ("distilled/images", "distilled/provenance", "recovery"):
        got = {p.relative_to(folder).as_posix(): p.read_bytes() for p in (folder / sub).rglob("*") if p.is_file()}
        want = {p.relative_to(ref).as_posix(): p.read_bytes() for p in (ref / sub).rglob("*") if p.is_file()}
        assert got == want, sub
