"""The layouts a training set is kept in, on any fsspec filesystem (local, ``s3://``, ``memory://``).

======================  ==============================================================================
``image-folder``        ``<root>/<split>/<class>/<image file>`` (ImageNet-1K, ImageNet-21K-P); a shard is a class
                        folder; the classes are the training split's folders, sorted by name
``webdataset``          ``<root>/<split>/*.tar``: samples of members ``<key>.jpg`` (or .jpeg, .png, .webp) with the
                        label in ``<key>.cls`` (a decimal) or ``<key>.json`` (its ``label``); a shard is a tar
``parquet``             ``<root>/<split>/*.parquet``: an image column (binary, or struct<bytes, path> as the Hugging
                        Face datasets library writes it) and an integer label column; a shard is a file
======================  ==============================================================================

webdataset and parquet labels index the class names of ``<root>/classes.txt`` (one name per line; Parquet: or the
``ClassLabel`` names in the files' Hugging Face schema metadata).

A layout lists a split's shards (:func:`list_shards`: name, size and the store's version of each), turns one shard
into index rows (:func:`index_shard`, :data:`INDEX_SCHEMA`) and reads one indexed image's bytes back
(:func:`read_entry`): a whole file, a byte range of a tar, or a row of a Parquet row group. The tar and Parquet
readers are the standard library's ``tarfile`` and pyarrow; the ``webdataset`` package streams tars in order but
has no random access by sample, which RDED's random candidate draws need. :mod:`ddpipe.dataindex` builds, keeps
and opens the index.
"""

from __future__ import annotations

import json
import os
import tarfile
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from ddpipe.errors import DataError, DatasetNotFoundError
from ddpipe.store import fs_options

KINDS = ("image-folder", "webdataset", "parquet")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
CLASSES_FILE = "classes.txt"

INDEX_SCHEMA = pa.schema(
    [
        pa.field("split", pa.string(), nullable=False),
        pa.field("class_index", pa.int32(), nullable=False),
        pa.field("file", pa.string(), nullable=False),  # relative to the root: the image file, the tar or Parquet
        pa.field("member", pa.string(), nullable=False),  # tar: the image member; otherwise ""
        pa.field("offset", pa.int64(), nullable=False),  # tar: byte offset of the member's data; otherwise 0
        pa.field("length", pa.int64(), nullable=False),  # bytes of the image (-1: Parquet, known when read)
        pa.field("row_group", pa.int32(), nullable=False),  # Parquet: row group; otherwise -1
        pa.field("row", pa.int64(), nullable=False),  # Parquet: row within the row group; otherwise -1
        pa.field("file_size", pa.int64(), nullable=False),  # bytes of ``file``
        pa.field("version", pa.string(), nullable=False),  # ETag of ``file`` where the store has one, else mtime
    ]
)


@dataclass(frozen=True)
class ShardInfo:
    """One unit of indexing: a class folder, a tar or a Parquet file, relative to the source root."""

    split: str
    path: str
    size: int
    version: str


@dataclass
class SourceSpec:
    """Where a source is and how it is laid out; opens its filesystem lazily, once per process (fsspec's
    asynchronous filesystems do not survive a fork into loader workers)."""

    kind: str
    root: str
    storage_options: dict[str, Any] = field(default_factory=dict)
    image_column: str = "image"
    label_column: str = "label"
    _fs: Any = field(default=None, init=False, repr=False, compare=False)
    _pid: int = field(default=-1, init=False, repr=False, compare=False)
    _groups: Any = field(default=None, init=False, repr=False, compare=False)

    def __getstate__(self):
        return {**self.__dict__, "_fs": None, "_pid": -1, "_groups": None}

    @property
    def fs(self):
        if self._pid != os.getpid():
            import fsspec

            try:
                self._fs, path = fsspec.core.url_to_fs(self.root, skip_instance_cache=True,
                                                           **fs_options(self.root, self.storage_options))
            except (ImportError, ValueError, TypeError) as e:
                raise DatasetNotFoundError(f"cannot open dataset.root '{self.root}': {e}") from None
            self._base = path.rstrip("/")
            self._pid, self._groups = os.getpid(), OrderedDict()
        return self._fs

    def path(self, rel: str) -> str:
        self.fs  # noqa: B018 - sets _base
        return f"{self._base}/{rel}" if rel else self._base

    def url(self, rel: str) -> str:
        return f"{self.root.rstrip('/')}/{rel}"


def _version(info: dict) -> str:
    for key in ("ETag", "etag", "mtime", "LastModified", "last_modified"):
        if info.get(key) is not None:
            return str(info[key]).strip('"')
    return ""


