"""The plain runner: every stage of a run in order, as function calls, with no orchestrator.

The ``distill`` flow (``flows/distill.py``) composes exactly these calls as Prefect tasks; both write the same
files, byte for byte.
"""

from __future__ import annotations

from ddpipe.config import RunConfig
from ddpipe.dataset import dataset_classes
from ddpipe.manifests import StageManifest
from ddpipe.pipeline import Driver, context_for, drive, finalize_stage, make_plan, prepare, run_lock, run_shard
from ddpipe.report import write_report
from ddpipe.stages import stages_for


def run_stages(cfg: RunConfig, until: str | None = None) -> tuple[dict[str, StageManifest], dict[str, float]]:
    """Run (or resume) the stages of ``cfg`` in order, up to and including ``until`` (default: all of them);
    returns each stage's manifest and seconds. Refused when another run holds the run folder."""
    with run_lock(cfg):
        return _run_stages(cfg, until)


def _run_stages(cfg: RunConfig, until: str | None) -> tuple[dict[str, StageManifest], dict[str, float]]:
    ctx = context_for(cfg)
    stages = stages_for(cfg)
    prepare(ctx)
    driver = Driver(
        shards=lambda stage, shards, inputs: (run_shard(ctx, stage, shard, inputs) for shard in shards),
        finalize=lambda stage, shards, results: finalize_stage(ctx, stage, shards, results),
        plan=lambda dataset: make_plan(ctx, stages, len(dataset_classes(ctx.store, dataset))),
    )
    return drive(ctx, stages, driver, until)


def run_pipeline(cfg: RunConfig) -> dict:
    """Run (or resume) every stage of ``cfg`` and return the report."""
    with run_lock(cfg):
        manifests, timings = _run_stages(cfg, None)
        return write_report(context_for(cfg), manifests, timings)
