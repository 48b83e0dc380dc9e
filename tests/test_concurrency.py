"""Concurrent runs on one store (issue 24): the run-folder lock (local flock, S3 lease with conditional writes),
shared outputs computed once while the other run waits, and end-to-end runs started at the same time."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from ddpipe import locks
from ddpipe.manifests import files_of
from ddpipe.pipeline import RUN_LOCK, run_store, shared_outputs
from ddpipe.store import Store

from conftest import BUCKET, ROOT, SMOKE, smoke_config

HOLD = textwrap.dedent("""
    import sys, time
    from ddpipe import locks
    from ddpipe.store import Store
    with locks.held(Store(sys.argv[1]), "run.lock", "run folder", wait=False):
        print("held", flush=True)
        time.sleep(600)
""")


def _holder(folder: Path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(folder)], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_local_lock_refuses_a_second_holder_and_ends_with_its_process(tmp_path):
    holder = _holder(tmp_path / "run")
    try:
        with pytest.raises(locks.LockedError, match=f"run folder is in use by another ddpipe run \\(pid {holder.pid} "):
            with locks.held(Store(str(tmp_path / "run")), "run.lock", "run folder", wait=False):
                pass
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    # SIGKILL: the kernel dropped the flock, so the next run takes the folder at once.
    with locks.held(Store(str(tmp_path / "run")), "run.lock", "run folder", wait=False):
        assert (tmp_path / "run" / "run.lock").exists()
    assert not (tmp_path / "run" / "run.lock").exists()  # released: nothing left behind


def test_a_run_refused_while_its_folder_is_held_writes_nothing(tmp_path):
    cfg = smoke_config(tmp_path / "runs")
    folder = Path(run_store(cfg).root)
    holder = _holder(folder)
    try:
        from ddpipe.cli import main

        import io
        from contextlib import redirect_stderr

        err = io.StringIO()
        with redirect_stderr(err):
            code = main(["run", str(SMOKE), "--engine", "plain", "--no-progress", "--store", str(tmp_path / "runs")])
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    lines = err.getvalue().strip().splitlines()
    assert code == 2
    assert len(lines) == 1 and lines[0].startswith(f"ddpipe: error: run folder {folder} is in use by another ddpipe run")
    assert sorted(p.name for p in folder.iterdir()) == ["run.lock"]  # no config.yaml, run.json or manifest


def test_shared_output_is_computed_once_while_the_other_run_waits(tmp_path):
    cfg = smoke_config(tmp_path / "runs")
    calls, started = [], threading.Event()

    def slow():
        calls.append("first")
        started.set()
        time.sleep(1.0)
        return {"a.bin": b"computed once"}

    def second():
        calls.append("second")
        return {"a.bin": b"computed twice"}

    first = threading.Thread(target=lambda: shared_outputs(cfg, "teachers", "k" * 64, slow))
    first.start()
    started.wait()
    out = shared_outputs(cfg, "teachers", "k" * 64, second)  # blocks on the lock, then reads the first's files
    first.join()
    assert out == {"a.bin": b"computed once"} and calls == ["first"]


# ---------------------------------------------------------------- S3: a lease with conditional writes
@pytest.fixture
def s3_store(s3_endpoint, request):
    endpoint, _ = s3_endpoint
    opts = {"key": "testing", "secret": "testing", "client_kwargs": {"endpoint_url": endpoint}}
    return Store(f"s3://{BUCKET}/locks/{request.node.name}", opts)


def _lease(store: Store) -> dict | None:
    path = store.path("run.lock")
    store.fs.invalidate_cache(path)
    return json.loads(store.fs.cat_file(path)) if store.fs.exists(path) else None


def test_s3_lease_refuses_renews_and_is_deleted_on_release(s3_store):
    with locks.held(s3_store, "run.lock", "run folder", wait=False, ttl=1.0):
        mine = _lease(s3_store)
        assert mine["pid"] == os.getpid()
        with pytest.raises(locks.LockedError, match=f"pid {os.getpid()} on host "):
            with locks.held(Store(s3_store.uri, s3_store.storage_options), "run.lock", "run folder", wait=False):
                pass
        time.sleep(0.6)
        assert _lease(s3_store)["token"] == mine["token"] and "renewed" in _lease(s3_store)
        locks.check(s3_store, "run.lock")  # still ours
    assert _lease(s3_store) is None


def test_s3_lease_of_a_dead_process_or_past_its_ttl_is_taken_over(s3_store):
    dead = subprocess.Popen(["true"])
    dead.wait()
    fs, path = s3_store.fs, s3_store.path("run.lock")
    fs.pipe_file(path, json.dumps({"token": "t", "pid": dead.pid, "host": socket.gethostname()}).encode())
    with locks.held(s3_store, "run.lock", "run folder", wait=False, ttl=100):  # dead on this host: at once
        assert _lease(s3_store)["pid"] == os.getpid()
    fs.pipe_file(path, json.dumps({"token": "t", "pid": 1, "host": "another-host"}).encode())
    with pytest.raises(locks.LockedError, match="pid 1 on host another-host"):
        with locks.held(s3_store, "run.lock", "run folder", wait=False, ttl=100):
            pass
    time.sleep(1.2)
    with locks.held(s3_store, "run.lock", "run folder", wait=False, ttl=1.0):  # not renewed for 1 s: stale
        assert _lease(s3_store)["pid"] == os.getpid()


def test_s3_lease_taken_over_stops_the_writes_of_its_old_holder(s3_store):
    with locks.held(s3_store, "run.lock", "run folder", wait=False, ttl=0.4):
        s3_store.fs.pipe_file(s3_store.path("run.lock"), b'{"token": "someone else"}')
        time.sleep(0.5)  # the next renewal finds another etag
        with pytest.raises(locks.LockedError, match="lost the lock .*run.lock"):
            locks.check(s3_store, "run.lock")
    assert _lease(s3_store) == {"token": "someone else"}  # not deleted by the run that lost it


# ---------------------------------------------------------------- end to end: two `ddpipe run` at once
FAST = ["--set", "teacher.epochs=1", "--set", "evaluation.epochs=10", "--set", "evaluation.seeds=[0]",
        "--set", "evaluation.regimes=[hard]"]


def _start(store: str, *extra: str, env: dict | None = None) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "ddpipe.cli", "run", str(SMOKE), "--engine", "plain", "--no-progress",
           "--store", store, *FAST, *extra]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                            env={**os.environ, **(env or {})})


def _consistent(store: Store) -> int:
    """Every stage manifest of a run folder lists files that hash as recorded; returns how many files."""
    n = 0
    for name in store.list("manifests"):
        if name.endswith(".parquet") and name != "plan.parquet":
            for f in files_of(store.read_table(f"manifests/{name}")):
                assert store.verify(f), f"{f.path} disagrees with the {name} manifest"
                n += 1
    return n


def _same_config_twice(store_uri: str, store: Store, env: dict | None = None) -> None:
    """Start the same run twice at once (a deployment clicked twice): one runs to the end, the other is refused
    with one line, and the run folder's manifests agree with its files."""
    procs = [_start(store_uri, env=env), _start(store_uri, env=env)]
    results = [(p.communicate(timeout=600), p.returncode) for p in procs]
    results = [(code, out, err) for (out, err), code in results]
    codes = sorted(code for code, _, _ in results)
    assert codes == [0, 2], [err for _, _, err in results]
    refused = next(err for code, _, err in results if code == 2).strip().splitlines()
    assert len(refused) == 1 and refused[0].startswith("ddpipe: error: run folder ") and \
        "is in use by another ddpipe run (pid " in refused[0], refused
    assert _consistent(store) > 0 and store.exists("report.json")
    assert not store.exists(RUN_LOCK)