def _ls(spec: SourceSpec, rel: str) -> list[dict]:
    """The entries of folder ``rel``, sorted by name; a one-line error for a missing folder or no access."""
    try:
        entries = spec.fs.ls(spec.path(rel), detail=True)
    except FileNotFoundError:
        raise DatasetNotFoundError(f"dataset folder {spec.url(rel)} not found") from None
    except Exception as e:  # noqa: BLE001 - credentials, endpoint, permissions: one line naming the folder
        raise DatasetNotFoundError(f"cannot list dataset folder {spec.url(rel)}: {e.__class__.__name__}: "
                                   f"{(str(e).splitlines() or [''])[0][:200]}") from None
    base = spec.path("")
    return sorted(({**e, "rel": e["name"].rstrip("/").removeprefix(base).lstrip("/")} for e in entries),
                  key=lambda e: e["rel"])


def list_shards(spec: SourceSpec, split: str) -> list[ShardInfo]:
    """The shards of ``split``, sorted by path."""
    entries = _ls(spec, split)
    if spec.kind == "image-folder":
        return [ShardInfo(split, e["rel"], 0, _version(e) if "mtime" in e else "") for e in entries
                if e["type"] == "directory"]
    suffix = ".tar" if spec.kind == "webdataset" else ".parquet"
    return [ShardInfo(split, e["rel"], int(e.get("size") or 0), _version(e)) for e in entries
            if e["type"] == "file" and e["rel"].endswith(suffix)]


def class_names(spec: SourceSpec, train_shards: list[ShardInfo]) -> list[str]:
    """The ordered class list: image-folder: the training split's folders; otherwise ``<root>/classes.txt``, or
    (Parquet) the label column's ClassLabel names in the first shard's schema metadata."""
    if spec.kind == "image-folder":
        return [s.path.rsplit("/", 1)[-1] for s in train_shards]
    if spec.fs.exists(spec.path(CLASSES_FILE)):
        names = [line.strip() for line in spec.fs.cat_file(spec.path(CLASSES_FILE)).decode().splitlines()]
        return [n for n in names if n]
    if spec.kind == "parquet" and train_shards:
        meta = _parquet(spec, train_shards[0].path).schema_arrow.metadata or {}
        try:
            names = json.loads(meta[b"huggingface"])["info"]["features"][spec.label_column]["names"]
            return [str(n) for n in names]
        except (KeyError, TypeError, ValueError):
            pass
    raise DataError(f"no class names for the {spec.kind} source: {spec.url(CLASSES_FILE)} is missing"
                    + (" and the Parquet schema metadata has no label names" if spec.kind == "parquet" else ""))


def index_shard(spec: SourceSpec, shard: ShardInfo, classes: list[str]) -> pa.Table:
    """One row per image of ``shard`` (:data:`INDEX_SCHEMA`), in the shard's order (files by name)."""
    rows = {"split": [], "class_index": [], "file": [], "member": [], "offset": [], "length": [], "row_group": [],
            "row": [], "file_size": [], "version": []}

    def add(c, file, member, offset, length, row_group, row, size, version):
        for k, v in zip(rows, (shard.split, c, file, member, offset, length, row_group, row, size, version)):
            rows[k].append(v)

    if spec.kind == "image-folder":
        c = classes.index(shard.path.rsplit("/", 1)[-1])
        for e in _ls(spec, shard.path):
            if e["type"] == "file" and e["rel"].lower().endswith(IMAGE_SUFFIXES):
                add(c, e["rel"], "", 0, int(e["size"]), -1, -1, int(e["size"]), _version(e))
    elif spec.kind == "webdataset":
        for key, member, offset, length, label in _tar_samples(spec, shard):
            add(_checked(label, classes, f"{spec.url(shard.path)}: sample {key}"), shard.path, member, offset, length,
                -1, -1, shard.size, shard.version)
    else:
        pf = _parquet(spec, shard.path)
        _image_column(spec, pf, shard.path)
        if spec.label_column not in pf.schema_arrow.names:
            raise DataError(f"Parquet shard {spec.url(shard.path)} has no label column '{spec.label_column}' "
                            f"(columns: {', '.join(pf.schema_arrow.names)})")
        for g in range(pf.num_row_groups):
            labels = pf.read_row_group(g, columns=[spec.label_column]).column(0).to_pylist()
            for r, label in enumerate(labels):
                c = _checked(label, classes, f"Parquet shard {spec.url(shard.path)} row group {g} row {r}")
                add(c, shard.path, "", 0, -1, g, r, shard.size, shard.version)
    return pa.table(rows, schema=INDEX_SCHEMA)


def _checked(label, classes: list[str], where: str) -> int:
    if label is None or not isinstance(label, int) or not 0 <= label < len(classes):
        raise DataError(f"{where} has label {label!r}, outside the {len(classes)} classes (0..{len(classes) - 1})")
    return label


