"""The ``distill`` and ``teacher`` flows: the stages of a run as Prefect tasks, shard by shard.

They only compose: prepare the run folder, then :func:`ddpipe.pipeline.drive` runs the stages as the plain
runner does, with each shard, the stage's finalizing and the plan as Prefect tasks (shards one at a time in
the flow's own thread, or ``orchestration.max_workers`` at a time on the task runner), and write the report.
Shards run on the task runner that ``orchestration.task_runner`` names (:mod:`ddpipe.flows.runners`): with
dask or ray the stages run in a subflow, ``distill-stages``, that owns the cluster.

What the UI shows of a run: a progress artifact per stage, updated as shards finish; a table artifact of
the results (per student and regime, next to the random subset of the same size); a Markdown artifact
with the grid of distilled images per class (``distilled/grid.png`` in the run folder); a link artifact to
the run folder.

The parameter is the config model itself, so a deployment's form shows every field with its description,
bounds and choices. Run it with ``ddpipe run CONFIG``, from a deployment (``deployments/``), or from Python:
``distill(load_config("configs/smoke.yaml"))``.
"""

from __future__ import annotations

import base64

from prefect import flow
from prefect.artifacts import (
    create_link_artifact, create_markdown_artifact, create_progress_artifact, create_table_artifact,
    update_progress_artifact,
)
from prefect.futures import as_completed

from ddpipe.config import RunConfig
from ddpipe.flows.runners import shard_resources, task_runner_for
from ddpipe.manifests import StageManifest
from ddpipe.pipeline import Driver, Shard, Stage, context_for, drive, run_lock, run_store
from ddpipe.report import GRID_CLASSES, GRID_IMAGES, results_rows, results_table
from ddpipe.stages import stages_for
from ddpipe.tasks.pipeline import (
    RunRef, finalize_stage, index_shards, plan_index, plan_run, prepare_run, report, retries, run_shard,
)


def _submitted(shard_task, window: int, ref: RunRef, stage: str, shards: list[Shard], inputs):
    """Results of ``shard_task`` over ``shards`` in completion order, at most ``window`` running at once."""
    pending, running = list(shards), []
    while pending or running:
        while pending and len(running) < window:
            with shard_resources(ref.config.orchestration):
                running.append(shard_task.submit(ref, stage, pending.pop(0), inputs))
        done = next(as_completed(running))
        running.remove(done)
        yield done.result()


def _shard_results(ref: RunRef, stage: Stage, shards: list[Shard], inputs: dict[str, StageManifest]):
    """The shards of ``stage`` as Prefect tasks, with a progress artifact updated as they finish."""
    orch = ref.config.orchestration
    artifact = create_progress_artifact(progress=0.0, description=f"{stage.name}: {stage.doc}")
    shard_task = run_shard.with_options(task_run_name=f"{stage.name}:{{shard.id}}", **retries(orch))
    if orch.max_workers == 1 and orch.task_runner == "local":
        # One shard at a time runs in the flow's own thread, like the plain runner: torch's OpenMP pool is
        # per calling thread, and a second pool makes libgomp throttle its spin-waits (~15% slower on CPU).
        finished = (shard_task(ref, stage.name, shard, inputs) for shard in shards)
    else:
        finished = _submitted(shard_task, orch.max_workers, ref, stage.name, shards, inputs)
    for n, result in enumerate(finished, 1):
        update_progress_artifact(artifact_id=artifact, progress=100.0 * n / len(shards))
        yield result


def _index_source(config: RunConfig) -> None:
    """Index the data source's shards not indexed yet, a task per group of shards (the dataset stage then joins
    the parts); nothing to do for Fashion-MNIST or a source indexed already."""
    groups = plan_index(config)
    orch = config.orchestration
    task = index_shards.with_options(task_run_name="index:{shards[0].path}", **retries(orch))
    if orch.max_workers == 1 and orch.task_runner == "local":
        for group in groups:
            task(config, group)
    else:
        for future in [task.submit(config, group) for group in groups]:
            future.result()


def _run_stages(config: RunConfig, until: str | None = None) -> tuple[RunRef, dict[str, StageManifest], dict]:
    """Index the data source, prepare the run folder and run its stages in order (up to and including ``until``)."""
    _index_source(config)
    ref = prepare_run(config)
    print(f"run folder: {ref.uri}")
    driver = Driver(
        shards=lambda stage, shards, inputs: _shard_results(ref, stage, shards, inputs),
        finalize=lambda stage, shards, results: finalize_stage(ref, stage.name, shards, results),
        plan=lambda dataset: plan_run(ref, dataset),
    )
    manifests, timings = drive(context_for(config), stages_for(config), driver, until)
    return ref, manifests, timings


def _distill(config: RunConfig) -> dict:
    with run_lock(config):  # a second run of the same config on the same store is refused with one line
        ref, manifests, timings = _run_stages(config)
        result = report(ref, manifests, timings)
    _result_artifacts(config, result)
    return result


# The stages of a run on a dask or ray task runner (chosen per run, so the runner is set with with_options).
distill_stages = flow(_distill, name="distill-stages", log_prints=True)


@flow(name="distill", log_prints=True)
def distill(config: RunConfig) -> dict:
    """Distill a dataset as the config says, resuming what is already done; returns report.json's contents."""
    if config.orchestration.task_runner == "local":
        return _distill(config)
    return distill_stages.with_options(task_runner=task_runner_for(config.orchestration))(config)


@flow(name="teacher", log_prints=True)
def teacher(config: RunConfig) -> dict:
    """Pretrain (or load and measure) the config's teachers only: the dataset and teacher stages of a run.
    A later ``distill`` run of the same config reuses them, as does any run with the same data and teacher
    settings (``<store>/shared/teachers``)."""
    with run_lock(config):
        ref, manifests, _ = _run_stages(config, until="teacher")
    metrics = run_store(config).read_bytes("teacher/metrics.json").decode()
    create_link_artifact(key="ddpipe-run-folder", link=ref.uri, link_text=config.run_name,
                         description="the run folder (teacher/teacher.pt, teacher/metrics.json)")
    print(f"teacher: {metrics}")
    return {"run_uri": ref.uri, "teacher": manifests["teacher"].model_dump(mode="json")}


def _result_artifacts(config: RunConfig, result: dict) -> None:
    """The results table, the distilled images and the run folder, as artifacts of the flow run."""
    name = config.run_name
    create_markdown_artifact(key="ddpipe-results", markdown=f"```\n{results_table(result)}\n```",
                             description=f"results of {name}")
    create_table_artifact(key="ddpipe-results-table", table=results_rows(result),
                          description=f"{name}: test accuracy (%) per student and regime, distilled set vs a "
                                      "random subset of the same size")
    grid = run_store(config).read_bytes("distilled/grid.png")
    create_markdown_artifact(
        key="ddpipe-distilled-images",
        markdown=f"# Distilled images of {name}\n\nOne row per class (at most {GRID_CLASSES} classes and "
                 f"{GRID_IMAGES} images shown); "
                 f"the file is `{result['run_uri']}/distilled/grid.png`.\n\n"
                 f"![distilled images](data:image/png;base64,{base64.b64encode(grid).decode()})\n",
        description=f"{name}: distilled images per class")
    create_link_artifact(key="ddpipe-run-folder", link=result["run_uri"], link_text=name,
                         description="the run folder: report.json, manifests/, distilled/, labels")
