"""The temporary Prefect server of a ``ddpipe run``: it ends with the CLI, even after SIGKILL, and a server that
does not answer in time is one line."""

import os
import signal
import subprocess
import sys
import time

import pytest

from ddpipe.flows.temporary_server import PARENT_ENV, server_processes

from conftest import ROOT, SMOKE, run_cli
from test_bad_input import assert_one_line_error

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not os.path.isdir("/proc"), reason="finds servers through /proc")]


def cli_env(tmp_path, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}  # a temporary server, not the harness's
    return {**env, "PREFECT_HOME": str(tmp_path / "prefect"), **extra}


def wait_for(predicate, timeout: float, every: float = 0.2):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := predicate():
            return value
        time.sleep(every)
    return predicate()


def test_server_ends_when_the_cli_is_killed_with_sigkill(tmp_path):
    cli = subprocess.Popen(
        [sys.executable, "-m", "ddpipe.cli", "run", str(SMOKE), "--engine", "prefect", "--no-progress",
         "--store", str(tmp_path / "runs")], cwd=ROOT, env=cli_env(tmp_path),
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        servers = wait_for(lambda: server_processes(cli.pid), 180)
        assert servers, "the CLI started no server"
        assert cli.poll() is None  # still running: the kill below lands mid-run
        cli.send_signal(signal.SIGKILL)
        cli.wait()
        assert wait_for(lambda: not server_processes(cli.pid), 20), f"server {servers} outlived the CLI"
    finally:
        if cli.poll() is None:
            cli.kill()
        for pid in server_processes(cli.pid):
            os.kill(pid, signal.SIGKILL)


def test_server_that_does_not_answer_in_time_is_one_line_and_is_stopped(tmp_path):
    proc = run_cli("run", str(SMOKE), "--store", str(tmp_path / "runs"), "--no-progress", "--engine", "prefect",
                   env=cli_env(tmp_path, PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="0.5"))
    assert_one_line_error(proc, "did not answer within 0.5 s", "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS")
    assert not list((tmp_path / "runs").rglob("manifests/*.parquet"))  # no stage recorded as complete
    # the CLI has exited: no server on this machine may outlive the process that started it
    assert wait_for(lambda: not any(_parent_gone(pid) for pid in server_processes()), 5)


def _parent_gone(pid: int) -> bool:
    """A ddpipe server whose starting process has ended (it should have ended with it)."""
    with open(f"/proc/{pid}/environ", "rb") as f:
        env = dict(v.split("=", 1) for v in f.read().decode(errors="replace").split("\0") if "=" in v)
    return not os.path.exists(f"/proc/{env[PARENT_ENV]}")


def test_startup_wait_that_is_not_a_number_is_one_line(tmp_path):
    proc = run_cli("run", str(SMOKE), "--store", str(tmp_path / "runs"), "--no-progress", "--engine", "prefect",
                   env=cli_env(tmp_path, PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="soon"))
    assert_one_line_error(proc, "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS='soon'")
