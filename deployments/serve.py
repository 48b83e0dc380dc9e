"""Serve the distill flow's deployments from this process (no work pool needed).

    python deployments/serve.py            # registers the deployments, then waits for runs

With PREFECT_API_URL pointing at a Prefect server (`prefect server start`), the deployments appear in the
UI, where a run can be started with any config path and overrides. Stop with Ctrl-C.
"""

from __future__ import annotations

from prefect import serve

from ddpipe.flows.distill import distill

PRESETS = {
    "fashion-mnist-rded-ipc1": "configs/fashion-mnist-rded-ipc1.yaml",
    "fashion-mnist-rded-ipc10": "configs/fashion-mnist-rded-ipc10.yaml",
    "fashion-mnist-rded-ipc50": "configs/fashion-mnist-rded-ipc50.yaml",
    "smoke": "configs/smoke.yaml",
}


def build_deployments():
    return [
        distill.to_deployment(name=name, parameters={"config": path, "overrides": []},
                              description=f"distill with {path}", tags=["ddpipe"])
        for name, path in PRESETS.items()
    ]


if __name__ == "__main__":  # pragma: no cover
    serve(*build_deployments())
