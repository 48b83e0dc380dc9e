"""Global statistics: exact merging of shards, patch grid, the statistics file."""

import numpy as np
import pytest
import torch

from ddpipe.methods.recovery.statistics import (
    CLOSED_FORM_MAX_PIXELS, batch_sums, collect, conv_layers, global_statistics, merge, moments_bytes, patch_grid,
    read_moments, read_statistics, statistics_bytes,
)


def conv_inputs(model, split, indices, mean, std):
    """Every conv layer's input for ``split[indices]``, concatenated over the whole slice."""
    from ddpipe.data import normalize

    seen = {}
    hooks = [m.register_forward_pre_hook(lambda mod, inp, n=n: seen.setdefault(n, []).append(inp[0].detach().clone()))
             for n, m in conv_layers(model)]
    with torch.no_grad():
        model(normalize(split.batch(indices), mean, std))
    for h in hooks:
        h.remove()
    return {n: torch.cat(v).double() for n, v in seen.items()}


@pytest.mark.fmnist
def test_merged_shards_equal_the_whole_slice_at_once(trained_teacher):
    cfg, source, teacher = trained_teacher
    mean, std = cfg.normalization
    idx = np.arange(600)
    runtime = cfg.runtime
    shards = [collect(teacher.model, source.train, idx[a:b], 4, 64, mean, std, "cpu", runtime)
              for a, b in ((0, 250), (250, 251), (251, 600))]
    merged = merge([read_moments(moments_bytes(s)) for s in shards])  # through the stored format
    whole = conv_inputs(teacher.model, source.train, idx, mean, std)
    assert set(merged) == set(whole) and len(whole) == 2
    for name, x in whole.items():
        var, mu = torch.var_mean(x, dim=(0, 2, 3), correction=0)
        got = merged[name]["channel"]
        assert got.n == x.shape[0] * x.shape[2] * x.shape[3]
        torch.testing.assert_close(got.mean, mu, rtol=1e-6, atol=1e-8)
        torch.testing.assert_close(got.var, var, rtol=1e-5, atol=1e-6)
        pvar, pmu = torch.var_mean(patch_grid(x, 4), dim=(0, 1, 3, 5), correction=0)
        torch.testing.assert_close(merged[name]["patch"].mean, pmu.flatten(), rtol=1e-6, atol=1e-8)
        torch.testing.assert_close(merged[name]["patch"].var, pvar.flatten(), rtol=1e-5, atol=1e-6)
        # the G-VBSM reference's estimator, the mean of per-batch variances, would fail the check above
        batches = [torch.var(x[s : s + 64], dim=(0, 2, 3), correction=0) * len(x[s : s + 64]) for s in range(0, 600, 64)]
        assert not torch.allclose(sum(batches) / 600, var, rtol=1e-5, atol=1e-6)


@pytest.mark.fmnist
def test_batch_sums_of_resized_maps_equal_those_of_the_resized_batch(trained_teacher):
    """Maps that are not multiples of the patch: the closed form (small maps) and the resize (large ones)
    both give the sums of the explicitly resized maps; channel sums are those of the map itself."""
    cfg, source, _ = trained_teacher
    images = source.train.batch(np.arange(40)).float()  # [40, 1, 28, 28] real images
    x = torch.cat([images, images.flip(-1), 1 - images], dim=1)  # 3 channels
    for side in (1, 2, 7, 14, 18):  # 18 x 18 > CLOSED_FORM_MAX_PIXELS: resized batch
        m = torch.nn.functional.adaptive_avg_pool2d(x, side)
        (n, c1, c2), (pn, p1, p2) = batch_sums(m, 4)
        assert (side * side <= CLOSED_FORM_MAX_PIXELS) == (side < 18)
        g = patch_grid(m.double(), 4)
        assert n == 40 * side * side and pn == 40 * 3 * 16
        torch.testing.assert_close(c1.double(), m.double().sum((0, 2, 3)), rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(c2.double(), (m.double() ** 2).sum((0, 2, 3)), rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(p1.double(), g.sum((0, 1, 3, 5)).flatten(), rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(p2.double(), (g**2).sum((0, 1, 3, 5)).flatten(), rtol=1e-5, atol=1e-4)


def test_patch_grid_rounds_sides_up_to_multiples_of_the_patch():
    x = torch.arange(2 * 3 * 6 * 7, dtype=torch.float32).view(2, 3, 6, 7)
    assert patch_grid(x, 4).shape == (2, 3, 2, 4, 2, 4)
    assert patch_grid(x[:, :, :4, :4], 4).shape == (2, 3, 1, 4, 1, 4)
    assert torch.equal(patch_grid(x[:, :, :4, :4], 2).reshape(2, 3, 4, 4), x[:, :, :4, :4])


@pytest.mark.fmnist
def test_statistics_file_holds_conv_and_bn_statistics(trained_teacher):
    cfg, source, teacher = trained_teacher
    mean, std = cfg.normalization
    moments = collect(teacher.model, source.train, np.arange(200), 4, 100, mean, std, "cpu", cfg.runtime)
    stats = read_statistics(statistics_bytes(global_statistics(teacher.model, moments, 4)))
    first = stats["conv"]["features.0"]
    assert first["channel_mean"].shape == (1,) and first["patch_mean"].shape == (49,)  # 28 px: 7 x 7 patches of 4 px
    assert float(first["count"]) == 200 * 28 * 28
    bn = stats["bn"]["features.1"]
    torch.testing.assert_close(bn["var"], teacher.model.features[1].running_var)
