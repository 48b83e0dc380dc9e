import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ddpipe.augment import boxes_from_draws, crop_resize, generator, quantize
from ddpipe.data import normalize
from ddpipe.errors import DataError
from ddpipe.imageset import cell_boxes
from ddpipe.methods.rded import (
    cut, draw_candidates, score_class, scoring_inputs, selected_rows, stitch_class,
)

from conftest import smoke_config

CPU = torch.device("cpu")


def score(teacher, split, c, cfg, gen):
    """RDED's scoring of class ``c`` with the sections of ``cfg``, on the CPU."""
    return score_class(teacher, split, c, cfg.method, cfg.factor, cfg.input_format, cfg.runtime, gen, CPU)


@pytest.mark.fmnist
def test_scoring_keeps_each_candidates_lowest_ce_crop_and_ranks_by_it(trained_teacher):
    cfg, source, teacher = trained_teacher
    c, k = 3, cfg.method.crops_per_image
    candidates, draws = draw_candidates(source.train, c, cfg.method, cfg.factor, generator(7))
    boxes = boxes_from_draws(draws, 28, 28, ratio=(1.0, 1.0))  # Fashion-MNIST: every image 28 x 28
    images = source.train.batch(np.repeat(candidates, k)).float()
    patches = quantize(crop_resize(images, boxes, 28))
    mean, std = cfg.normalization
    with torch.no_grad():  # one crop at a time: independent of the batched scorer
        manual = torch.stack([
            F.cross_entropy(teacher.model(normalize(p[None], mean, std)), torch.tensor([c]))[()] for p in patches
        ]).view(len(candidates), k)

    table = score(teacher, source.train, c, cfg, generator(7)).to_pylist()
    assert len(table) == len(candidates) == cfg.method.candidates_per_class
    for row in table:
        i = row["candidate"]
        assert row["source_index"] == candidates[i]
        assert row["crop"] == int(manual[i].argmin())
        assert row["loss"] == pytest.approx(float(manual[i].min()), abs=1e-4)
        assert row["score"] == -row["loss"]
        assert [row["top"], row["left"], row["height"], row["width"]] == boxes[i * k + row["crop"]].tolist()
    losses = [r["loss"] for r in table]
    assert [r["rank"] for r in table] == list(range(len(table))) and losses == sorted(losses)
    need = cfg.factor**2 * cfg.method.ipc
    assert [r["selected"] for r in table] == [True] * need + [False] * (len(table) - need)


@pytest.mark.fmnist
def test_scoring_is_deterministic(trained_teacher):
    cfg, source, teacher = trained_teacher
    a = score(teacher, source.train, 5, cfg, generator(1))
    b = score(teacher, source.train, 5, cfg, generator(1))
    assert a.equals(b)


@pytest.mark.fmnist
@pytest.mark.parametrize("factor", [1, 2])
def test_stitched_regions_equal_the_selected_crops(trained_teacher, tmp_path, factor):
    _, source, teacher = trained_teacher
    cfg = smoke_config(tmp_path, f"method.factor={factor}", "method.ipc=3")
    rows = selected_rows(score(teacher, source.train, 8, cfg, generator(2)), cfg.patches_per_class)
    images, provenance = stitch_class(source.train, rows, cfg.method.ipc, cfg.factor, cfg.input_format)
    ipc, cells = 3, cell_boxes(28, factor)
    assert images.shape == (ipc, 1, 28, 28) and len(provenance) == ipc * factor**2
    used = set()
    for p in provenance:
        top, left, h, w = p["cell"]
        region = images[p["ipc_index"], :, top : top + h, left : left + w]
        box = torch.tensor([[p["top"], p["left"], p["height"], p["width"]]])
        assert torch.equal(region, cut(source.train, [p["source_index"]], box, (h, w))[0])
        cell_index = cells.index(p["cell"])
        assert p["rank"] == cell_index * ipc + p["ipc_index"]  # RDED layout: cell k of image j = rank k*ipc+j
        used.add(p["rank"])
    assert used == set(range(ipc * factor**2))
    if factor == 1:  # one patch per image, at full size: the scored patch itself
        first = rows[0]
        box = torch.tensor([[first["top"], first["left"], first["height"], first["width"]]])
        assert torch.equal(images[0], cut(source.train, [first["source_index"]], box, 28)[0])


@pytest.mark.fmnist
def test_scoring_pads_small_patches_to_the_input_size(trained_teacher, tmp_path):
    cfg = smoke_config(tmp_path, "method.factor=2")
    patch = torch.full((1, 1, 14, 14), 255, dtype=torch.uint8)
    x = scoring_inputs(patch, cfg.method.patch_view, cfg.input_format)
    assert x.shape == (1, 1, 28, 28)
    assert torch.all(x[0, 0, :7] == 0) and torch.all(x[0, 0, 7:21, 7:21] > 0)  # zero = the mean colour


@pytest.mark.fmnist
def test_too_few_images_for_the_ipc_is_refused(trained_teacher, tmp_path):
    _, source, teacher = trained_teacher
    cfg = smoke_config(tmp_path, "method.ipc=101", "method.candidates_per_class=300")
    with pytest.raises(DataError, match="fewer than factor"):
        score(teacher, source.train, 0, cfg, generator(0))


def test_cell_boxes_tile_the_image():
    for size, factor in ((28, 1), (28, 2), (224, 2), (29, 3)):
        cover = np.zeros((size, size), dtype=int)
        for top, left, h, w in cell_boxes(size, factor):
            cover[top : top + h, left : left + w] += 1
        assert (cover == 1).all()
