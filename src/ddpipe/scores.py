"""The scores DD-Ranking defines (arXiv 2505.13300), on accuracies as fractions in [0, 1].

- improvement over random: IOR = acc(distilled, regime) - acc(random subset of the same ipc, same regime);
- hard-label recovery: HLR = acc(full training set, hard labels) - acc(distilled, hard labels), lower is better;
- label-robust score: alpha = w * IOR - (1 - w) * HLR, LRS = (e^alpha - e^-1) / (e - e^-1), so alpha in
  [-1, 1] maps to [0, 1] (w = 0.5 by default, DD-Ranking's ``lrs_lambda``).

The reference package (ddranking 0.2.0) passes percents into the same formula, where alpha leaves [-1, 1]
and the score saturates; here every input must be a fraction and anything else is refused.

:func:`against_random` gives the verdict of a distilled set against its random subsets, the one every report
and matrix shows. With two or more random subsets it asks whether the set beats a *new* random subset: the
difference of the set's mean accuracy to the subsets' mean, with the 95 % t prediction interval of one more
subset's mean, ``t(n - 1) * sd(subset means) * sqrt(1 + 1/n)`` over n subsets (:func:`new_subset_interval`).
Under "the set is just another random subset" the verdict is level 95 % of the time, whatever the number of
seeds. "above", "level" or "below" as the interval lies above 0, covers it, or lies below it.

:func:`compare` answers a narrower question, kept next to it in every report (``welch``): is this set's mean
accuracy over student seeds different from the random subsets' mean accuracy? The difference of the means with
Welch's 95 % t interval (Welch-Satterthwaite degrees of freedom). With two or more random subsets, the unit of the
random side is a subset (its mean over the student seeds), not a student: the students of one subset share its
images. The distilled side's units are its seeds, so the interval carries no set-to-set spread on that side: a
random subset compared this way with the other subsets is called above or below far more often than 5 % of the
time (benchmarks/verdict_calibration.py), and such a verdict speaks about one set, not about its method.
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


def new_subset_interval(distilled: list[float], draw_means: list[float]) -> dict:
    """The set against a new random subset: its mean accuracy over the seeds minus the subsets' mean, with the
    95 % t prediction interval of one more subset's mean (n - 1 degrees of freedom, n subsets, each a mean over
    the same seeds as the set). Needs at least one distilled accuracy and 2 subsets, else the verdict is "n/a"."""
    out = {"difference": None, "ci95": None, "verdict": "n/a", "method": "prediction-t", "random_units": "subsets",
           "subsets": len(draw_means)}
    if not distilled or not draw_means:
        return out
    n, mean = len(draw_means), sum(draw_means) / len(draw_means)
    diff = sum(distilled) / len(distilled) - mean
    if n < 2:
        return {**out, "difference": diff}
    sd = math.sqrt(sum((m - mean) ** 2 for m in draw_means) / (n - 1))
    half = t975(n - 1) * sd * math.sqrt(1 + 1 / n)
    lo, hi = diff - half, diff + half
    return {**out, "difference": diff, "ci95": [lo, hi], "verdict": _verdict(lo, hi)}


def _verdict(lo: float, hi: float) -> str:
    return "above" if lo > 0 else "below" if hi < 0 else "level"


def against_random(distilled: list[float], random: list[float], draw_means: list[float] | None = None) -> dict:
    """The verdict of a report: with 2 or more random subsets the set against a new subset
    (:func:`new_subset_interval`), with Welch's interval of the two means under ``welch``; with one subset only
    Welch's interval over the students (:func:`compare`, ``random_units: "students"``), which cannot carry the
    spread between subsets."""
    welch = compare(distilled, random, draw_means)
    if draw_means is None or len(draw_means) < 2:
        return welch
    return {**new_subset_interval(distilled, draw_means), "welch": {"ci95": welch["ci95"], "verdict": welch["verdict"]}}


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
    return {**out, "difference": diff, "ci95": [lo, hi], "verdict": _verdict(lo, hi)}
