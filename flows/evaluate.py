"""The ``evaluate`` flow: an evaluation matrix (methods x IPC; regimes x seeds inside each run) and its report.

It only composes: each (method, ipc) cell is a ``distill`` subflow run (cached shard by shard, so a killed
matrix resumes without redoing finished cells), then the comparison report (:mod:`ddpipe.matrix`) is
written and shown as a Markdown artifact. Run it with ``ddpipe evaluate MATRIX`` or from Python:
``evaluate(matrix="configs/matrix/fashion-mnist.yaml")``.
"""

from __future__ import annotations

from pathlib import Path

from prefect import flow
from prefect.artifacts import create_markdown_artifact

from ddpipe.flows.distill import distill
from ddpipe.matrix import load_matrix, run_matrix, select


@flow(name="evaluate", log_prints=True)
def evaluate(matrix: str, overrides: list[str] | None = None, methods: list[str] | None = None,
             ipc: list[int] | None = None) -> dict:
    """Run (or resume) every cell of the matrix file (or only ``methods`` / ``ipc``) and write the report."""
    spec, root = load_matrix(Path(matrix))
    spec = select(spec, methods, ipc)
    report = run_matrix(spec, root, lambda cfg: distill(config=cfg), overrides or [])
    from ddpipe.store import Store

    markdown = Store(report["uri"]).read_bytes("report.md").decode()
    create_markdown_artifact(key="ddpipe-matrix", markdown=markdown, description=f"evaluation matrix {spec.name}")
    print(f"matrix report: {report['uri']}/report.md")
    return report
