"""Shared fixtures. Tests that need data run on real Fashion-MNIST (small slices of it) and carry the ``fmnist``
marker: where the IDX files are missing they are skipped with the install hint, and the rest still run."""

from __future__ import annotations

import atexit
import os
import shutil
import socket
import sys
import tempfile
from pathlib import Path

# Prefect reads its settings at import: isolate its home and keep it offline before anything imports it.
_PREFECT_HOME = tempfile.mkdtemp(prefix="ddpipe-test-prefect-")
atexit.register(shutil.rmtree, _PREFECT_HOME, ignore_errors=True)  # its SQLite database and logs
os.environ.setdefault("PREFECT_HOME", _PREFECT_HOME)
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")

import pytest  # noqa: E402
import torch  # noqa: E402

from ddpipe.config import RunConfig, load_config  # noqa: E402
from ddpipe.data import find_fashion_mnist  # noqa: E402
from ddpipe.errors import DatasetNotFoundError  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
SMOKE = CONFIGS / "smoke.yaml"

try:
    find_fashion_mnist(None)
    NO_FASHION_MNIST = None
except DatasetNotFoundError as e:  # the README's set-up installs it (scripts/install-data.sh)
    NO_FASHION_MNIST = f"needs Fashion-MNIST: {e}"


def pytest_collection_modifyitems(config, items):
    if NO_FASHION_MNIST:
        skip = pytest.mark.skip(reason=NO_FASHION_MNIST)
        for item in items:
            if "fmnist" in item.keywords:
                item.add_marker(skip)

torch.set_num_threads(2)


def smoke_config(store: str | Path, *overrides: str) -> RunConfig:
    """The smoke preset with its store redirected (plus dotted-key overrides)."""
    return load_config(SMOKE, [f"store.uri={store}", *overrides])


@pytest.fixture
def cfg(tmp_path) -> RunConfig:
    return smoke_config(tmp_path / "runs")


@pytest.fixture(scope="session")
def session_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("session")


@pytest.fixture(scope="session")
def trained_teacher(session_dir):
    """The smoke preset's teacher, trained once for the unit tests: (cfg, source, Teacher)."""
    from ddpipe.dataindex import open_source
    from ddpipe.teacher import checkpoint_bytes, load_teacher, measure, train_teacher

    c = smoke_config(session_dir / "runs")
    source = open_source(c)
    cpu, fmt = torch.device("cpu"), c.input_format
    model = train_teacher(c.teacher, c.teacher.model, fmt, source, c.seed, cpu, c.runtime)
    acc = measure(model, fmt, source, cpu, c.runtime, c.evaluation.test_batch_size)
    data = checkpoint_bytes(model, fmt, source, c.teacher.model, acc)
    (session_dir / "teacher.pt").write_bytes(data)
    return c, source, load_teacher(data, "teacher.pt", source.classes, fmt, cpu, c.runtime)


def run_cli(*args: str, env: dict | None = None, timeout: int = 600):
    """Run the ddpipe CLI in a subprocess; returns CompletedProcess with text output."""
    import subprocess

    full_env = {**os.environ, **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "ddpipe.cli", *args], capture_output=True, text=True, env=full_env, timeout=timeout,
        cwd=ROOT,
    )


BUCKET = "ddpipe-test"


@pytest.fixture(scope="session")
def s3_endpoint():
    """moto's S3 server on loopback with bucket ``ddpipe-test``: (endpoint URL, the AWS_* variables to reach it)."""
    from moto.server import ThreadedMotoServer

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    creds = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
    import s3fs

    s3fs.S3FileSystem(key="testing", secret="testing", client_kwargs={"endpoint_url": endpoint}).mkdir(BUCKET)
    yield endpoint, creds
    server.stop()
