"""Sharding at ImageNet-21K-P size (10,450 classes, 11 million training images) without the data, and
grouping of recovery units that never changes the images."""

import hashlib
from pathlib import Path

import numpy as np
import pytest

from ddpipe.config import load_config
from ddpipe.data import ArraySplit, DataSource
from ddpipe.pipeline import Context, flow_task_runs, run_store
from ddpipe.runner import run_pipeline
from ddpipe.stages import stages_for

from conftest import CONFIGS

CLASSES, IMAGES = 10_450, 11_000_000


def plan_at_scale(config: str, *overrides: str) -> dict:
    cfg = load_config(CONFIGS / config, ["method.ipc=20", *overrides])
    labels = np.arange(IMAGES, dtype=np.int64) % CLASSES
    train = ArraySplit("train", np.zeros((1, 1, 1, 1), np.uint8), labels, CLASSES, "scale")  # images never read
    ctx = Context(cfg)
    ctx._cache["source"] = DataSource("image-folder", [f"c{c}" for c in range(CLASSES)], train, train)
    return {s.name: s.plan(ctx, CLASSES) for s in stages_for(cfg)}


@pytest.mark.parametrize("config, overrides", [
    ("imagenet21k-p-rded-ipc10.yaml", ()),
    ("imagenet21k-p-sre2l-ipc10.yaml", ()),
    ("imagenet21k-p-cda-ipc10.yaml", ()),
    ("imagenet21k-p-rded-ipc10.yaml", ("orchestration.classes_per_shard=1",)),  # grown to fit
    ("imagenet21k-p-sre2l-ipc10.yaml", ("method.name=gvbsm", "statistics.images_per_shard=1000",
                                        "method.recovery.classes_per_batch=1", "method.recovery.ipc_per_shard=1")),
    ("imagenet21k-p-rded-ipc10.yaml", ("method.name=diffusion", "method.factor=null")),
    ("imagenet21k-p-rded-ipc10.yaml", ("method.name=herding", "method.factor=null")),
])
def test_a_flow_run_at_10450_classes_stays_under_2000_task_runs(config, overrides):
    plan = plan_at_scale(config, *overrides)
    limit = 200  # orchestration.max_shards_per_stage's default
    # labels: a group per set (the distilled set and evaluation.baseline_draws random subsets)
    assert all(len(shards) <= max(1, len({s.set for s in shards if s.classes})) * limit for shards in plan.values())
    assert flow_task_runs(plan) < 2000
    for shards in plan.values():  # every class is in exactly one shard of a per-class stage (per set)
        per_set = {}
        for s in shards:
            if s.classes:
                per_set.setdefault((s.set, s.ipc), []).extend(s.classes)
        assert all(sorted(v) == list(range(CLASSES)) for v in per_set.values())


def _image_hashes(store_root: Path) -> dict:
    return {p.relative_to(store_root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(store_root.glob("distilled/images/*/*.png"))}


@pytest.mark.fmnist
@pytest.mark.slow
def test_grouping_recovery_units_into_fewer_shards_gives_the_same_images(tmp_path):
    fast = ("method.recovery.iterations=5", "evaluation.epochs=1", "evaluation.seeds=[0]",
            "evaluation.regimes=[hard]", "evaluation.baseline=false")
    one = load_config(CONFIGS / "smoke-sre2l.yaml", [f"store.uri={tmp_path / 'a'}", *fast])
    few = load_config(CONFIGS / "smoke-sre2l.yaml", [f"store.uri={tmp_path / 'b'}", *fast,
                                                     "orchestration.max_shards_per_stage=1"])
    run_pipeline(one)
    run_pipeline(few)
    a, b = Path(run_store(one).uri), Path(run_store(few).uri)
    shards = lambda root: sorted(p.name for p in (root / "manifests" / "recovery").iterdir())  # noqa: E731
    assert len(shards(a)) == 4 and len(shards(b)) == 2  # 2 class batches x 2 ipc ranges, grouped per range
    assert _image_hashes(a) == _image_hashes(b) and len(_image_hashes(a)) == 20
