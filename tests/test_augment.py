import pytest
import torch
import torch.nn.functional as F

from ddpipe.augment import Augmenter, crop_resize, generator, sample_boxes, seed_for
from ddpipe.config import AugmentConfig


def test_sample_boxes_fit_the_image_and_repeat_with_the_seed():
    a = sample_boxes(500, 28, 40, generator(1), scale=(0.08, 1.0), ratio=(1.0, 1.0))
    b = sample_boxes(500, 28, 40, generator(1), scale=(0.08, 1.0), ratio=(1.0, 1.0))
    assert torch.equal(a, b)
    top, left, h, w = a.T
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= 28).all() and (left + w <= 40).all()
    assert (h == w).all() and (h >= 1).all()  # square crops
    assert len(set(map(tuple, a.tolist()))) > 400


def test_sample_boxes_fall_back_to_a_centre_crop():
    # No square crop of 90-100% of a 10x40 image fits: every draw falls back to the centred 10x10 square.
    boxes = sample_boxes(20, 10, 40, generator(0), scale=(0.9, 1.0), ratio=(1.0, 1.0))
    assert (boxes == torch.tensor([0, 15, 10, 10])).all()


def test_crop_resize_matches_bilinear_resize_of_the_crop():
    x = torch.rand(2, 3, 20, 24) * 255
    boxes = torch.tensor([[0, 0, 20, 24], [4, 6, 10, 10]])
    out = crop_resize(x, boxes, (20, 24))
    assert torch.allclose(out[0], x[0], atol=1e-3)  # the full box is the identity
    # Upscaling a box: interior pixels equal F.interpolate of the cropped region.
    ref = F.interpolate(x[1:, :, 4:14, 6:16], size=(20, 24), mode="bilinear", align_corners=False)
    assert torch.allclose(out[1, :, 2:-2, 2:-2], ref[0, :, 2:-2, 2:-2], atol=1e-3)


def test_augmenter_is_seeded_and_cutmix_reports_the_kept_share():
    x = torch.rand(8, 1, 28, 28)
    cfg = AugmentConfig(crop_scale=(0.5, 1.0), flip=True, cutmix=1.0)
    a, b = Augmenter(cfg, generator(3)), Augmenter(cfg, generator(3))
    va, vb = a.views(x), b.views(x)
    assert torch.equal(va, vb) and not torch.equal(va, x)
    mixed, perm, lam = a.cutmix(x)
    changed = (mixed != x).float().mean().item()
    assert 0.0 <= lam <= 1.0 and abs((1 - lam) - changed) < 0.2


def test_seed_for_is_stable():
    assert seed_for(0, "scoring", 3) == seed_for(0, "scoring", 3) != seed_for(0, "scoring", 4)
    assert 0 <= seed_for(0, "x") < 2**63


def real_batch(n=8):
    from ddpipe.data import normalize
    from ddpipe.dataindex import open_source

    from conftest import smoke_config

    cfg = smoke_config("/tmp/unused")
    source = open_source(cfg)
    mean, std = cfg.normalization
    return normalize(source.train.batch(torch.arange(n) * 97), mean, std)


@pytest.mark.fmnist
def test_dsa_crop_translates_with_zero_fill_and_cutout_zeroes_one_half_side_square():
    from ddpipe.augment import dsa

    x = real_batch()
    out = dsa(x, generator(0), "crop")
    for a, b in zip(x, out):  # some shift within 4 px (12.5 % of 28) explains the output exactly
        padded = F.pad(a, (4, 4, 4, 4))
        assert any(torch.equal(padded[:, 4 - dy : 32 - dy, 4 - dx : 32 - dx], b) for dy in range(-4, 5) for dx in range(-4, 5))
    out = dsa(x, generator(0), "cutout")
    for a, b in zip(x, out):
        changed = (a != b)[0]
        rows, cols = changed.any(1).nonzero().flatten(), changed.any(0).nonzero().flatten()
        assert (b[:, changed] == 0).all() and len(rows) <= 14 and len(cols) <= 14
        assert changed[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1].float().mean() > 0.5


@pytest.mark.fmnist
def test_dsa_is_seeded_and_each_op_changes_the_batch():
    from ddpipe.augment import DSA_OPS, dsa

    x = real_batch()
    for op in DSA_OPS:
        a, b = dsa(x, generator(1), op), dsa(x, generator(1), op)
        assert torch.equal(a, b) and a.shape == x.shape and not torch.equal(a, x), op
    chosen = {op: 0 for op in DSA_OPS}
    for k in range(60):  # one op per batch, drawn first, then that op's parameters
        gen = generator(3, k)
        op = DSA_OPS[int(torch.randint(len(DSA_OPS), (1,), generator=gen))]
        assert torch.equal(dsa(x, generator(3, k)), dsa(x, gen, op))
        chosen[op] += 1
    assert all(v > 0 for v in chosen.values())


@pytest.mark.fmnist
def test_mixup_blends_the_batch_with_its_partners():
    x = real_batch()
    aug = Augmenter(AugmentConfig(mixup=1.0, mixup_alpha=0.8), generator(4))
    lams = []
    for _ in range(20):
        mixed, perm, lam = aug.mix(x)
        assert 0.0 < lam < 1.0
        torch.testing.assert_close(mixed, lam * x + (1 - lam) * x[perm])
        lams.append(lam)
    assert len(set(lams)) == 20
    again = Augmenter(AugmentConfig(mixup=1.0, mixup_alpha=0.8), generator(4))
    assert again.mix(x)[2] == lams[0]


def test_views_leave_stored_crops_uncropped_with_the_same_draws():
    x = torch.rand(6, 1, 28, 28)
    keep = torch.tensor([True, False, True, False, False, True])
    cfg = AugmentConfig(crop_scale=(0.3, 0.6), flip=False)
    plain = Augmenter(cfg, generator(3)).views(x)
    kept = Augmenter(cfg, generator(3)).views(x, keep=keep)
    assert torch.allclose(kept[keep], x[keep], atol=1e-5)  # a stored crop label's view is shown as it is
    assert torch.equal(kept[~keep], plain[~keep]) and not torch.allclose(plain[keep], x[keep], atol=1e-3)
