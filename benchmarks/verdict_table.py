"""One IPC of a matrix report as the Markdown table docs/benchmarks.md shows: methods x regimes.

``python benchmarks/verdict_table.py REPORT.json IPC``: REPORT is a matrix report (``ddpipe evaluate MATRIX
--report-only``). Each cell: top-1 test accuracy (%) mean ± std over the seeds, then the difference to the random
subsets in points with the report's 95 % interval and verdict (the set against a new random subset), and Welch's
verdict on the two means after it; verdicts other than level in bold. Then the random subsets and the full
training set.
"""

from __future__ import annotations

import argparse
import json

from ddpipe.matrix import _pct as pct  # the matrix report's own cells
from ddpipe.matrix import _subsets as subsets
from ddpipe.matrix import reference_groups

NAMES = {"rded": "RDED", "kcenter": "k-center", "el2n": "EL2N", "cad": "CAD-Prune", "ca2d": "CA2D",
         "random": "random (method)", "sre2l": "SRe2L", "cda": "CDA", "gvbsm": "G-VBSM (primary backbone)",
         "refine-fadrm": "refine, FADRM", "refine-random": "refine, FADRM from random real images",
         "refine-cim": "refine, CIM", "refine-edc": "refine, EDC"}
REGIMES = ("hard", "soft", "soft_kd")


def cell(row: dict) -> str:
    c = row["comparison"]
    if not c.get("ci95"):
        return f"{pct(row['distilled'])} ({c['verdict']})"
    (lo, hi), v = c["ci95"], c["verdict"]
    text = f"{100 * c['difference']:+.2f} [{100 * lo:+.2f}, {100 * hi:+.2f}] {v}"
    welch = (c.get("welch") or {}).get("verdict")
    return f"{pct(row['distilled'])} ({text if v == 'level' else f'**{text}**'}" + (f"; Welch {welch})" if welch else ")")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("report")
    p.add_argument("ipc", type=int)
    args = p.parse_args()
    with open(args.report) as f:
        rows = [r for r in json.load(f)["rows"] if r["ipc"] == args.ipc]
    if not rows:
        raise SystemExit(f"{args.report}: no finished cell at IPC {args.ipc}")
    cells: dict[str, dict[str, str]] = {}
    for row in rows:
        cells.setdefault(row["method"], {})[row["regime"]] = cell(row)
    print("| method | hard | soft | soft + KD |\n| --- | --- | --- | --- |")
    for method, c in cells.items():
        print(f"| {NAMES.get(method, method)} | " + " | ".join(c.get(r, "") for r in REGIMES) + " |")
    # the references: one row per distinct random subsets (G-VBSM's students train another way), then the full set
    per_regime = reference_groups(rows, list(cells), "regime")
    for k in range(max(len(g) for g in per_regime.values())):
        at = {r: per_regime[r][k] if k < len(per_regime.get(r, [])) else None for r in REGIMES}
        first = next(g for g in at.values() if g)[0]
        whose = "" if k == 0 else ", " + ", ".join(dict.fromkeys(r["method"] for g in at.values() if g for r in g)) \
            + "'s student recipe"
        print(f"| *random subsets ({first['random']['draws']} x the same seeds{whose})* | "
              + " | ".join(subsets(g[0]["random"]) if g else "" for g in at.values()) + " |")
    full = next((r["full"] for r in rows if r.get("full")), None)
    if full:
        print(f"| *full training set, same budget* | {pct(full)} | | |")


if __name__ == "__main__":
    main()
