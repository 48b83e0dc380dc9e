"""How often each verdict against random calls a random subset "above" or "below" the other random subsets.

``python benchmarks/verdict_calibration.py REPORT.json [--ipc 10]``: REPORT is a matrix report (``ddpipe evaluate
MATRIX --report-only``). For each IPC and regime it takes the random side of one row (every subset's students,
in subset order, and each subset's mean), leaves each subset out in turn, and compares it with the other subsets
exactly as a distilled set is compared, under both verdicts of :mod:`ddpipe.scores`:

- the report's verdict, the set against a new random subset (:func:`ddpipe.scores.new_subset_interval`);
- Welch's interval of the set's mean against the subsets' mean (:func:`ddpipe.scores.compare`), kept in
  report.json as ``welch``.

A verdict calibrated for "a random set against random sets" is level about 95 % of the time; the count of
verdicts that are not level says how far a verdict speaks about one set rather than about its method. Then, for
every finished cell, both verdicts side by side.
"""

from __future__ import annotations

import argparse
import json
from collections import Counter

from ddpipe.scores import compare, new_subset_interval

KINDS = {"new subset": new_subset_interval,
         "Welch": lambda students, others: compare(students, [], others)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("report")
    p.add_argument("--ipc", type=int, action="append", help="only these IPCs (repeatable; default: every one)")
    args = p.parse_args()
    with open(args.report) as f:
        report = json.load(f)
    rows = [r for r in report["rows"] if not args.ipc or r["ipc"] in args.ipc]
    seen, total = set(), {kind: Counter() for kind in KINDS}
    print("leave-one-out: each random subset against the others")
    for row in rows:
        key = (row["ipc"], row["regime"])
        random = row.get("random") or {}
        means, values = random.get("draw_means") or [], random.get("values") or []
        if key in seen or len(means) < 3:
            continue
        seen.add(key)
        per = len(values) // len(means)
        groups = [values[k * per:(k + 1) * per] for k in range(len(means))]
        if any(abs(sum(g) / len(g) - m) > 1e-9 for g, m in zip(groups, means)):
            raise SystemExit(f"{args.report}: IPC {row['ipc']} {row['regime']}: the random students are not in "
                             "subset order")
        line = f"  IPC {row['ipc']:>3} {row['regime']:<8} {len(means)} subsets:"
        for kind, verdict in KINDS.items():
            counts = Counter(verdict(g, means[:k] + means[k + 1:])["verdict"] for k, g in enumerate(groups))
            total[kind].update(counts)
            line += f"  {kind}: " + ", ".join(f"{v} {counts[v]}" for v in ("above", "level", "below"))
        print(line)
    for kind, counts in total.items():
        n = sum(counts.values())
        print(f"{kind}: not level {n - counts['level']} of {n}")
    print("every cell, both verdicts (difference and 95 % interval in points):")
    for row in rows:
        c = row.get("comparison") or {}
        if not c.get("ci95") or not (c.get("welch") or {}).get("ci95"):
            continue
        (lo, hi), (wlo, whi) = c["ci95"], c["welch"]["ci95"]
        print(f"  {row['method']:<14} IPC {row['ipc']:>3} {row['regime']:<8} {100 * c['difference']:+6.2f}  "
              f"new subset [{100 * lo:+6.2f}, {100 * hi:+6.2f}] {c['verdict']:<5}  "
              f"Welch [{100 * wlo:+6.2f}, {100 * whi:+6.2f}] {c['welch']['verdict']}")


if __name__ == "__main__":
    main()
