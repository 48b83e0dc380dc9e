"""The validation split and the random draws (issue 25): which stage reads which split, on a real smoke run."""

import inspect

import numpy as np
import pytest
import torch

import ddpipe.data
from ddpipe.baseline import random_picks
from ddpipe.dataindex import open_source
from ddpipe.pipeline import run_store
from ddpipe.runner import run_pipeline
from ddpipe.stages import all_stages
from ddpipe.teacher import checkpoint_bytes, load_teacher, read_checkpoint

from conftest import smoke_config

STAGE_FUNCTIONS = {stage.run.__name__ for stage in all_stages()}


def _stage() -> str:
    """The stage function on the call stack (run_teacher, run_evaluation, ...), or '' outside one."""
    for frame in inspect.stack(context=0):
        if frame.function in STAGE_FUNCTIONS:
            return frame.function
    return ""


@pytest.mark.fmnist
@pytest.mark.slow
def test_the_test_split_is_read_only_by_the_final_evaluation_and_validation_never_trains(tmp_path, monkeypatch):
    reads = []  # (split name, stage, file positions of the images read)
    real_batch, real_decoded = ddpipe.data.ArraySplit.batch, ddpipe.data.ArraySplit.decoded

    def batch(self, indices):
        reads.append((self.name, _stage(), self.ids[np.asarray(indices, dtype=np.int64)]))
        return real_batch(self, indices)

    def decoded(self, i, reduce=1, size=None):
        reads.append((self.name, _stage(), self.ids[[int(i)]]))
        return real_decoded(self, i, reduce, size)

    monkeypatch.setattr(ddpipe.data.ArraySplit, "batch", batch)
    monkeypatch.setattr(ddpipe.data.ArraySplit, "decoded", decoded)
    cfg = smoke_config(tmp_path / "runs", "evaluation.seeds=[0, 1]", "evaluation.regimes=[hard, soft_kd]",
                       "evaluation.baseline_draws=2", "teacher.min_val_accuracy=0.3", "evaluation.full=true")
    report = run_pipeline(cfg)

    stages = {}
    for name, stage, _ in reads:
        stages.setdefault(name, set()).add(stage)
    assert stages["test"] == {"run_evaluation"}  # students' final accuracy only
    assert stages["val"] == {"run_teacher"}  # the teacher gate
    assert {"run_teacher", "run_scoring", "run_random_subset", "run_evaluation"} <= stages["train"]  # full set
    val = open_source(cfg).val
    held = set(val.ids.tolist())
    assert len(held) == 100  # 10 % of the slice's 100 images per class
    trained = set(np.concatenate([ids for name, _, ids in reads if name == "train"]).tolist())
    assert trained and not trained & held  # nothing that trains or selects ever sees a validation image
    assert report["teacher"]["val_images"] == 100 and 0.3 <= report["teacher"]["val_accuracy"] <= 1

    # the random subsets: draws differ, each evaluated with the same student seeds, and reproducible
    store = run_store(cfg)
    source = open_source(cfg)
    drawn = {}
    for draw, set_name in enumerate(("random", "random-1")):
        ids = [store.read_table(f"{set_name}/provenance/class={c:05d}.parquet").column("source_index").to_pylist()
               for c in range(10)]
        drawn[set_name] = ids
        assert ids == [random_picks(cfg.seed, cfg.method.ipc, source.train, c, draw).tolist() for c in range(10)]
    assert drawn["random"] != drawn["random-1"]
    for regime in ("hard", "soft_kd"):
        entry = report["regimes"][regime]
        assert entry["random"]["draws"] == 2 and len(entry["random"]["values"]) == 4  # 2 draws x 2 seeds
        assert len(entry["distilled"]["values"]) == 2 and entry["comparison"]["verdict"] in ("above", "level", "below")
    for set_name in ("random", "random-1"):
        seeds = sorted(store.read_json(f"evaluation/{set_name}-hard-seed{s}.json")["seed"] for s in (0, 1))
        assert seeds == [0, 1]


def test_old_teacher_checkpoints_still_load_and_say_their_accuracy_was_on_the_test_split(trained_teacher):
    cfg, source, teacher = trained_teacher
    new = read_checkpoint(checkpoint_bytes(teacher.model, cfg.input_format, source, cfg.teacher.model, 0.8), "new")
    assert new["val_accuracy"] == 0.8 and new["val_images"] == len(source.val) > 0
    old = {k: v for k, v in new.items() if k != "val_images"}  # the format before the validation split
    old["val_accuracy"] = 0.77  # which was measured on the test split
    buf = __import__("io").BytesIO()
    torch.save(old, buf)
    loaded = load_teacher(buf.getvalue(), "old.pt", source.classes, cfg.input_format, torch.device("cpu"),
                          cfg.runtime)
    assert loaded.val_accuracy is None and loaded.test_accuracy == 0.77
