"""The stages run as plain function calls (no orchestrator): outputs, resume, validation, determinism."""

import json
import math
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from ddpipe.pipeline import run_store, status
from ddpipe.runner import run_pipeline
from ddpipe.stages import stages_for

from conftest import smoke_config

pytestmark = [pytest.mark.slow, pytest.mark.fmnist]  # end to end: whole runs of the smoke preset

FAST = ("evaluation.epochs=5", "evaluation.seeds=[0]")
VOLATILE = {"report.json", "run.json", "config.yaml"}  # times, a random token, the store URI


def snapshot(folder: Path) -> dict[str, tuple[bytes, int]]:
    return {
        p.relative_to(folder).as_posix(): (p.read_bytes(), p.stat().st_mtime_ns)
        for p in folder.rglob("*") if p.is_file() and p.name not in VOLATILE
    }


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    cfg = smoke_config(tmp_path_factory.mktemp("plain") / "runs", *FAST)
    report = run_pipeline(cfg)
    return cfg, Path(run_store(cfg).root), report


def test_run_folder_layout_and_report(finished):
    cfg, folder, report = finished
    assert (folder / "config.yaml").is_file() and (folder / "teacher" / "teacher.pt").is_file()
    assert len(list((folder / "distilled" / "images").rglob("*.png"))) == 10 * cfg.method.ipc
    assert len(list((folder / "random" / "images").rglob("*.png"))) == 10 * cfg.method.ipc
    for stage in stages_for(cfg):
        assert (folder / "manifests" / f"{stage.name}.parquet").is_file()
    assert set(report["regimes"]) == {"hard", "soft", "soft_kd"}
    for entry in report["regimes"].values():
        assert 0.0 < entry["distilled"]["mean"] <= 1.0 and 0.0 < entry["random"]["mean"] <= 1.0
    assert report["labels"]["bytes"] > 0 and report["teacher"]["val_accuracy"] > 0.5
    assert json.loads((folder / "report.json").read_text()) == report


def test_manifests_record_every_output_with_hash_and_rows(finished):
    cfg, folder, _ = finished
    table = pq.read_table(folder / "manifests" / "scoring.parquet").to_pylist()
    assert len(table) == 10 and {r["path"] for r in table} == {f"scoring/class={c:05d}.parquet" for c in range(10)}
    assert all(r["rows"] == cfg.method.candidates_per_class for r in table)
    import hashlib
    for r in table:
        assert hashlib.sha256((folder / r["path"]).read_bytes()).hexdigest() == r["sha256"]


def test_status_reads_the_manifests(finished):
    cfg, _, _ = finished
    rows = {r["stage"]: r for r in status(run_store(cfg))}
    assert rows["scoring"] == {"stage": "scoring", "done": 5, "total": 5, "complete": True}
    assert rows["evaluation"]["total"] == 6  # 3 regimes x 1 seed x 2 sets (the smoke preset draws one random subset)


def test_rerun_reuses_everything(finished):
    cfg, folder, report = finished
    before = snapshot(folder)
    again = run_pipeline(cfg)
    assert snapshot(folder) == before  # nothing rewritten: same bytes, same mtimes
    assert again["regimes"] == report["regimes"]


def test_a_damaged_output_recomputes_only_its_shard(finished):
    cfg, folder, _ = finished
    png = folder / "distilled" / "images" / "00003" / "class00003_id00001.png"
    original = png.read_bytes()
    png.write_bytes(b"garbage")
    before = snapshot(folder)
    run_pipeline(cfg)
    after = snapshot(folder)
    assert png.read_bytes() == original  # recomputed byte-identically
    changed = {k for k in after if after[k] != before.get(k)}
    shard = "manifests/synthesis/classes-00002-00003.parquet"
    assert shard in changed and "distilled/images/00003/class00003_id00001.png" in changed
    # Nothing else was recomputed: the rewritten synthesis shard hashes as before, so downstream keys hold.
    assert all(k.startswith(("distilled/images/00002", "distilled/images/00003", "distilled/provenance/class=0000"))
               or k in (shard, "manifests/synthesis.parquet", "manifests/plan.parquet")
               or k.startswith("manifests/dataset") or k.startswith("dataset/") for k in changed), changed


def test_same_config_and_seed_give_identical_outputs_in_another_store(finished, tmp_path):
    cfg, folder, _ = finished
    other = smoke_config(tmp_path / "elsewhere", *FAST)
    run_pipeline(other)
    mine = {k: v[0] for k, v in snapshot(folder).items()}
    theirs = {k: v[0] for k, v in snapshot(Path(run_store(other).root)).items()}
    assert mine.keys() == theirs.keys() and mine == theirs


def test_memory_store_and_a_run_without_the_baseline_students(tmp_path):
    cfg = smoke_config(f"memory://ddpipe-{tmp_path.name}", *FAST, "evaluation.regimes=[hard]", "evaluation.baseline=false")
    report = run_pipeline(cfg)
    store = run_store(cfg)
    hard = report["regimes"]["hard"]
    assert store.exists("report.json") and hard["distilled"]["mean"] > 0
    assert hard["random"]["mean"] is None and hard["improvement_over_random"] is None and hard["steps"] > 0
    assert store.list("evaluation") == ["distilled-hard-seed0.json"]


def test_cross_architecture_students_and_the_full_set_reference(tmp_path):
    cfg = smoke_config(tmp_path / "runs", *FAST, "evaluation.regimes=[hard]", "evaluation.full=true",
                       "evaluation.cross_models=[{name: resnet18_small}]")
    report = run_pipeline(cfg)
    store = run_store(cfg)
    assert store.list("evaluation") == ["distilled-hard-seed0-student1.json", "distilled-hard-seed0.json",
                                        "full-hard-seed0.json", "random-hard-seed0-student1.json",
                                        "random-hard-seed0.json"]
    full = json.loads(store.read_bytes("evaluation/full-hard-seed0.json"))
    distilled = json.loads(store.read_bytes("evaluation/distilled-hard-seed0.json"))
    assert full["images"] == 900 and (full["steps"], full["batch_size"]) == (distilled["steps"], distilled["batch_size"])
    hard = report["regimes"]["hard"]
    hlr = report["scores"]["hard_label_recovery"]
    assert hlr == pytest.approx(full["test_accuracy"] - distilled["test_accuracy"])
    alpha = 0.5 * hard["improvement_over_random"] - 0.5 * hlr
    expected = (math.exp(alpha) - math.exp(-1)) / (math.e - math.exp(-1))
    assert report["scores"]["label_robust_score"]["hard"] == pytest.approx(expected)
    (cross,) = report["cross_architecture"]
    assert cross["model"]["name"] == "resnet18_small"
    main, other = report["regimes"]["hard"], cross["regimes"]["hard"]
    assert other["distilled"]["mean"] > 0.1 and other["distilled"]["mean"] != main["distilled"]["mean"]
    result = json.loads(store.read_bytes("evaluation/distilled-hard-seed0-student1.json"))
    assert result["model"]["name"] == "resnet18_small" and result["student"] == 1
