import pytest
import torch
import torch.nn.functional as F

from ddpipe.augment import crop_resize, generator
from ddpipe.config import LabelsConfig
from ddpipe.data import normalize
from ddpipe.labels import crop_views, expand, label_rows, labels_table, pruned, region_views, soft_labels
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


def test_crop_labels_are_the_teacher_on_each_stored_crop_and_pruning_keeps_one_per_image(trained_teacher, tmp_path):
    _, source, teacher = trained_teacher
    cfg = smoke_config(tmp_path, "labels.crops=3", "labels.keep=0.4", "labels.top_k=null", "labels.dtype=float32")
    images = real_images(source)
    paths = [f"distilled/images/00004/class00004_id{j:05d}.png" for j in range(len(images))]
    views, meta = crop_views(images, 1, cfg.labels, 0, 4, paths)
    assert views.shape == (6 * 3, 1, 28, 28) and [m[1] for m in meta[:3]] == [1, 2, 3]
    again, _ = crop_views(images, 1, cfg.labels, 0, 4, paths)
    assert torch.equal(views, again)  # boxes drawn from (seed, class, image)
    i, _, (top, left, h, w) = meta[4]
    crop = crop_resize(images[i : i + 1].float(), torch.tensor([[top, left, h, w]]), 28)
    assert torch.equal(crop, views[4 : 5]) and h * w >= 0.5 * 28 * 28 - 28
    whole, whole_meta = region_views(images, 1)
    rows = whole_meta + meta
    keep = pruned(rows, cfg.labels.keep, generator(0, "keep"))
    per_image = {k: sum(1 for j in keep if rows[j][0] == k) for k in range(6)}
    assert all(1 <= v <= 4 for v in per_image.values()) and len(keep) < 0.7 * len(rows)
    assert pruned(rows, 1.0, generator(0, "keep")) == list(range(len(rows)))
    probs = soft_labels(teacher.model, torch.cat([whole, views])[keep], cfg.labels, *cfg.normalization, CPU, cfg.runtime)
    table = labels_table(paths, [4] * 6, [rows[j] for j in keep], probs, 10, cfg.labels)
    soft, boxes, present, region = label_rows(table, paths)
    assert present.sum() == len(keep) and soft.shape[:2] == present.shape
    j = keep[-1]  # the last kept row, read back per image, is the teacher on that crop
    i = rows[j][0]
    slot = int(present[i].sum()) - 1
    assert tuple(boxes[i, slot].tolist()) == rows[j][2] and int(region[i, slot]) == rows[j][1]
    assert sorted(region[present].tolist()) == sorted(rows[k][1] for k in keep)  # 0 the whole image, 1.. the crops
    expected = teacher_probs(teacher, crop_resize(images[i : i + 1].float(), boxes[i, slot : slot + 1], 28), cfg)[0]
    assert torch.allclose(soft[i, slot], expected, atol=1e-5)
    every = soft_labels(teacher.model, torch.cat([whole, views]), cfg.labels, *cfg.normalization, CPU, cfg.runtime)
    full = labels_table(paths, [4] * 6, rows, every, 10, cfg.labels)
    assert table.num_rows == len(keep) and len(table_bytes(table)) < len(table_bytes(full))  # fewer bytes
