"""DD-Ranking scores on fractions."""

import math

import pytest

from ddpipe.scores import compare, hard_label_recovery, improvement_over_random, label_robust_score


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


def test_welch_interval_on_a_hand_example():
    from ddpipe.scores import t975

    # distilled 80/82/81 %, random 75/77/76 %: each side's sd 1 point, se = sqrt(2 * 0.01^2 / 3) = 0.0081650,
    # Welch df = 4 exactly, t(0.975, 4) = 2.776: 5.00 +- 2.267 points -> [2.733, 7.267], above.
    c = compare([0.80, 0.82, 0.81], [0.75, 0.77, 0.76])
    assert c["difference"] == pytest.approx(0.05)
    assert c["ci95"] == pytest.approx([0.05 - 2.776 * 0.0081650, 0.05 + 2.776 * 0.0081650], abs=1e-6)
    assert c["verdict"] == "above" and c["method"] == "welch-t"
    # unequal spreads and sizes: variances 0.0004 and 0.00061667, v1 = 0.0004/3, v2 = 0.00061667/6,
    # df = (v1 + v2)^2 / (v1^2/2 + v2^2/5) = 5.07 -> the table at 5 (2.571); se = 0.015366:
    # 1.833 +- 3.951 points -> [-2.117, 5.784], level.
    c = compare([0.70, 0.74, 0.72], [0.70, 0.73, 0.66, 0.71, 0.69, 0.72])
    assert c["ci95"] == pytest.approx([-0.02117, 0.05784], abs=1e-5)
    assert c["verdict"] == "level"
    assert compare([0.60, 0.61, 0.62], [0.70, 0.71, 0.72])["verdict"] == "below"  # -10 +- 2.27 points
    assert compare([0.60, 0.61], [0.70, 0.72])["verdict"] == "level"  # 2 seeds a side: df 1.5, t 12.7
    assert compare([0.8], [0.7, 0.71]) == {"difference": pytest.approx(0.095), "ci95": None, "verdict": "n/a",
                                           "method": "welch-t", "random_units": "students"}
    assert t975(4) == 2.776 and t975(4.9) == 2.776 and abs(t975(1000) - 1.9623) < 1e-3


def test_with_several_random_subsets_a_subset_is_the_unit_of_the_random_side():
    # three subsets whose students agree within a subset (70-72, 75-77, 80-82 %): counted as 9 students the
    # interval would ignore that the subsets differ, and call distilled 80/82/81 % above random:
    r = [0.70, 0.71, 0.72, 0.75, 0.76, 0.77, 0.80, 0.81, 0.82]
    assert compare([0.80, 0.82, 0.81], r)["verdict"] == "above"
    # the subsets' means 71/76/81 %: sd 5 points, v2 = 0.0025 / 3, v1 = 0.0001 / 3, se = 0.029439,
    # df = (v1 + v2)^2 / (v1^2/2 + v2^2/2) = 2.16 -> the table at 2 (4.303): 5.00 +- 12.668 points, level.
    c = compare([0.80, 0.82, 0.81], r, draw_means=[0.71, 0.76, 0.81])
    assert c["ci95"] == pytest.approx([0.05 - 4.303 * 0.029439, 0.05 + 4.303 * 0.029439], abs=1e-5)
    assert c["verdict"] == "level" and c["random_units"] == "subsets"
    assert compare([0.80, 0.82, 0.81], [0.75, 0.76], draw_means=[0.755])["random_units"] == "students"  # one subset


def test_the_set_against_a_new_random_subset_on_a_hand_example():
    from ddpipe.scores import against_random, new_subset_interval

    # five subsets' means 70/72/74/76/78 %: mean 74, sd sqrt((16 + 4 + 0 + 4 + 16) / 4) = 3.1623 points,
    # t(0.975, 4) = 2.776, sqrt(1 + 1/5) = 1.095445: a new subset's mean lies within 74 +- 9.6163 points.
    means = [0.70, 0.72, 0.74, 0.76, 0.78]
    c = new_subset_interval([0.84, 0.85, 0.86], means)
    assert c["difference"] == pytest.approx(0.11)
    assert c["ci95"] == pytest.approx([0.11 - 0.096163, 0.11 + 0.096163], abs=1e-6)
    assert (c["verdict"], c["method"], c["subsets"]) == ("above", "prediction-t", 5)
    assert new_subset_interval([0.64], means)["verdict"] == "below"  # -10 +- 9.62 points; one seed is enough
    # 79/80/81 %: Welch on the two means says above (6 +- 3.93 points: v1 = 0.0001/3, v2 = 0.001/5, df 5.16 ->
    # t 2.571), but a new random subset beats 80 % often enough: 6 +- 9.62 points, level.
    c = against_random([0.79, 0.80, 0.81], [], means)
    assert c["verdict"] == "level" and c["welch"]["verdict"] == "above"
    assert c["welch"]["ci95"] == pytest.approx([0.06 - 2.571 * 0.015275, 0.06 + 2.571 * 0.015275], abs=1e-5)
    # each subset against the other four is level: the verdict does not call a random subset above random
    assert [new_subset_interval([m], means[:k] + means[k + 1:])["verdict"] for k, m in enumerate(means)] == ["level"] * 5
    assert new_subset_interval([0.8], [0.7])["verdict"] == "n/a"  # one subset: no spread to predict from
    assert against_random([0.8, 0.81], [0.7, 0.71], [0.705])["method"] == "welch-t"  # one subset: Welch on students


