"""Evaluation matrices: cells as runs, resume after a crash, the comparison report."""

import json
from pathlib import Path
from unittest import mock

import pytest

import ddpipe.evaluate
from ddpipe.errors import ConfigError
from ddpipe.matrix import MatrixConfig, cell_configs, load_matrix, matrix_store, run_matrix
from ddpipe.pipeline import run_store
from ddpipe.runner import run_pipeline

from conftest import CONFIGS

FAST = ["evaluation.epochs=5", "evaluation.seeds=[0]", "evaluation.regimes=[hard, soft]", "evaluation.full=true"]


def matrix(tmp_path):
    spec = MatrixConfig(name="t", run=str(CONFIGS / "smoke.yaml"), ipc=(1, 2),
                        methods={"rded": [], "herding": [{"method": {"name": "herding"}}]})
    return spec, Path("/"), [f"store.uri={tmp_path / 'runs'}", *FAST]


def test_cells_are_runs_with_the_method_and_ipc(tmp_path):
    spec, root, overrides = matrix(tmp_path)
    cells = cell_configs(spec, root, overrides)
    assert [(m, i, c.method.name, c.method.ipc, c.name) for m, i, c in cells] == [
        ("rded", 1, "rded", 1, "t-rded-ipc1"), ("rded", 2, "rded", 2, "t-rded-ipc2"),
        ("herding", 1, "herding", 1, "t-herding-ipc1"), ("herding", 2, "herding", 2, "t-herding-ipc2")]
    bad = MatrixConfig(name="t", run=str(CONFIGS / "smoke.yaml"), ipc=(2,), methods={"x": [{"method": {"name": "nope"}}]})
    with pytest.raises(ConfigError, match="matrix cell x ipc 2: .*method.name"):
        cell_configs(bad, root, overrides)
    spec, _ = load_matrix(CONFIGS / "matrix" / "smoke.yaml")
    assert len(cell_configs(spec, CONFIGS / "matrix")) == len(spec.methods) * len(spec.ipc)


@pytest.mark.fmnist
@pytest.mark.slow
def test_a_crashed_matrix_resumes_without_redoing_finished_cells(tmp_path):
    spec, root, overrides = matrix(tmp_path)
    done = []

    def crash_after_two(cfg):
        if len(done) == 2:
            raise RuntimeError("killed")
        done.append(cfg)
        return run_pipeline(cfg)

    with pytest.raises(RuntimeError, match="killed"):
        run_matrix(spec, root, crash_after_two, overrides)
    finished = {c.run_name: sorted(p.stat().st_mtime_ns for p in Path(run_store(c).root).rglob("*.json")
                                   if p.name not in ("report.json", "run.json")) for c in done}
    with mock.patch.object(ddpipe.evaluate, "evaluate", wraps=ddpipe.evaluate.evaluate) as trained:
        report = run_matrix(spec, root, run_pipeline, overrides)
    # only the two herding cells' distilled students train (2 regimes each); references are shared
    assert trained.call_count == 2 * 2
    for c in done:
        assert finished[c.run_name] == sorted(p.stat().st_mtime_ns for p in Path(run_store(c).root).rglob("*.json")
                                              if p.name not in ("report.json", "run.json"))

    store = matrix_store(spec, cell_configs(spec, root, overrides))
    assert store.uri == report["uri"] and store.exists("accuracy.png")
    saved = json.loads(store.read_bytes("report.json"))
    rows = {(r["method"], r["ipc"], r["regime"]): r for r in saved["rows"]}
    assert len(rows) == 2 * 2 * 2
    cell = next(c for c in saved["cells"] if (c["method"], c["ipc"]) == ("herding", 2))
    run_report = json.loads(Path(cell["run_uri"], "report.json").read_text())
    assert rows["herding", 2, "hard"]["distilled"] == run_report["regimes"]["hard"]["distilled"]
    assert rows["herding", 2, "hard"]["random"] == rows["rded", 2, "hard"]["random"]  # one baseline per ipc
    hard = rows["herding", 2, "hard"]
    assert hard["hlr"] == pytest.approx(hard["full"]["mean"] - hard["distilled"]["mean"])
    md = store.read_bytes("report.md").decode()
    assert "## hard" in md and "| herding |" in md and "*full training set*" in md
    assert f"{100 * hard['distilled']['mean']:.2f} ({100 * hard['ior']:+.2f} n/a)" in md  # one seed: no verdict
    assert saved["pending"] == [] and saved["not_run"] == []


