"""Data sources: the class list and the train and test splits, and the loader every image-reading stage uses.

A :class:`DataSource` gives the class list, and for each split (``train`` and ``test``) the labels, a per-class
index, the images as ``uint8`` tensors and a fingerprint of the content. Every image is addressed by its integer
index in its split; :meth:`Split.source_id` names it for humans (``train/123``, a file's path relative to the
split folder, ``<tar>/<member>`` or ``<parquet>#<row group>.<row>``).

Fashion-MNIST is held in memory (:class:`ArraySplit`). Image folders, WebDataset tars and Parquet shards, on any
fsspec URL, are read through their index (:mod:`ddpipe.dataindex`, :mod:`ddpipe.formats`);
:func:`ddpipe.dataindex.open_source` opens whichever the config names. Images are decoded
by :func:`loader`: in the calling process, or by ``runtime.loader_workers`` worker processes that keep
``runtime.prefetch`` batches each in flight while the caller computes on the previous ones.
"""

from __future__ import annotations

import gzip
import hashlib
import threading
import zlib
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F

from ddpipe.augment import crop_resize, generator, quantize
from ddpipe.config import RunConfig
from ddpipe.decode import decode_jpegs_cuda, is_jpeg, reduction
from ddpipe.errors import DataError, DatasetNotFoundError, DDPipeError

FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
FASHION_MNIST_DEFAULT_ROOTS = ("/usr/share/datasets/fashion-mnist", "./data/FashionMNIST/raw", "./data/fashion-mnist")
FASHION_MNIST_HINT = (
    "install it with 'apt-get install dataset-fashion-mnist' (Debian) or set dataset.root to a folder holding the "
    "IDX files (a torchvision root with FashionMNIST/raw/ works too)"
)


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass
class Split:
    """One split of a dataset. Subclasses provide :meth:`decoded` (and :meth:`read` where images are files)."""

    name: str
    labels: np.ndarray  # int64 [N]
    num_classes: int
    image_size: int
    channels: int
    base_fingerprint: str
    _by_class: list[np.ndarray] = field(init=False, repr=False)

    def __post_init__(self):
        order = np.argsort(self.labels, kind="stable")
        counts = np.bincount(self.labels, minlength=self.num_classes)
        self._by_class = np.split(order, np.cumsum(counts)[:-1])

    def __len__(self) -> int:
        return len(self.labels)

    def class_indices(self, c: int) -> np.ndarray:
        """Indices (ascending) of the images of class ``c``."""
        return self._by_class[c]

    def class_counts(self) -> np.ndarray:
        return np.array([len(ix) for ix in self._by_class])

    @property
    def fingerprint(self) -> str:
        return _sha256(f"{self.base_fingerprint}:{self.name}:{self.image_size}:{self.channels}".encode())

    def subset(self, name: str, positions: np.ndarray) -> "Split":
        """The images at ``positions`` (ascending) of this split as a split of their own, named ``name``."""
        raise NotImplementedError

    # -- image access --
    def source_id(self, i: int) -> str:
        raise NotImplementedError

    def read(self, i: int) -> bytes:
        """The stored bytes of image ``i`` (file-backed splits)."""
        raise NotImplementedError

    def decoded(self, i: int, reduce: int | Callable[[int, int], int] = 1,
                size: int | None = None) -> tuple[torch.Tensor, float]:
        """Image ``i`` as uint8 [C, H, W] and its scale against the full size. ``reduce``: a JPEG DCT-scaling
        factor, or a function of the full (height, width) that returns one (:mod:`ddpipe.decode`). With ``size``:
        resized (shorter side) and centre-cropped to ``size`` x ``size`` (:func:`resize_center`, or the decoder's
        own uint8 resize for stored images)."""
        raise NotImplementedError

    def image(self, i: int) -> torch.Tensor:
        """The image at native resolution, uint8 [C, H, W]."""
        return self.decoded(i)[0]

    def load(self, i: int) -> torch.Tensor:
        """Image ``i`` at ``image_size`` (shorter side resized, centre crop), decoded at reduced size where the
        shorter side stays at least ``image_size``."""
        return self.load_sized(i)[1]

    def load_sized(self, i: int) -> tuple[tuple[int, int], torch.Tensor]:
        """(full (height, width), :meth:`load` of image ``i``)."""
        size, seen = self.image_size, []

        def reduce(h, w):
            seen.append((h, w))
            return reduction(torch.tensor([[0, 0, min(h, w), min(h, w)]]), size)

        img, _ = self.decoded(i, reduce, size)
        return seen[0], img

    def crops(self, i: int, make_boxes: Callable[[int, int], torch.Tensor],
              size: int | tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Boxes ``make_boxes(height, width)`` (int64 [K, 4] top, left, h, w in full-size pixels) of image ``i``
        and the uint8 crops they cut, resized to ``size``; decoded at reduced size where every box allows it."""
        made = []

        def reduce(h, w):
            made.append(make_boxes(h, w))
            return reduction(made[0], size)

        img, scale = self.decoded(i, reduce)
        boxes = made[0]
        cut = boxes if scale == 1.0 else boxes.float() * scale
        return boxes, quantize(crop_resize(img[None].float(), cut, size, torch.zeros(len(boxes), dtype=torch.int64)))

    def batch(self, indices) -> torch.Tensor:
        """Images at ``image_size``, uint8 [B, C, S, S]."""
        return torch.stack([self.load(int(i)) for i in np.asarray(indices)])

    def batches(self, indices, batch_size: int, runtime=None,
                device=None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(uint8 images at ``image_size``, int64 labels) for ``indices`` in order, decoded by
        ``runtime.loader_workers`` processes that work ``runtime.prefetch`` batches ahead; on a CUDA ``device``
        with ``runtime.gpu_decode``, JPEGs are decoded there in batches and the images are on that device."""
        indices = np.asarray(indices)
        gpu = runtime is not None and runtime.gpu_decode and device is not None and torch.device(device).type == "cuda"
        fn = self.read if gpu else self.load
        for s, items in zip(range(0, len(indices), batch_size), loader(indices, fn, batch_size, runtime)):
            labels = torch.from_numpy(self.labels[indices[s : s + batch_size]])
            yield (self._device_batch(items, indices[s : s + batch_size], device) if gpu else torch.stack(items)), labels

    def _device_batch(self, datas: list[bytes], indices, device) -> torch.Tensor:
        jpeg = [k for k, d in enumerate(datas) if is_jpeg(d)]
        out: list[torch.Tensor | None] = [None] * len(datas)
        if jpeg:
            for k, img in zip(jpeg, decode_jpegs_cuda([datas[k] for k in jpeg], device)):
                out[k] = resize_center(img if self.channels == 3 else img.float().mean(0, keepdim=True).round().to(
                    torch.uint8), self.image_size)
        for k, i in enumerate(indices):
            if out[k] is None:
                out[k] = self.load(int(i)).to(device)
        return torch.stack(out)


class _Items(torch.utils.data.Dataset):
    """``fn(item)`` per item; a ddpipe error is returned, not raised, so that the calling process can raise it
    with its one-line message (a loader worker's exception would arrive wrapped in a traceback)."""

    def __init__(self, items, fn):
        self.items, self.fn = items, fn

    def __len__(self):
        return len(self.items)

    def __getitem__(self, k):
        try:
            return self.fn(self.items[k])
        except DDPipeError as e:
            return _Failed(e.__class__, str(e))


def _forget_parent_exit_hooks(_worker_id: int) -> None:
    """A forked loader worker must not run the exit hooks its parent registered with ``threading``: Prefect's
    log and event services register one that, after a fork, asserts and turns the worker's clean exit into exit
    code 1 ("DataLoader worker exited unexpectedly" under the Prefect engine)."""
    getattr(threading, "_threading_atexits", []).clear()


@dataclass
class _Failed:
    kind: type
    message: str


def loader(items, fn: Callable, batch_size: int, runtime=None) -> Iterator[list]:
    """Lists of ``fn(item)`` for consecutive batches of ``items``, in order: in this process, or by
    ``runtime.loader_workers`` worker processes keeping ``runtime.prefetch`` batches each in flight (when there is
    more than one batch)."""
    workers = runtime.loader_workers if runtime is not None else 0
    if workers <= 0 or len(items) <= batch_size:  # a batch or less: starting workers would cost more
        for s in range(0, len(items), batch_size):
            yield [fn(item) for item in items[s : s + batch_size]]
        return
    batches = torch.utils.data.DataLoader(
        _Items(items, fn), batch_size=batch_size, num_workers=workers, shuffle=False, collate_fn=list,
        prefetch_factor=runtime.prefetch, worker_init_fn=_forget_parent_exit_hooks,
    )
    for batch in batches:
        for out in batch:
            if isinstance(out, _Failed):
                raise out.kind(out.message)
        yield batch


class ArraySplit(Split):
    """A split held in memory as one uint8 array (Fashion-MNIST). ``ids``: each image's position in the file split
    ``origin`` it came from (default: its own position in ``name``), which names it in :meth:`source_id`."""

    def __init__(self, name, images: np.ndarray, labels, num_classes, base_fingerprint, ids=None, origin=None):
        self.images = torch.from_numpy(images)  # [N, C, H, W] uint8
        self.ids = np.arange(len(labels)) if ids is None else ids
        self.origin = origin or name
        super().__init__(name, labels, num_classes, images.shape[-1], images.shape[1], base_fingerprint)

    def subset(self, name, positions):
        return ArraySplit(name, self.images[torch.as_tensor(positions, dtype=torch.long)].numpy(),
                          self.labels[positions], self.num_classes, subset_fingerprint(self, positions),
                          self.ids[positions], self.origin)

    def source_id(self, i: int) -> str:
        return f"{self.origin}/{int(self.ids[int(i)])}"

    def decoded(self, i, reduce=1, size=None):
        img = self.images[int(i)]
        if callable(reduce):
            reduce(*img.shape[1:])
        return (img if size is None else resize_center(img, size)), 1.0

    def batch(self, indices) -> torch.Tensor:
        return self.images[torch.as_tensor(np.asarray(indices), dtype=torch.long)]

    def batches(self, indices, batch_size, runtime=None, device=None):
        indices = np.asarray(indices)
        for s in range(0, len(indices), batch_size):
            ix = indices[s : s + batch_size]
            yield self.batch(ix), torch.from_numpy(self.labels[ix])


def resize_center(img: torch.Tensor, size: int) -> torch.Tensor:
    """Resize the shorter side to ``size`` (antialiased) and crop the centre square; uint8 in and out."""
    _, h, w = img.shape
    if (h, w) == (size, size):
        return img
    scale = size / min(h, w)
    nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
    x = F.interpolate(img[None].float(), size=(nh, nw), mode="bilinear", antialias=True, align_corners=False)[0]
    top, left = (nh - size) // 2, (nw - size) // 2
    return x[:, top : top + size, left : left + size].round().clamp(0, 255).to(torch.uint8)


def subset_fingerprint(split: Split, positions: np.ndarray) -> str:
    return _sha256(f"{split.fingerprint}:{_sha256(np.asarray(positions, dtype=np.int64).tobytes())}".encode())


@dataclass
class DataSource:
    """A dataset: the ordered class list, its train and test splits, and the validation split held out of the
    training split (:func:`hold_out`; None without one)."""

    kind: str
    classes: list[str]
    train: Split
    test: Split
    val: Split | None = None

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def val_counts(self) -> np.ndarray:
        """Validation images per class (zeros without a validation split)."""
        return self.val.class_counts() if self.val is not None else np.zeros(self.num_classes, dtype=np.int64)

    @property
    def fingerprint(self) -> str:
        val = self.val.fingerprint if self.val is not None else None
        return _sha256(f"{self.kind}:{self.classes}:{self.train.fingerprint}:{self.test.fingerprint}:{val}".encode())


def val_positions(cfg: RunConfig, split: Split) -> np.ndarray:
    """Positions (ascending) of the validation images in the training split: per class, the first
    ``cfg.val_count(n)`` of a permutation seeded by the class index alone, so the split is a property of the data
    and ``dataset.val_*``, the same for every run seed and method."""
    picks = []
    for c in range(split.num_classes):
        pool = split.class_indices(c)
        k = cfg.val_count(len(pool))
        if k:
            picks.append(pool[torch.randperm(len(pool), generator=generator(0, "val", c))[:k].numpy()])
    return np.sort(np.concatenate(picks)) if picks else np.zeros(0, dtype=np.int64)


def hold_out(cfg: RunConfig, source: DataSource) -> DataSource:
    """``source`` with its validation split (``dataset.val_fraction`` / ``val_per_class``) taken out of the
    training split: every stage that trains or selects sees only the rest."""
    if not cfg.has_val_split:
        return source
    val = val_positions(cfg, source.train)
    rest = np.setdiff1d(np.arange(len(source.train)), val, assume_unique=True)
    return DataSource(source.kind, source.classes, source.train.subset("train", rest),
                      source.test, source.train.subset("val", val))


# ---------------------------------------------------------------- Fashion-MNIST


def _read_idx(path: Path) -> tuple[np.ndarray, str]:
    try:
        raw = path.read_bytes()
        data = gzip.decompress(raw) if path.suffix == ".gz" else raw
    except (OSError, EOFError, gzip.BadGzipFile, zlib.error) as e:
        raise DataError(f"cannot read IDX file {path}: {e.__class__.__name__}: {e}") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 8:
        raise DataError(f"IDX file {path} has a bad header (not unsigned-byte IDX data)")
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * k : 8 + 4 * k], "big") for k in range(ndim)]
    offset = 4 + 4 * ndim
    if len(data) - offset != int(np.prod(dims)):
        raise DataError(f"IDX file {path} is truncated: header says {dims}, found {len(data) - offset} bytes")
    return np.frombuffer(data, dtype=np.uint8, offset=offset).reshape(dims), _sha256(raw)


