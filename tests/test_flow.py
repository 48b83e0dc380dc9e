"""The distill flow end to end under prefect_test_harness: outputs, artifacts, cache hits across flow runs."""

import time

import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
from prefect.testing.utilities import prefect_test_harness

from ddpipe.flows.distill import distill
from ddpipe.pipeline import run_store
from ddpipe.runner import run_pipeline

from conftest import smoke_config

pytestmark = [pytest.mark.slow, pytest.mark.fmnist]  # end to end: the flows under a Prefect server, dask and ray

FAST = ("evaluation.epochs=5", "evaluation.seeds=[0]")


@pytest.fixture(scope="module")
def harness():
    with prefect_test_harness(server_startup_timeout=120):
        yield


def task_runs(flow_run_id, select=lambda r: True, expected=None, timeout=60.0):
    """The flow run's task runs that ``select`` keeps, as the server has recorded them.

    Prefect 3 records task-run states from events, after the flow has returned; with ``expected`` set, wait
    (up to ``timeout`` seconds) until that many selected runs are recorded in a final state.
    """
    deadline = time.monotonic() + timeout
    while True:
        with get_client(sync_client=True) as client:
            runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
        runs = [r for r in runs if select(r)]
        settled = [r for r in runs if r.state is not None and r.state.is_final()]
        if expected is None or (len(settled) >= expected and len(runs) == len(settled)) or time.monotonic() > deadline:
            return runs
        time.sleep(0.5)


def test_flow_runs_every_stage_and_a_new_flow_run_is_served_from_cache(harness, tmp_path):
    cfg = smoke_config(tmp_path / "runs")  # the smoke preset as it is
    first = distill(config=cfg, return_state=True)
    assert first.is_completed()
    report = first.result()
    assert set(report["regimes"]) == {"hard", "soft", "soft_kd"} and report["teacher"]["val_accuracy"] > 0.5

    is_shard = lambda r: r.name.split(":")[0] in report["stages"]  # noqa: E731  shard task runs are "<stage>:<shard>"
    shard_runs = task_runs(first.state_details.flow_run_id, is_shard, expected=39)
    assert len(shard_runs) == 1 + 1 + 5 + 5 + 5 + 10 + 12  # dataset, teacher, 3x5 class groups, 2 sets x 5 labels, 12 evals
    assert all(r.state.name == "Completed" for r in shard_runs)

    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts()
    kinds = {(a.type, a.key) for a in artifacts}
    assert ("markdown", "ddpipe-results") in kinds
    assert sum(1 for a in artifacts if a.type == "progress" and a.flow_run_id == first.state_details.flow_run_id) == 7

    second = distill(config=cfg, return_state=True)
    assert second.result()["regimes"] == report["regimes"]
    again = task_runs(second.state_details.flow_run_id, is_shard, expected=len(shard_runs))
    assert len(again) == len(shard_runs) and all(r.state.name == "Cached" for r in again)


def test_flow_and_plain_runner_write_the_same_outputs(harness, tmp_path):
    # two shards at once in task-runner threads (the default, one at a time in the flow's thread, is tested above)
    a = smoke_config(tmp_path / "flow", *FAST, "evaluation.regimes=[soft_kd]", "orchestration.max_workers=2")
    b = smoke_config(tmp_path / "plain", *FAST, "evaluation.regimes=[soft_kd]")
    distill(config=a.model_dump(mode="json"))  # a mapping is validated into the model, as from the API
    run_pipeline(b)
    sa, sb = run_store(a), run_store(b)
    for stage in ("scoring", "synthesis", "labels", "evaluation"):
        assert sa.read_bytes(f"manifests/{stage}.parquet") == sb.read_bytes(f"manifests/{stage}.parquet")


def test_teacher_flow_runs_only_the_dataset_and_teacher_stages(harness, tmp_path):
    from ddpipe.flows.distill import teacher

    cfg = smoke_config(tmp_path)
    out = teacher(config=cfg)
    store = run_store(cfg)
    assert out["run_uri"] == store.uri and store.exists("teacher/teacher.pt")
    assert [row["stage"] for row in store.read_table("manifests/plan.parquet").to_pylist()][-1] == "evaluation"
    assert store.exists("manifests/teacher.parquet") and not store.exists("manifests/scoring.parquet")


@pytest.mark.parametrize("runner", ["dask", "ray"])
def test_smoke_on_a_distributed_task_runner_writes_the_same_outputs(harness, tmp_path, runner):
    a = smoke_config(tmp_path / runner, *FAST, f"orchestration.task_runner={runner}", "orchestration.max_workers=2")
    b = smoke_config(tmp_path / "local", *FAST)
    ra, rb = distill(config=a), distill(config=b)
    assert ra["regimes"] == rb["regimes"]
    sa, sb = run_store(a), run_store(b)
    for stage in ("dataset", "teacher", "scoring", "synthesis", "random_subset", "labels", "evaluation"):
        assert sa.read_bytes(f"manifests/{stage}.parquet") == sb.read_bytes(f"manifests/{stage}.parquet"), stage
    with get_client(sync_client=True) as client:  # the stages ran in a subflow that owns the cluster
        stages_flow = client.read_flow_by_name("distill-stages")
        runs = [r for r in client.read_flow_runs() if r.flow_id == stages_flow.id]
    assert runs and all(r.state.is_completed() and r.parent_task_run_id for r in runs)


def test_evaluate_flow_runs_a_matrix_as_distill_subflows(harness, tmp_path):
    from ddpipe.flows.evaluate import evaluate

    from conftest import CONFIGS

    overrides = [f"store.uri={tmp_path}", *FAST, "evaluation.regimes=[hard]", "evaluation.full=false"]
    state = evaluate(matrix=str(CONFIGS / "matrix" / "smoke.yaml"), overrides=overrides, return_state=True)
    report = state.result()
    assert [(c["method"], c["ipc"]) for c in report["cells"]] == [
        (m, i) for m in ("rded", "ca2d", "herding", "cad") for i in (1, 2)]
    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs()
        artifacts = client.read_artifacts()
        distill_flow = client.read_flow_by_name("distill")
    subflows = [r for r in runs if r.parent_task_run_id is not None and r.flow_id == distill_flow.id]
    assert len(subflows) == 8 and all(r.state.is_completed() for r in subflows)
    assert ("markdown", "ddpipe-matrix") in {(a.type, a.key) for a in artifacts}
    assert all(c["regimes"]["hard"]["distilled"]["mean"] > 0 for c in report["cells"])
