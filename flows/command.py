"""How ``ddpipe run`` (the default Prefect engine) runs the ``distill`` flow from the command line.

The command line lives in :mod:`ddpipe.cli`, which has no Prefect import; this module holds what only the
Prefect engine needs: quiet defaults, the temporary local server (:mod:`ddpipe.flows.temporary_server`: it ends with the
process that started it, even after SIGKILL), and a log filter that keeps a
:class:`~ddpipe.errors.DDPipeError` to the CLI's one line (Prefect would echo it with a traceback).
"""

from __future__ import annotations

import logging
import math
import os

from ddpipe.config import RunConfig
from ddpipe.errors import DDPipeError
from ddpipe.flows.temporary_server import TIMEOUT_ENV, prefect_api, startup_timeout

PREFECT_DEFAULTS = {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_LOGGING_LEVEL": "WARNING",
}


def _prefect_environment() -> float:
    """ddpipe's defaults for Prefect's settings, before Prefect reads them; the server's start-up wait (checked
    here: Prefect would refuse a wait that is not whole seconds with a traceback)."""
    for k, v in PREFECT_DEFAULTS.items():
        os.environ.setdefault(k, v)
    timeout = startup_timeout()
    if TIMEOUT_ENV in os.environ:
        os.environ[TIMEOUT_ENV] = str(math.ceil(timeout))
    return timeout


def run_flow(cfg: RunConfig) -> dict:
    """Run the distill flow for ``cfg`` (a temporary local server unless PREFECT_API_URL is set); its report."""
    timeout = _prefect_environment()
    from ddpipe.flows.distill import distill

    _quiet_known_errors()
    with prefect_api(timeout):
        return distill(config=cfg)


def run_evaluate_flow(matrix: str, overrides: list[str], methods: list[str] | None = None,
                      ipcs: list[int] | None = None) -> dict:
    """Run the evaluate flow for a matrix file (same server rules as :func:`run_flow`); its report."""
    timeout = _prefect_environment()
    from ddpipe.flows.evaluate import evaluate

    _quiet_known_errors()
    with prefect_api(timeout):
        return evaluate(matrix=matrix, overrides=overrides, methods=methods, ipc=ipcs)


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
