"""RDED (Sun et al., CVPR'24, Algorithm 1): per-class patch scoring and stitching.

Stage 1, :func:`score_class`: draw ``candidates_per_class`` images of the class at random (|T'_c|), cut
``crops_per_image`` square random-resized crops (K) from each at native resolution, resize each to the
patch size (image_size / factor), and score it with the teacher: realism score = -CE(teacher(crop), class).
A patch smaller than the input is zero-padded (in normalised space) to the input size before scoring, as
in the reference code, or upsampled to it (``method.patch_view``). Each image keeps its best crop; images are ranked by that score and the top
``factor^2 x ipc`` are selected.

Stage 2, :func:`stitch_class`: distilled image j of a class holds, in grid cell k (row-major), the
selected patch of rank ``k * ipc + j``, cropped from its source image straight to the cell size.

The functions read the ``method`` section, the run's ``factor`` (patches per side) and its input format. The
stages: ``scoring`` (``scoring/class=CCCCC.parquet``, :data:`SCORES_SCHEMA`, per class group) and ``synthesis``
(the stitched images and their per-region provenance, :mod:`ddpipe.imageset`). CA2D runs :func:`run_scoring` on
the candidate pool its selection chooses (:mod:`ddpipe.methods.selection`).
"""

from __future__ import annotations

from typing import Callable, Iterator

import numpy as np
import pyarrow as pa
import torch
import torch.nn.functional as F

from ddpipe import progress
from ddpipe.augment import box_draws, boxes_from_draws, generator
from ddpipe.config import InputFormat, MethodConfig, RuntimeConfig
from ddpipe.data import Split, loader, normalize
from ddpipe.errors import DataError
from ddpipe.imageset import cell_boxes, write_class
from ddpipe.pipeline import Context, Shard, Stage, class_groups
from ddpipe.store import FileRecord
from ddpipe.teacher import Teacher, teacher_of
from ddpipe.train import autocast, batch_to

SCORES_SCHEMA = pa.schema(
    [
        pa.field("class_index", pa.int32(), nullable=False),
        pa.field("candidate", pa.int32(), nullable=False),  # position in the random pre-selection
        pa.field("source_index", pa.int64(), nullable=False),  # index in the train split
        pa.field("source_id", pa.string(), nullable=False),  # train/<i> or <class>/<file>
        pa.field("crop", pa.int16(), nullable=False),  # which of the K crops won
        pa.field("top", pa.int32(), nullable=False),  # crop box in native pixels
        pa.field("left", pa.int32(), nullable=False),
        pa.field("height", pa.int32(), nullable=False),
        pa.field("width", pa.int32(), nullable=False),
        pa.field("loss", pa.float32(), nullable=False),  # teacher cross-entropy on the class
        pa.field("score", pa.float32(), nullable=False),  # realism score = -loss
        pa.field("rank", pa.int32(), nullable=False),  # 0 = most realistic
        pa.field("selected", pa.bool_(), nullable=False),  # rank < factor^2 * ipc
    ]
)


def cut(split: Split, source_indices, boxes: torch.Tensor, size, runtime: RuntimeConfig | None = None) -> torch.Tensor:
    """uint8 crops: box k cut from training image ``source_indices[k]``, resized to ``size`` (decoded through the
    loader, at reduced size where the box allows it)."""
    items = list(range(len(boxes)))
    crops = [c for batch in loader(items, lambda k: split.crops(int(source_indices[k]), lambda h, w: boxes[k : k + 1],
                                                                size)[1], 16, runtime) for c in batch]
    return torch.cat(crops)


