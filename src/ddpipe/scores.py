"""The scores DD-Ranking defines (arXiv 2505.13300), on accuracies as fractions in [0, 1].

- improvement over random: IOR = acc(distilled, regime) - acc(random subset of the same ipc, same regime);
- hard-label recovery: HLR = acc(full training set, hard labels) - acc(distilled, hard labels), lower is better;
- label-robust score: alpha = w * IOR - (1 - w) * HLR, LRS = (e^alpha - e^-1) / (e - e^-1), so alpha in
  [-1, 1] maps to [0, 1] (w = 0.5 by default, DD-Ranking's ``lrs_lambda``).

The reference package (ddranking 0.2.0) passes percents into the same formula, where alpha leaves [-1, 1]
and the score saturates; here every input must be a fraction and anything else is refused.

:func:`compare` gives the verdict of a distilled set against its random subsets: the difference of the mean
accuracies with Welch's 95 % t interval (unequal variances, Welch-Satterthwaite degrees of freedom), and
"above", "level" or "below" as the interval lies above 0, covers it, or lies below it. With two or more random
subsets, the unit of the random side is a subset (its mean over the student seeds), not a student: the students of
one subset share its images, so their accuracies are not independent samples of a random subset's accuracy, and
counting them as such would narrow the interval by the very spread between subsets that several draws measure.
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


# Two-sided 95 % quantiles of Student's t for 1..30 degrees of freedom.
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
         2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)
_Z975 = 1.959964


def t975(df: float) -> float:
    """The 97.5 % quantile of Student's t with ``df`` degrees of freedom: the table at floor(df) (a wider,
    conservative interval for fractional df), above 30 the Cornish-Fisher term z + (z^3 + z) / (4 df)."""
    if df < 1:
        raise ValueError(f"degrees of freedom must be at least 1, got {df!r}")
    if df < 31:
        return _T975[int(df) - 1]
    return _Z975 + (_Z975 ** 3 + _Z975) / (4 * df)


def compare(distilled: list[float], random: list[float], draw_means: list[float] | None = None) -> dict:
    """Difference of mean accuracies (distilled - random) with Welch's 95 % interval and a verdict.

    ``distilled``: the distilled set's accuracies, one per student seed. ``random``: the random side's accuracies
    (every draw x seed). ``draw_means``: each random subset's mean over the seeds; with two or more, they are the
    random side's units (``random_units: "subsets"``), else its students are (``"students"``: one subset, whose
    spread against other subsets the interval then does not carry). Each side needs at least 2 units; with fewer
    the verdict is "n/a"."""
    by_subset = draw_means is not None and len(draw_means) >= 2
    units = list(draw_means) if by_subset else list(random)
    out = {"difference": None, "ci95": None, "verdict": "n/a", "method": "welch-t",
           "random_units": "subsets" if by_subset else "students"}
    n1, n2 = len(distilled), len(units)
    if n1 == 0 or n2 == 0:
        return out
    m1, m2 = sum(distilled) / n1, sum(units) / n2
    diff = m1 - m2
    if n1 < 2 or n2 < 2:
        return {**out, "difference": diff}
    v1 = sum((x - m1) ** 2 for x in distilled) / (n1 - 1) / n1
    v2 = sum((x - m2) ** 2 for x in units) / (n2 - 1) / n2
    se = math.sqrt(v1 + v2)
    if se == 0:
        lo = hi = diff
    else:
        df = (v1 + v2) ** 2 / (v1 ** 2 / (n1 - 1) + v2 ** 2 / (n2 - 1))
        half = t975(df) * se
        lo, hi = diff - half, diff + half
    verdict = "above" if lo > 0 else "below" if hi < 0 else "level"
    return {**out, "difference": diff, "ci95": [lo, hi], "verdict": verdict}
