"""Coreset selections, training dynamics and CA2D through the pipeline, on the smoke slice."""

from pathlib import Path
from unittest import mock

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from ddpipe.dataindex import open_source
from ddpipe.methods.selection.coreset import cad_scores, herding, top_k
from ddpipe.methods.selection.dynamics import checkpoint_steps, dynamics_steps, read_dynamics
from ddpipe.pipeline import run_store
from ddpipe.runner import run_pipeline, run_stages
from ddpipe.train import penultimate_features

from conftest import smoke_config

FAST = ("evaluation.epochs=5", "evaluation.seeds=[0]", "evaluation.regimes=[hard]")


def test_checkpoint_steps_spread_over_the_run():
    assert checkpoint_steps(100, 4) == [25, 50, 75, 100]
    assert checkpoint_steps(3, 8) == [1, 2, 3]  # fewer steps than checkpoints: every step


def test_matched_budget_equals_the_students_samples(tmp_path):
    cfg = smoke_config(tmp_path, "method.name=cad", "evaluation.epochs=40", "method.selection.batch_size=50")
    assert dynamics_steps(cfg, 10) == 40 * 2 * 10 // 50  # epochs x ipc x classes / proxy batch
    assert dynamics_steps(smoke_config(tmp_path, "method.selection.steps=3"), 10) == 8  # at least one per checkpoint


@pytest.mark.fmnist
@pytest.mark.slow
def test_cad_keeps_the_top_scores_of_each_class_and_shares_dynamics_with_el2n(tmp_path):
    store = tmp_path / "runs"
    cfg = smoke_config(store, "method.name=cad", *FAST)
    report = run_pipeline(cfg)
    folder = Path(run_store(cfg).root)
    d = read_dynamics(pq.read_table(folder / "dynamics/seed0.parquet"))
    assert d.el2n.shape == (8, 900)  # 1,000 less the validation split and list(d.steps) == checkpoint_steps(dynamics_steps(cfg, 10), 8)
    assert d.correct[-1].mean() > d.correct[0].mean()  # the proxy learns
    scores = np.zeros(1000)
    scores[d.indices] = cad_scores(d.el2n, 6, 2)
    source = open_source(cfg)
    for c in (0, 7):
        pool = source.train.class_indices(c)
        rows = pq.read_table(folder / f"distilled/provenance/class={c:05d}.parquet").to_pylist()
        assert [r["source_index"] for r in rows] == [int(pool[i]) for i in top_k(scores[pool], 2)]
        assert [r["score"] for r in rows] == pytest.approx([scores[r["source_index"]] for r in rows], rel=1e-6)
    assert report["regimes"]["hard"]["distilled"]["mean"] > 0.1

    # el2n at the same ipc and budget reuses the trained proxy (training would fail here)
    with mock.patch("ddpipe.methods.selection.dynamics.record_dynamics", side_effect=AssertionError("retrained")):
        other = smoke_config(store, "method.name=el2n", *FAST)
        run_stages(other, "synthesis")
    again = pq.read_table(Path(run_store(other).root) / "dynamics/seed0.parquet")
    assert again.equals(pq.read_table(folder / "dynamics/seed0.parquet"))


@pytest.mark.fmnist
@pytest.mark.slow
def test_ca2d_scores_the_cad_pool_and_herding_follows_the_teacher_features(tmp_path):
    store = tmp_path / "runs"
    cfg = smoke_config(store, "method.name=ca2d", "method.candidates_per_class=20", *FAST)
    run_stages(cfg, "synthesis")
    folder = Path(run_store(cfg).root)
    d = read_dynamics(pq.read_table(folder / "dynamics/seed0.parquet"))
    scores = np.zeros(1000)
    scores[d.indices] = cad_scores(d.el2n, 6, 2)
    pool = open_source(cfg).train.class_indices(4)
    scored = pq.read_table(folder / "scoring/class=00004.parquet").to_pylist()
    assert sorted(r["source_index"] for r in scored) == sorted(int(pool[i]) for i in top_k(scores[pool], 20))
    assert sum(r["selected"] for r in scored) == 2

    # keep: smallest scores the other end of the CAD ranking (same dynamics, shared)
    cfg = smoke_config(store, "method.name=ca2d", "method.candidates_per_class=20", "method.selection.keep=smallest", *FAST)
    run_stages(cfg, "scoring")
    folder = Path(run_store(cfg).root)
    scored = pq.read_table(folder / "scoring/class=00004.parquet").to_pylist()
    assert sorted(r["source_index"] for r in scored) == sorted(int(pool[i]) for i in top_k(scores[pool], 20, largest=False))

    # herding: the teacher's penultimate features of the class, then the greedy choice
    cfg = smoke_config(store, "method.name=herding", *FAST)
    run_stages(cfg, "synthesis")
    folder = Path(run_store(cfg).root)
    from ddpipe.teacher import load_teacher

    source = open_source(cfg)
    teacher = load_teacher((folder / "teacher/teacher.pt").read_bytes(), "teacher.pt", source.classes,
                           cfg.input_format, torch.device("cpu"), cfg.runtime)
    pool = source.train.class_indices(4)
    mean, std = cfg.normalization
    feats = penultimate_features(teacher.model, source.train, pool, mean, std, torch.device("cpu"), cfg.runtime)
    rows = pq.read_table(folder / "distilled/provenance/class=00004.parquet").to_pylist()
    assert [r["source_index"] for r in rows] == [int(pool[i]) for i in herding(feats, 2)]


@pytest.mark.fmnist
@pytest.mark.slow
def test_random_baseline_students_are_trained_once_per_store(tmp_path):
    """A herding run after an RDED run in the same store, same students: the random-subset students are
    reused (only the distilled set's student trains), and give the same accuracy."""
    import ddpipe.evaluate

    store = tmp_path / "runs"
    first = run_pipeline(smoke_config(store, *FAST))
    with mock.patch.object(ddpipe.evaluate, "evaluate", wraps=ddpipe.evaluate.evaluate) as trained:
        second = run_pipeline(smoke_config(store, "method.name=herding", *FAST))
    assert trained.call_count == 1
    assert second["regimes"]["hard"]["random"] == first["regimes"]["hard"]["random"]


@pytest.mark.fmnist
@pytest.mark.slow
def test_more_seeds_and_draws_train_only_the_new_reference_students(tmp_path):
    """A run with a second seed and a second random subset after a run with neither: only the new students train
    (the distilled set's two, in its new run folder; the first subset's seed 1; the second subset's two), and the
    first subset's seed-0 student is the earlier one."""
    import ddpipe.evaluate

    store = tmp_path / "runs"
    first = run_pipeline(smoke_config(store, *FAST))
    with mock.patch.object(ddpipe.evaluate, "evaluate", wraps=ddpipe.evaluate.evaluate) as trained:
        second = run_pipeline(smoke_config(store, "evaluation.epochs=5", "evaluation.regimes=[hard]",
                                           "evaluation.seeds=[0, 1]", "evaluation.baseline_draws=2"))
    assert trained.call_count == 2 + 1 + 2
    before, after = first["regimes"]["hard"]["random"], second["regimes"]["hard"]["random"]
    assert after["draws"] == 2 and len(after["values"]) == 4 and after["values"][0] == before["values"][0]
