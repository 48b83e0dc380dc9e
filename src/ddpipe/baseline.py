"""The ``random_subset`` stage: the baselines every distilled set is compared with. Each of the
``evaluation.baseline_draws`` draws is ``ipc`` real images per class drawn at random, stored as the set
``random`` (draw 0), ``random-1``, ``random-2``, ... (``<set>/images/...png``, ``<set>/provenance/class=CCCCC.parquet``,
:mod:`ddpipe.imageset`). The ``random`` selection method keeps draw 0's images (:func:`random_picks`).
"""

from __future__ import annotations

import numpy as np
import torch

from ddpipe.augment import generator
from ddpipe.data import Split
from ddpipe.imageset import random_sets, write_real_images
from ddpipe.pipeline import Context, Shard, Stage, class_groups
from ddpipe.store import FileRecord


def random_picks(seed: int, ipc: int, split: Split, c: int, draw: int = 0) -> np.ndarray:
    """Random subset ``draw``'s ``ipc`` training images of class ``c`` (split positions); draw 0 is also what the
    ``random`` selection method keeps."""
    pool = split.class_indices(c)
    stream = ("random", c) if draw == 0 else ("random", c, f"draw{draw}")
    return pool[torch.randperm(len(pool), generator=generator(seed, *stream))[:ipc].numpy()]


def run_random_subset(ctx: Context, shard: Shard, inputs) -> list[FileRecord]:
    """The baselines: ``evaluation.baseline_draws`` independent subsets of ``ipc`` real images per class drawn at
    random, each stored like a distilled set (``random``, ``random-1``, ...)."""
    cfg, split = ctx.cfg, ctx.source.train
    files = []
    for draw, set_name in enumerate(random_sets(cfg)):
        for c in shard.classes:
            picks = random_picks(cfg.seed, cfg.method.ipc, split, c, draw)
            files += write_real_images(ctx.store, split, cfg.image_size, set_name, c, picks, runtime=cfg.runtime)
    return files


RANDOM_SUBSET = Stage("random_subset", ("dataset",), ("dataset", "method"), class_groups, run_random_subset,
                      fingerprint=lambda ctx: f"draws={ctx.cfg.evaluation.baseline_draws}",
                      doc="draw the random-subset baselines (evaluation.baseline_draws of them)")
