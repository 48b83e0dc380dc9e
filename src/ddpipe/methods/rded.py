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

from typing import Callable

import numpy as np
import pyarrow as pa
import torch
import torch.nn.functional as F

from ddpipe import progress
from ddpipe.augment import crop_resize, generator, quantize, sample_boxes
from ddpipe.config import InputFormat, MethodConfig, RuntimeConfig
from ddpipe.data import Split, normalize
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


def cut(split: Split, source_indices, boxes: torch.Tensor, size) -> torch.Tensor:
    """uint8 crops of ``boxes`` (one per source image index, repeated indices allowed), resized to ``size``."""
    unique, inverse = np.unique(np.asarray(source_indices), return_inverse=True)
    return cut_images([split.image(int(i)) for i in unique], torch.as_tensor(inverse), boxes, size)


def cut_images(images: list[torch.Tensor], image_index: torch.Tensor, boxes: torch.Tensor, size) -> torch.Tensor:
    """uint8 crops: box k cut from ``images[image_index[k]]`` (uint8 [C, H, W], any sizes), resized to ``size``."""
    if all(im.shape == images[0].shape for im in images):
        return quantize(crop_resize(torch.stack(images).float(), boxes, size, image_index))
    out = [quantize(crop_resize(images[int(j)][None].float(), boxes[k : k + 1], size)) for k, j in enumerate(image_index)]
    return torch.cat(out)


