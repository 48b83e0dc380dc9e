"""DD-Ranking scores on fractions."""

import math

import pytest

from ddpipe.scores import hard_label_recovery, improvement_over_random, label_robust_score


def test_scores_match_hand_computed_values():
    ior = improvement_over_random(0.80, 0.75)
    hlr = hard_label_recovery(0.90, 0.70)
    assert ior == pytest.approx(0.05) and hlr == pytest.approx(0.20)
    # alpha = 0.5 * 0.05 - 0.5 * 0.20 = -0.075; (e^-0.075 - e^-1) / (e - e^-1) = 0.23820
    assert label_robust_score(ior, hlr) == pytest.approx(0.23820, abs=1e-5)
    assert label_robust_score(1.0, 0.0, weight=1.0) == pytest.approx(1.0)
    assert label_robust_score(0.0, 1.0, weight=0.0) == pytest.approx(0.0)
    assert label_robust_score(0.0, 0.0) == pytest.approx((1 - math.exp(-1)) / (math.e - math.exp(-1)))


def test_percent_inputs_are_refused():
    with pytest.raises(ValueError, match="fraction"):
        improvement_over_random(80.0, 75.0)
    with pytest.raises(ValueError, match="fraction"):
        hard_label_recovery(90.0, 0.7)
