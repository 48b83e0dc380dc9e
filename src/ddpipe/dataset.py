"""The ``dataset`` stage: the run's class list, image counts and data fingerprint.

It writes ``dataset/classes.parquet`` (:data:`CLASSES_SCHEMA`: per class its training, test and validation
image counts) and ``dataset/dataset.json`` (kind, fingerprints, counts, image size, channels). Its key includes the data's fingerprint, and its manifest enters every later
stage's key. The sources themselves are :mod:`ddpipe.data`.
"""

from __future__ import annotations

import json

import pyarrow as pa

from ddpipe.data import DataSource
from ddpipe.errors import ConfigError, DataError
from ddpipe.manifests import StageManifest, stage_files
from ddpipe.pipeline import Context, Shard, Stage, single_shard
from ddpipe.store import FileRecord, Store

CLASSES_SCHEMA = pa.schema(
    [
        pa.field("class_index", pa.int32(), nullable=False),
        pa.field("class_name", pa.string(), nullable=False),
        pa.field("train_images", pa.int64(), nullable=False),
        pa.field("test_images", pa.int64(), nullable=False),
        pa.field("val_images", pa.int64(), nullable=False),
    ]
)


def check_data(cfg, src: DataSource) -> None:
    """What the config asks of the data, checked before any stage records completion: every class has the
    ``patches_per_class`` training images the method needs (factor^2 x ipc), ``labels.top_k`` fits the class
    count, and the test split tests every class.

    A test split without images of a class is refused, not warned about: its accuracy would silently measure fewer
    classes than the students learn, and the usual cause is a class folder missing or misnamed in one split (the
    class-map mismatch that makes results collapse without a word)."""
    val = src.val_counts()
    for c, k in enumerate(src.train.class_counts()):
        if k < cfg.patches_per_class:
            held = f" after {val[c]} held out for validation (dataset.val_fraction)" if val[c] else ""
            raise DataError(
                f"method.ipc={cfg.method.ipc} needs {cfg.patches_per_class} training images per class (factor^2 x ipc "
                f"with factor {cfg.factor}), but class '{src.classes[c]}' has {k}{held}"
            )
    n = src.num_classes
    if cfg.labels.top_k is not None and cfg.labels.top_k > n:
        raise ConfigError(f"labels.top_k={cfg.labels.top_k} is above the {n} classes of the data (at most {n}, or null "
                          "to store every class)")
    missing = [c for c, k in enumerate(src.test.class_counts()) if k == 0]
    if missing:
        names = ", ".join(f"'{src.classes[c]}'" for c in missing[:3]) + (", ..." if len(missing) > 3 else "")
        raise DataError(f"the test split has no images of {len(missing)} of the {n} training classes ({names}): every "
                        "class the students learn must be tested (a class folder missing or misnamed in the test split?)")


def dataset_classes(store: Store, dataset: StageManifest) -> list[str]:
    """The class names, in class-index order, from the dataset stage's outputs."""
    path = next(f.path for f in stage_files(store, dataset) if f.path.endswith("classes.parquet"))
    return store.read_table(path).column("class_name").to_pylist()


def run_dataset(ctx: Context, shard: Shard, inputs) -> list[FileRecord]:
    cfg, src = ctx.cfg, ctx.source
    check_data(cfg, src)
    train, test, val = src.train.class_counts(), src.test.class_counts(), src.val_counts()
    table = pa.table(
        {"class_index": list(range(src.num_classes)), "class_name": src.classes, "train_images": train.tolist(),
         "test_images": test.tolist(), "val_images": val.tolist()},
        schema=CLASSES_SCHEMA,
    )
    info = {
        "kind": src.kind, "fingerprint": src.fingerprint, "train_fingerprint": src.train.fingerprint,
        "test_fingerprint": src.test.fingerprint, "num_classes": src.num_classes, "image_size": cfg.image_size,
        "channels": cfg.channels, "train_images": len(src.train), "test_images": len(src.test),
        "val_images": int(val.sum()), "val_fingerprint": src.val.fingerprint if src.val is not None else None,
    }
    return [
        ctx.store.write_table("dataset/classes.parquet", table),
        ctx.store.write_bytes("dataset/dataset.json", json.dumps(info, indent=1, sort_keys=True).encode()),
    ]


DATASET = Stage("dataset", (), ("dataset", "method"), single_shard("dataset"), run_dataset,
                fingerprint=lambda ctx: ctx.source.fingerprint,
                doc="list classes, count images, fingerprint the data")
