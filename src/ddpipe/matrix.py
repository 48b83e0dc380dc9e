"""Evaluation matrices: methods x IPC as ordinary runs, and the comparison report over them.

A matrix file (``configs/matrix/*.yaml``, validated by :class:`MatrixConfig`) names a base run config, the
IPCs, and per method the config files or override mappings that make that method's run. Each (method,
ipc) cell is an ordinary run (its own run folder, cached and resumable shard by shard; regimes x seeds
are its evaluation shards), so a killed matrix resumes without redoing finished cells, and the random
baseline and full-set students are trained once per IPC for all methods (shared outputs of the store).

The report, written to ``<store>/matrices/<name>-<hash>/``:

- ``report.json``: ``{"matrix": name, "cells": [{"method", "ipc", "run", "regimes": {...}, "scores":
  {...}}], "rows": [...], "not_run": [{"method", "ipc", "reason"}], "pending": [{"method", "ipc"}]}``, one row
  per (method, ipc, regime) with ``distilled``, ``random``, ``full`` (means and stds, fractions), ``ior``,
  ``comparison`` (:func:`ddpipe.scores.against_random`), ``hlr``, ``lrs``;
- ``report.md``: the verdicts at 95 % (which methods are above and below random, in which regime and at which
  IPC), a Markdown table per regime (rows: methods; columns: IPCs; mean +- std in percent, the difference to
  random with its 95 % interval and verdict), the HLR and LRS tables, and the cells not run (``not_run``, with
  the reason) or still pending;
  :func:`finished_report` rewrites it from the finished cells' own reports without running anything;
- ``accuracy.png``: accuracy against IPC, one panel per regime, one line per method, random dashed.
"""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path
from typing import Any, Callable

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ddpipe.config import RunConfig, _describe_error, _merge, _read_yaml, build_config
from ddpipe.errors import ConfigError
from ddpipe.store import Store


class MatrixConfig(BaseModel):
    """An evaluation matrix: which runs make it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(description="Names the report folder and prefixes every cell's run name.")
    run: str = Field(description="Base run config file (relative to the matrix file): data, teacher, labels, students.")
    ipc: tuple[int, ...] = Field(min_length=1, description="Images per class of the cells.")
    ipc_config: str | None = Field(
        None, description="Per-IPC config file, '{ipc}' replaced (e.g. base/fashion-mnist-ipc{ipc}.yaml): student "
        "budgets per IPC."
    )
    methods: dict[str, list[str | dict[str, Any]]] = Field(
        min_length=1, description="Method label -> config files (relative) and/or mappings merged over the base, "
        "in order; e.g. ca2d: [base/fashion-mnist-rded.yaml, {method: {name: ca2d}}]."
    )
    overrides: tuple[str, ...] = Field((), description="Dotted-key overrides applied to every cell last.")
    not_run: dict[str, str] = Field(
        {}, description="Cells this matrix does not run, each with the reason the report gives: a method label "
        "(every IPC) or 'label@ipc' -> reason (e.g. what it would cost)."
    )
    notes: tuple[str, ...] = Field((), description="Lines the report prints under its title (budget, variants).")


def load_matrix(path: str | Path) -> tuple[MatrixConfig, Path]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"matrix file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
        return MatrixConfig.model_validate(data), path.parent
    except yaml.YAMLError as e:
        raise ConfigError(f"matrix file {path} is not valid YAML: {e}") from None
    except ValidationError as e:
        raise ConfigError(f"matrix file {path}: {_describe_error(e)}") from None


def select(matrix: MatrixConfig, methods: list[str] | None = None, ipcs: list[int] | None = None) -> MatrixConfig:
    """The matrix restricted to some methods and IPCs (same cells, same run folders, its own report)."""
    for m in methods or []:
        if m not in matrix.methods:
            raise ConfigError(f"matrix {matrix.name} has no method '{m}' (it has {', '.join(matrix.methods)})")
    for i in ipcs or []:
        if i not in matrix.ipc:
            raise ConfigError(f"matrix {matrix.name} has no ipc {i} (it has {', '.join(map(str, matrix.ipc))})")
    return matrix.model_copy(update={
        "methods": {k: v for k, v in matrix.methods.items() if not methods or k in methods},
        "ipc": tuple(i for i in matrix.ipc if not ipcs or i in ipcs),
    })


def cell_configs(matrix: MatrixConfig, root: Path, overrides: tuple[str, ...] | list[str] = ()) -> list[tuple[str, int, RunConfig]]:
    """Every (method label, ipc, run config) of the matrix, methods in file order, then by IPC."""
    base = _read_yaml(root / matrix.run)
    cells = []
    for label, parts in matrix.methods.items():
        for ipc in matrix.ipc:
            data = base
            if matrix.ipc_config:
                data = _merge(data, _read_yaml(root / matrix.ipc_config.format(ipc=ipc)))
            for part in parts:
                data = _merge(data, _read_yaml(root / part) if isinstance(part, str) else part)
            data = _merge(data, {"name": f"{matrix.name}-{label}-ipc{ipc}", "method": {"ipc": ipc}})
            try:
                cfg = build_config(data, [*matrix.overrides, *overrides])
            except ConfigError as e:
                raise ConfigError(f"matrix cell {label} ipc {ipc}: {e}") from None
            cells.append((label, ipc, cfg))
    return cells


def matrix_store(matrix: MatrixConfig, cells: list[tuple[str, int, RunConfig]]) -> Store:
    """``<store>/matrices/<name>-<hash of the cells' run names>``."""
    cfg = cells[0][2]
    digest = hashlib.sha256("\n".join(c.run_name for _, _, c in cells).encode()).hexdigest()[:10]
    return Store(cfg.store.uri, cfg.store.storage_options).child(f"matrices/{matrix.name}-{digest}")


