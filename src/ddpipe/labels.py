"""Soft labels: the teacher's softened output for every region of a distilled image, stored compactly; the
``labels`` stage, which labels both sets (``{distilled,random}/labels/class=CCCCC.parquet``).

For factor 1 an image has one region (region 0, the whole image). For factor f > 1 it has the whole
image (region 0) and its f^2 stitched cells (regions 1..f^2, each resized to the input size before the
teacher sees it), the region-level labels of RDED. A label is ``softmax(teacher(view) / T)``.

Storage (Parquet, :data:`labels_schema`): probabilities as float16 or float32; with ``top_k`` only the k
largest probabilities and their class indices are kept, and :func:`expand` spreads the remaining mass
evenly over the other classes when reading.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import torch
import torch.nn.functional as F

from ddpipe.augment import crop_resize
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
