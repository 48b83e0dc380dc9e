"""``ddpipe server``: a local Prefect server with ddpipe's deployments and a worker, in one command.

1. starts ``prefect server start`` (UI and API on SQLite under ``$PREFECT_HOME``), unless ``--api`` names
   a running server;
2. creates the work pools: ``ddpipe-local`` (process) and ``ddpipe-k8s`` (Kubernetes, with
   ``deployments/k8s-gpu-job-template.json``; no worker here, so its runs wait for a cluster's worker);
3. registers every deployment of :mod:`ddpipe.deployments.catalog` (the Kubernetes ones only with
   ``--with-k8s``: the server then checks their job variables against the template);
4. starts ``prefect worker start --pool ddpipe-local``, which runs each triggered run in a subprocess.

Then open the UI, or trigger a run from a shell: ``prefect deployment run distill/smoke``.
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import subprocess
import sys
import time
import urllib.request

from ddpipe.deployments.catalog import CATALOG, ENTRYPOINTS, K8S_POOL, LOCAL_POOL, ROOT, k8s_template

QUIET = {"PREFECT_SERVER_ANALYTICS_ENABLED": "false"}


def _prefect() -> list[str]:
    exe = shutil.which("prefect", path=os.path.dirname(sys.executable)) or shutil.which("prefect")
    return [exe] if exe else [sys.executable, "-m", "prefect"]


def wait_healthy(api: str, timeout: float = 120.0, process: subprocess.Popen | None = None) -> None:
    """Wait until ``<api>/health`` answers (the server process must not have died meanwhile)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"prefect server exited with code {process.returncode}")
        try:
            with urllib.request.urlopen(f"{api}/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise RuntimeError(f"prefect server at {api} not healthy after {timeout:.0f} s")


def start_server(host: str, port: int, env: dict) -> subprocess.Popen:
    cmd = [*_prefect(), "server", "start", "--host", host, "--port", str(port)]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def start_worker(pool: str, env: dict, log=None) -> subprocess.Popen:
    cmd = [*_prefect(), "worker", "start", "--pool", pool, "--type", "process"]
    return subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=log or subprocess.DEVNULL, stderr=subprocess.STDOUT)


def ensure_pools(with_k8s: bool) -> None:
    """Create the work pools that are missing (the API must be set in Prefect's settings)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectAlreadyExists

    pools = [WorkPoolCreate(name=LOCAL_POOL, type="process")]
    if with_k8s:
        pools.append(WorkPoolCreate(name=K8S_POOL, type="kubernetes", base_job_template=k8s_template()))
    with get_client(sync_client=True) as client:
        for pool in pools:
            try:
                client.create_work_pool(pool)
            except ObjectAlreadyExists:
                pass


def register(with_k8s: bool = False) -> list[str]:
    """Register the catalog's deployments on the server in Prefect's settings; their full names."""
    from prefect.flows import Flow
    from prefect.schedules import Cron

    names = []
    for e in CATALOG:
        if e.pool == K8S_POOL and not with_k8s:
            continue
        flow = Flow.from_source(source=str(ROOT), entrypoint=ENTRYPOINTS[e.flow])
        with contextlib.redirect_stdout(io.StringIO()):  # deploy() prints a table per deployment
            flow.deploy(name=e.name, work_pool_name=e.pool, parameters=e.parameters(), description=e.description,
                        schedules=[Cron(e.cron, timezone="UTC")] if e.cron else None,
                        job_variables=e.job_variables, tags=["ddpipe"], print_next_steps=False, ignore_warnings=True)
        names.append(e.full_name)
    return names


def serve(host: str = "127.0.0.1", port: int = 4200, api: str | None = None, with_k8s: bool = False,
          worker: bool = True) -> int:
    """Run the whole local set-up until Ctrl-C (see the module docstring)."""
    env = {**os.environ, **QUIET}
    children = []
    try:
        if api is None:
            api = f"http://{host}:{port}/api"
            home = env.get("PREFECT_HOME", "~/.prefect")
            print(f"starting prefect server on http://{host}:{port} (PREFECT_HOME={home})")
            children.append(start_server(host, port, env))
            wait_healthy(api, process=children[0])
        env["PREFECT_API_URL"] = os.environ["PREFECT_API_URL"] = api
        ensure_pools(with_k8s)
        names = register(with_k8s)
        print("deployments: " + ", ".join(names))
        if worker:
            children.append(start_worker(LOCAL_POOL, env))
        ui = api.removesuffix("/api")
        print(f"UI: {ui}  (Deployments -> distill/smoke -> Run)\n"
              f"from a shell: PREFECT_API_URL={api} prefect deployment run distill/smoke\n"
              "stop with Ctrl-C")
        while all(c.poll() is None for c in children):
            time.sleep(1)
        return 1  # a child died
    except KeyboardInterrupt:
        return 0
    finally:
        for c in reversed(children):
            c.terminate()
        for c in children:
            try:
                c.wait(timeout=20)
            except subprocess.TimeoutExpired:
                c.kill()