def test_every_regime_of_a_report_carries_its_verdict():
    from ddpipe.report import regime_results, results_rows, results_table

    results = [{"regime": "hard", "set": s, "seed": k, "top1": v, "steps": 10}
               for s, vals in (("distilled", [0.80, 0.82, 0.81]), ("random", [0.75, 0.77, 0.76]))
               for k, v in enumerate(vals)]
    regimes = regime_results(results, ["hard"], 0)
    assert regimes["hard"]["comparison"]["verdict"] == "above"
    report = {"method": "rded", "dataset": "fm", "ipc": 10, "teacher": {"val_accuracy": 0.9}, "labels": {"bytes": 1},
              "regimes": regimes, "student": "convnet"}
    lines = results_table(report).splitlines()
    assert lines[2].startswith("hard") and lines[2].endswith("+5.00  [+2.73, +7.27] above")
    assert lines[3].startswith("random: 1 random subset(s)")
    row = results_rows(report)[0]
    assert (row["gain_ci95_low"], row["gain_ci95_high"], row["verdict"]) == (2.73, 7.27, "above")


def test_the_random_side_pools_every_draw_and_seed():
    from ddpipe.report import regime_results

    results = [{"regime": "hard", "set": "distilled", "seed": k, "test_accuracy": v, "steps": 10}
               for k, v in enumerate([0.80, 0.82, 0.81])]
    results += [{"regime": "hard", "set": s, "seed": k, "test_accuracy": v, "steps": 10}
                for s, vals in (("random-1", [0.70, 0.71, 0.72]), ("random", [0.75, 0.77, 0.76]))
                for k, v in enumerate(vals)]
    results.append({"regime": "hard", "set": "random-2", "seed": 0, "top1": 0.74, "steps": 10})  # an old file
    hard = regime_results(results, ["hard"], 0)["hard"]
    assert hard["random"]["draws"] == 3 and hard["random"]["values"] == [0.75, 0.77, 0.76, 0.70, 0.71, 0.72, 0.74]
    assert hard["random"]["mean"] == pytest.approx(0.7357142857) and len(hard["distilled"]["values"]) == 3
    assert hard["random"]["draw_means"] == pytest.approx([0.76, 0.71, 0.74])  # in draw order; one file per seed
    welch = compare([0.80, 0.82, 0.81], hard["random"]["values"], hard["random"]["draw_means"])
    assert hard["comparison"]["welch"] == {"ci95": welch["ci95"], "verdict": welch["verdict"]}
    assert hard["comparison"]["random_units"] == "subsets" and hard["comparison"]["method"] == "prediction-t"
    # 81 % against a new subset: 81 - 73.67 = 7.33 points, +- t(2) * sd(76, 71, 74) * sqrt(4/3) = 4.303 * 2.5166 *
    # 1.1547 = 12.50 points: level, where Welch (the set's mean against the subsets' mean) says above
    assert hard["comparison"]["ci95"] == pytest.approx([0.0733 - 0.1250, 0.0733 + 0.1250], abs=2e-4)
    assert (hard["comparison"]["verdict"], welch["verdict"]) == ("level", "above")
    from ddpipe.report import results_rows, results_table

    report = {"method": "rded", "dataset": "fm", "ipc": 10, "teacher": {"val_accuracy": 0.9}, "labels": {"bytes": 1},
              "regimes": {"hard": hard}, "student": "convnet"}
    line = results_table(report).splitlines()[2]
    # Δ is the pooled difference (81 - 73.57); Welch: se = sqrt(0.0001/3 + 0.00063333/3) = 0.015635, df 2.62 -> t
    # 4.303: 7.33 +- 6.73 points
    assert line.endswith("+7.43  [-5.17, +19.84] level  (Welch [+0.61, +14.06] above)"), line
    assert (results_rows(report)[0]["verdict"], results_rows(report)[0]["mean_verdict"]) == ("level", "above")


def test_students_trained_differently_are_not_compared():
    from ddpipe.report import far_below_random, refused_comparisons, regime_results

    def row(s, seed, top1, steps):
        return {"regime": "hard", "set": s, "seed": seed, "top1": top1, "steps": steps, "batch_size": 50,
                "model": {"name": "convnet"}, "images": 100, "test_images": 1000}

    same = [row("distilled", k, 0.8 + k / 100, 600) for k in range(3)] + [row("random", k, 0.7, 600) for k in range(3)]
    assert regime_results(same, ["hard"], 0)["hard"]["comparison"]["verdict"] == "above"
    other = same[:3] + [row("random", k, 0.7, 300) for k in range(3)]
    regimes = regime_results(other, ["hard"], 0)
    c = regimes["hard"]["comparison"]
    assert c["verdict"] == "refused" and regimes["hard"]["improvement_over_random"] is None
    assert c["reason"] == "not compared: the distilled and random students differ in steps (600 vs 300)"
    assert refused_comparisons(regimes) == [f"hard regime {c['reason']}"] and far_below_random(regimes) == []
