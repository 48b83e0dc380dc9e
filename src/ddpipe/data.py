"""Data sources: Fashion-MNIST IDX files and image folders (ImageNet layout).

A :class:`DataSource` gives the class list, and for each split (``train`` and
``test``) the labels, a per-class index, the images as ``uint8`` tensors and a
fingerprint of the content. Every image is addressed by its integer index in
its split; :meth:`Split.source_id` names it for humans (``train/123`` or the
file's path relative to the split folder).
"""

from __future__ import annotations

import gzip
import hashlib
import os
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F

from ddpipe.config import RunConfig
from ddpipe.errors import DataError, DatasetNotFoundError

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
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass
class Split:
    """One split of a dataset. Subclasses provide image access."""

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

    # -- image access, implemented by subclasses --
    def source_id(self, i: int) -> str:
        raise NotImplementedError

    def image(self, i: int) -> torch.Tensor:
        """The image at native resolution, uint8 [C, H, W]."""
        raise NotImplementedError

    def batch(self, indices) -> torch.Tensor:
        """Images at ``image_size``, uint8 [B, C, S, S]."""
        raise NotImplementedError

    def batches(self, indices, batch_size: int, workers: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield (uint8 images, int64 labels) for ``indices`` in order."""
        indices = np.asarray(indices)
        for s in range(0, len(indices), batch_size):
            ix = indices[s : s + batch_size]
            yield self.batch(ix), torch.from_numpy(self.labels[ix])


class ArraySplit(Split):
    """A split held in memory as one uint8 array (Fashion-MNIST)."""

    def __init__(self, name, images: np.ndarray, labels, num_classes, base_fingerprint):
        self.images = torch.from_numpy(images)  # [N, C, H, W] uint8
        super().__init__(name, labels, num_classes, images.shape[-1], images.shape[1], base_fingerprint)

    def source_id(self, i: int) -> str:
        return f"{self.name}/{int(i)}"

    def image(self, i: int) -> torch.Tensor:
        return self.images[int(i)]

    def batch(self, indices) -> torch.Tensor:
        return self.images[torch.as_tensor(np.asarray(indices), dtype=torch.long)]


class FolderSplit(Split):
    """A split stored as ``<root>/<split>/<class>/<file>`` image files."""

    def __init__(self, name, folder: Path, files: list[str], labels, num_classes, image_size, channels, fp):
        self.folder = folder
        self.files = files
        super().__init__(name, labels, num_classes, image_size, channels, fp)

    def source_id(self, i: int) -> str:
        return self.files[int(i)]

    def image(self, i: int) -> torch.Tensor:
        from PIL import Image, UnidentifiedImageError

        path = self.folder / self.files[int(i)]
        try:
            with Image.open(path) as im:
                im = im.convert("L" if self.channels == 1 else "RGB")
                arr = np.asarray(im, dtype=np.uint8)
        except (OSError, UnidentifiedImageError, ValueError) as e:
            raise DataError(f"cannot read image file {path} ({e.__class__.__name__})") from None
        if arr.ndim == 2:
            arr = arr[:, :, None]
        return torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()

    def batch(self, indices) -> torch.Tensor:
        return torch.stack([resize_center(self.image(i), self.image_size) for i in np.asarray(indices)])

    def batches(self, indices, batch_size, workers=0):
        if workers <= 0:
            yield from super().batches(indices, batch_size)
            return
        loader = torch.utils.data.DataLoader(
            _Indexed(self, np.asarray(indices)), batch_size=batch_size, num_workers=workers, shuffle=False
        )
        yield from loader


class _Indexed(torch.utils.data.Dataset):
    def __init__(self, split: FolderSplit, indices: np.ndarray):
        self.split, self.indices = split, indices

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, k):
        i = int(self.indices[k])
        return resize_center(self.split.image(i), self.split.image_size), int(self.split.labels[i])


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


@dataclass
class DataSource:
    """A dataset: the ordered class list and its train and test splits."""

    kind: str
    classes: list[str]
    train: Split
    test: Split

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def fingerprint(self) -> str:
        return _sha256(f"{self.kind}:{self.classes}:{self.train.fingerprint}:{self.test.fingerprint}".encode())


# ---------------------------------------------------------------- Fashion-MNIST


def _read_idx(path: Path) -> tuple[np.ndarray, str]:
    try:
        raw = path.read_bytes()
        data = gzip.decompress(raw) if path.suffix == ".gz" else raw
    except (OSError, EOFError, gzip.BadGzipFile) as e:
        raise DataError(f"cannot read IDX file {path}: {e}") from None
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


@lru_cache(maxsize=4)
def _fashion_mnist_arrays(folder: str) -> dict:
    out = {}
    for split, (img_name, lbl_name) in FASHION_MNIST_FILES.items():
        arrays = []
        for name in (img_name, lbl_name):
            path = Path(folder) / name
            if not path.is_file():
                path = Path(folder) / f"{name}.gz"
            if not path.is_file():
                raise DatasetNotFoundError(f"Fashion-MNIST file {name}[.gz] missing in {folder}; {FASHION_MNIST_HINT}")
            arrays.append(_read_idx(path))
        (images, h_img), (labels, h_lbl) = arrays
        if images.shape[0] != labels.shape[0]:
            raise DataError(f"Fashion-MNIST {split} split in {folder}: {images.shape[0]} images but {labels.shape[0]} labels")
        out[split] = (images, labels.astype(np.int64), h_img + h_lbl)
    return out


def _slice_per_class(labels: np.ndarray, per_class: int | None, num_classes: int) -> np.ndarray:
    if per_class is None:
        return np.arange(len(labels))
    keep = [np.flatnonzero(labels == c)[:per_class] for c in range(num_classes)]
    return np.sort(np.concatenate(keep))


def _fashion_mnist(cfg: RunConfig) -> DataSource:
    folder = find_fashion_mnist(cfg.dataset.root)
    arrays = _fashion_mnist_arrays(str(folder))
    splits = {}
    for split, per_class in (("train", cfg.dataset.train_per_class), ("test", cfg.dataset.test_per_class)):
        images, labels, h = arrays[split]
        keep = _slice_per_class(labels, per_class, 10)
        imgs = images[keep][:, None, :, :]
        if cfg.channels == 3:
            imgs = np.repeat(imgs, 3, axis=1)
        fp = _sha256(f"{h}:{per_class}".encode())
        splits[split] = ArraySplit(split, np.ascontiguousarray(imgs), labels[keep], 10, fp)
    return DataSource("fashion-mnist", list(FASHION_MNIST_CLASSES), splits["train"], splits["test"])


# ---------------------------------------------------------------- image folders


def _list_folder(folder: Path) -> dict[str, list[str]]:
    classes = {}
    for entry in sorted(os.scandir(folder), key=lambda e: e.name):
        if entry.is_dir():
            files = sorted(
                f.name for f in os.scandir(entry.path) if f.is_file() and f.name.lower().endswith(IMAGE_SUFFIXES)
            )
            classes[entry.name] = files
    return classes


def _image_folder(cfg: RunConfig) -> DataSource:
    d = cfg.dataset
    if not d.root:
        raise DatasetNotFoundError("dataset.root is required for image-folder datasets")
    root = Path(d.root)
    train_dir, test_dir = root / d.train_split, root / d.test_split
    for folder, field_name in ((train_dir, "train_split"), (test_dir, "test_split")):
        if not folder.is_dir():
            raise DatasetNotFoundError(
                f"image folder {folder} not found (dataset.root={d.root}, dataset.{field_name}); expected "
                f"<root>/<split>/<class>/<image files>"
            )
    train_listing = _list_folder(train_dir)
    if not train_listing:
        raise DataError(f"image folder {train_dir} has no class sub-folders")
    classes = list(train_listing)
    empty = [c for c, files in train_listing.items() if not files]
    if empty:
        raise DataError(f"class '{empty[0]}' has no images in {train_dir / empty[0]}")
    test_listing = _list_folder(test_dir)
    unknown = sorted(set(test_listing) - set(classes))
    if unknown:
        raise DataError(f"class '{unknown[0]}' is in {test_dir} but not in {train_dir}")
    splits = {}
    for split, folder, listing, per_class in (
        ("train", train_dir, train_listing, d.train_per_class),
        ("test", test_dir, test_listing, d.test_per_class),
    ):
        files, labels, h = [], [], hashlib.sha256()
        for c, name in enumerate(classes):
            for fname in listing.get(name, [])[:per_class]:
                rel = f"{name}/{fname}"
                files.append(rel)
                labels.append(c)
                h.update(f"{rel}:{(folder / rel).stat().st_size}\n".encode())
        splits[split] = FolderSplit(
            split, folder, files, np.asarray(labels, dtype=np.int64), len(classes), cfg.image_size, cfg.channels,
            h.hexdigest(),
        )
    return DataSource("image-folder", classes, splits["train"], splits["test"])


def open_source(cfg: RunConfig) -> DataSource:
    """Open the dataset the config names; raises DatasetNotFoundError / DataError with a one-line message."""
    if cfg.dataset.kind == "fashion-mnist":
        return _fashion_mnist(cfg)
    return _image_folder(cfg)


def normalize(x: torch.Tensor, mean, std) -> torch.Tensor:
    """uint8 [B,C,H,W] (or float in [0,1]) to normalised float32."""
    if x.dtype == torch.uint8:
        x = x.float().div_(255)
    m = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    return (x - m) / s
