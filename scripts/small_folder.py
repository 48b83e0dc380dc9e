"""A small image folder unlike the Fashion-MNIST presets' data, for testing ddpipe's defaults on a newcomer's data.

    python scripts/small_folder.py OUT [--size 32] [--classes 10] [--train-per-class 150] [--val-per-class 50]

Real Fashion-MNIST images, resized (Pillow bicubic) from 28 to ``--size`` px and written as grayscale PNGs in the
ImageNet folder layout, ``OUT/{train,val}/<class name>/<k>.png``: the first ``--train-per-class`` images of each
class of the train split and the first ``--val-per-class`` of the test split. Deterministic: the same arguments
write byte-identical files.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))


def write_small_folder(out: str | Path, size: int = 32, classes: int = 10, train_per_class: int = 150,
                       val_per_class: int = 50) -> Path:
    from ddpipe.data import FASHION_MNIST_CLASSES, _fashion_mnist_arrays, find_fashion_mnist

    out = Path(out)
    arrays = _fashion_mnist_arrays(str(find_fashion_mnist(None)))
    for split, name, per_class in (("train", "train", train_per_class), ("test", "val", val_per_class)):
        images, labels, _ = arrays[split]
        for c in range(classes):
            folder = out / name / FASHION_MNIST_CLASSES[c].replace("/", "-").replace(" ", "-").lower()
            folder.mkdir(parents=True, exist_ok=True)
            for k, i in enumerate(np.flatnonzero(labels == c)[:per_class]):
                Image.fromarray(images[i]).resize((size, size), Image.BICUBIC).save(folder / f"{k:05d}.png")
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out")
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--train-per-class", type=int, default=150)
    p.add_argument("--val-per-class", type=int, default=50)
    a = p.parse_args()
    print(write_small_folder(a.out, a.size, a.classes, a.train_per_class, a.val_per_class))


if __name__ == "__main__":
    main()
