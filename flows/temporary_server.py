"""The temporary Prefect server of a run on embedded defaults, tied to the process that started it.

Without ``PREFECT_API_URL``, Prefect starts a temporary server (uvicorn serving its API on SQLite) as a child
process and stops it at exit. A CLI killed with SIGKILL never reaches that exit: the server is reparented to PID 1
and keeps running (about 270 MB), one more per crash. ddpipe starts the same server itself (Prefect's app factory,
the UI off, the same environment) with a watchdog thread inside the server process: when the process that started
it is gone, whatever killed it, the server shuts itself down within a second (SIGTERM to itself, then a hard exit
if uvicorn has not stopped 10 s later).

The wait for the server to answer is ``PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS`` (Prefect's setting;
ddpipe's default 300 s: a loaded machine takes more than Prefect's 20 s). Past it, or when the server exits during
start-up, :class:`~ddpipe.errors.ServerError` says so in one line.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

from ddpipe.errors import ServerError

PARENT_ENV = "DDPIPE_SERVER_PARENT"
TIMEOUT_ENV = "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"
DEFAULT_TIMEOUT = 300.0


def create_app():
    """uvicorn's app factory in the server process: Prefect's API app, after starting the parent watchdog."""
    threading.Thread(target=_watch, args=(int(os.environ[PARENT_ENV]),), name="ddpipe-parent-watch",
                     daemon=True).start()
    from prefect.server.api.server import create_app as prefect_app

    return prefect_app()


def _watch(parent: int) -> None:
    """End this process once its parent is no longer ``parent`` (it died and this one was reparented)."""
    while os.getppid() == parent:
        time.sleep(0.5)
    os.kill(os.getpid(), signal.SIGTERM)  # uvicorn's graceful shutdown
    time.sleep(10)
    os._exit(1)


def startup_timeout() -> float:
    raw = os.environ.get(TIMEOUT_ENV)
    if raw is None:
        return DEFAULT_TIMEOUT
    try:
        value = float(raw)
    except ValueError:
        raise ServerError(f"{TIMEOUT_ENV}={raw!r} is not a number of seconds") from None
    if value <= 0:
        raise ServerError(f"{TIMEOUT_ENV}={raw!r} must be above 0")
    return value


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
            return r.status == 200
    except (urllib.error.URLError, OSError):
        return False


def server_processes(parent: int | None = None) -> list[int]:
    """PIDs of the running servers ddpipe started (of ``parent`` only, when given), from ``/proc`` (Linux; empty
    elsewhere)."""
    want = f"{PARENT_ENV}={parent}" if parent is not None else f"{PARENT_ENV}="
    found = []
    for entry in os.scandir("/proc") if os.path.isdir("/proc") else ():
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/environ", "rb") as f:
                env = f.read().decode(errors="replace").split("\0")
            with open(f"/proc/{entry.name}/stat", "rb") as f:
                state = f.read().rsplit(b")", 1)[1].split()[0]
        except OSError:  # gone, or not ours to read
            continue
        if state != b"Z" and any(v == want or (parent is None and v.startswith(want)) for v in env):
            found.append(int(entry.name))
    return found


class TemporaryServer:
    """A Prefect API server for the life of this process (or of the ``with`` block); ``api_url`` once started."""

    def __init__(self, timeout: float | None = None):
        self.timeout = startup_timeout() if timeout is None else timeout
        self.process: subprocess.Popen | None = None
        self.api_url = ""

    def _launch(self) -> None:
        port = _free_port()
        self.api_url = f"http://127.0.0.1:{port}/api"
        env = {**os.environ, PARENT_ENV: str(os.getpid()), "PREFECT_UI_ENABLED": "0",
               "PREFECT__SERVER_EPHEMERAL": "1", "PREFECT__SERVER_FINAL": "1"}
        env.pop("PREFECT_API_URL", None)
        self.process = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "--factory", "ddpipe.flows.temporary_server:create_app",
             "--host", "127.0.0.1", "--port", str(port), "--log-level", "error", "--lifespan", "on"],
            env=env, stdin=subprocess.DEVNULL)

    def start(self) -> str:
        self._launch()
        deadline = time.monotonic() + self.timeout
        while not _answers(self.api_url):
            code = self.process.poll()
            if code == 3:  # uvicorn could not bind: the port was taken in between
                self._launch()
            elif code is not None:
                self.stop()
                raise ServerError(f"the temporary Prefect server exited with code {code} while starting "
                                  "(set PREFECT_API_URL to use a running server, or run with --engine plain)")
            if time.monotonic() > deadline:
                self.stop()
                raise ServerError(
                    f"the temporary Prefect server did not answer within {self.timeout:g} s (a loaded machine? set "
                    f"{TIMEOUT_ENV} to wait longer, or PREFECT_API_URL to use a running server)")
            time.sleep(0.2)
        return self.api_url

    def stop(self) -> None:
        if self.process is None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.process = None

    def __enter__(self) -> TemporaryServer:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


@contextlib.contextmanager
def prefect_api(timeout: float | None = None):
    """Where the flow's Prefect API is: ``PREFECT_API_URL`` when set (a real server, or a test harness's), else a
    :class:`TemporaryServer` (waiting ``timeout`` s for it) for the duration of the block."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    if PREFECT_API_URL.value():
        yield PREFECT_API_URL.value()
        return
    with TemporaryServer(timeout) as server:
        before = os.environ.get("PREFECT_API_URL")
        os.environ["PREFECT_API_URL"] = server.api_url  # for worker processes of a distributed task runner
        try:
            with temporary_settings(updates={PREFECT_API_URL: server.api_url}):
                try:
                    yield server.api_url
                finally:
                    _drain_prefect_workers()
        finally:
            if before is None:
                os.environ.pop("PREFECT_API_URL", None)
            else:
                os.environ["PREFECT_API_URL"] = before


def _drain_prefect_workers() -> None:
    """Send the logs and events Prefect still queues to the server before it stops (as prefect_test_harness does),
    so that a failed run does not end with "Error logging to API" after its one-line error."""
    import inspect

    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker
    from prefect.utilities.asyncutils import run_coro_as_sync

    async def drain():
        try:
            result = APILogWorker.instance().drain()
            if inspect.isawaitable(result):
                await result
        except RuntimeError:  # never started
            pass
        result = EventsWorker.drain_all()
        if inspect.isawaitable(result):
            await result

    run_coro_as_sync(drain())