def find_fashion_mnist(root: str | None) -> Path:
    """The folder holding the Fashion-MNIST IDX files, or a DatasetNotFoundError with the install hint."""
    roots = [root] if root else list(FASHION_MNIST_DEFAULT_ROOTS)
    tried = []
    for r in roots:
        for cand in (Path(r), Path(r) / "FashionMNIST" / "raw"):
            tried.append(str(cand))
            name = FASHION_MNIST_FILES["train"][0]
            if (cand / name).is_file() or (cand / f"{name}.gz").is_file():
                return cand
    raise DatasetNotFoundError(f"Fashion-MNIST IDX files not found (looked in {', '.join(tried)}); {FASHION_MNIST_HINT}")


def _idx_path(folder: str, name: str) -> Path:
    path = Path(folder) / name
    return path if path.is_file() else Path(folder) / f"{name}.gz"


@lru_cache(maxsize=4)
def _fashion_mnist_arrays(folder: str) -> dict:
    out = {}
    for split, (img_name, lbl_name) in FASHION_MNIST_FILES.items():
        img_path, lbl_path = paths = [_idx_path(folder, name) for name in (img_name, lbl_name)]
        for name, path in zip((img_name, lbl_name), paths):
            if not path.is_file():
                raise DatasetNotFoundError(f"Fashion-MNIST file {name}[.gz] missing in {folder}; {FASHION_MNIST_HINT}")
        (images, h_img), (labels, h_lbl) = (_read_idx(path) for path in paths)
        if images.ndim != 3 or images.shape[1:] != (28, 28):
            raise DataError(f"IDX file {img_path} holds images of shape {list(images.shape[1:])}; Fashion-MNIST "
                            f"(dataset.image_size 28) needs 28 x 28")
        if labels.ndim != 1:
            raise DataError(f"IDX file {lbl_path} holds labels of shape {list(labels.shape)}; expected one label per image")
        if len(labels) and int(labels.max()) >= len(FASHION_MNIST_CLASSES):
            k = int(np.argmax(labels >= len(FASHION_MNIST_CLASSES)))
            raise DataError(f"IDX file {lbl_path}: label {int(labels[k])} of image {k} is outside the "
                            f"{len(FASHION_MNIST_CLASSES)} Fashion-MNIST classes (0-{len(FASHION_MNIST_CLASSES) - 1})")
        if images.shape[0] != labels.shape[0]:
            raise DataError(f"Fashion-MNIST {split} split in {folder}: {images.shape[0]} images but {labels.shape[0]} labels")
        out[split] = (images, labels.astype(np.int64), h_img + h_lbl)
    return out


