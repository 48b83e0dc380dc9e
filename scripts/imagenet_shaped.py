"""An ImageNet-shaped real data set made from Fashion-MNIST, for ddpipe's tests and benchmarks.

    python scripts/imagenet_shaped.py OUT [--classes 10] [--train-per-class 100] [--val-per-class 50] [--seed 0]
        [--shard-size 100] [--row-group-size 50] [--layouts image-folder,webdataset,parquet] [--workers N]

ImageNet itself cannot be downloaded on these machines, but ddpipe's ImageNet data layer must still be tested and
benchmarked on real images with ImageNet's geometry. This script renders real Fashion-MNIST images the way ImageNet
stores its photos: RGB JPEGs (quality 90, baseline) whose shorter side is 256-375 px with an aspect ratio of 1.0-1.5
(landscape 3 times in 4), tinted per image and given a mild texture noise so that the files weigh roughly 40-150 KB
(ImageNet's mean is about 110 KB). Train images are the first ``train_per_class`` of each class of the Fashion-MNIST
train split, val images the first ``val_per_class`` of each class of its test split; class ``c`` is named
``n{c:08d}`` (wnid style).

The images are written in the three layouts people keep ImageNet in, under ``OUT`` (a local folder or any fsspec URL,
e.g. ``s3://bucket/prefix``):

- ``image-folder/{train,val}/<wnid>/<key>.JPEG`` (torchvision ImageFolder);
- ``webdataset/{train,val}/shard-000000.tar`` ... with members ``<key>.jpg`` and ``<key>.cls``, plus
  ``webdataset/classes.txt``;
- ``parquet/{train,val}/part-00000.parquet`` ... with columns ``image: struct<bytes, path>`` and ``label: int64`` and
  the Hugging Face ``datasets`` schema metadata, plus ``parquet/classes.txt``.

Each image is encoded once and the same JPEG bytes, in the same order (class-major, then Fashion-MNIST order; key
``<wnid>_<k:06d>``), go into all three layouts, so runs reading any of them must give byte-identical results. All
output is deterministic for a given seed: running the script twice writes byte-identical files.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

LAYOUTS = ("image-folder", "webdataset", "parquet")
SPLITS = {"train": "train", "val": "test"}  # our split -> Fashion-MNIST split


def wnid(c: int) -> str:
    return f"n{c:08d}"


NOISE_SIDE = 2048
_noise = None


def _noise_bank() -> np.ndarray:
    """A fixed field of standard Gaussian noise; each image takes windows of it at random offsets (cheaper than
    drawing ~400k normals per image, and the same in every process)."""
    global _noise
    if _noise is None:
        _noise = np.random.default_rng(20240601).standard_normal((NOISE_SIDE, NOISE_SIDE), dtype=np.float32)
    return _noise


def render(img: np.ndarray, seed: int, split: str, key: str) -> bytes:
    """One 28x28 grayscale image as an ImageNet-sized RGB JPEG, deterministic from (seed, split, key)."""
    digest = hashlib.sha256(f"imagenet-shaped/{seed}/{split}/{key}".encode()).digest()
    rng = np.random.default_rng(int.from_bytes(digest[:8], "little"))
    short = int(rng.integers(256, 376))
    long = max(short, int(short * rng.uniform(1.0, 1.5) + 0.5))
    w, h = (long, short) if rng.random() < 0.75 else (short, long)
    g = np.asarray(Image.fromarray(img).resize((w, h), Image.BICUBIC), dtype=np.float32) / np.float32(255.0)
    tint = rng.uniform(0.6, 1.0, 3) * 255.0  # class-independent colour of the garment
    background = rng.uniform(20.0, 180.0, 3)  # shows where the garment is dark
    std = rng.uniform(8.0, 12.0)  # texture noise, sets the JPEG size (~40-150 KB)
    ys, xs = rng.integers(0, NOISE_SIDE - h + 1, 3), rng.integers(0, NOISE_SIDE - w + 1, 3)
    bank, channels = _noise_bank(), []
    for c in range(3):
        ch = np.float32(background[c] + 0.5) + g * np.float32(tint[c] - background[c])
        ch += bank[ys[c]:ys[c] + h, xs[c]:xs[c] + w] * np.float32(std)
        channels.append(Image.fromarray(np.clip(ch, 0, 255).astype(np.uint8)))
    out = io.BytesIO()
    Image.merge("RGB", channels).save(out, "JPEG", quality=90, subsampling=0, optimize=False, progressive=False)
    return out.getvalue()


def _render_job(job):
    return render(*job)


def _samples(arrays: dict, split: str, classes: int, per_class: int) -> list[tuple[str, int, np.ndarray]]:
    """(key, class, 28x28 image) for the first `per_class` images of each class, class-major."""
    images, labels, _ = arrays[SPLITS[split]]
    out = []
    for c in range(classes):
        idx = np.flatnonzero(labels == c)[:per_class]
        if len(idx) < per_class:
            raise ValueError(f"Fashion-MNIST {SPLITS[split]} split has only {len(idx)} images of class {c}")
        out += [(f"{wnid(c)}_{k:06d}", c, images[i]) for k, i in enumerate(idx)]
    return out


def _tar(members: list[tuple[str, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(data), 0, 0o644
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _parquet(rows: list[tuple[str, int, bytes]], names: list[str], row_group_size: int) -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq

    hf = {"info": {"features": {"image": {"_type": "Image"}, "label": {"_type": "ClassLabel", "names": names}}}}
    schema = pa.schema([("image", pa.struct([("bytes", pa.binary()), ("path", pa.string())])), ("label", pa.int64())],
                       metadata={b"huggingface": json.dumps(hf).encode()})
    table = pa.table({"image": [{"bytes": b, "path": f"{k}.JPEG"} for k, _, b in rows],
                      "label": [c for _, c, _ in rows]}, schema=schema)
    buf = io.BytesIO()
    pq.write_table(table, buf, row_group_size=row_group_size)
    return buf.getvalue()


def write_imagenet_shaped(out, classes: int = 10, train_per_class: int = 100, val_per_class: int = 50,
                          seed: int = 0, shard_size: int = 100, row_group_size: int = 50,
                          layouts=LAYOUTS, storage_options: dict | None = None, workers: int = 1) -> dict:
    """Render and write the set under `out` (folder or fsspec URL); returns a summary (counts, JPEG sizes, roots).

    `workers` > 1 renders in a process pool (forkserver) when there are more than 500 images; the output is the same.
    The calling program's main module must then guard its top level with ``if __name__ == "__main__":``.
    """
    import fsspec

    from ddpipe.data import _fashion_mnist_arrays, find_fashion_mnist

    layouts = tuple(layouts)
    unknown = set(layouts) - set(LAYOUTS)
    if unknown or not layouts:
        raise ValueError(f"layouts must be a non-empty subset of {LAYOUTS}, got {layouts}")
    if not 1 <= classes <= 10 or train_per_class < 1 or val_per_class < 1 or shard_size < 1 or row_group_size < 1:
        raise ValueError("classes must be in 1..10; per-class counts, shard_size and row_group_size must be >= 1")
    t0 = time.perf_counter()
    fs, base = fsspec.core.url_to_fs(str(out), **(storage_options or {}))
    base = base.rstrip("/")
    arrays = _fashion_mnist_arrays(str(find_fashion_mnist(None)))
    names = [wnid(c) for c in range(classes)]
    splits = {s: _samples(arrays, s, classes, n) for s, n in (("train", train_per_class), ("val", val_per_class))}

    jobs = [(img, seed, s, key) for s, samples in splits.items() for key, _, img in samples]
    if len(jobs) > 500 and workers > 1:
        from multiprocessing import get_all_start_methods, get_context

        # no plain fork: the parent has imported torch (threads); forkserver starts workers cheaply and safely
        ctx = get_context("forkserver" if "forkserver" in get_all_start_methods() else "spawn")
        with ctx.Pool(workers) as pool:
            jpegs = pool.map(_render_job, jobs, chunksize=16)
    else:
        jpegs = [_render_job(j) for j in jobs]
    t_render = time.perf_counter() - t0

    files: dict[str, bytes] = {}  # path -> bytes
    classes_txt = "".join(f"{n}\n" for n in names).encode()
    pos = 0
    for s, samples in splits.items():
        rows = [(key, c, jpegs[pos + i]) for i, (key, c, _) in enumerate(samples)]
        pos += len(samples)
        shards = [rows[i:i + shard_size] for i in range(0, len(rows), shard_size)]
        if "image-folder" in layouts:
            files.update({f"{base}/image-folder/{s}/{wnid(c)}/{key}.JPEG": b for key, c, b in rows})
        if "webdataset" in layouts:
            files[f"{base}/webdataset/classes.txt"] = classes_txt
            for i, shard in enumerate(shards):
                members = [m for key, c, b in shard for m in ((f"{key}.jpg", b), (f"{key}.cls", str(c).encode()))]
                files[f"{base}/webdataset/{s}/shard-{i:06d}.tar"] = _tar(members)
        if "parquet" in layouts:
            files[f"{base}/parquet/classes.txt"] = classes_txt
            for i, shard in enumerate(shards):
                files[f"{base}/parquet/{s}/part-{i:05d}.parquet"] = _parquet(shard, names, row_group_size)

    roots = {layout: f"{base}/{layout}" for layout in layouts}
    for root in roots.values():  # files a previous run with other sizes left behind would break the layout
        if fs.exists(root):
            stale = [p for p in fs.find(root) if fs._strip_protocol(p).rstrip("/") not in files]
            if stale:
                fs.rm(stale)
    for d in sorted({p.rsplit("/", 1)[0] for p in files}):
        fs.makedirs(d, exist_ok=True)
    fs.pipe(files)

    sizes = np.array([len(b) for b in jpegs])
    prefix = str(out).rstrip("/")
    return {
        "images": {s: len(samples) for s, samples in splits.items()},
        "classes": classes,
        "jpeg_bytes_total": int(sizes.sum()),
        "jpeg_bytes_mean": round(float(sizes.mean()), 1),
        "jpeg_bytes_min": int(sizes.min()),
        "jpeg_bytes_max": int(sizes.max()),
        "files_written": len(files),
        "layouts": {layout: f"{prefix}/{layout}" for layout in layouts},
        "seconds_render": round(t_render, 2),
        "seconds_total": round(time.perf_counter() - t0, 2),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out", help="output folder or fsspec URL")
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--train-per-class", type=int, default=100)
    p.add_argument("--val-per-class", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--shard-size", type=int, default=100)
    p.add_argument("--row-group-size", type=int, default=50)
    p.add_argument("--layouts", default=",".join(LAYOUTS), help="comma-separated subset of " + ",".join(LAYOUTS))
    p.add_argument("--workers", type=int, default=1, help="rendering processes (a pool pays off on many cores)")
    a = p.parse_args(argv)
    summary = write_imagenet_shaped(a.out, a.classes, a.train_per_class, a.val_per_class, a.seed, a.shard_size,
                                    a.row_group_size, [x for x in a.layouts.split(",") if x], workers=a.workers)
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
