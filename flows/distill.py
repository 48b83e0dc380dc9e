"""The ``distill`` flow: every stage of a run as Prefect tasks, shard by shard.

It only composes: prepare the run folder, run the dataset stage, plan, then for each stage run its
shards (one at a time in the flow's own thread, or ``orchestration.max_workers`` at a time in task-runner
threads when that is above 1), finalize the stage, and write the report.
Progress shows as one progress artifact per stage and a results table artifact at the end.

Run it with ``ddpipe run CONFIG``, from a deployment (``deployments/``), or from Python:
``distill(config="configs/smoke.yaml")``.
"""

from __future__ import annotations

import time
from typing import Any

from prefect import flow
from prefect.artifacts import create_markdown_artifact, create_progress_artifact, update_progress_artifact
from prefect.futures import as_completed

from ddpipe import progress
from ddpipe.config import RunConfig, build_config, load_config
from ddpipe.manifests import StageManifest
from ddpipe.pipeline import Shard, Stage, context_for
from ddpipe.report import results_table
from ddpipe.methods import stages_for
from ddpipe.tasks.pipeline import RunRef, finalize_stage, plan_run, prepare_run, report, run_shard


def _config(config: str | dict[str, Any], overrides: list[str] | None) -> RunConfig:
    if isinstance(config, str):
        return load_config(config, overrides or [])
    return build_config(config, overrides or [])


def _submitted(shard_task, window: int, ref: RunRef, stage: str, shards: list[Shard], inputs):
    """Results of ``shard_task`` over ``shards`` in completion order, at most ``window`` running at once."""
    pending, running = list(shards), []
    while pending or running:
        while pending and len(running) < window:
            running.append(shard_task.submit(ref, stage, pending.pop(0), inputs))
        done = next(as_completed(running))
        running.remove(done)
        yield done.result()


def _run_stage(ref: RunRef, stage: Stage, shards: list[Shard], manifests: dict[str, StageManifest]) -> StageManifest:
    inputs = {name: manifests[name] for name in stage.inputs}
    window = ref.config.orchestration.max_workers
    artifact = create_progress_artifact(progress=0.0, description=f"{stage.name}: {stage.doc}")
    progress.emit("stage_started", stage.name, len(shards))
    shard_task = run_shard.with_options(task_run_name=f"{stage.name}:{{shard.id}}")
    if window == 1:
        # One shard at a time runs in the flow's own thread, like the plain runner: torch's OpenMP pool is
        # per calling thread, and a second pool makes libgomp throttle its spin-waits (~15% slower on CPU).
        finished = (shard_task(ref, stage.name, shard, inputs) for shard in shards)
    else:
        finished = _submitted(shard_task, window, ref, stage.name, shards, inputs)
    results = {}
    for result in finished:
        results[result.shard] = result
        progress.emit("shard_finished", stage.name, result.shard, result.reused)
        update_progress_artifact(artifact_id=artifact, progress=100.0 * len(results) / len(shards))
    manifest = finalize_stage(ref, stage.name, shards, [results[s.id] for s in shards])
    progress.emit("stage_finished", stage.name)
    return manifest


@flow(name="distill", log_prints=True)
def distill(config: str | dict[str, Any], overrides: list[str] | None = None) -> dict:
    """Distill a dataset as the config says (a YAML path or a mapping), resuming what is already done."""
    cfg = _config(config, overrides)
    ref = prepare_run(cfg)
    print(f"run folder: {ref.uri}")
    stages = stages_for(cfg)
    manifests: dict[str, StageManifest] = {}
    timings: dict[str, float] = {}
    plan: dict[str, list[Shard]] = {stages[0].name: stages[0].plan(context_for(cfg), 0)}
    for stage in stages:
        start = time.perf_counter()
        manifests[stage.name] = _run_stage(ref, stage, plan[stage.name], manifests)
        if stage is stages[0]:
            plan = plan_run(ref, manifests[stage.name])
        timings[stage.name] = time.perf_counter() - start
    result = report(ref, manifests, timings)
    create_markdown_artifact(key="ddpipe-results", markdown=f"```\n{results_table(result)}\n```",
                             description=f"results of {cfg.run_name}")
    return result