def scoring_inputs(patches: torch.Tensor, patch_view: str, fmt: InputFormat,
                   out: torch.Tensor | None = None) -> torch.Tensor:
    """Normalised teacher inputs for uint8 patches smaller than the input: zero-padded and centred
    (``method.patch_view: pad``, the reference code) or upsampled (``resize``) to the input size. ``out``, a
    float buffer [>= B, C, size, size] with a zero border, receives the padded view in place (no new allocation:
    a batch of 224 px float inputs is tens of MB)."""
    mean, std, size = fmt.mean, fmt.std, fmt.size
    if patches.shape[-1] == size:
        return normalize(patches, mean, std)
    if patch_view == "resize":
        return normalize(F.interpolate(patches.float(), size=(size, size), mode="bilinear", align_corners=False) / 255.0,
                         mean, std)
    p = patches.shape[-1]
    o = (size - p) // 2
    if out is None:
        return F.pad(normalize(patches, mean, std), (o, size - p - o, o, size - p - o))
    view = out[: len(patches)]
    view[:, :, o : o + p, o : o + p] = normalize(patches, mean, std)
    return view


@torch.no_grad()
def crop_losses(teacher: Teacher, patches: torch.Tensor, target: int, m: MethodConfig, fmt: InputFormat, device,
                runtime: RuntimeConfig, buffer: torch.Tensor | None = None) -> torch.Tensor:
    """Teacher cross-entropy against class ``target`` (float32, CPU) of the scoring view
    (:func:`scoring_inputs`) of each uint8 patch, in batches of ``method.batch_size``. The views are made where
    the teacher runs (on a GPU, only the uint8 patches cross the bus); on the CPU in ``buffer`` when given
    (:func:`scoring_buffer`)."""
    out = []
    bs = m.batch_size
    for s in range(0, len(patches), bs):
        x = patches[s : s + bs]
        if torch.device(device).type == "cpu":
            x = scoring_inputs(x, m.patch_view, fmt, buffer)
        else:
            x = scoring_inputs(x.to(device, non_blocking=True), m.patch_view, fmt)
        x = batch_to(x, device, runtime)
        with autocast(device, runtime):
            logits = teacher.model(x).float()
        y = torch.full((len(x),), target, device=logits.device)
        out.append(F.cross_entropy(logits, y, reduction="none").cpu())
    return torch.cat(out) if out else torch.empty(0)


def scoring_buffer(m: MethodConfig, fmt: InputFormat, channels: int, patch: int, device) -> torch.Tensor | None:
    """The reusable CPU buffer of :func:`crop_losses` for padded views of ``patch`` px patches (None where
    there is nothing to pad, or the teacher is not on the CPU)."""
    if torch.device(device).type != "cpu" or m.patch_view != "pad" or patch == fmt.size:
        return None
    return torch.zeros(m.batch_size, channels, fmt.size, fmt.size)


def draw_candidates(split: Split, c: int, m: MethodConfig, factor: int, gen: torch.Generator,
                    candidates: np.ndarray | None = None):
    """The random pre-selection T'_c of class ``c`` (or the given ``candidates``, CA2D's pool) and the random draws
    of K crop boxes per candidate (:func:`~ddpipe.augment.box_draws`, rows grouped by candidate), which become
    boxes once each image's size is known (:func:`candidate_crops`).

    Returns (candidate split indices [n], draws for n * K boxes)."""
    pool = split.class_indices(c)
    need = factor**2 * m.ipc
    if len(pool) < need:
        raise DataError(
            f"class {c} has {len(pool)} training images, fewer than factor^2 x ipc = {need} (method.ipc={m.ipc})"
        )
    if candidates is None:
        candidates = pool[torch.randperm(len(pool), generator=gen)[: m.candidates_per_class].numpy()]
    return candidates, box_draws(len(candidates) * m.crops_per_image, gen, scale=m.crop_scale, ratio=(1.0, 1.0))


