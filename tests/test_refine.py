"""The refine method: real starts optimised against the teacher (bound, FADRM mix, EDC and CIM terms), its
stages end to end, and the student-side options it brought (EMA students, the smoothed cosine)."""

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from torch import nn

from ddpipe.augment import generator
from ddpipe.config import OptimConfig, load_config
from ddpipe.evaluate import ema_model
from ddpipe.imageset import png_decode
from ddpipe.methods.rded import SCORES_SCHEMA
from ddpipe.methods.recovery.statistics import global_statistics
from ddpipe.methods.refine import draw_anchors, refine, start_rows
from ddpipe.pipeline import run_store
from ddpipe.report import recipe_difference
from ddpipe.runner import run_pipeline
from ddpipe.train import lr_factor

from conftest import CONFIGS, smoke_config

CLASSES = torch.tensor([0, 0, 1, 1, 7, 7])


def _case(trained_teacher, tmp_path, *overrides):
    """(cfg, teacher model, statistics, uint8 starts of CLASSES, each class's anchors) on the smoke teacher."""
    _, source, teacher = trained_teacher
    cfg = load_config(CONFIGS / "smoke-refine.yaml", [f"store.uri={tmp_path}", *overrides])
    picks = [int(source.train.class_indices(int(c))[k % 2]) for k, c in enumerate(CLASSES)]
    start = source.train.batch(np.asarray(picks))
    anchors = {int(c): draw_anchors(source.train, int(c), 8, 0) for c in CLASSES.unique()}
    return cfg, teacher.model, global_statistics(teacher.model, {}, 4), start, anchors


def _refine(cfg, model, stats, start, anchors, seed=0):
    return refine(cfg.method.recovery, cfg.method.refine, [(model, stats)], CLASSES, start, anchors,
                  *cfg.normalization, "cpu", cfg.runtime, generator(seed, "t"))


@pytest.mark.fmnist
@pytest.mark.parametrize("param", ["residual", "pixels"])
def test_refined_images_change_but_stay_within_the_bound(trained_teacher, tmp_path, param):
    cfg, model, stats, start, anchors = _case(trained_teacher, tmp_path, f"method.refine.param={param}",
                                              "method.refine.bound=0.1", "method.refine.mix=0", "method.refine.mix_every=0",
                                              "method.recovery.lr=0.2")
    images, info = _refine(cfg, model, stats, start, anchors)
    change = (images.float() - start.float()).abs()
    assert images.dtype == torch.uint8 and images.shape == start.shape
    assert change.max() <= 0.1 * 255 + 1  # the bound, plus rounding to uint8
    assert change.mean() > 1.0 and info["change"] > 0.004


@pytest.mark.fmnist
def test_fadrm_mixing_keeps_images_nearer_their_start(trained_teacher, tmp_path):
    plain = _case(trained_teacher, tmp_path, "method.refine.bound=0", "method.refine.mix=0", "method.refine.mix_every=0")
    mixed = _case(trained_teacher, tmp_path, "method.refine.bound=0", "method.refine.mix=0.5", "method.refine.mix_every=4")
    far, near = _refine(*plain)[1]["change"], _refine(*mixed)[1]["change"]
    assert near < 0.8 * far, (near, far)


@pytest.mark.fmnist
def test_the_category_aware_and_feature_terms_fall_when_optimised(trained_teacher, tmp_path):
    cfg, model, stats, start, anchors = _case(
        trained_teacher, tmp_path, "method.refine.ce_weight=0", "method.recovery.r_bn=0", "method.refine.bound=0",
        "method.refine.mix=0", "method.refine.mix_every=0", "method.recovery.iterations=40", "method.recovery.lr=0.1",
        "method.refine.class_bn_weight=1.0", "method.refine.feature_weight=10.0", "method.refine.feature_layers=all")
    _, info = _refine(cfg, model, stats, start, anchors)
    for term in ("class_bn", "feature"):
        first, last = np.mean(info[term][:4]), np.mean(info[term][-4:])
        assert last < 0.7 * first, (term, first, last)


@pytest.mark.fmnist
def test_refinement_is_reproducible_from_its_seed(trained_teacher, tmp_path):
    case = _case(trained_teacher, tmp_path, "method.recovery.iterations=8")
    assert torch.equal(_refine(*case)[0], _refine(*case)[0])
    assert not torch.equal(_refine(*case)[0], _refine(*case, seed=1)[0])