def _tar_samples(spec: SourceSpec, shard: ShardInfo):
    """(key, image member, data offset, size, label) per sample of a tar, in member order."""
    url = spec.url(shard.path)
    samples: OrderedDict[str, dict] = OrderedDict()
    try:
        with spec.fs.open(spec.path(shard.path), "rb") as f, tarfile.open(fileobj=f, mode="r:") as tar:
            for m in tar:
                if not m.isfile():
                    continue
                base = m.name.rsplit("/", 1)[-1]
                if "." not in base:
                    continue
                key = m.name[: len(m.name) - len(base)] + base.split(".", 1)[0]
                ext = base.split(".", 1)[1].lower()
                sample = samples.setdefault(key, {})
                if f".{ext}" in IMAGE_SUFFIXES:
                    sample["image"] = (m.name, m.offset_data, m.size)
                elif ext in ("cls", "json"):
                    sample[ext] = tar.extractfile(m).read()
    except (tarfile.TarError, OSError, EOFError) as e:
        raise DataError(f"cannot read tar shard {url} ({e.__class__.__name__}: {e})") from None
    for key, s in samples.items():
        if "image" not in s:
            raise DataError(f"tar shard {url}: sample {key} has no image member")
        label = None
        if "cls" in s:
            try:
                label = int(s["cls"].decode().strip())
            except ValueError:
                raise DataError(f"tar shard {url}: {key}.cls is not an integer label") from None
        elif "json" in s:
            try:
                meta = json.loads(s["json"])
                label = meta.get("label", meta.get("cls")) if isinstance(meta, dict) else None
            except ValueError:
                raise DataError(f"tar shard {url}: {key}.json is not valid JSON") from None
        if label is None:
            raise DataError(f"tar member {url}:{s['image'][0]} has no label (no {key}.cls, and no {key}.json "
                            "with a 'label')")
        yield key, s["image"][0], s["image"][1], s["image"][2], label


def _parquet(spec: SourceSpec, rel: str):
    import pyarrow.parquet as pq

    try:
        return pq.ParquetFile(spec.fs.open(spec.path(rel), "rb"))
    except FileNotFoundError:
        raise DataError(f"{spec.url(rel)} is listed in the dataset index but is gone") from None
    except (OSError, pa.ArrowException) as e:
        raise DataError(f"cannot read Parquet shard {spec.url(rel)} ({e.__class__.__name__}: {e})") from None


def _image_column(spec: SourceSpec, pf, rel: str) -> list[str]:
    """The column path of the image bytes: [image] (binary) or [image, bytes] (struct<bytes, path>)."""
    schema = pf.schema_arrow
    col = spec.image_column
    if col in schema.names:
        t = schema.field(col).type
        if pa.types.is_binary(t) or pa.types.is_large_binary(t):
            return [col]
        if pa.types.is_struct(t) and t.get_field_index("bytes") >= 0:
            return [col, "bytes"]
    raise DataError(f"Parquet shard {spec.url(rel)} has no image column '{col}' (binary, or struct<bytes, path>); "
                    f"columns: {', '.join(schema.names)}")


GROUP_CACHE = 4  # Parquet row groups kept decoded per process


def read_entry(spec: SourceSpec, file: str, member, offset: int, length: int, row_group: int, row: int) -> bytes:
    """The bytes of one indexed image; a :class:`DataError` naming the file when it is gone or changed. ``member``
    (the tar member's name, for messages) may be a function that returns it."""
    def where():
        name = member() if callable(member) else member
        return spec.url(file) + (f":{name}" if name else "")

    try:
        if spec.kind == "parquet":
            return _parquet_value(spec, file, row_group, row)
        if spec.kind == "webdataset":
            data = spec.fs.cat_file(spec.path(file), start=offset, end=offset + length)
        else:
            data = spec.fs.cat_file(spec.path(file))
    except FileNotFoundError:
        raise DataError(f"{spec.url(file)} is listed in the dataset index but is gone") from None
    except DataError:
        raise
    except Exception as e:  # noqa: BLE001 - network, permissions: one line naming the file
        raise DataError(f"cannot read {where()}: {e.__class__.__name__}: {(str(e).splitlines() or [''])[0][:200]}") \
            from None
    if len(data) != length:
        raise DataError(f"{where()} changed after it was indexed ({len(data)} bytes, the index says {length})")
    return data


def _parquet_value(spec: SourceSpec, file: str, row_group: int, row: int) -> bytes:
    spec.fs  # noqa: B018 - per-process state
    key = (file, row_group)
    groups = spec._groups
    if key not in groups:
        pf = _parquet(spec, file)
        path = _image_column(spec, pf, file)
        column = pf.read_row_group(row_group, columns=[path[0]]).column(0)
        if len(path) == 2:
            column = column.combine_chunks().field("bytes")
        groups[key] = column
        while len(groups) > GROUP_CACHE:
            groups.popitem(last=False)
    groups.move_to_end(key)
    value = groups[key][row].as_py()
    if value is None:
        raise DataError(f"Parquet shard {spec.url(file)} row group {row_group} row {row} has no image bytes")
    return value