def candidate_crops(split: Split, i: int, draws, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The K crop boxes of training image ``i`` (``draws``: its K rows) and the crops resized to ``size``."""
    return split.crops(i, lambda h, w: boxes_from_draws(draws, h, w, ratio=(1.0, 1.0)), size)


def score_classes(teacher: Teacher, split: Split, plans: list[tuple[int, np.ndarray, tuple]], m: MethodConfig,
                  factor: int, fmt: InputFormat, runtime: RuntimeConfig, device) -> Iterator[pa.Table]:
    """RDED stage 1 for classes ``plans`` ((class, candidates, draws) from :func:`draw_candidates`): each class's
    table of one row per candidate (its best crop), ranked by realism score, in order.

    The candidates of all the classes go through one loader (:func:`ddpipe.data.loader`): its workers read,
    decode and crop the next candidates while the teacher runs on the current ones, in batches of
    ``method.batch_size`` crops per class."""
    k, bs = m.crops_per_image, m.batch_size

    def work(item):
        ci, j = item
        draws = tuple(d[j * k : (j + 1) * k] for d in plans[ci][2])
        return (ci, *candidate_crops(split, int(plans[ci][1][j]), draws, fmt.size // factor))

    items = [(ci, j) for ci, (_, candidates, _) in enumerate(plans) for j in range(len(candidates))]
    current, boxes, queue, losses = 0, [], [], []
    buffer = scoring_buffer(m, fmt, split.channels, fmt.size // factor, device)

    def forward(everything: bool):
        x = torch.cat(queue) if queue else torch.empty(0)
        n = len(x) if everything else len(x) // bs * bs
        if n:
            losses.append(crop_losses(teacher, x[:n], plans[current][0], m, fmt, device, runtime, buffer))
        queue[:] = [x[n:]] if n < len(x) else []

    def finish():
        forward(True)
        c, candidates, _ = plans[current]
        table = _ranked(split, c, candidates, torch.cat(boxes), torch.cat(losses).view(len(candidates), k), m, factor)
        boxes.clear(), losses.clear()
        return table

    for batch in loader(items, work, max(1, bs // k), runtime):
        for ci, b, crops in batch:
            if ci != current:
                yield finish()
                current = ci
            boxes.append(b)
            queue.append(crops)
            if sum(len(q) for q in queue) >= bs:
                forward(False)
    if plans:
        yield finish()


def score_class(teacher: Teacher, split: Split, c: int, m: MethodConfig, factor: int, fmt: InputFormat,
                runtime: RuntimeConfig, gen: torch.Generator, device, candidates: np.ndarray | None = None) -> pa.Table:
    """RDED stage 1 for class ``c`` alone (:func:`score_classes`). ``candidates`` replaces the random
    pre-selection (CA2D)."""
    plan = (c, *draw_candidates(split, c, m, factor, gen, candidates))
    return next(score_classes(teacher, split, [plan], m, factor, fmt, runtime, device))


def _ranked(split: Split, c: int, candidates: np.ndarray, boxes: torch.Tensor, losses: torch.Tensor,
            m: MethodConfig, factor: int) -> pa.Table:
    n, k = losses.shape
    best_loss, best_crop = losses.min(dim=1)
    rank_order = np.lexsort((np.arange(n), best_loss.numpy()))  # ascending loss, ties by candidate position
    rank = np.empty(n, dtype=np.int32)
    rank[rank_order] = np.arange(n, dtype=np.int32)
    best_boxes = boxes.view(n, k, 4)[torch.arange(n), best_crop]
    cols = {
        "class_index": np.full(n, c, dtype=np.int32),
        "candidate": np.arange(n, dtype=np.int32),
        "source_index": np.asarray(candidates).astype(np.int64),
        "source_id": [split.source_id(int(i)) for i in candidates],
        "crop": best_crop.numpy().astype(np.int16),
        "top": best_boxes[:, 0].numpy().astype(np.int32),
        "left": best_boxes[:, 1].numpy().astype(np.int32),
        "height": best_boxes[:, 2].numpy().astype(np.int32),
        "width": best_boxes[:, 3].numpy().astype(np.int32),
        "loss": best_loss.numpy().astype(np.float32),
        "score": (-best_loss).numpy().astype(np.float32),
        "rank": rank,
        "selected": rank < factor**2 * m.ipc,
    }
    return pa.table(cols, schema=SCORES_SCHEMA).take(pa.array(rank_order))


def selected_rows(scores: pa.Table, patches: int) -> list[dict]:
    """The selected rows of a class's score table, by rank; checks that there are ``patches`` (factor^2 x ipc)."""
    rows = sorted((r for r in scores.to_pylist() if r["selected"]), key=lambda r: r["rank"])
    if len(rows) != patches:
        raise DataError(f"score table has {len(rows)} selected patches, expected {patches}")
    return rows


def stitch_class(split: Split, rows: list[dict], ipc: int, factor: int, fmt: InputFormat,
                 runtime: RuntimeConfig | None = None, span: tuple[int, int] | None = None
                 ) -> tuple[torch.Tensor, list[dict]]:
    """RDED stage 2: uint8 images [ipc, C, S, S] of one class and their per-region provenance (every patch of
    the class cut through one loader). ``span`` (j0, j1): only the images of IPC indices j0..j1-1, [j1 - j0, ...]
    (their provenance keeps the class's IPC index)."""
    j0, j1 = span or (0, ipc)
    size = fmt.size
    cells = cell_boxes(size, factor)
    images = torch.zeros(j1 - j0, fmt.channels, size, size, dtype=torch.uint8)
    kept = [(cell_index, cell, j, rows[cell_index * ipc + j]) for cell_index, cell in enumerate(cells)
            for j in range(j0, j1)]
    jobs = [(r["source_index"], torch.tensor([[r["top"], r["left"], r["height"], r["width"]]]), cell[2:])
            for _, cell, _, r in kept]
    patches = [p for batch in loader(jobs, lambda job: split.crops(int(job[0]), lambda h, w: job[1], job[2])[1],
                                     16, runtime) for p in batch]
    provenance = []
    for (cell_index, (top, left, h, w), j, r), patch in zip(kept, patches):
        images[j - j0, :, top : top + h, left : left + w] = patch[0]
        provenance.append({"ipc_index": j, "region": cell_index + 1 if factor > 1 else 0, "cell": (top, left, h, w), **r})
    provenance.sort(key=lambda p: (p["ipc_index"], p["region"]))
    return images, provenance


# ---------------------------------------------------------------- stages


def run_scoring(ctx: Context, shard: Shard, inputs,
                candidates: Callable[[int], np.ndarray] | None = None) -> list[FileRecord]:
    """RDED stage 1 for a class group: ``scoring/class=C.parquet`` per class. ``candidates(c)`` gives class
    ``c``'s candidate pool instead of the random pre-selection (CA2D)."""
    cfg = ctx.cfg
    teacher = teacher_of(ctx, inputs)
    split = ctx.source.train
    plans = [(c, *draw_candidates(split, c, cfg.method, cfg.factor, generator(cfg.seed, "scoring", c),
                                  candidates(c) if candidates else None)) for c in shard.classes]
    files = []
    tables = score_classes(teacher, split, plans, cfg.method, cfg.factor, cfg.input_format, cfg.runtime, ctx.device)
    for k, (c, table) in enumerate(zip(shard.classes, tables)):
        files.append(ctx.store.write_table(f"scoring/class={c:05d}.parquet", table))
        progress.emit("step", "scoring", shard.id, k + 1, len(shard.classes))
    return files


def run_synthesis(ctx: Context, shard: Shard, inputs) -> list[FileRecord]:
    """RDED stage 2 for a class group: the stitched images and their provenance."""
    cfg = ctx.cfg
    files = []
    for c in shard.classes:
        rows = selected_rows(ctx.store.read_table(f"scoring/class={c:05d}.parquet"), cfg.patches_per_class)
        images, provenance = stitch_class(ctx.source.train, rows, cfg.method.ipc, cfg.factor, cfg.input_format,
                                          cfg.runtime)
        files += write_class(ctx.store, "distilled", c, images, provenance)
    return files


SCORING = Stage("scoring", ("dataset", "teacher"), ("dataset", "method"), class_groups, run_scoring,
                doc="RDED stage 1: score crops, select the top factor^2 x ipc per class")
SYNTHESIS = Stage("synthesis", ("dataset", "scoring"), ("dataset", "method"), class_groups, run_synthesis,
                  doc="RDED stage 2: stitch the selected patches into images")


def stages(method, cfg=None) -> tuple[Stage, ...]:
    return (SCORING, SYNTHESIS)
