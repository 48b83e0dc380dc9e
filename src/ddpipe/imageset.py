"""The image-set format: how the distilled set and the random subset are stored in a run folder.

A set (``distilled``, the random subsets ``random``, ``random-1``, ... of ``evaluation.baseline_draws``;
diffusion's pool ``generated`` too) holds, per class ``c``:

- ``<set>/images/CCCCC/classCCCCC_idJJJJJ.png``: image ``j`` of the class (uint8, the run's size and channels);
- ``<set>/provenance/class=CCCCC.parquet``: one row per image region (:data:`PROVENANCE_SCHEMA`): where the
  region sits in the image, which training image and crop box it came from, and its score;
- ``<set>/labels/class=CCCCC.parquet``: the soft labels of every region (:mod:`ddpipe.labels`).

An image has one region (region 0, the whole image) or, stitched with factor f > 1, the whole image and its f^2
grid cells (regions 1..f^2, row-major, :func:`cell_boxes`). Only the distilled set of a stitching method is
stitched (:func:`set_factor`).
"""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import torch
from PIL import Image

from ddpipe.data import Split, loader
from ddpipe.store import FileRecord, Store


def run_sets(cfg) -> tuple[str, ...]:
    """The sets every run labels and evaluates: the distilled set, then each random subset."""
    return ("distilled", *random_sets(cfg))


def random_sets(cfg) -> tuple[str, ...]:
    """The random subsets of a run (``evaluation.baseline_draws`` of them): ``random``, ``random-1``, ..."""
    return tuple("random" if d == 0 else f"random-{d}" for d in range(cfg.evaluation.baseline_draws))


def side_of(set_name: str) -> str:
    """Which side of a comparison an evaluated set is on: distilled, random (every draw) or full."""
    return "random" if set_name == "random" or set_name.startswith("random-") else set_name


def draw_of(set_name: str) -> int:
    """Which random subset a set name is (0 for ``random``)."""
    return int(set_name.rsplit("-", 1)[1]) if set_name.startswith("random-") else 0


PROVENANCE_SCHEMA = pa.schema(
    [
        pa.field("image", pa.string(), nullable=False),  # PNG path, relative to the run folder
        pa.field("class_index", pa.int32(), nullable=False),
        pa.field("ipc_index", pa.int32(), nullable=False),  # j in 0..ipc-1
        pa.field("region", pa.int16(), nullable=False),  # 0 = whole image, 1..f^2 = grid cell (row-major)
        pa.field("cell_top", pa.int16(), nullable=False),  # where the patch sits in the image
        pa.field("cell_left", pa.int16(), nullable=False),
        pa.field("cell_height", pa.int16(), nullable=False),
        pa.field("cell_width", pa.int16(), nullable=False),
        pa.field("source_index", pa.int64(), nullable=False),  # train-split index of the source image
        pa.field("source_id", pa.string(), nullable=False),
        pa.field("crop_top", pa.int32(), nullable=False),  # crop box in the source image (native pixels)
        pa.field("crop_left", pa.int32(), nullable=False),
        pa.field("crop_height", pa.int32(), nullable=False),
        pa.field("crop_width", pa.int32(), nullable=False),
        pa.field("score", pa.float32()),  # realism score of the patch (null for random-subset images)
    ]
)


def image_path(set_name: str, c: int, j: int) -> str:
    return f"{set_name}/images/{c:05d}/class{c:05d}_id{j:05d}.png"


def set_factor(factor: int, set_name: str) -> int:
    """Patches per side of a set's images: the run's ``factor`` for the distilled set, 1 (whole images) otherwise."""
    return factor if set_name == "distilled" else 1


def cell_boxes(size: int, factor: int) -> list[tuple[int, int, int, int]]:
    """Grid cells ``(top, left, h, w)`` of a ``size`` square image, row-major."""
    edges = [round(i * size / factor) for i in range(factor + 1)]
    return [
        (edges[r], edges[c], edges[r + 1] - edges[r], edges[c + 1] - edges[c])
        for r in range(factor) for c in range(factor)
    ]


def regions(size: int, factor: int) -> list[tuple[int, int, int, int]]:
    """Region boxes of an image: the whole image, then the grid cells when factor > 1."""
    whole = [(0, 0, size, size)]
    return whole if factor == 1 else whole + cell_boxes(size, factor)


def png_bytes(image: torch.Tensor) -> bytes:
    arr = image.permute(1, 2, 0).numpy()
    buf = io.BytesIO()
    Image.fromarray(arr[:, :, 0] if arr.shape[2] == 1 else arr).save(buf, format="PNG")
    return buf.getvalue()


