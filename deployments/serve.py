"""Serve the distill flow's deployments from this process (no work pool needed).

    python deployments/serve.py            # registers the deployments, then waits for runs

With PREFECT_API_URL pointing at a Prefect server (`prefect server start`), the deployments appear in the
UI, where a run can be started with any config path and overrides. Stop with Ctrl-C.
"""

from __future__ import annotations

from pathlib import Path

from prefect import serve

from ddpipe.flows.distill import distill

# Every Fashion-MNIST and smoke preset (RDED, SRe2L, CDA, G-VBSM), by name; paths relative to the repository root.
_CONFIGS = Path(__file__).resolve().parents[1] / "configs"
PRESETS = {
    p.stem: f"configs/{p.name}"
    for p in sorted([*_CONFIGS.glob("fashion-mnist-*.yaml"), *_CONFIGS.glob("smoke*.yaml")])
}


def build_deployments():
    return [
        distill.to_deployment(name=name, parameters={"config": path, "overrides": []},
                              description=f"distill with {path}", tags=["ddpipe"])
        for name, path in PRESETS.items()
    ]


if __name__ == "__main__":  # pragma: no cover
    serve(*build_deployments())
