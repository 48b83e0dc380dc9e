"""Prefect tasks: thin wrappers over :mod:`ddpipe.pipeline` with caching, retries and artifacts.

Tasks take and return small pydantic models (:class:`RunRef`, :class:`~ddpipe.pipeline.Shard`,
:class:`~ddpipe.manifests.ShardResult`, :class:`~ddpipe.manifests.StageManifest`), never tensors.

Caching: :class:`ShardCachePolicy` keys a shard task on :func:`ddpipe.pipeline.shard_key` (the stage's
config sections, the input manifests' content hashes, the code version) plus the run folder's token,
with no RUN_ID, so a new flow run after a crash gets every finished shard as a cache hit. The library
checks the shard's outputs as well, so a lost Prefect cache (another machine, a wiped PREFECT_HOME) only
costs a re-validation, never a recomputation.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE, CachePolicy
from pydantic import BaseModel

from ddpipe import dataindex, pipeline
from ddpipe.config import RunConfig
from ddpipe.dataset import dataset_classes
from ddpipe.errors import DDPipeError, StoreError
from ddpipe.formats import ShardInfo
from ddpipe.locks import LockedError
from ddpipe.manifests import ShardResult, StageManifest
from ddpipe.pipeline import Shard, Stage, context_for
from ddpipe.report import write_report
from ddpipe.stages import stages_for


class RunRef(BaseModel):
    """What every task needs to find its run: the config and the run folder's token."""

    config: RunConfig
    token: str

    @property
    def uri(self) -> str:
        return pipeline.run_store(self.config).uri


def stage_named(cfg: RunConfig, name: str) -> Stage:
    for stage in stages_for(cfg):
        if stage.name == name:
            return stage
    raise KeyError(name)


@dataclass
class ShardCachePolicy(CachePolicy):
    """Cache key of a shard task: the library's shard key plus the run folder's token."""

    def compute_key(self, task_ctx, inputs: dict[str, Any], flow_parameters: dict[str, Any], **kwargs) -> str | None:
        ref: RunRef = inputs["ref"]
        stage = stage_named(ref.config, inputs["stage"])
        key = pipeline.shard_key(context_for(ref.config), stage, inputs["shard"], inputs["inputs"])
        return hashlib.sha256(f"{key}:{ref.token}".encode()).hexdigest()


def _retry_unless_user_error(task, task_run, state) -> bool:
    """Retry transient failures (network, store), not bad input: that fails the same way again. A store
    error counts as transient (the S3 client's own retries were spent), a lost run lock does not."""
    try:
        state.result()
    except LockedError:
        return False
    except StoreError:
        return True
    except DDPipeError:
        return False
    except Exception:
        return True
    return False


def retries(orch) -> dict:
    """The retry options of the shard and index tasks, from ``orchestration.task_retries`` / ``retry_delay_s``."""
    return {"retries": orch.task_retries, "retry_delay_seconds": orch.retry_delay_s,
            "retry_condition_fn": _retry_unless_user_error}


@task(name="plan-index", cache_policy=NO_CACHE)
def plan_index(cfg: RunConfig) -> list[list[ShardInfo]]:
    """The source's shards still to index, in groups (none for Fashion-MNIST or a source indexed already)."""
    return dataindex.index_groups(cfg)


@task(name="index-shards", cache_policy=NO_CACHE)  # retries: retries(orchestration), set by the flow
def index_shards(cfg: RunConfig, shards: list[ShardInfo]) -> int:
    """Index one group of shards into their parts of the dataset index (parts done already are reused)."""
    return dataindex.index_group(cfg, shards)


@task(name="prepare-run", cache_policy=NO_CACHE)
def prepare_run(cfg: RunConfig) -> RunRef:
    """Check the store, write config.yaml, and return the run reference."""
    token = pipeline.prepare(context_for(cfg))
    return RunRef(config=cfg, token=token)


@task(name="run-shard", cache_policy=ShardCachePolicy(), result_serializer="json")  # retries: set by the flow
def run_shard(ref: RunRef, stage: str, shard: Shard, inputs: dict[str, StageManifest]) -> ShardResult:
    """Compute (or validate and reuse) one shard of a stage."""
    return pipeline.run_shard(context_for(ref.config), stage_named(ref.config, stage), shard, inputs)


@task(name="finalize-stage", cache_policy=NO_CACHE)
def finalize_stage(ref: RunRef, stage: str, shards: list[Shard], results: list[ShardResult]) -> StageManifest:
    """Validate every shard of a stage and write the stage manifest."""
    return pipeline.finalize_stage(context_for(ref.config), stage_named(ref.config, stage), shards, results)


@task(name="plan-run", cache_policy=NO_CACHE)
def plan_run(ref: RunRef, dataset: StageManifest) -> dict[str, list[Shard]]:
    """Split every stage into shards (needs the class count from the dataset stage)."""
    ctx = context_for(ref.config)
    return pipeline.make_plan(ctx, stages_for(ref.config), len(dataset_classes(ctx.store, dataset)))


@task(name="write-report", cache_policy=NO_CACHE)
def report(ref: RunRef, manifests: dict[str, StageManifest], timings: dict[str, float]) -> dict:
    """Build report.json from the manifests."""
    return write_report(context_for(ref.config), manifests, timings)