def skipped(matrix: MatrixConfig, label: str, ipc: int) -> str | None:
    """Why the matrix does not run cell (label, ipc), or None when it does."""
    return matrix.not_run.get(f"{label}@{ipc}", matrix.not_run.get(label))


def run_matrix(matrix: MatrixConfig, root: Path, run: Callable[[RunConfig], dict],
               overrides: tuple[str, ...] | list[str] = ()) -> dict:
    """Run every cell with ``run`` (the plain runner or the distill flow) except those ``not_run`` names; the
    comparison report is written after each cell, so a matrix spread over several sessions always has the
    report of the cells finished so far (the others listed as pending)."""
    cells = cell_configs(matrix, root, overrides)
    store = matrix_store(matrix, cells)
    todo = [(label, ipc, cfg) for label, ipc, cfg in cells if skipped(matrix, label, ipc) is None]
    reports = []
    for k, (label, ipc, cfg) in enumerate(todo):
        reports.append((label, ipc, run(cfg)))
        report = write_matrix_report(matrix, store, reports, pending=[(m, i) for m, i, _ in todo[k + 1:]])
    return report if todo else write_matrix_report(matrix, store, [])


def finished_report(matrix: MatrixConfig, root: Path, overrides: tuple[str, ...] | list[str] = ()) -> dict:
    """The comparison report of the cells finished so far, running nothing (``ddpipe evaluate --report-only``):
    each cell's ``report.json`` from its run folder, its verdicts recomputed by this code
    (:func:`ddpipe.report.reverdict`); cells without one are listed as pending. A matrix run by an older checkout
    (continued from a frozen commit for its cache keys) gets the current verdicts this way."""
    from ddpipe.report import reverdict

    cells = cell_configs(matrix, root, overrides)
    listed: dict[str, list[str]] = {}  # one listing per store, not one per cell
    reports, pending = [], []
    for label, ipc, cfg in cells:
        if skipped(matrix, label, ipc) is not None:
            continue
        if cfg.store.uri not in listed:
            listed[cfg.store.uri] = Store(cfg.store.uri, cfg.store.storage_options).list("")
        run = finished_run(cfg, listed[cfg.store.uri])
        if run is not None:
            reports.append((label, ipc, reverdict(run.read_json("report.json"))))
        else:
            pending.append((label, ipc))
    return write_matrix_report(matrix, matrix_store(matrix, cells), reports, pending)


