"""Recovery from noise (SRe2L, CDA, G-VBSM): curriculum, DD loss, matching losses, ensembles, MSE+GT loss."""

import numpy as np
import pytest
import torch

from ddpipe.augment import generator
from ddpipe.config import CurriculumConfig, build_config
from ddpipe.errors import ConfigError
from ddpipe.evaluate import mse_loss
from ddpipe.methods import METHODS
from ddpipe.methods.recovery.recover import crop_lower_bound, dd_loss, recover
from ddpipe.methods.recovery.statistics import collect, global_statistics
from ddpipe.teacher import Ensemble, ensemble_logits

from conftest import smoke_config


@pytest.mark.parametrize(
    "scheduler, milestone, expected",
    [
        # CDA Algorithm 1 with the paper's defaults (beta_l 0.08, beta_u 1.0, gamma 0.92), S = 100 iterations
        ("step", 0.5, {0: 1.0, 49: 1.0, 50: 0.08, 99: 0.08}),
        ("linear", 1.0, {0: 1.0, 25: 0.08 + 0.92 * 0.75, 50: 0.54, 75: 0.08 + 0.92 * 0.25}),
        ("cosine", 1.0, {0: 1.0, 25: 0.08 + 0.46 * (1 + np.cos(np.pi / 4)), 50: 0.54, 99: 0.08 + 0.46 * (1 + np.cos(0.99 * np.pi))}),
        ("cosine", 0.5, {0: 1.0, 25: 0.54, 50: 0.08, 80: 0.08}),
    ],
)
def test_curriculum_schedulers_give_the_papers_values(scheduler, milestone, expected):
    cur = CurriculumConfig(scheduler=scheduler, milestone=milestone)
    for step, value in expected.items():
        assert crop_lower_bound(cur, step, 100) == pytest.approx(value, abs=1e-9), (scheduler, step)


def test_a_curriculum_that_starts_above_beta_u_is_refused():
    with pytest.raises(ConfigError, match="method.recovery.curriculum"):
        build_config({"name": "x", "method": {"name": "cda", "recovery": {"curriculum": {"beta_l": 0.4, "gamma": 0.92}}}})


def test_recovery_methods_refuse_a_teacher_without_batch_norm():
    with pytest.raises(ConfigError, match="teacher.model needs norm: batch"):
        build_config({"name": "x", "method": {"name": "sre2l"}, "teacher": {"model": {"norm": "instance"}}})


@pytest.mark.fmnist
def test_dd_loss_is_larger_for_a_rank_deficient_class_batch(trained_teacher):
    _, source, _ = trained_teacher
    images = source.train.batch(source.train.class_indices(3)[:8]).float() / 255.0
    q, _ = torch.linalg.qr(images.flatten(1).T)  # 8 orthonormal directions spanned by real images
    full = q.T.reshape(8, 1, 28, 28) * 2.0
    deficient = torch.cat([full[:4], full[:4]])  # rank 4 in a batch of 8
    y = torch.full((8,), 3)
    low, high = dd_loss(full, y, tau=4.0), dd_loss(deficient, y, tau=4.0)
    assert float(low) == pytest.approx(0.0, abs=1e-5)  # equal eigenvalues: the spectrum is already flat
    assert float(high) > 0.1
    assert float(dd_loss(deficient, torch.arange(8), tau=4.0)) == 0.0  # one image per class: nothing to densify


def test_logit_normalised_ensemble_equals_eq8_on_a_hand_example():
    z = torch.tensor([[[3.0, 4.0], [0.0, 0.0]], [[1.0, 0.0], [0.0, 0.0]]])  # Frobenius norms 5 and 1, mean 3
    torch.testing.assert_close(ensemble_logits(z, True), torch.tensor([[2.4, 1.2], [0.0, 0.0]]))
    torch.testing.assert_close(ensemble_logits(z, False), torch.tensor([[2.0, 2.0], [0.0, 0.0]]))
    a, b = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    x = torch.randn(5, 3)
    torch.testing.assert_close(Ensemble([a, b], True)(x), ensemble_logits(torch.stack([a(x), b(x)]), True))


def test_mse_loss_compares_logits_up_to_a_shift(tmp_path):
    cfg = smoke_config(tmp_path)
    teacher = torch.tensor([[2.0, -1.0, 0.5]])
    probs = torch.softmax(teacher / cfg.labels.temperature, dim=1)
    assert float(mse_loss(teacher + 7.0, probs, cfg.labels.temperature)) == pytest.approx(0.0, abs=1e-6)
    assert float(mse_loss(torch.tensor([[0.0, 0.0, 0.0]]), probs, cfg.labels.temperature)) == pytest.approx(
        float(((teacher - teacher.mean()) ** 2).mean()), rel=1e-5)


def _stats(teacher, source, cfg):
    mean, std = cfg.normalization
    moments = collect(teacher.model, source.train, np.arange(0, len(source.train), 2), 4, 250, mean, std, "cpu", cfg.runtime)
    return global_statistics(teacher.model, moments, 4)


@pytest.mark.fmnist
@pytest.mark.parametrize("method", ["sre2l", "gvbsm"])
def test_matching_losses_fall_during_recovery(trained_teacher, tmp_path, method):
    cfg0, source, teacher = trained_teacher
    cfg = smoke_config(tmp_path, f"method.name={method}", "method.recovery.iterations=80", "method.recovery.lr=0.1",
                       "method.recovery.r_bn=1.0", "method.recovery.drop_rate=0.0", "method.recovery.dd_weight=0")
    init = torch.randn(10, 1, 28, 28, generator=generator(0, "t"))
    images, info = recover(cfg.method.recovery, METHODS[method].variant, [(teacher.model, _stats(teacher, source, cfg))],
                           torch.arange(10), init, *cfg.normalization, "cpu", cfg.runtime, generator(0, "r"))
    assert images.dtype == torch.uint8 and images.shape == (10, 1, 28, 28)
    kinds = ["bn", "conv"] if method == "gvbsm" else ["bn"]
    for kind in kinds:
        first, last = np.mean(info[kind][:5]), np.mean(info[kind][-5:])
        assert last < 0.5 * first, (kind, first, last)
    if method == "sre2l":
        assert all(v == 0.0 for v in info["conv"])
    assert np.mean(info["ce"][-5:]) < np.mean(info["ce"][:5])


@pytest.mark.fmnist
def test_recovery_is_reproducible_from_its_seed(trained_teacher, tmp_path):
    _, source, teacher = trained_teacher
    cfg = smoke_config(tmp_path, "method.name=cda", "method.recovery.iterations=15")
    stats = _stats(teacher, source, cfg)
    init = torch.randn(4, 1, 28, 28, generator=generator(0, "t"))
    run = lambda: recover(cfg.method.recovery, METHODS["cda"].variant, [(teacher.model, stats)], torch.arange(4),  # noqa: E731
                          init, *cfg.normalization, "cpu", cfg.runtime, generator(0, "r"))[0]
    assert torch.equal(run(), run())