def test_part_of_a_matrix_runs_the_same_cells(tmp_path):
    from ddpipe.matrix import select

    spec, root, overrides = matrix(tmp_path)
    part = select(spec, ["herding"], [2])
    whole = {c.run_name for _, _, c in cell_configs(spec, root, overrides)}
    (only,) = cell_configs(part, root, overrides)
    assert only[:2] == ("herding", 2) and only[2].run_name in whole
    with pytest.raises(ConfigError, match="no method 'nope'"):
        select(spec, ["nope"])


def test_the_report_gives_verdicts_and_names_cells_not_run_or_pending():
    from ddpipe.matrix import markdown_report, skipped
    from ddpipe.scores import compare

    def row(method, ipc, distilled, random):
        acc = {"mean": sum(distilled) / len(distilled), "std": 0.01, "values": distilled}
        ref = {"mean": sum(random) / len(random), "std": 0.01, "values": random}
        comparison = compare(distilled, random)
        return {"method": method, "ipc": ipc, "regime": "hard", "distilled": acc, "random": ref, "full": None,
                "ior": comparison["difference"], "hlr": None, "lrs": None, "comparison": comparison}

    rows = [row("herding", 10, [0.80, 0.81, 0.82], [0.70, 0.71, 0.72, 0.70, 0.71, 0.72]),
            row("el2n", 10, [0.30, 0.31, 0.32], [0.70, 0.71, 0.72, 0.70, 0.71, 0.72]),
            row("rded", 10, [0.70, 0.72, 0.71], [0.70, 0.71, 0.72, 0.70, 0.71, 0.72])]
    spec = MatrixConfig(name="t", run="x.yaml", ipc=(10, 50), methods={"herding": [], "el2n": [], "rded": [],
                                                                        "gvbsm": []},
                        not_run={"gvbsm": "four backbones: 9 h on 2 cores", "el2n@50": "no time"})
    assert skipped(spec, "gvbsm", 10) == skipped(spec, "gvbsm", 50) == "four backbones: 9 h on 2 cores"
    assert skipped(spec, "el2n", 50) == "no time" and skipped(spec, "el2n", 10) is None
    not_run = [(m, i, skipped(spec, m, i)) for m in spec.methods for i in spec.ipc if skipped(spec, m, i)]
    md = markdown_report("t", rows, not_run, pending=[("herding", 50)], notes=("Budget: 300 student steps.",))
    assert "Budget: 300 student steps." in md
    assert "- **above random**: herding IPC 10 hard (+10.00 [" in md and "] above)" in md
    assert "- **below random**: el2n IPC 10 hard (-40.00 [" in md
    assert "level with random (the interval covers 0): 1 of 3 cells" in md
    assert "| gvbsm | not run (see below) | not run (see below) |" in md
    assert "| herding | 81.00 ± 1.00 (+10.00 [" in md and "| pending |" in md
    assert "- gvbsm IPC 50: not run: four backbones: 9 h on 2 cores" in md and "- el2n IPC 50: not run: no time" in md
    assert "- herding IPC 50: pending" in md
    assert "| *random subsets* | 71.00 ± 1.00 |  |" in md

    # G-VBSM's students follow its own recipe, so its cells have their own random subsets: one row per reference
    own = row("gvbsm", 10, [0.60, 0.61, 0.62], [0.50, 0.52, 0.54, 0.50, 0.52, 0.54])
    md = markdown_report("t", rows + [own], order=("herding", "el2n", "rded", "gvbsm"))
    assert "| *random subsets (herding, el2n, rded)* | 71.00 ± 1.00 |" in md
    assert "| *random subsets (gvbsm)* | 52.00 ± 1.00 |" in md


