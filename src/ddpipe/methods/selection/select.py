"""The ``synthesis`` stage of the coreset selections.

A selection keeps ``ipc`` whole real images per class, stored as the distilled set (:mod:`ddpipe.imageset`),
ranked by its :class:`~ddpipe.methods.Selection` variant's ``score``: random (the random subset's draw),
herding or k-center greedy on the teacher's penultimate features, or a training-dynamics score averaged over
the proxy seeds (EL2N at ``selection.el2n_checkpoint``, forgetting events, CAD), keeping the
``selection.keep`` end. CA2D ranks the same way to choose RDED's candidate pool (:mod:`.ca2d`).
"""

from __future__ import annotations

import numpy as np

from ddpipe import progress
from ddpipe.baseline import random_picks
from ddpipe.errors import DataError
from ddpipe.imageset import write_real_images
from ddpipe.methods import METHODS
from ddpipe.methods.selection.coreset import cad_scores, forgetting_events, herding, k_center_greedy, top_k
from ddpipe.methods.selection.dynamics import dynamics_shards, read_dynamics
from ddpipe.pipeline import Context, Shard, Stage, class_groups
from ddpipe.store import FileRecord
from ddpipe.teacher import teacher_of
from ddpipe.train import penultimate_features

# Training-dynamics scores of every sample from its records (d) and the selection section (sel).
DYNAMICS_SCORES = {
    "el2n": lambda d, sel: d.el2n[sel.el2n_checkpoint - 1],
    "forgetting": lambda d, sel: forgetting_events(d.correct),
    "cad": lambda d, sel: cad_scores(d.el2n, sel.window, sel.last),
}
FEATURE_SCORES = {"herding": herding, "kcenter": k_center_greedy}  # greedy orders on the teacher's features


def dynamics_scores(ctx: Context, inputs) -> np.ndarray:
    """The selection's score of every training sample (by split position), averaged over the proxy seeds."""
    def compute():
        sel = ctx.cfg.method.selection
        score = DYNAMICS_SCORES[METHODS[ctx.cfg.method.name].variant.score]
        total = np.zeros(len(ctx.source.train))
        for s in dynamics_shards(ctx, 0):
            d = read_dynamics(ctx.store.read_table(f"dynamics/{s.id}.parquet"))
            total[d.indices] += score(d, sel)
        return total / sel.seeds

    return ctx.cached(f"dynamics-scores:{inputs['dynamics'].sha256}", compute)


def kept_by_dynamics(ctx: Context, pool: np.ndarray, n: int, inputs) -> tuple[np.ndarray, np.ndarray]:
    """The ``n`` images of ``pool`` at the ``selection.keep`` end of the dynamics score, and their scores."""
    scores = dynamics_scores(ctx, inputs)[pool]
    order = top_k(scores, n, largest=ctx.cfg.method.selection.keep == "largest")
    return pool[order], scores[order]


def select_class(ctx: Context, c: int, inputs) -> tuple[np.ndarray, np.ndarray | None]:
    """The ``ipc`` training images of class ``c`` the selection keeps (split positions, in order) and their
    scores (none for random and the feature orders)."""
    cfg, split = ctx.cfg, ctx.source.train
    score, ipc = METHODS[cfg.method.name].variant.score, cfg.method.ipc
    pool = split.class_indices(c)
    if len(pool) < ipc:
        raise DataError(f"class {c} has {len(pool)} training images, fewer than method.ipc={ipc}")
    if score == "random":
        return random_picks(cfg.seed, ipc, split, c), None
    if score in FEATURE_SCORES:
        mean, std = cfg.normalization
        feats = penultimate_features(teacher_of(ctx, inputs).model, split, pool, mean, std, ctx.device, cfg.runtime)
        return pool[FEATURE_SCORES[score](feats, ipc)], None
    return kept_by_dynamics(ctx, pool, ipc, inputs)


def run_selection(ctx: Context, shard: Shard, inputs) -> list[FileRecord]:
    """A coreset selection for a class group: the kept real images, stored as the distilled set."""
    cfg, split = ctx.cfg, ctx.source.train
    files = []
    for k, c in enumerate(shard.classes):
        picks, scores = select_class(ctx, c, inputs)
        files += write_real_images(ctx.store, split, cfg.image_size, "distilled", c, picks, scores, cfg.runtime)
        progress.emit("step", "synthesis", shard.id, k + 1, len(shard.classes))
    return files


SELECTION = Stage("synthesis", ("dataset", "teacher"), ("dataset", "method"), class_groups, run_selection,
                  doc="keep ipc real images per class by the selection method")
DYNAMICS_SELECTION = Stage("synthesis", ("dataset", "teacher", "dynamics"), ("dataset", "method"), class_groups,
                           run_selection, doc="keep ipc real images per class by their training-dynamics score")
