"""The deployments on a real local Prefect server, as ``ddpipe server`` sets them up: registered, a run
triggered through the API (the call the UI's Run button makes) executed by a process worker, bad
parameters rejected by the server, and the run's page in the UI opened in headless Chromium."""

from __future__ import annotations

import json
import os
import socket
import subprocess

import pytest
from PIL import Image

import browser
from conftest import ROOT, smoke_config

pytestmark = [pytest.mark.slow, pytest.mark.fmnist]

ARTIFACTS = ROOT / "test-artifacts"  # screenshots kept after the run (git-ignored)
FAST = ("evaluation.epochs=5", "evaluation.seeds=[0]", "evaluation.regimes=[hard,soft_kd]")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ui(tmp_path_factory):
    """A Prefect server in a fresh PREFECT_HOME with the catalog registered (local and Kubernetes pools), a
    worker on the local pool, and one smoke run triggered through the API and finished."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from ddpipe.deployments import server

    home = tmp_path_factory.mktemp("prefect-home")
    port = _free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = {**os.environ, **server.QUIET, "PREFECT_HOME": str(home), "PREFECT_API_URL": api}
    env.pop("PREFECT_LOGGING_LEVEL", None)  # the run's logs go to the server, as from `ddpipe server`
    srv = server.start_server("127.0.0.1", port, env)
    worker = None
    try:
        server.wait_healthy(api, timeout=180, process=srv)
        with temporary_settings({PREFECT_API_URL: api}):
            server.ensure_pools(with_k8s=True)
            names = server.register(with_k8s=True)
            log = open(home / "worker.log", "w")
            worker = server.start_worker(server.LOCAL_POOL, env, log=log)
            store = tmp_path_factory.mktemp("store")
            config = smoke_config(store, *FAST).model_dump(mode="json")
            from prefect.deployments import run_deployment

            run = run_deployment("distill/smoke", parameters={"config": config}, timeout=900, poll_interval=2)
            yield {"api": api, "names": names, "run": run, "store": store, "home": home}
    finally:
        for p in (worker, srv):
            if p is not None:
                p.terminate()
                try:
                    p.wait(timeout=30)
                except subprocess.TimeoutExpired:  # a worker can sit in a poll longer than that
                    p.kill()
                    p.wait()


def test_catalog_is_registered_with_forms(ui):
    from prefect.client.orchestration import get_client

    from ddpipe.deployments.catalog import CATALOG

    with get_client(sync_client=True) as client:
        found = {f"{client.read_flow(d.flow_id).name}/{d.name}": d for d in client.read_deployments()}
        pools = {p.name: p.type for p in client.read_work_pools()}
    assert set(found) == {e.full_name for e in CATALOG} == set(ui["names"])
    assert pools == {"ddpipe-local": "process", "ddpipe-k8s": "kubernetes"}
    smoke = found["distill/smoke"]
    assert smoke.enforce_parameter_schema and [s.schedule.cron for s in smoke.schedules] == ["0 3 * * *"]
    orch = smoke.parameter_openapi_schema["definitions"]["OrchestrationConfig"]["properties"]
    assert orch["task_runner"]["enum"] == ["local", "dask", "ray"] and orch["max_workers"]["minimum"] == 1
    assert "description" in orch["max_workers"]
    nightly = found["distill/imagenet1k-rded-ipc10-nightly"]
    assert nightly.work_pool_name == "ddpipe-k8s" and nightly.job_variables["gpu_limit"] == 1


def test_run_triggered_through_the_api_completes_on_the_worker(ui):
    from prefect.client.orchestration import get_client

    run = ui["run"]
    assert run.state.is_completed(), run.state
    report = next(ui["store"].glob("smoke-*/report.json"))
    assert (report.parent / "distilled" / "grid.png").is_file()
    with get_client(sync_client=True) as client:
        artifacts = [a for a in client.read_artifacts() if a.flow_run_id == run.id]
    kinds = {(a.type, a.key) for a in artifacts}  # a link artifact is stored as Markdown
    assert {("table", "ddpipe-results-table"), ("markdown", "ddpipe-distilled-images"),
            ("markdown", "ddpipe-run-folder")} <= kinds
    table = next(a for a in artifacts if a.key == "ddpipe-results-table")
    assert "random" in table.data and "soft_kd" in table.data
    assert sum(a.type == "progress" for a in artifacts) == 7  # one per stage


@pytest.mark.parametrize("bad, field", [
    ({"name": "smoke", "method": {"ipc": 0}}, "config.method.ipc"),
    ({"name": "smoke", "orchestration": {"task_runner": "spark"}}, "config.orchestration.task_runner"),
    ({"name": "Smoke Run"}, "config.name"),
    ({"name": "smoke", "no_such_field": 1}, "config"),
])
def test_server_rejects_bad_parameters_before_a_run_starts(ui, bad, field):
    from prefect.client.orchestration import get_client
    from prefect.exceptions import PrefectHTTPStatusError

    with get_client(sync_client=True) as client:
        deployment = client.read_deployment_by_name("distill/smoke")
        before = len(client.read_flow_runs())
        with pytest.raises(PrefectHTTPStatusError, match=f"Validation failed for field '{field}'"):
            client.create_flow_run_from_deployment(deployment.id, parameters={"config": bad})
        assert len(client.read_flow_runs()) == before


def test_server_checks_kubernetes_job_variables_against_the_gpu_template(ui):
    """The nightly GPU deployment registered, so its job variables (image, gpu_limit, requests, env) fit the
    template; a run asking for a bad GPU count is refused before a pod would be created."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import PrefectHTTPStatusError

    with get_client(sync_client=True) as client:
        nightly = client.read_deployment_by_name("distill/imagenet1k-rded-ipc10-nightly")
        with pytest.raises(PrefectHTTPStatusError, match="Validation failed for field 'gpu_limit'"):
            client.create_flow_run_from_deployment(nightly.id, job_variables={"gpu_limit": "two"})
        run = client.create_flow_run_from_deployment(nightly.id, job_variables={"gpu_limit": 2})
        assert run.job_variables["gpu_limit"] == 2  # waits in the pool: no Kubernetes worker here
        client.delete_flow_run(run.id)