def slice_per_class(labels: np.ndarray, per_class: int | None, num_classes: int) -> np.ndarray:
    if per_class is None:
        return np.arange(len(labels))
    keep = [np.flatnonzero(labels == c)[:per_class] for c in range(num_classes)]
    return np.sort(np.concatenate(keep))


def fashion_mnist(cfg: RunConfig) -> DataSource:
    """The Fashion-MNIST source of ``cfg`` (its per-class slices), held in memory."""
    folder = find_fashion_mnist(cfg.dataset.root)
    arrays = _fashion_mnist_arrays(str(folder))
    splits = {}
    for split, per_class in (("train", cfg.dataset.train_per_class), ("test", cfg.dataset.test_per_class)):
        images, labels, h = arrays[split]
        keep = slice_per_class(labels, per_class, 10)
        imgs = images[keep][:, None, :, :]
        if cfg.channels == 3:
            imgs = np.repeat(imgs, 3, axis=1)
        fp = _sha256(f"{h}:{per_class}".encode())
        splits[split] = ArraySplit(split, np.ascontiguousarray(imgs), labels[keep], 10, fp)
    return DataSource("fashion-mnist", list(FASHION_MNIST_CLASSES), splits["train"], splits["test"])


def normalize(x: torch.Tensor, mean, std) -> torch.Tensor:
    """uint8 [B,C,H,W] (or float in [0,1]) to normalised float32."""
    owned = x.dtype == torch.uint8
    if owned:
        x = x.float().div_(255)
    m = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    return x.sub_(m).div_(s) if owned else (x - m) / s  # in place on a tensor made here: same values
