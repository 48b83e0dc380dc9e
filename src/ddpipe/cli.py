"""The ``ddpipe`` command line.

    ddpipe run CONFIG [--store URI] [--set key=value ...] [--engine prefect|plain]
    ddpipe evaluate MATRIX [--store URI] [--set key=value ...] [--engine prefect|plain] [--methods ...] [--ipc ...]
                    [--report-only]
    ddpipe status RUN
    ddpipe validate CONFIG [--set key=value ...]
    ddpipe server [--host H] [--port P] [--api URL] [--with-k8s] [--no-worker]

``run`` runs the ``distill`` flow (Prefect, through :mod:`ddpipe.flows.command`; a temporary local server
unless PREFECT_API_URL is set), or the same stages as plain function calls with ``--engine plain``, and
prints the run folder and a results table. ``evaluate`` runs every (method, ipc) cell of an evaluation
matrix (``configs/matrix/``) the same way and writes the comparison report (Markdown, JSON, a plot).
``server`` starts a local Prefect server with the UI, registers the deployments and starts a worker
(:mod:`ddpipe.deployments.server`).
Re-running the same command resumes. A bad input ends with one line ``ddpipe: error: ...`` on
stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import sys

from ddpipe.errors import DDPipeError


def _run_options(cmd: argparse.ArgumentParser, flow: str) -> None:
    """The options ``run`` and ``evaluate`` share."""
    cmd.add_argument("--store", help="store URI for run folders (overrides store.uri), e.g. ./runs or s3://bucket/runs")
    cmd.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                     help="override a config field with a dotted key, e.g. --set method.ipc=50 (repeatable)")
    cmd.add_argument("--engine", choices=("prefect", "plain"), default="prefect",
                     help=f"prefect: the {flow} flow (default); plain: the same stages as plain function calls")
    cmd.add_argument("--no-progress", action="store_true", help="no terminal progress bars")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ddpipe", description="Dataset distillation as resumable pipelines.")
    sub = p.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run (or resume) the distill pipeline for a config")
    run.add_argument("config", help="YAML config file (see configs/)")
    _run_options(run, "distill")
    ev = sub.add_parser("evaluate", help="run (or resume) an evaluation matrix and write its comparison report")
    ev.add_argument("matrix", help="matrix YAML file (see configs/matrix/); --store and --set apply to every cell")
    _run_options(ev, "evaluate")
    ev.add_argument("--methods", nargs="+", metavar="LABEL", help="run only these methods of the matrix")
    ev.add_argument("--ipc", nargs="+", type=int, metavar="N", help="run only these IPCs of the matrix")
    ev.add_argument("--report-only", action="store_true",
                    help="run nothing: rewrite the report from the cells finished so far, verdicts recomputed")
    status = sub.add_parser("status", help="show each stage's done/total shards of a run folder")
    status.add_argument("run", help="run folder URI (printed by 'ddpipe run')")
    val = sub.add_parser("validate", help="validate a config and print its run folder name")
    val.add_argument("config")
    val.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    srv = sub.add_parser("server", help="start a local Prefect server (UI), register the deployments, start a worker")
    srv.add_argument("--host", default="127.0.0.1")
    srv.add_argument("--port", type=int, default=4200)
    srv.add_argument("--api", help="use this running Prefect API (http://host:port/api) instead of starting a server")
    srv.add_argument("--with-k8s", action="store_true",
                     help="also create the Kubernetes work pool and register its deployments (no worker here)")
    srv.add_argument("--no-worker", action="store_true", help="register only; start no worker")
    return p


def _load(args):
    from ddpipe.config import load_config

    overrides = list(args.overrides)
    if getattr(args, "store", None):
        overrides.append(f"store.uri={args.store}")
    return load_config(args.config, overrides)


def cmd_run(args) -> int:
    from ddpipe import progress
    from ddpipe.pipeline import run_store
    from ddpipe.report import results_table
    from ddpipe.runner import run_pipeline
    from ddpipe.stages import preflight

    cfg = _load(args)
    preflight(cfg)
    print(f"run folder: {run_store(cfg).uri}", flush=True)
    sink = None if args.no_progress else progress.TerminalSink()
    if sink:
        progress.add_sink(sink)
    try:
        if args.engine == "plain":
            report = run_pipeline(cfg)
        else:
            from ddpipe.flows.command import run_flow

            report = run_flow(cfg)
    finally:
        if sink:
            progress.remove_sink(sink)
    print(results_table(report))
    print(f"report: {report['run_uri']}/report.json")
    return 0


def cmd_evaluate(args) -> int:
    from ddpipe import progress
    from ddpipe.matrix import cell_configs, load_matrix, run_matrix, select
    from ddpipe.runner import run_pipeline
    from ddpipe.stages import preflight

    overrides = list(args.overrides) + ([f"store.uri={args.store}"] if args.store else [])
    matrix, root = load_matrix(args.matrix)
    matrix = select(matrix, args.methods, args.ipc)
    if args.report_only:
        from ddpipe.matrix import finished_report

        report = finished_report(matrix, root, overrides)
        return _print_matrix_report(report, f" ({len(report['cells'])} finished cells, {len(report['pending'])} pending)")
    cells = cell_configs(matrix, root, overrides)  # every cell validates before anything runs
    for cfg in {c.run_name: c for _, _, c in cells}.values():
        preflight(cfg)
    print(f"{len(cells)} cells: " + ", ".join(f"{label}@{ipc}" for label, ipc, _ in cells), flush=True)
    sink = None if args.no_progress else progress.TerminalSink()
    if sink:
        progress.add_sink(sink)
    try:
        if args.engine == "plain":
            report = run_matrix(matrix, root, run_pipeline, overrides)
        else:
            from ddpipe.flows.command import run_evaluate_flow

            report = run_evaluate_flow(args.matrix, overrides, args.methods, args.ipc)
    finally:
        if sink:
            progress.remove_sink(sink)
    return _print_matrix_report(report)


def _print_matrix_report(report: dict, suffix: str = "") -> int:
    from ddpipe.store import Store

    print(Store(report["uri"]).read_bytes("report.md").decode())
    print(f"report: {report['uri']}/report.md{suffix}")
    return 0


def cmd_status(args) -> int:
    from ddpipe.pipeline import status
    from ddpipe.store import Store

    store = Store(args.run)
    rows = status(store)
    print(f"{'stage':<14} {'shards':>9}  state")
    for r in rows:
        state = "complete" if r["complete"] else ("running or stopped" if r["done"] else "pending")
        print(f"{r['stage']:<14} {r['done']:>4}/{r['total']:<4}  {state}")
    if store.exists("report.json"):
        from ddpipe.report import results_table

        print(results_table(store.read_json("report.json")))
    return 0


def cmd_validate(args) -> int:
    cfg = _load(args)
    print(f"ok: {args.config} -> run folder {cfg.run_name}")
    return 0


def cmd_server(args) -> int:
    from ddpipe.deployments.server import serve

    return serve(args.host, args.port, args.api, args.with_k8s, worker=not args.no_worker)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        commands = {"run": cmd_run, "evaluate": cmd_evaluate, "status": cmd_status, "validate": cmd_validate,
                    "server": cmd_server}
        return commands[args.command](args)
    except DDPipeError as e:
        print(f"ddpipe: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("ddpipe: interrupted; run the same command again to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