def png_decode(data: bytes, channels: int) -> torch.Tensor:
    with Image.open(io.BytesIO(data)) as im:
        arr = np.asarray(im.convert("L" if channels == 1 else "RGB"), dtype=np.uint8)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    return torch.from_numpy(arr.copy()).permute(2, 0, 1)


def image_grid(rows: list[torch.Tensor], pad: int = 2) -> torch.Tensor:
    """uint8 images [n_i, C, H, W] per row -> one uint8 [C, H', W'] grid (rows: classes)."""
    c, h, w = rows[0].shape[1:]
    cols = max(len(r) for r in rows)
    grid = torch.full((c, len(rows) * (h + pad) + pad, cols * (w + pad) + pad), 255, dtype=torch.uint8)
    for i, r in enumerate(rows):
        for j, img in enumerate(r):
            top, left = pad + i * (h + pad), pad + j * (w + pad)
            grid[:, top:top + h, left:left + w] = img
    return grid


def provenance_table(set_name: str, rows: list[dict]) -> pa.Table:
    """Provenance rows (one per image region; each names its ``class_index`` and ``ipc_index``) as a table."""
    return pa.table(
        {
            "image": [image_path(set_name, r["class_index"], r["ipc_index"]) for r in rows],
            "class_index": [r["class_index"] for r in rows],
            "ipc_index": [r["ipc_index"] for r in rows],
            "region": [r["region"] for r in rows],
            "cell_top": [r["cell"][0] for r in rows],
            "cell_left": [r["cell"][1] for r in rows],
            "cell_height": [r["cell"][2] for r in rows],
            "cell_width": [r["cell"][3] for r in rows],
            "source_index": [r["source_index"] for r in rows],
            "source_id": [r["source_id"] for r in rows],
            "crop_top": [r["top"] for r in rows],
            "crop_left": [r["left"] for r in rows],
            "crop_height": [r["height"] for r in rows],
            "crop_width": [r["width"] for r in rows],
            "score": [r.get("score") for r in rows],
        },
        schema=PROVENANCE_SCHEMA,
    )


def synthetic_row(c: int, j: int, size: int, source_id: str = "", crop: int = 0, score: float | None = None) -> dict:
    """Provenance row of whole synthetic image ``j`` of class ``c`` (no training image behind it: source_index -1).
    ``source_id`` and ``crop`` (the side of the crop box at 0, 0) name a generated image it was taken from."""
    return {"class_index": c, "ipc_index": j, "region": 0, "cell": (0, 0, size, size), "source_index": -1,
            "source_id": source_id, "top": 0, "left": 0, "height": crop, "width": crop, "score": score}


def write_class(store: Store, set_name: str, c: int, images: torch.Tensor, rows: list[dict]) -> list[FileRecord]:
    """Class ``c`` of a set: a PNG per image plus the class's provenance table (one row per image region)."""
    files = [store.write_bytes(image_path(set_name, c, j), png_bytes(img)) for j, img in enumerate(images)]
    table = provenance_table(set_name, [{**r, "class_index": c} for r in rows])
    files.append(store.write_table(f"{set_name}/provenance/class={c:05d}.parquet", table))
    return files


def write_real_images(store: Store, split: Split, size: int, set_name: str, c: int, picks,
                      scores=None, runtime=None) -> list[FileRecord]:
    """Whole training images ``picks`` (split positions) of class ``c``, centre-cropped and resized to ``size``,
    stored as class ``c`` of set ``set_name`` with their provenance (``scores``: the selection score of each)."""
    if size != split.image_size:
        raise ValueError(f"write_real_images: size {size} is not the split's image size {split.image_size}")
    loaded = [out for batch in loader(list(picks), split.load_sized, 16, runtime) for out in batch]
    images, rows = [], []
    for j, (i, ((h, w), image)) in enumerate(zip(picks, loaded)):
        side = min(h, w)
        images.append(image)
        rows.append({"ipc_index": j, "region": 0, "cell": (0, 0, size, size), "source_index": int(i),
                     "source_id": split.source_id(int(i)), "top": (h - side) // 2, "left": (w - side) // 2,
                     "height": side, "width": side, "score": None if scores is None else float(scores[j])})
    return write_class(store, set_name, c, torch.stack(images), rows)


def read_class(store: Store, set_name: str, c: int, channels: int) -> tuple[list[str], torch.Tensor]:
    """Class ``c`` of a set: its image paths (in ipc order) and the images, uint8 [n, C, H, W]."""
    prov = store.read_table(f"{set_name}/provenance/class={c:05d}.parquet")
    paths = list(dict.fromkeys(prov.column("image").to_pylist()))
    images = torch.stack([png_decode(store.read_bytes(p), channels) for p in paths])
    return paths, images
