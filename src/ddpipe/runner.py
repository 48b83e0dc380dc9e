"""The plain runner: every stage of a run in order, as function calls, with no orchestrator.

The ``distill`` flow (``flows/distill.py``) composes exactly these calls as Prefect tasks; both write the same
files, byte for byte.
"""

from __future__ import annotations

import time

from ddpipe.config import RunConfig
from ddpipe.manifests import StageManifest
from ddpipe.pipeline import context_for, make_plan, prepare, run_stage
from ddpipe.report import write_report
from ddpipe.methods import stages_for
from ddpipe.stages import dataset_classes


def run_stages(cfg: RunConfig, until: str | None = None) -> tuple[dict[str, StageManifest], dict[str, float]]:
    """Run (or resume) the stages of ``cfg`` in order, up to and including ``until`` (default: all of them);
    returns each stage's manifest and seconds."""
    ctx = context_for(cfg)
    stages = stages_for(cfg)
    prepare(ctx)
    manifests: dict[str, StageManifest] = {}
    timings: dict[str, float] = {}
    plan = {stages[0].name: stages[0].plan(ctx, 0)}
    for stage in stages:
        start = time.perf_counter()
        manifests[stage.name] = run_stage(ctx, stage, plan[stage.name], manifests)
        if stage is stages[0]:  # the dataset stage knows the classes: now every stage can be planned
            plan = make_plan(ctx, stages, len(dataset_classes(ctx.store, manifests[stage.name])))
        timings[stage.name] = time.perf_counter() - start
        if stage.name == until:
            break
    return manifests, timings


def run_pipeline(cfg: RunConfig) -> dict:
    """Run (or resume) every stage of ``cfg`` and return the report."""
    manifests, timings = run_stages(cfg)
    return write_report(context_for(cfg), manifests, timings)