@pytest.mark.skipif(not browser.available(), reason="needs the Debian chromium package (make test installs it)")
def test_ui_pages_of_the_run_show_results_images_and_progress(ui, tmp_path):
    """Headless Chromium opens the run's page in the UI, its Artifacts tab, the results table and the
    distilled images; the screenshots are kept in test-artifacts/."""
    ARTIFACTS.mkdir(exist_ok=True)
    page = ui["api"].removesuffix("/api") + f"/runs/flow-run/{ui['run'].id}"
    b = browser.Browser(tmp_path / "chromium")
    try:
        b.open(page)
        b.wait_for_text("Completed", "Artifacts", "run folder: ")  # the Logs tab shows the flow's prints
        assert b.click_text("Artifacts")
        stages = ("dataset", "teacher", "scoring", "synthesis", "random_subset", "labels", "evaluation")
        b.wait_for_text("ddpipe-results-table", "ddpipe-distilled-images", "ddpipe-run-folder",
                        *(f"{s}: " for s in stages), "random subset of the same size")
        b.screenshot(ARTIFACTS / "ui-flow-run-artifacts.png")
        assert b.click_text("ddpipe-results-table")
        text = b.wait_for_text("student", "regime", "distilled", "random", "gain", "soft_kd")
        b.screenshot(ARTIFACTS / "ui-results-table.png")
        report = json.loads(next(ui["store"].glob("smoke-*/report.json")).read_text())
        hard = report["regimes"]["hard"]["distilled"]["mean"]
        assert f"{round(100 * hard, 2):g}" in text  # the table shows the report's numbers
        b.open(page)
        b.wait_for_text("Artifacts")
        assert b.click_text("Artifacts")
        b.wait_for_text("ddpipe-distilled-images")
        assert b.click_text("ddpipe-distilled-images")
        b.wait_for_text("Distilled images of smoke-")
        width = b.evaluate("Math.max(0, ...[...document.images].filter(i => i.alt === 'distilled images')"
                           ".map(i => i.complete ? i.naturalWidth : 0))")
        b.screenshot(ARTIFACTS / "ui-distilled-images.png")
    finally:
        b.close()
    assert width == Image.open(next(ui["store"].glob("smoke-*/distilled/grid.png"))).width  # the PNG rendered
