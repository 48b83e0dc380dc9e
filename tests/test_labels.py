import pytest
import torch
import torch.nn.functional as F

from ddpipe.augment import crop_resize
from ddpipe.config import LabelsConfig
from ddpipe.data import normalize
from ddpipe.labels import expand, labels_table, region_views, soft_labels
from ddpipe.store import table_bytes

from conftest import smoke_config

pytestmark = pytest.mark.fmnist

CPU = torch.device("cpu")


def teacher_probs(teacher, x_uint8_or_float, cfg):
    mean, std = cfg.normalization
    x = x_uint8_or_float.float() / 255.0
    with torch.no_grad():
        return F.softmax(teacher.model(normalize(x, mean, std)) / cfg.labels.temperature, dim=1)


def real_images(source, n=6):
    return source.train.batch(source.train.class_indices(4)[:n])


def test_stored_soft_labels_equal_the_teacher_output_within_fp16(trained_teacher, tmp_path):
    _, source, teacher = trained_teacher
    cfg = smoke_config(tmp_path, "labels.top_k=null", "labels.dtype=float16", "labels.temperature=3.0")
    images = real_images(source)
    views, meta = region_views(images, 1)
    table = labels_table([f"i{k}" for k in range(len(images))], [4] * len(images), meta,
                         soft_labels(teacher.model, views, cfg.labels, *cfg.normalization, CPU, cfg.runtime), 10, cfg.labels)
    assert table.schema.field("probs").type.value_type == "halffloat"
    stored = expand(table)
    expected = teacher_probs(teacher, images, cfg)
    assert stored.shape == (6, 10)
    assert torch.allclose(stored, expected, rtol=1e-3, atol=1e-4)
    assert not torch.allclose(stored, F.softmax(torch.zeros(6, 10), 1), atol=1e-3)  # not trivially uniform


def test_region_level_labels_for_stitched_images(trained_teacher, tmp_path):
    _, source, teacher = trained_teacher
    cfg = smoke_config(tmp_path, "labels.top_k=null", "labels.dtype=float32", "method.factor=2")
    images = real_images(source, 2)
    views, meta = region_views(images, 2)
    assert [m[1] for m in meta] == [0, 1, 2, 3, 4] * 2
    stored = expand(labels_table(["a", "b"], [4, 4], meta, soft_labels(teacher.model, views, cfg.labels, *cfg.normalization, CPU, cfg.runtime), 10, cfg.labels))
    whole = teacher_probs(teacher, images, cfg)
    assert torch.allclose(stored[0], whole[0], atol=1e-6) and torch.allclose(stored[5], whole[1], atol=1e-6)
    # region 4 of image 1 = bottom-right 14x14 cell, resized to 28x28
    cell = crop_resize(images[1:].float(), torch.tensor([[14, 14, 14, 14]]), 28)
    assert torch.allclose(stored[9], teacher_probs(teacher, cell, cfg)[0], atol=1e-6)


def test_top_k_labels_keep_the_largest_and_spread_the_rest(trained_teacher, tmp_path):
    _, source, teacher = trained_teacher
    dense_cfg = LabelsConfig(temperature=2.0, top_k=None, dtype="float16")
    topk_cfg = LabelsConfig(temperature=2.0, top_k=3, dtype="float16")
    cfg = smoke_config(tmp_path, "labels.temperature=2.0")
    n = 80  # class 4 has 90 training images in the smoke slice (10 held out for validation)
    images = real_images(source, n)
    views, meta = region_views(images, 1)
    probs = soft_labels(teacher.model, views, cfg.labels, *cfg.normalization, CPU, cfg.runtime)
    paths = [f"i{k}" for k in range(n)]
    dense = labels_table(paths, [4] * n, meta, probs, 10, dense_cfg)
    top = labels_table(paths, [4] * n, meta, probs, 10, topk_cfg)
    assert top.schema.field("classes").type.value_type == "int16"
    assert top.column("probs").nbytes + top.column("classes").nbytes < dense.column("probs").nbytes
    assert len(table_bytes(top)) < len(table_bytes(dense))
    restored = expand(top)
    assert torch.allclose(restored.sum(1), torch.ones(n), atol=2e-3)
    values, idx = probs.topk(3, dim=1)
    assert torch.allclose(restored.gather(1, idx), values, rtol=1e-3, atol=1e-4)
    mask = torch.ones_like(probs, dtype=torch.bool).scatter_(1, idx, False)
    rest = restored[mask].view(n, 7)
    assert torch.allclose(rest, rest[:, :1].expand(n, 7))  # spread evenly
    assert torch.allclose(rest[:, 0], (1 - values.sum(1)) / 7, atol=1e-3)