@pytest.mark.slow
@pytest.mark.fmnist
def test_same_config_twice_at_once_local(tmp_path):
    cfg = smoke_config(tmp_path / "runs", "teacher.epochs=1", "evaluation.epochs=10", "evaluation.seeds=[0]",
                       "evaluation.regimes=[hard]")
    _same_config_twice(str(tmp_path / "runs"), run_store(cfg))


@pytest.mark.slow
@pytest.mark.fmnist
def test_same_config_twice_at_once_s3(s3_endpoint):
    endpoint, creds = s3_endpoint
    uri = f"s3://{BUCKET}/concurrent"
    cfg = smoke_config(uri, "teacher.epochs=1", "evaluation.epochs=10", "evaluation.seeds=[0]",
                       "evaluation.regimes=[hard]")
    store = Store(f"{uri}/{cfg.run_name}", {"key": "testing", "secret": "testing",
                                            "client_kwargs": {"endpoint_url": endpoint}})
    env = {**creds, "AWS_ENDPOINT_URL": endpoint}
    _same_config_twice(uri, store, env)


@pytest.mark.slow
@pytest.mark.fmnist
def test_two_configs_at_once_on_one_store_share_the_teacher(tmp_path):
    store = str(tmp_path / "runs")
    a, b = _start(store), _start(store, "--set", "method.ipc=1")
    for proc in (a, b):
        out, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err
    teachers = list((tmp_path / "runs" / "shared" / "teachers").iterdir())
    assert len(teachers) == 1  # one teacher key, trained by one run while the other waited
    folders = [p for p in (tmp_path / "runs").iterdir() if p.name.startswith("smoke-")]
    assert len(folders) == 2
    for folder in folders:
        assert _consistent(Store(str(folder))) > 0
        assert (folder / "teacher" / "teacher.pt").read_bytes() == (folders[0] / "teacher" / "teacher.pt").read_bytes()