def finished_run(cfg: RunConfig, names: list[str]) -> Store | None:
    """The run folder with ``cfg``'s finished report: its own (``cfg.run_name``), or one an older checkout wrote
    for the same settings. A config schema that has since gained fields (with defaults) hashes the same settings
    to another name, so a folder named ``<cfg.name>-*`` among ``names`` (the store's folders) counts when its
    ``config.yaml``, read by this code, is ``cfg``."""
    root = Store(cfg.store.uri, cfg.store.storage_options)
    own = root.child(cfg.run_name)
    if own.exists("report.json"):
        return own
    for name in names:
        run = root.child(name)
        if name.startswith(f"{cfg.name}-") and run.exists("report.json") and run.exists("config.yaml"):
            try:
                same = build_config(yaml.safe_load(run.read_bytes("config.yaml"))).run_name == cfg.run_name
            except ConfigError:  # written by a checkout with fields this one no longer has
                same = False
            if same:
                return run
    return None


def matrix_rows(reports: list[tuple[str, int, dict]]) -> list[dict]:
    rows = []
    for label, ipc, report in reports:
        for regime, e in report["regimes"].items():
            rows.append({
                "method": label, "ipc": ipc, "regime": regime, "distilled": e["distilled"], "random": e["random"],
                "full": e.get("full"), "ior": e["improvement_over_random"],
                "hlr": report["scores"]["hard_label_recovery"],
                "lrs": report["scores"]["label_robust_score"].get(regime), "steps": e.get("steps"),
                "comparison": e.get("comparison"),
            })
    return rows


def _pct(s: dict | None) -> str:
    if not s or s.get("mean") is None:
        return "n/a"
    return f"{100 * s['mean']:.2f} ± {100 * s['std']:.2f}" if len(s["values"]) > 1 else f"{100 * s['mean']:.2f}"


def _subsets(random: dict) -> str:
    """The random side: mean ± std over draws x seeds, and the range of the subsets' means."""
    means = random.get("draw_means") or []
    spread = f" (means of {len(means)} subsets: {100 * min(means):.2f} to {100 * max(means):.2f})" if len(means) > 1 else ""
    return _pct(random) + spread


def _signed(v: float | None, scale: float = 100.0, digits: int = 2) -> str:
    return "n/a" if v is None else f"{scale * v:+.{digits}f}"


def _verdict(c: dict) -> str:
    """A cell's difference to random with its 95 % interval and verdict, in points."""
    comp = c.get("comparison") or {}
    if comp.get("verdict") == "refused":
        return f"refused: {comp.get('reason', '')}"
    if comp.get("ci95"):
        lo, hi = comp["ci95"]
        return f"{_signed(c['ior'])} [{_signed(lo)}, {_signed(hi)}] {comp['verdict']}"
    return f"{_signed(c['ior'])} n/a"


def verdict_lines(rows: list[dict]) -> list[str]:
    """Which methods are above and below random, per regime and IPC, at 95 %."""
    out = []
    for verdict in ("above", "below"):
        hits = [r for r in rows if (r.get("comparison") or {}).get("verdict") == verdict]
        names = ", ".join(f"{r['method']} IPC {r['ipc']} {r['regime']} ({_verdict(r)})" for r in hits)
        out.append(f"- **{verdict} random**: {names or 'none'}")
    level = [r for r in rows if (r.get("comparison") or {}).get("verdict") == "level"]
    out.append(f"- level with random (the interval covers 0): {len(level)} of {len(rows)} cells")
    other = [r for r in rows if (r.get("comparison") or {}).get("verdict") not in ("above", "below", "level")]
    if other:
        out.append(f"- no verdict (fewer than 2 random subsets or accuracies, or refused): {len(other)} cells")
    return out


