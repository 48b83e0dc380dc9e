"""The ``random_subset`` stage: the baseline every distilled set is compared with, ``ipc`` real images per class
drawn at random, stored as the set ``random`` (``random/images/...png``, ``random/provenance/class=CCCCC.parquet``,
:mod:`ddpipe.imageset`). The ``random`` selection method keeps the same images (:func:`random_picks`).
"""

from __future__ import annotations

import numpy as np
import torch

from ddpipe.augment import generator
from ddpipe.data import Split
from ddpipe.imageset import write_real_images
from ddpipe.pipeline import Context, Shard, Stage, class_groups
from ddpipe.store import FileRecord


def random_picks(seed: int, ipc: int, split: Split, c: int) -> np.ndarray:
    """The random subset's ``ipc`` training images of class ``c`` (split positions)."""
    pool = split.class_indices(c)
    return pool[torch.randperm(len(pool), generator=generator(seed, "random", c))[:ipc].numpy()]


def run_random_subset(ctx: Context, shard: Shard, inputs) -> list[FileRecord]:
    """The baseline: ``ipc`` real images per class drawn at random, stored like a distilled set."""
    cfg, split = ctx.cfg, ctx.source.train
    files = []
    for c in shard.classes:
        picks = random_picks(cfg.seed, cfg.method.ipc, split, c)
        files += write_real_images(ctx.store, split, cfg.image_size, "random", c, picks, runtime=cfg.runtime)
    return files


RANDOM_SUBSET = Stage("random_subset", ("dataset",), ("dataset", "method"), class_groups, run_random_subset,
                      doc="draw the random-subset baseline")
