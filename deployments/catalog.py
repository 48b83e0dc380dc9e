"""Every deployment of ddpipe's flows, in one list: ``ddpipe server`` registers the local ones, and
``deployments/prefect.yaml`` (for ``prefect deploy --all``) is generated from it:

    python -m ddpipe.deployments.catalog > deployments/prefect.yaml

A deployment's parameters are a preset's config (the pydantic model, only its non-default fields), so
the UI shows the whole config as a form, with each field's description, bounds and choices, pre-filled
with the preset, and the server rejects a bad value before a run starts.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from ddpipe.config import load_config

ROOT = Path(__file__).resolve().parents[1]
LOCAL_POOL = "ddpipe-local"  # a process work pool: runs start as subprocesses of `prefect worker start`
K8S_POOL = "ddpipe-k8s"  # a Kubernetes work pool with deployments/k8s-gpu-job-template.json
K8S_TEMPLATE = ROOT / "deployments" / "k8s-gpu-job-template.json"

ENTRYPOINTS = {
    "distill": "flows/distill.py:distill",
    "teacher": "flows/distill.py:teacher",
    "evaluate": "flows/evaluate.py:evaluate",
}


@dataclass(frozen=True)
class Entry:
    flow: str  # a key of ENTRYPOINTS
    name: str
    description: str
    config: str | None = None  # distill, teacher: a preset, relative to the repository root
    matrix: str | None = None  # evaluate: a matrix file, relative to the repository root
    overrides: tuple[str, ...] = ()
    cron: str | None = None  # UTC
    pool: str = LOCAL_POOL
    job_variables: dict = field(default_factory=dict)

    @property
    def full_name(self) -> str:
        return f"{self.flow}/{self.name}"

    def parameters(self) -> dict:
        if self.flow == "evaluate":
            return {"matrix": self.matrix, "overrides": list(self.overrides)}
        cfg = load_config(ROOT / self.config, self.overrides)
        return {"config": cfg.model_dump(mode="json", exclude_defaults=True)}


CATALOG: tuple[Entry, ...] = (
    Entry("distill", "smoke", "The smoke preset (RDED on a 1,000-image slice of Fashion-MNIST, about a minute), "
          "every night at 03:00 UTC: a health check of the whole pipeline.", config="configs/smoke.yaml",
          cron="0 3 * * *"),
    Entry("distill", "fashion-mnist-rded-ipc10", "RDED on Fashion-MNIST at IPC 10, local store; resumes where a "
          "previous run stopped.", config="configs/fashion-mnist-rded-ipc10.yaml"),
    Entry("distill", "fashion-mnist-sre2l-ipc10", "SRe2L on Fashion-MNIST at IPC 10.",
          config="configs/fashion-mnist-sre2l-ipc10.yaml"),
    Entry("distill", "fashion-mnist-diffusion-ipc10", "Class-conditional diffusion on Fashion-MNIST at IPC 10 (the "
          "denoiser trains once per store, checkpointed).", config="configs/fashion-mnist-diffusion-ipc10.yaml"),
    Entry("teacher", "fashion-mnist", "Pretrain the Fashion-MNIST teacher only (shared by every Fashion-MNIST "
          "preset in the same store).", config="configs/fashion-mnist-rded-ipc10.yaml"),
    Entry("evaluate", "fashion-mnist-quick", "The comparison matrix (8 methods x IPC 1/10/50 x 3 regimes) at the "
          "quick student budget.", matrix="configs/matrix/fashion-mnist-quick.yaml"),
    Entry("distill", "imagenet1k-rded-ipc10-nightly", "RDED on ImageNet-1K at IPC 10 into S3 on a GPU pod, every "
          "night at 02:00 UTC; a run that dies resumes in the next one.", config="configs/imagenet1k-rded-ipc10.yaml",
          overrides=("store.uri=s3://ddpipe-runs/imagenet1k", "runtime.device=cuda", "runtime.amp=true",
                     "runtime.channels_last=true", "runtime.loader_workers=8"),
          cron="0 2 * * *", pool=K8S_POOL,
          job_variables={"image": "ghcr.io/ddpipe/ddpipe:0.1.0", "gpu_limit": 1, "cpu_request": "8",
                         "memory_request": "48Gi", "namespace": "ddpipe",
                         "env": {"PREFECT_RESULTS_PERSIST_BY_DEFAULT": "true", "DDPIPE_HOME": "/opt/ddpipe"}}),
)


def prefect_yaml() -> str:
    """deployments/prefect.yaml for ``prefect deploy --all --prefect-file deployments/prefect.yaml``."""
    deployments = []
    for e in CATALOG:
        d = {"name": e.name, "description": e.description, "entrypoint": ENTRYPOINTS[e.flow],
             "tags": ["ddpipe"], "parameters": e.parameters(), "work_pool": {"name": e.pool}}
        if e.job_variables:
            d["work_pool"]["job_variables"] = e.job_variables
        if e.cron:
            d["schedules"] = [{"cron": e.cron, "timezone": "UTC", "active": True}]
        deployments.append(d)
    spec = {"name": "ddpipe", "prefect-version": "3.8.8", "build": None, "push": None,
            "pull": [{"prefect.deployments.steps.set_working_directory": {"directory": "{{ $DDPIPE_HOME }}"}}],
            "deployments": deployments}
    head = ("# Generated from deployments/catalog.py: python -m ddpipe.deployments.catalog > deployments/prefect.yaml\n"
            "# Work pools: prefect work-pool create ddpipe-local --type process\n"
            "#             prefect work-pool create ddpipe-k8s --type kubernetes "
            "--base-job-template deployments/k8s-gpu-job-template.json\n"
            "# Deploy:     DDPIPE_HOME=$PWD prefect deploy --all --prefect-file deployments/prefect.yaml\n"
            "# (`ddpipe server` does all of this for the local pool, and starts a server and a worker.)\n")
    return head + yaml.safe_dump(spec, sort_keys=False, width=110)


def k8s_template() -> dict:
    return json.loads(K8S_TEMPLATE.read_text())


if __name__ == "__main__":  # pragma: no cover
    sys.stdout.write(prefect_yaml())