def reference_groups(rows: list[dict], methods: list[str], column: str) -> dict[object, list[list[dict]]]:
    """Rows that share one reference (random subsets and full training set), per value of ``row[column]`` (IPC or
    regime), in the matrix file's order of methods. Methods whose students follow their own recipe (G-VBSM's)
    have references of their own, so a column can hold more than one group."""
    groups: dict[tuple, list[dict]] = {}
    for r in sorted(rows, key=lambda r: methods.index(r["method"]) if r["method"] in methods else len(methods)):
        refs = json.dumps([r["random"].get("values"), (r["full"] or {}).get("values")])
        groups.setdefault((r[column], refs), []).append(r)
    out: dict[object, list[list[dict]]] = {}
    for (col, _), g in groups.items():
        out.setdefault(col, []).append(g)
    return out


def _reference_rows(rows: list[dict], methods: list[str], ipcs: list[int]) -> list[str]:
    """The random subsets and full training set rows of one regime: one row each per distinct reference, named by
    the methods it serves when there is more than one."""
    per_ipc = reference_groups(rows, methods, "ipc")
    per_ipc = {i: per_ipc.get(i, []) for i in ipcs}
    out = []
    for k in range(max((len(g) for g in per_ipc.values()), default=0)):
        at = {i: per_ipc[i][k] if k < len(per_ipc[i]) else None for i in ipcs}
        served = ", ".join(dict.fromkeys(r["method"] for g in at.values() if g for r in g))
        suffix = f" ({served})" if any(len(g) > 1 for g in per_ipc.values()) else ""
        out.append(f"| *random subsets{suffix}* | " + " | ".join(
            _subsets(at[i][0]["random"]) if at[i] else "" for i in ipcs) + " |")
        if any(at[i] and at[i][0]["full"] for i in ipcs):
            out.append(f"| *full training set{suffix}* | " + " | ".join(
                _pct(at[i][0]["full"]) if at[i] else "" for i in ipcs) + " |")
    return out


def markdown_report(name: str, rows: list[dict], not_run: list[tuple[str, int, str]] = (),
                    pending: list[tuple[str, int]] = (), notes: tuple[str, ...] = (), order: tuple[str, ...] = ()) -> str:
    listed = set([r["method"] for r in rows] + [m for m, _, _ in not_run] + [m for m, _ in pending])
    methods = [m for m in order if m in listed] + sorted(listed - set(order))  # the matrix file's order
    ipcs = sorted({r["ipc"] for r in rows} | {i for _, i, _ in not_run} | {i for _, i in pending})
    regimes = list(dict.fromkeys(r["regime"] for r in rows))
    at = {(r["method"], r["ipc"], r["regime"]): r for r in rows}
    why = {(m, i): reason for m, i, reason in not_run}
    waiting = set(pending)
    head = "| method | " + " | ".join(f"IPC {i}" for i in ipcs) + " |\n|---|" + "---|" * len(ipcs)
    out = [f"# Evaluation matrix: {name}", "", *[f"{n}" for n in notes], *([""] if notes else []),
           "Top-1 test accuracy (%) at the final step, mean ± std over student seeds; then the difference to the "
           "random subsets of the same IPC (same regime and students; mean over draws x seeds) in points, its 95 % "
           "interval and the verdict: above, level (the interval covers 0) or below. With two or more random "
           "subsets the interval is the t prediction interval of a new random subset's mean (n - 1 degrees of "
           "freedom over n subsets, each averaged over the same seeds as the set): the verdict says whether the "
           "set beats a random subset drawn anew, and a set that is just another random subset is called level 95 % "
           "of the time (ddpipe.scores.against_random). report.json keeps Welch's interval of the set's mean "
           "against the subsets' mean next to it (\"welch\"). Random subset and full training set rows are the "
           "references.", "", "## Verdicts at 95 %", "", *verdict_lines(rows), ""]
    for regime in regimes:
        out += [f"## {regime}", "", head]
        for m in methods:
            cells = [at.get((m, i, regime)) for i in ipcs]
            out.append(f"| {m} | " + " | ".join(
                f"{_pct(c['distilled'])} ({_verdict(c)})" if c is not None
                else "not run (see below)" if (m, i) in why else "pending" if (m, i) in waiting else ""
                for c, i in zip(cells, ipcs)) + " |")
        out += _reference_rows([r for r in rows if r["regime"] == regime], methods, ipcs)
        out.append("")
    out += ["## Scores (DD-Ranking, on fractions)", "",
            "HLR: full-set accuracy minus the method's, hard labels, same budget (lower is better). LRS per regime: "
            "(e^a - e^-1) / (e - e^-1), a = (IOR - HLR) / 2.", "",
            "| method | IPC | HLR | " + " | ".join(f"LRS {r}" for r in regimes) + " |",
            "|---|---|---|" + "---|" * len(regimes)]
    for m in methods:
        for i in ipcs:
            cells = [at.get((m, i, r)) for r in regimes]
            some = next((c for c in cells if c), None)
            if some is None:
                continue
            out.append(f"| {m} | {i} | {_signed(some['hlr'], 1.0, 4)} | " + " | ".join(
                "n/a" if c is None or c["lrs"] is None else f"{c['lrs']:.4f}" for c in cells) + " |")
    if not_run or pending:
        out += ["", "## Cells not in this report", ""]
        out += [f"- {m} IPC {i}: not run: {reason}" for m, i, reason in not_run]
        out += [f"- {m} IPC {i}: pending (run the matrix again to continue)" for m, i in pending]
    return "\n".join(out) + "\n"


