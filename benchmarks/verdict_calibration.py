"""How often the verdict against random calls a random subset "above" or "below" the other random subsets.

``python benchmarks/verdict_calibration.py REPORT.json [--ipc 10]``: REPORT is a matrix report (``ddpipe evaluate
MATRIX --report-only``). For each IPC and regime it takes the random side of one row (every subset's students,
in subset order, and each subset's mean), leaves each subset out in turn, and compares its students with the
other subsets' means exactly as a distilled set is compared (:func:`ddpipe.scores.compare`). A verdict calibrated
for "a random set against random sets" would be level about 95 % of the time; the count of verdicts that are
not level says how far each verdict in the report speaks about one set rather than about its method.

Then, for every finished cell, the verdict of a prediction interval: does the set beat a *new* random subset?
The difference of the set's mean to the subsets' mean, with the t interval (n - 1 degrees of freedom, n subsets)
of one more subset's mean, ``t * sd(subset means) * sqrt(1 + 1/n)``. The subsets' means carry their own seeds'
noise, as the set's mean does.
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections import Counter

from ddpipe.scores import compare, t975


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("report")
    p.add_argument("--ipc", type=int, action="append", help="only these IPCs (repeatable; default: every one)")
    args = p.parse_args()
    with open(args.report) as f:
        report = json.load(f)
    seen, total = set(), Counter()
    for row in report["rows"]:
        key = (row["ipc"], row["regime"])
        random = row.get("random") or {}
        means, values = random.get("draw_means") or [], random.get("values") or []
        if key in seen or (args.ipc and row["ipc"] not in args.ipc) or len(means) < 3:
            continue
        seen.add(key)
        per = len(values) // len(means)
        groups = [values[k * per:(k + 1) * per] for k in range(len(means))]
        if any(abs(sum(g) / len(g) - m) > 1e-9 for g, m in zip(groups, means)):
            raise SystemExit(f"{args.report}: IPC {row['ipc']} {row['regime']}: the random students are not in "
                             "subset order")
        verdicts = [compare(g, [], [m for j, m in enumerate(means) if j != k])["verdict"]
                    for k, g in enumerate(groups)]
        counts = Counter(verdicts)
        total.update(counts)
        print(f"IPC {row['ipc']:>3} {row['regime']:<8} {len(means)} subsets: " +
              ", ".join(f"{v} {counts[v]}" for v in ("above", "level", "below")) + f"   {verdicts}")
    n = sum(total.values())
    print(f"not level: {n - total['level']} of {n}")
    print("prediction interval (the set against a new random subset):")
    for row in report["rows"]:
        distilled, means = row.get("distilled") or {}, (row.get("random") or {}).get("draw_means") or []
        if "mean" not in distilled or len(means) < 3 or (args.ipc and row["ipc"] not in args.ipc):
            continue
        diff = distilled["mean"] - statistics.mean(means)
        half = t975(len(means) - 1) * statistics.stdev(means) * (1 + 1 / len(means)) ** 0.5
        verdict = "above" if diff - half > 0 else "below" if diff + half < 0 else "level"
        print(f"  {row['method']:<14} IPC {row['ipc']:>3} {row['regime']:<8} {100 * diff:+6.2f} "
              f"[{100 * (diff - half):+6.2f}, {100 * (diff + half):+6.2f}] {verdict}")


if __name__ == "__main__":
    main()
