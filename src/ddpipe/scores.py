"""The scores DD-Ranking defines (arXiv 2505.13300), on accuracies as fractions in [0, 1].

- improvement over random: IOR = acc(distilled, regime) - acc(random subset of the same ipc, same regime);
- hard-label recovery: HLR = acc(full training set, hard labels) - acc(distilled, hard labels), lower is better;
- label-robust score: alpha = w * IOR - (1 - w) * HLR, LRS = (e^alpha - e^-1) / (e - e^-1), so alpha in
  [-1, 1] maps to [0, 1] (w = 0.5 by default, DD-Ranking's ``lrs_lambda``).

The reference package (ddranking 0.2.0) passes percents into the same formula, where alpha leaves [-1, 1]
and the score saturates; here every input must be a fraction and anything else is refused.
"""

from __future__ import annotations

import math


def _fraction(name: str, value: float) -> float:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be an accuracy as a fraction in [0, 1], got {value!r}")
    return float(value)


def improvement_over_random(distilled: float, random: float) -> float:
    return _fraction("distilled accuracy", distilled) - _fraction("random-subset accuracy", random)


def hard_label_recovery(full: float, distilled_hard: float) -> float:
    return _fraction("full-set accuracy", full) - _fraction("distilled hard-label accuracy", distilled_hard)


def label_robust_score(ior: float, hlr: float, weight: float = 0.5) -> float:
    if not 0.0 <= weight <= 1.0:
        raise ValueError(f"LRS weight must be in [0, 1], got {weight!r}")
    alpha = weight * ior - (1.0 - weight) * hlr
    return (math.exp(alpha) - math.exp(-1.0)) / (math.e - math.exp(-1.0))
