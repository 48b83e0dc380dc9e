"""A store damaged under a run (issue 24): it fills up mid-shard, a finished shard's file is truncated later, a
Parquet file is replaced by a valid one of another schema. Each ends in one error line or a recompute of what
was damaged, never in an output that looks complete, and a resume gives the uninterrupted run's bytes."""

from __future__ import annotations

import io
import shutil
import subprocess
from contextlib import redirect_stderr
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ddpipe.cli import main
from ddpipe.manifests import files_of
from ddpipe.pipeline import run_store
from ddpipe.runner import run_pipeline
from ddpipe.store import Store

from conftest import SMOKE, smoke_config

pytestmark = [pytest.mark.slow, pytest.mark.fmnist]

FAST = ("evaluation.epochs=5", "evaluation.seeds=[0]", "evaluation.regimes=[hard]")
VOLATILE = {"report.json", "run.json", "config.yaml"}


def contents(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes()
            for p in folder.rglob("*") if p.is_file() and p.name not in VOLATILE}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    cfg = smoke_config(tmp_path_factory.mktemp("reference") / "runs", *FAST)
    run_pipeline(cfg)
    return cfg, Path(run_store(cfg).root)


def _cli_run(store: Path) -> tuple[int, list[str]]:
    err = io.StringIO()
    args = ["run", str(SMOKE), "--engine", "plain", "--no-progress", "--store", str(store)]
    for s in FAST:
        args += ["--set", s]
    with redirect_stderr(err):
        code = main(args)
    return code, err.getvalue().strip().splitlines()


def _records_verify(folder: Path) -> int:
    """Every shard record present lists files that hash as recorded (nothing partial counts as done)."""
    store, n = Store(str(folder)), 0
    for record in (folder / "manifests").glob("*/*.parquet"):
        for f in files_of(pq.read_table(record)):
            assert store.verify(f), f"{f.path} of {record.name} does not match its record"
            n += 1
    return n


def test_a_store_that_fills_up_mid_shard(tmp_path, reference):
    _, ref_folder = reference
    mnt = tmp_path / "small"
    mnt.mkdir()
    # The finished run folder and its shared teacher take about 1.1 MB of tmpfs pages: 600 kB fills up mid-run.
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=600k", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        code, lines = _cli_run(mnt)
        assert code == 2 and len(lines) == 1, lines
        assert lines[0].startswith(f"ddpipe: error: cannot write {mnt}/") and "No space left on device" in lines[0]
        folder = next(mnt.glob("smoke-*"))
        assert not (folder / "report.json").exists()
        assert [p for p in mnt.rglob("*") if ".tmp-" in p.name] == []  # the failed write left no temporary file
        done = _records_verify(folder)
        assert done > 0  # some shards finished before the disk filled, and they are whole
        subprocess.run(["mount", "-o", "remount,size=64m", str(mnt)], check=True)
        code, lines = _cli_run(mnt)
        assert code == 0, lines
        assert contents(folder) == contents(ref_folder)
        assert [p for p in mnt.rglob("*") if ".tmp-" in p.name or p.name == "run.lock"] == []
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def _copy(reference, tmp_path) -> tuple:
    cfg, ref_folder = reference
    store = tmp_path / "runs"
    shutil.copytree(Path(cfg.store.uri), store)
    return smoke_config(store, *FAST), Path(run_store(smoke_config(store, *FAST)).root)


def test_a_truncated_file_of_a_finished_shard_is_recomputed(tmp_path, reference):
    cfg, folder = _copy(reference, tmp_path)
    want = contents(folder)
    scores = folder / "scoring" / "class=00003.parquet"
    scores.write_bytes(scores.read_bytes()[: scores.stat().st_size // 2])  # its footer is gone
    label = next((folder / "distilled" / "labels").glob("*.parquet"))
    label.write_bytes(label.read_bytes()[:100])
    run_pipeline(cfg)
    assert contents(folder) == want


def test_parquet_files_of_another_schema_are_not_taken_for_outputs(tmp_path, reference):
    cfg, folder = _copy(reference, tmp_path)
    want = contents(folder)
    scores = folder / "scoring" / "class=00003.parquet"
    rows = pq.read_metadata(scores).num_rows
    pq.write_table(pa.table({"other": list(range(rows))}), scores)  # valid footer, same row count, wrong schema
    record = folder / "manifests" / "synthesis" / "classes-00000-00001.parquet"
    pq.write_table(pa.table({"stage": ["synthesis"], "shard": ["x"]}), record)  # a record of another schema
    stage = folder / "manifests" / "evaluation.parquet"
    pq.write_table(pa.table({"nothing": [1]}), stage)  # a stage manifest of another schema
    run_pipeline(cfg)
    assert contents(folder) == want