def scoring_inputs(patches: torch.Tensor, patch_view: str, fmt: InputFormat) -> torch.Tensor:
    """Normalised teacher inputs for uint8 patches smaller than the input: zero-padded and centred
    (``method.patch_view: pad``, the reference code) or upsampled (``resize``) to the input size."""
    mean, std, size = fmt.mean, fmt.std, fmt.size
    if patches.shape[-1] == size:
        return normalize(patches, mean, std)
    if patch_view == "resize":
        return normalize(F.interpolate(patches.float(), size=(size, size), mode="bilinear", align_corners=False) / 255.0,
                         mean, std)
    x = normalize(patches, mean, std)
    pad = size - x.shape[-1]
    return F.pad(x, (pad // 2, pad - pad // 2, pad // 2, pad - pad // 2))


@torch.no_grad()
def crop_losses(teacher: Teacher, inputs: torch.Tensor, target: int, batch_size: int, device,
                runtime: RuntimeConfig) -> torch.Tensor:
    """Teacher cross-entropy of each input against class ``target`` (float32, CPU)."""
    out = []
    bs = batch_size
    for s in range(0, len(inputs), bs):
        x = batch_to(inputs[s : s + bs], device, runtime)
        with autocast(device, runtime):
            logits = teacher.model(x).float()
        y = torch.full((len(x),), target, device=logits.device)
        out.append(F.cross_entropy(logits, y, reduction="none").cpu())
    return torch.cat(out)


def draw_candidates(split: Split, c: int, m: MethodConfig, factor: int, gen: torch.Generator,
                    candidates: np.ndarray | None = None):
    """The random pre-selection T'_c of class ``c`` (or the given ``candidates``, CA2D's pool) and K crop boxes
    per candidate.

    Returns (candidate split indices [n], their uint8 images, int64 boxes [n * K, 4] grouped by candidate).
    """
    pool = split.class_indices(c)
    need = factor**2 * m.ipc
    if len(pool) < need:
        raise DataError(
            f"class {c} has {len(pool)} training images, fewer than factor^2 x ipc = {need} (method.ipc={m.ipc})"
        )
    if candidates is None:
        candidates = pool[torch.randperm(len(pool), generator=gen)[: m.candidates_per_class].numpy()]
    images = [split.image(int(i)) for i in candidates]
    k = m.crops_per_image
    # One draw per image size (a single one for fixed-size data), in order of first appearance: per-image draws
    # cost as much as the teacher's forward pass on small images.
    boxes = torch.empty(len(images) * k, 4, dtype=torch.int64)
    by_shape: dict[tuple[int, int], list[int]] = {}
    for i, im in enumerate(images):
        by_shape.setdefault(tuple(im.shape[1:]), []).append(i)
    for (h, w), members in by_shape.items():
        rows = (torch.tensor(members)[:, None] * k + torch.arange(k)).flatten()
        boxes[rows] = sample_boxes(len(rows), h, w, gen, scale=m.crop_scale, ratio=(1.0, 1.0))
    return candidates, images, boxes


def score_class(teacher: Teacher, split: Split, c: int, m: MethodConfig, factor: int, fmt: InputFormat,
                runtime: RuntimeConfig, gen: torch.Generator, device, candidates: np.ndarray | None = None) -> pa.Table:
    """RDED stage 1 for class ``c``: one row per candidate image (its best crop), ranked by realism score.
    ``candidates`` replaces the random pre-selection (CA2D)."""
    candidates, images, boxes = draw_candidates(split, c, m, factor, gen, candidates)
    n, k = len(candidates), m.crops_per_image
    patches = cut_images(images, torch.arange(n).repeat_interleave(k), boxes, fmt.size // factor)
    inputs = scoring_inputs(patches, m.patch_view, fmt)
    losses = crop_losses(teacher, inputs, c, m.batch_size, device, runtime).view(n, k)
    best_loss, best_crop = losses.min(dim=1)
    rank_order = np.lexsort((np.arange(n), best_loss.numpy()))  # ascending loss, ties by candidate position
    rank = np.empty(n, dtype=np.int32)
    rank[rank_order] = np.arange(n, dtype=np.int32)
    best_boxes = boxes.view(n, k, 4)[torch.arange(n), best_crop]
    cols = {
        "class_index": np.full(n, c, dtype=np.int32),
        "candidate": np.arange(n, dtype=np.int32),
        "source_index": candidates.astype(np.int64),
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


def stitch_class(split: Split, rows: list[dict], ipc: int, factor: int,
                 fmt: InputFormat) -> tuple[torch.Tensor, list[dict]]:
    """RDED stage 2: uint8 images [ipc, C, S, S] of one class and their per-region provenance."""
    size = fmt.size
    cells = cell_boxes(size, factor)
    images = torch.zeros(ipc, fmt.channels, size, size, dtype=torch.uint8)
    provenance = []
    for cell_index, (top, left, h, w) in enumerate(cells):
        group = rows[cell_index * ipc : (cell_index + 1) * ipc]
        boxes = torch.tensor([[r["top"], r["left"], r["height"], r["width"]] for r in group])
        patches = cut(split, [r["source_index"] for r in group], boxes, (h, w))
        images[:, :, top : top + h, left : left + w] = patches
        for j, r in enumerate(group):
            provenance.append(
                {"ipc_index": j, "region": cell_index + 1 if factor > 1 else 0, "cell": (top, left, h, w), **r}
            )
    provenance.sort(key=lambda p: (p["ipc_index"], p["region"]))
    return images, provenance


# ---------------------------------------------------------------- stages


def run_scoring(ctx: Context, shard: Shard, inputs,
                candidates: Callable[[int], np.ndarray] | None = None) -> list[FileRecord]:
    """RDED stage 1 for a class group: ``scoring/class=C.parquet`` per class. ``candidates(c)`` gives class
    ``c``'s candidate pool instead of the random pre-selection (CA2D)."""
    cfg = ctx.cfg
    teacher = teacher_of(ctx, inputs)
    files = []
    for k, c in enumerate(shard.classes):
        table = score_class(teacher, ctx.source.train, c, cfg.method, cfg.factor, cfg.input_format, cfg.runtime,
                            generator(cfg.seed, "scoring", c), ctx.device,
                            candidates=candidates(c) if candidates else None)
        files.append(ctx.store.write_table(f"scoring/class={c:05d}.parquet", table))
        progress.emit("step", "scoring", shard.id, k + 1, len(shard.classes))
    return files


def run_synthesis(ctx: Context, shard: Shard, inputs) -> list[FileRecord]:
    """RDED stage 2 for a class group: the stitched images and their provenance."""
    cfg = ctx.cfg
    files = []
    for c in shard.classes:
        rows = selected_rows(ctx.store.read_table(f"scoring/class={c:05d}.parquet"), cfg.patches_per_class)
        images, provenance = stitch_class(ctx.source.train, rows, cfg.method.ipc, cfg.factor, cfg.input_format)
        files += write_class(ctx.store, "distilled", c, images, provenance)
    return files


SCORING = Stage("scoring", ("dataset", "teacher"), ("dataset", "method"), class_groups, run_scoring,
                doc="RDED stage 1: score crops, select the top factor^2 x ipc per class")
SYNTHESIS = Stage("synthesis", ("dataset", "scoring"), ("dataset", "method"), class_groups, run_synthesis,
                  doc="RDED stage 2: stitch the selected patches into images")


def stages(method) -> tuple[Stage, ...]:
    return (SCORING, SYNTHESIS)
