"""Soft labels: the teacher's softened output for every region of a distilled image, stored compactly; the
``labels`` stage, which labels both sets (``{distilled,random}/labels/class=CCCCC.parquet``).

For factor 1 an image has one region (region 0, the whole image). For factor f > 1 it has the whole
image (region 0) and its f^2 stitched cells (regions 1..f^2, each resized to the input size before the
teacher sees it), the region-level labels of RDED. A label is ``softmax(teacher(view) / T)``.

With ``labels.crops`` each image also gets that many labelled random-resized crops (rows with region
numbers after the regions', their boxes in the top/left/height/width columns), and with ``labels.keep`` < 1
only that share of an image's rows is stored (LPLD's random label pruning, at least one row per image):
:func:`label_rows` reads such a table back per image.

Storage (Parquet, :data:`labels_schema`): probabilities as float16 or float32; with ``top_k`` only the k
largest probabilities and their class indices are kept, and :func:`expand` spreads the remaining mass
evenly over the other classes when reading.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import torch
import torch.nn.functional as F

from ddpipe.augment import crop_resize, generator, sample_boxes
from ddpipe.config import LabelsConfig, RuntimeConfig
from ddpipe.data import normalize
from ddpipe.dataset import dataset_classes
from ddpipe.imageset import read_class, run_sets, regions, set_factor
from ddpipe.pipeline import Context, Shard, Stage, class_groups
from ddpipe.store import FileRecord
from ddpipe.teacher import label_model
from ddpipe.train import predict_logits


def labels_schema(num_classes: int, cfg: LabelsConfig) -> pa.Schema:
    width = cfg.top_k if cfg.top_k and cfg.top_k < num_classes else num_classes
    value = pa.float16() if cfg.dtype == "float16" else pa.float32()
    fields = [
        pa.field("image", pa.string(), nullable=False),  # image path, relative to the run folder
        pa.field("class_index", pa.int32(), nullable=False),  # the image's class
        pa.field("region", pa.int16(), nullable=False),  # 0 = whole image, 1..f^2 = grid cells (row-major)
        pa.field("top", pa.int16(), nullable=False),  # region box in the image
        pa.field("left", pa.int16(), nullable=False),
        pa.field("height", pa.int16(), nullable=False),
        pa.field("width", pa.int16(), nullable=False),
    ]
    if width < num_classes:  # top-k class indices
        fields.append(pa.field("classes", pa.list_(_index_type(num_classes), width), nullable=False))
    fields.append(pa.field("probs", pa.list_(value, width), nullable=False))
    return pa.schema(fields, metadata={"num_classes": str(num_classes)})


def _index_type(num_classes: int) -> pa.DataType:
    return pa.int16() if num_classes <= 32767 else pa.int32()


def region_views(images: torch.Tensor, factor: int) -> tuple[torch.Tensor, list[tuple[int, int, tuple]]]:
    """Every region of every uint8 image as a float [0, 255] view at full size, and (image, region, box) meta."""
    n, _, size, _ = images.shape
    boxes = regions(size, factor)
    if factor == 1:
        views = images.float()  # the whole image is the only view
    else:
        index = torch.arange(n).repeat_interleave(len(boxes))
        views = crop_resize(images.float(), torch.tensor(boxes * n), size, index)
    meta = [(i, r, boxes[r]) for i in range(n) for r in range(len(boxes))]
    return views, meta


def crop_views(images: torch.Tensor, first_region: int, cfg: LabelsConfig, seed: int, c: int, paths: list[str]
               ) -> tuple[torch.Tensor, list[tuple[int, int, tuple]]]:
    """``cfg.crops`` random-resized crops of every uint8 image of class ``c`` (boxes drawn from the seed, the
    class and the image's path), as float [0, 255] views at full size, numbered from ``first_region``."""
    n, _, size, _ = images.shape
    if not cfg.crops or not n:
        return images.new_zeros((0, *images.shape[1:]), dtype=torch.float32), []
    boxes = torch.cat([sample_boxes(cfg.crops, size, size, generator(seed, "label-crops", c, p), cfg.crop_scale)
                       for p in paths])
    views = crop_resize(images.float(), boxes, size, torch.arange(n).repeat_interleave(cfg.crops))
    meta = [(i, first_region + k, tuple(int(v) for v in boxes[i * cfg.crops + k])) for i in range(n)
            for k in range(cfg.crops)]
    return views, meta


def pruned(meta: list[tuple[int, int, tuple]], keep: float, gen: torch.Generator) -> list[int]:
    """LPLD's random label pruning: the rows of ``meta`` kept, each with probability ``keep``, at least one per
    image (a random one where the draw kept none)."""
    if keep >= 1:
        return list(range(len(meta)))
    draw = torch.rand(len(meta), generator=gen) < keep
    rows: dict[int, list[int]] = {}
    for k, (i, _, _) in enumerate(meta):
        rows.setdefault(i, []).append(k)
    kept = []
    for i, ks in rows.items():
        chosen = [k for k in ks if draw[k]]
        kept += chosen or [ks[int(torch.randint(len(ks), (1,), generator=gen))]]
    return sorted(kept)


def soft_labels(teacher_model, views: torch.Tensor, labels: LabelsConfig, mean, std, device,
                runtime: RuntimeConfig) -> torch.Tensor:
    """softmax(teacher(view) / T) for float [0, 255] views; float32 [V, K] on CPU."""
    logits = predict_logits(teacher_model, normalize(views / 255.0, mean, std), labels.batch_size, device, runtime)
    return F.softmax(logits / labels.temperature, dim=1)


def labels_table(image_paths: list[str], classes: list[int], meta, probs: torch.Tensor, num_classes: int,
                 cfg: LabelsConfig) -> pa.Table:
    schema = labels_schema(num_classes, cfg)
    width = schema.field("probs").type.list_size
    np_dtype = np.float16 if cfg.dtype == "float16" else np.float32
    cols = {
        "image": [image_paths[i] for i, _, _ in meta],
        "class_index": [classes[i] for i, _, _ in meta],
        "region": [r for _, r, _ in meta],
        "top": [b[0] for _, _, b in meta],
        "left": [b[1] for _, _, b in meta],
        "height": [b[2] for _, _, b in meta],
        "width": [b[3] for _, _, b in meta],
    }
    if width < num_classes:
        values, idx = probs.topk(width, dim=1)
        index = pa.array(idx.numpy().ravel(), type=_index_type(num_classes))
        cols["classes"] = pa.FixedSizeListArray.from_arrays(index, width)
        probs = values
    flat = pa.array(probs.numpy().astype(np_dtype).ravel())
    cols["probs"] = pa.FixedSizeListArray.from_arrays(flat, width)
    return pa.table(cols, schema=schema)


def expand(table: pa.Table) -> torch.Tensor:
    """Dense float32 probabilities [rows, K] from a labels table (top-k rest spread evenly)."""
    num_classes = int(table.schema.metadata[b"num_classes"])
    width = table.schema.field("probs").type.list_size
    probs = _fixed_list(table["probs"], width).astype(np.float32)
    if "classes" not in table.column_names:
        return torch.from_numpy(probs)
    idx = _fixed_list(table["classes"], width).astype(np.int64)
    rest = np.clip(1.0 - probs.sum(1, keepdims=True), 0.0, None) / max(1, num_classes - width)
    dense = np.repeat(rest, num_classes, axis=1)
    np.put_along_axis(dense, idx, probs, axis=1)
    return torch.from_numpy(dense)


def label_rows(table: pa.Table, paths: list[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A labels table read back per image (``paths``, in the set's order): dense probabilities [N, R, K], the
    boxes [N, R, 4] (top, left, h, w), a mask [N, R] of the rows present and each row's region number [N, R]
    (numbers past the image's regions are crop labels), R the most rows any image has."""
    probs = expand(table)
    images = table["image"].to_pylist()
    position = {p: i for i, p in enumerate(paths)}
    rows: list[list[int]] = [[] for _ in paths]
    for k, p in enumerate(images):
        rows[position[p]].append(k)
    width = max((len(r) for r in rows), default=0)
    soft = torch.zeros(len(paths), width, probs.shape[1])
    boxes = torch.zeros(len(paths), width, 4, dtype=torch.int64)
    present = torch.zeros(len(paths), width, dtype=torch.bool)
    region = torch.zeros(len(paths), width, dtype=torch.int64)
    box = torch.tensor([table[c].to_pylist() for c in ("top", "left", "height", "width")], dtype=torch.int64).T
    numbers = torch.tensor(table["region"].to_pylist(), dtype=torch.int64)
    for i, ks in enumerate(rows):
        soft[i, : len(ks)], boxes[i, : len(ks)], present[i, : len(ks)] = probs[ks], box[ks], True
        region[i, : len(ks)] = numbers[ks]
    return soft, boxes, present, region


def _fixed_list(column: pa.ChunkedArray, width: int) -> np.ndarray:
    flat = column.combine_chunks().flatten().to_numpy(zero_copy_only=False)
    return flat.reshape(-1, width)


# ---------------------------------------------------------------- the labels stage


def run_labels(ctx: Context, shard: Shard, inputs) -> list[FileRecord]:
    """Soft labels for every region of every image of one set's class group."""
    cfg = ctx.cfg
    model = label_model(ctx, inputs)
    factor = set_factor(cfg.factor, shard.set)
    num_classes = len(dataset_classes(ctx.store, inputs["dataset"]))
    mean, std = cfg.normalization
    files = []
    for c in shard.classes:
        paths, images = read_class(ctx.store, shard.set, c, cfg.channels)
        views, meta = region_views(images, factor)
        extra, extra_meta = crop_views(images, len(regions(cfg.image_size, factor)), cfg.labels, cfg.seed, c, paths)
        keep = pruned(meta + extra_meta, cfg.labels.keep, generator(cfg.seed, "label-keep", shard.set, c))
        views, meta = torch.cat([views, extra])[keep], [(meta + extra_meta)[k] for k in keep]
        probs = soft_labels(model, views, cfg.labels, mean, std, ctx.device, cfg.runtime)
        table = labels_table(paths, [c] * len(paths), meta, probs, num_classes, cfg.labels)
        files.append(ctx.store.write_table(f"{shard.set}/labels/class={c:05d}.parquet", table))
    return files


def _label_shards(ctx: Context, num_classes: int) -> list[Shard]:
    return [
        Shard(id=f"{s}-{g.id}", classes=g.classes, set=s) for s in run_sets(ctx.cfg) for g in class_groups(ctx, num_classes)
    ]


LABELS = Stage("labels", ("dataset", "teacher", "synthesis", "random_subset"), ("dataset", "method", "labels"),
               _label_shards, run_labels, doc="soft labels from the teacher for every region of both sets")
