"""Distillation methods: each contributes the stages that make the distilled set.

A run is ``DATASET, TEACHER, <method stages>, RANDOM_SUBSET, LABELS, EVALUATION``; the method's last stage
is named ``synthesis`` and writes ``distilled/images/...png`` and ``distilled/provenance/class=C.parquet``
(:data:`ddpipe.stages.PROVENANCE_SCHEMA`). Adding a method means adding its stages here.
"""

from __future__ import annotations

from ddpipe import progress
from ddpipe.augment import generator
from ddpipe.config import RunConfig
from ddpipe.pipeline import Context, Shard, Stage
from ddpipe.rded import score_class, selected_rows, stitch_class
from ddpipe.stages import (
    DATASET, EVALUATION, LABELS, RANDOM_SUBSET, TEACHER, class_groups, teacher_of, write_image_set_class,
)
from ddpipe.store import FileRecord

# ---------------------------------------------------------------- RDED


def run_scoring(ctx: Context, shard: Shard, inputs) -> list[FileRecord]:
    """RDED stage 1 for a class group: ``scoring/class=C.parquet`` per class."""
    teacher = teacher_of(ctx, inputs)
    files = []
    for k, c in enumerate(shard.classes):
        table = score_class(teacher, ctx.source.train, c, ctx.cfg, generator(ctx.cfg.seed, "scoring", c), ctx.device)
        files.append(ctx.store.write_table(f"scoring/class={c:05d}.parquet", table))
        progress.emit("step", "scoring", shard.id, k + 1, len(shard.classes))
    return files


def run_synthesis(ctx: Context, shard: Shard, inputs) -> list[FileRecord]:
    """RDED stage 2 for a class group: the stitched images and their provenance."""
    files = []
    for c in shard.classes:
        rows = selected_rows(ctx.store.read_table(f"scoring/class={c:05d}.parquet"), ctx.cfg)
        images, provenance = stitch_class(ctx.source.train, rows, ctx.cfg)
        files += write_image_set_class(ctx.store, "distilled", c, images, provenance)
    return files


RDED = (
    Stage("scoring", ("dataset", "teacher"), ("dataset", "method"), class_groups, run_scoring,
          doc="RDED stage 1: score crops, select the top factor^2 x ipc per class"),
    Stage("synthesis", ("dataset", "scoring"), ("dataset", "method"), class_groups, run_synthesis,
          doc="RDED stage 2: stitch the selected patches into images"),
)

METHODS: dict[str, tuple[Stage, ...]] = {"rded": RDED}


def stages_for(cfg: RunConfig) -> list[Stage]:
    """The stages of a run, in order. The first stage always describes the dataset."""
    return [DATASET, TEACHER, *METHODS[cfg.method.name], RANDOM_SUBSET, LABELS, EVALUATION]
