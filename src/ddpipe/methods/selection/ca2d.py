"""CA2D: RDED on the candidate pool CAD-Prune chooses (docs/coreset.md).

Its stages are the ``dynamics`` stage, this module's ``scoring`` (RDED's scoring, :func:`ddpipe.methods.rded.run_scoring`,
of each class's ``candidates_per_class`` training images with the highest CAD instead of a random draw) and
RDED's ``synthesis``.
"""

from __future__ import annotations

import numpy as np

from ddpipe.methods.rded import run_scoring
from ddpipe.methods.selection.select import kept_by_dynamics
from ddpipe.pipeline import Context, Shard, Stage, class_groups
from ddpipe.store import FileRecord


def cad_pool(ctx: Context, c: int, inputs) -> np.ndarray:
    """CA2D's candidate pool of class ``c``: its ``candidates_per_class`` training images with the highest CAD
    (the lowest with ``selection.keep: smallest``)."""
    pool = ctx.source.train.class_indices(c)
    return kept_by_dynamics(ctx, pool, min(len(pool), ctx.cfg.method.candidates_per_class), inputs)[0]


def run_ca2d_scoring(ctx: Context, shard: Shard, inputs) -> list[FileRecord]:
    """RDED's scoring of each class's CAD pool."""
    return run_scoring(ctx, shard, inputs, candidates=lambda c: cad_pool(ctx, c, inputs))


CA2D_SCORING = Stage("scoring", ("dataset", "teacher", "dynamics"), ("dataset", "method"), class_groups,
                     run_ca2d_scoring, doc="CA2D: RDED's scoring on the candidate pool with the highest CAD")