def test_the_start_is_rded_s_ranking_or_the_random_draw_order():
    n = 6
    table = pa.table({
        "class_index": [3] * n, "candidate": list(range(n)), "source_index": [10 + k for k in range(n)],
        "source_id": [f"train/{10 + k}" for k in range(n)], "crop": [0] * n, "top": [0] * n, "left": [0] * n,
        "height": [28] * n, "width": [28] * n, "loss": [0.5, 0.1, 0.9, 0.2, 0.3, 0.4],
        "score": [-0.5, -0.1, -0.9, -0.2, -0.3, -0.4], "rank": [4, 0, 5, 1, 2, 3],
        "selected": [False, True, False, True, False, False]}, schema=SCORES_SCHEMA)
    assert [r["source_index"] for r in start_rows(table, 2, "rded")] == [11, 13]
    assert [r["source_index"] for r in start_rows(table, 2, "random")] == [10, 11]
    with pytest.raises(ValueError, match="fewer than the 7 patches"):
        start_rows(table, 7, "random")


def test_mix_without_its_interval_is_refused(tmp_path):
    with pytest.raises(Exception, match="mix and mix_every"):
        smoke_config(tmp_path, "method.name=refine", "method.refine.mix=0.3")


def test_refine_gets_optimiser_defaults_fit_for_a_real_start(tmp_path):
    cfg = smoke_config(tmp_path, "method.name=refine")
    assert (cfg.method.recovery.iterations, cfg.method.recovery.lr) == (40, 0.05)
    assert smoke_config(tmp_path, "method.name=sre2l").method.recovery.iterations == 1000


@pytest.mark.slow
@pytest.mark.fmnist
def test_refine_runs_every_stage_and_its_images_start_from_rded_with_pruned_crop_labels(tmp_path):
    cfg = load_config(CONFIGS / "smoke-refine.yaml", [f"store.uri={tmp_path / 'runs'}", "evaluation.epochs=3",
                                                      "evaluation.seeds=[0]", "evaluation.regimes=[hard, soft]",
                                                      "labels.crops=2", "labels.keep=0.5"])
    report = run_pipeline(cfg)
    folder = Path(run_store(cfg).root)
    assert list(report["stages"]) == ["dataset", "teacher", "scoring", "statistics", "refinement", "synthesis",
                                      "random_subset", "labels", "evaluation"]
    scores = pq.read_table(folder / "scoring/class=00004.parquet").to_pylist()
    best = [r["source_index"] for r in sorted(scores, key=lambda r: r["rank"])[:2]]
    provenance = pq.read_table(folder / "distilled/provenance/class=00004.parquet").to_pylist()
    assert [r["source_index"] for r in provenance] == best and [r["ipc_index"] for r in provenance] == [0, 1]
    labels = pq.read_table(folder / "distilled/labels/class=00004.parquet").to_pylist()  # 1 region + 2 crops, pruned
    per_image = [sum(1 for r in labels if r["image"] == p["image"]) for p in provenance]
    assert all(1 <= n <= 3 for n in per_image) and sum(per_image) < 6 and report["regimes"]["soft"]["distilled"]["mean"] > 0
    from ddpipe.dataindex import open_source
    source = open_source(cfg)
    for r in provenance:  # each image is its start, changed within the bound (0.3 of the range)
        image = png_decode((folder / r["image"]).read_bytes(), 1)
        real = source.train.batch(np.asarray([r["source_index"]]))[0]
        change = (image.float() - real.float()).abs()
        assert 0 < change.mean() and change.max() <= 0.3 * 255 + 1
    again = load_config(CONFIGS / "smoke-refine.yaml", [f"store.uri={tmp_path / 'again'}", "evaluation.epochs=3",
                                                        "evaluation.seeds=[0]", "evaluation.regimes=[hard]"])
    run_pipeline(again)
    other = Path(run_store(again).root)
    for r in provenance:  # the same config and seed give the same images
        assert (other / r["image"]).read_bytes() == (folder / r["image"]).read_bytes()


def test_an_ema_student_is_the_moving_average_of_the_weights():
    model = nn.Linear(2, 1)
    ema = ema_model(model, 0.75)
    with torch.no_grad():
        model.weight.fill_(1.0)
    ema.update_parameters(model)  # the first update copies
    with torch.no_grad():
        model.weight.fill_(5.0)
    ema.update_parameters(model)
    assert torch.allclose(ema.module.weight, torch.full((1, 2), 0.75 * 1.0 + 0.25 * 5.0))


def test_the_smoothed_cosine_ends_at_half_the_peak():
    f = lr_factor(OptimConfig(schedule="cosine", cosine_period=2.0), 100)
    assert f(0) == 1.0 and abs(f(100) - 0.5) < 1e-9 and abs(lr_factor(OptimConfig(), 100)(100)) < 1e-9


def test_students_with_and_without_ema_are_not_compared():
    row = {"steps": 300, "batch_size": 10, "model": {"name": "convnet"}, "images": 100, "test_images": 10000}
    assert recipe_difference([{**row, "ema": 0.99}], [row]) == (
        "the distilled and random students differ in ema (0.99 vs null)")
    assert recipe_difference([row], [dict(row)]) is None