def accuracy_plot(rows: list[dict]) -> bytes:
    """PNG: accuracy against IPC, one panel per regime, one line per method, the random subset dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    regimes = list(dict.fromkeys(r["regime"] for r in rows))
    methods = list(dict.fromkeys(r["method"] for r in rows))
    fig, axes = plt.subplots(1, len(regimes), figsize=(4.2 * len(regimes), 3.6), squeeze=False)
    for ax, regime in zip(axes[0], regimes):
        sub = [r for r in rows if r["regime"] == regime]
        for m in methods:
            pts = sorted((r["ipc"], r["distilled"]) for r in sub if r["method"] == m and r["distilled"]["mean"] is not None)
            if pts:
                ax.errorbar([p[0] for p in pts], [100 * p[1]["mean"] for p in pts],
                            yerr=[100 * p[1]["std"] for p in pts], marker="o", capsize=3, label=m)
        base = sorted({(r["ipc"], r["random"]["mean"]) for r in sub if r["random"]["mean"] is not None})
        if base:
            ax.plot([b[0] for b in base], [100 * b[1] for b in base], "k--", label="random subset")
        ax.set_xscale("log")
        ax.set_xticks(sorted({r["ipc"] for r in sub}), labels=[str(i) for i in sorted({r["ipc"] for r in sub})])
        ax.set_title(regime)
        ax.set_xlabel("images per class")
        ax.set_ylabel("top-1 (%)")
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, metadata={"Software": None})  # no version stamp: same bytes per run
    plt.close(fig)
    return buf.getvalue()


def write_matrix_report(matrix: MatrixConfig, store: Store, reports: list[tuple[str, int, dict]],
                        pending: list[tuple[str, int]] = ()) -> dict:
    rows = matrix_rows(reports)
    not_run = [(m, i, skipped(matrix, m, i)) for m in matrix.methods for i in matrix.ipc if skipped(matrix, m, i)]
    report = {
        "matrix": matrix.name, "uri": store.uri,
        "cells": [{"method": label, "ipc": ipc, "run": r["run"], "run_uri": r["run_uri"], "regimes": r["regimes"],
                   "scores": r["scores"]} for label, ipc, r in reports],
        "rows": rows,
        "not_run": [{"method": m, "ipc": i, "reason": reason} for m, i, reason in not_run],
        "pending": [{"method": m, "ipc": i} for m, i in pending],
    }
    store.write_bytes("report.json", json.dumps(report, indent=1).encode())
    store.write_bytes("report.md", markdown_report(matrix.name, rows, not_run, pending, matrix.notes, tuple(matrix.methods)).encode())
    if rows:
        store.write_bytes("accuracy.png", accuracy_plot(rows))
    return report



