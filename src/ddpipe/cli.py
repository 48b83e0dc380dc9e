"""The ``ddpipe`` command line.

    ddpipe run CONFIG [--store URI] [--set key=value ...] [--engine prefect|plain]
    ddpipe status RUN
    ddpipe validate CONFIG [--set key=value ...]

``run`` runs the ``distill`` flow (Prefect; a temporary local server unless PREFECT_API_URL is set), or the
same stages as plain function calls with ``--engine plain``, and prints the run folder and a results
table. Re-running the same command resumes. A bad input ends with one line ``ddpipe: error: ...`` on
stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from ddpipe.errors import DDPipeError

PREFECT_DEFAULTS = {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "90",
    "PREFECT_LOGGING_LEVEL": "WARNING",
}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ddpipe", description="Dataset distillation as resumable pipelines.")
    sub = p.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run (or resume) the distill pipeline for a config")
    run.add_argument("config", help="YAML config file (see configs/)")
    run.add_argument("--store", help="store URI for run folders (overrides store.uri), e.g. ./runs or s3://bucket/runs")
    run.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                     help="override a config field with a dotted key, e.g. --set method.ipc=50 (repeatable)")
    run.add_argument("--engine", choices=("prefect", "plain"), default="prefect",
                     help="prefect: the distill flow (default); plain: the same stages as plain function calls")
    run.add_argument("--no-progress", action="store_true", help="no terminal progress bars")
    status = sub.add_parser("status", help="show each stage's done/total shards of a run folder")
    status.add_argument("run", help="run folder URI (printed by 'ddpipe run')")
    val = sub.add_parser("validate", help="validate a config and print its run folder name")
    val.add_argument("config")
    val.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
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
            for k, v in PREFECT_DEFAULTS.items():
                os.environ.setdefault(k, v)
            from ddpipe.flows.distill import distill

            _quiet_known_errors()
            report = distill(config=cfg.model_dump(mode="json"))
    finally:
        if sink:
            progress.remove_sink(sink)
    print(results_table(report))
    print(f"report: {report['run_uri']}/report.json")
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

        print(results_table(json.loads(store.read_bytes("report.json"))))
    return 0


def cmd_validate(args) -> int:
    cfg = _load(args)
    print(f"ok: {args.config} -> run folder {cfg.run_name}")
    return 0


def _error_names() -> tuple[str, ...]:
    names, todo = [], [DDPipeError]
    while todo:
        cls = todo.pop()
        names.append(cls.__name__)
        todo.extend(cls.__subclasses__())
    return tuple(names)


class _DropKnownErrors(logging.Filter):
    """Keep a DDPipeError to the CLI's one line: drop Prefect's console echo of it (the API logs keep it)."""

    def __init__(self):
        super().__init__()
        self.markers = tuple(f"exception {n}:" for n in _error_names()) + tuple(f"exception: {n}" for n in _error_names())

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, DDPipeError):
            return False
        message = record.getMessage()
        return not any(m in message for m in self.markers)


def _quiet_known_errors() -> None:
    """Attach the filter to Prefect's console handlers (call after Prefect has configured logging)."""
    from prefect.logging.handlers import PrefectConsoleHandler

    filt = _DropKnownErrors()
    loggers = [logging.getLogger()] + [
        lg for lg in logging.Logger.manager.loggerDict.values() if isinstance(lg, logging.Logger)
    ]
    for lg in loggers:
        for handler in lg.handlers:
            if isinstance(handler, PrefectConsoleHandler):
                handler.addFilter(filt)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return {"run": cmd_run, "status": cmd_status, "validate": cmd_validate}[args.command](args)
    except DDPipeError as e:
        print(f"ddpipe: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("ddpipe: interrupted; run the same command again to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
