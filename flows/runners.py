"""The task runner a run's shards go to (``orchestration.task_runner``), and their resource annotations.

- ``local``: Prefect's thread pool in the flow's process (the default).
- ``dask``: prefect-dask's ``DaskTaskRunner``, on the cluster at ``orchestration.address`` or on a local
  cluster of ``max_workers`` single-threaded worker processes.
- ``ray``: prefect-ray's ``RayTaskRunner``, on ``orchestration.address`` or a local Ray instance.

With ``orchestration.gpus_per_shard`` > 0 every shard task asks the engine for that many GPUs: a Dask
resource named ``GPU`` (workers must be started with ``--resources GPU=<n>``; the local cluster is), or
Ray's ``num_gpus``.
"""

from __future__ import annotations

import contextlib
import importlib

from ddpipe.config import OrchestrationConfig
from ddpipe.errors import ConfigError


def _require(module: str, runner: str, extra: str):
    try:
        return importlib.import_module(module)
    except ImportError:
        raise ConfigError(f"orchestration.task_runner={runner} needs {module.replace('_', '-')}: "
                          f"pip install 'ddpipe[{extra}]'") from None


def task_runner_for(orch: OrchestrationConfig):
    """A Prefect task runner for ``orch`` (dask or ray; the local runner is the flow's default)."""
    if orch.task_runner == "dask":
        DaskTaskRunner = _require("prefect_dask", "dask", "dask").DaskTaskRunner
        if orch.address:
            return DaskTaskRunner(address=orch.address)
        workers = {"n_workers": orch.max_workers, "threads_per_worker": 1, "processes": True,
                   "dashboard_address": None}
        if orch.gpus_per_shard:
            workers["resources"] = {"GPU": orch.gpus_per_shard}
        return DaskTaskRunner(cluster_kwargs=workers)
    if orch.task_runner == "ray":
        RayTaskRunner = _require("prefect_ray", "ray", "ray").RayTaskRunner
        return RayTaskRunner(address=orch.address) if orch.address else RayTaskRunner(
            init_kwargs={"num_cpus": orch.max_workers})
    raise ValueError(f"no task runner to build for {orch.task_runner}")


def shard_resources(orch: OrchestrationConfig):
    """Context in which shard tasks are submitted: the GPU request of each shard, if any."""
    if not orch.gpus_per_shard or orch.task_runner == "local":
        return contextlib.nullcontext()
    if orch.task_runner == "dask":
        import dask

        return dask.annotate(resources={"GPU": orch.gpus_per_shard})
    from prefect_ray.context import remote_options

    return remote_options(num_gpus=orch.gpus_per_shard)
