import pytest
import torch

from ddpipe.evaluate import ImageSet, evaluate, summarize, train_student
from ddpipe.imageset import regions
from ddpipe.labels import expand, labels_table, region_views, soft_labels

from conftest import smoke_config

CPU = torch.device("cpu")


def real_set(source, per_class=5):
    idx = [int(i) for c in range(10) for i in source.train.class_indices(c)[:per_class]]
    return ImageSet(images=source.train.batch(idx), classes=torch.from_numpy(source.train.labels[idx]))


@pytest.fixture(scope="module")
def setup(trained_teacher, tmp_path_factory):
    _, source, teacher = trained_teacher
    cfg = smoke_config(tmp_path_factory.mktemp("ev"), "evaluation.epochs=30")
    data = real_set(source)
    views, meta = region_views(data.images, 1)
    probs = soft_labels(teacher.model, views, cfg.labels, *cfg.normalization, CPU, cfg.runtime)
    table = labels_table([str(i) for i in range(len(data))], data.classes.tolist(), meta, probs, 10, cfg.labels)
    data.soft = expand(table).view(len(data), 1, 10)
    data.regions = regions(28, 1)
    return cfg, source, teacher, data


@pytest.mark.fmnist
@pytest.mark.parametrize("regime", ["hard", "soft", "soft_kd"])
def test_students_learn_under_every_regime(setup, regime):
    cfg, source, teacher, data = setup
    result = evaluate(cfg, regime, data, source, 0, CPU, teacher.model)
    assert result["test_accuracy"] > 0.3  # chance is 0.1
    assert result["steps"] == 30 and result["images"] == 50  # ipc 2: batch 50, one step per epoch


@pytest.mark.fmnist
def test_student_training_is_deterministic_per_seed(setup):
    cfg, source, teacher, data = setup
    a = evaluate(cfg, "soft_kd", data, source, 1, CPU, teacher.model)
    b = evaluate(cfg, "soft_kd", data, source, 1, CPU, teacher.model)
    c = evaluate(cfg, "soft_kd", data, source, 2, CPU, teacher.model)
    assert a == b and a["test_accuracy"] != c["test_accuracy"]


@pytest.mark.fmnist
def test_a_step_budget_replaces_the_epochs(setup, tmp_path):
    _, source, teacher, data = setup
    cfg = smoke_config(tmp_path, "evaluation.epochs=30", "evaluation.steps=7", "evaluation.batch_size=20")
    seen = []
    train_student(cfg, "hard", data, 10, 0, CPU, progress=lambda step, total: seen.append((step, total)))
    assert seen[-1] == (7, 7) and len(seen) == 7  # 2.5 epochs of 3 batches of 20 (the last of 10 images)


@pytest.mark.fmnist
def test_regimes_need_their_labels(setup):
    cfg, source, teacher, data = setup
    bare = ImageSet(images=data.images, classes=data.classes)
    with pytest.raises(ValueError, match="stored soft labels"):
        train_student(cfg, "soft", bare, 10, 0, CPU)
    with pytest.raises(ValueError, match="needs the teacher"):
        train_student(cfg, "soft_kd", bare, 10, 0, CPU)


def test_summarize():
    s = summarize([0.5, 0.7])
    assert s["mean"] == pytest.approx(0.6) and s["std"] == pytest.approx(0.1414, abs=1e-3)
    assert summarize([0.4])["std"] == 0.0


@pytest.mark.fmnist
def test_stitched_images_train_on_their_regions(trained_teacher, tmp_path):
    from ddpipe.augment import generator
    from ddpipe.evaluate import sample_regions
    from ddpipe.methods.rded import score_class, selected_rows, stitch_class

    _, source, teacher = trained_teacher
    cfg = smoke_config(tmp_path, "method.factor=2", "method.ipc=3", "method.patch_view=resize",
                       "method.candidates_per_class=50", "evaluation.epochs=60")
    images = []
    for c in range(10):  # real RDED images: four 14 px patches each
        table = score_class(teacher, source.train, c, cfg.method, cfg.factor, cfg.input_format, cfg.runtime, generator(c), CPU)
        rows = selected_rows(table, cfg.patches_per_class)
        images.append(stitch_class(source.train, rows, cfg.method.ipc, cfg.factor, cfg.input_format)[0])
    images = torch.cat(images)
    views, meta = region_views(images, 2)
    probs = soft_labels(teacher.model, views, cfg.labels, *cfg.normalization, CPU, cfg.runtime)
    soft = expand(labels_table([str(i) for i in range(30)], [i // 3 for i in range(30)], meta, probs, 10,
                               cfg.labels)).view(30, 5, 10)
    stitched = ImageSet(images=images, classes=torch.arange(10).repeat_interleave(3), soft=soft,
                        regions=regions(28, 2))
    r = sample_regions(stitched, 1000, True, generator(0))
    assert set(r.tolist()) == {1, 2, 3, 4}  # grid cells only (RDED Eq. 10), never the whole mosaic
    assert set(sample_regions(stitched, 100, False, generator(0)).tolist()) == {0}
    assert set(sample_regions(ImageSet(images, stitched.classes, regions=regions(28, 1)), 100, True,
                              generator(0)).tolist()) == {0}  # factor 1: the image itself
    result = evaluate(cfg, "soft", stitched, source, 0, CPU)
    assert result["test_accuracy"] > 0.3, result