def test_the_report_of_finished_cells_runs_nothing_and_finds_folders_an_older_checkout_named(tmp_path):
    """``ddpipe evaluate --report-only``: a cell whose run folder carries another hash (an older checkout's
    schema) counts when its config.yaml is the cell's config; its verdict is recomputed with the random subsets
    as units; a cell without a report is pending, and nothing trains."""
    import yaml

    from ddpipe.matrix import finished_report
    from ddpipe.store import Store

    spec, root, overrides = matrix(tmp_path)
    cells = {(m, i): c for m, i, c in cell_configs(spec, root, overrides)}
    cfg = cells["rded", 1]
    old = Store(cfg.store.uri).child(f"{cfg.name}-0123456789")
    data = yaml.safe_load(cfg.to_yaml())
    old.write_bytes("config.yaml", yaml.safe_dump(data).encode())
    stale = {"verdict": "above", "ci95": [0.01, 0.09], "difference": 0.05, "method": "welch-t"}  # 9 students as units
    regime = {"distilled": {"mean": 0.81, "std": 0.01, "values": [0.80, 0.82, 0.81]},
              "random": {"mean": 0.76, "std": 0.04, "values": [0.70, 0.71, 0.72, 0.75, 0.76, 0.77, 0.80, 0.81, 0.82],
                         "draws": 3},
              "improvement_over_random": 0.05, "steps": 10, "comparison": stale}
    old.write_bytes("report.json", json.dumps({
        "run": old.uri, "run_uri": old.uri, "regimes": {"hard": regime},
        "scores": {"hard_label_recovery": None, "label_robust_score": {"hard": None}}}).encode())
    data["evaluation"]["steps"] = 7  # other settings under the same name: not this cell
    other = Store(cfg.store.uri).child(f"{cells['rded', 2].name}-9876543210")
    other.write_bytes("config.yaml", yaml.safe_dump({**data, "method": {**data["method"], "ipc": 2}}).encode())
    other.write_bytes("report.json", old.read_bytes("report.json"))

    with mock.patch.object(ddpipe.evaluate, "evaluate") as trained:
        report = finished_report(spec, root, overrides)
    assert trained.call_count == 0
    (row,) = report["rows"]
    assert (row["method"], row["ipc"]) == ("rded", 1)
    assert row["comparison"]["verdict"] == "level" and row["comparison"]["random_units"] == "subsets"
    assert row["random"]["draw_means"] == pytest.approx([0.71, 0.76, 0.81])
    md = Store(report["uri"]).read_bytes("report.md").decode()
    assert "| *random subsets* | 76.00 ± 4.00 (means of 3 subsets: 71.00 to 81.00) |" in md
    assert {(p["method"], p["ipc"]) for p in report["pending"]} == {("rded", 2), ("herding", 1), ("herding", 2)}


def test_report_only_on_the_command_line_lists_every_cell_pending_in_an_empty_store(tmp_path):
    from conftest import run_cli

    proc = run_cli("evaluate", str(CONFIGS / "matrix" / "smoke.yaml"), "--store", str(tmp_path), "--report-only",
                   "--engine", "plain")
    spec, _ = load_matrix(CONFIGS / "matrix" / "smoke.yaml")
    assert proc.returncode == 0, proc.stderr
    assert f"(0 finished cells, {len(spec.methods) * len(spec.ipc)} pending)" in proc.stdout
    assert not any(p.name != "matrices" for p in tmp_path.iterdir())  # no run folder was started
