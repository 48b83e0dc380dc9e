"""The dataset index: one Parquet row per image of a source (:mod:`ddpipe.formats`), listed once per store.

The first run over a source lists it and writes ``<store>/shared/datasets/<key>/``:

- ``parts/<split>/<shard name>.parquet``: the rows of one shard (a class folder, a tar, a Parquet file), written as
  that shard is indexed; the shard's size and version are in the part's metadata, so an interrupted indexing
  resumes shard by shard and a part is reused only for the very same shard;
- ``<split>.parquet``: the parts of a split joined in shard order (:data:`~ddpipe.formats.INDEX_SCHEMA`);
- ``classes.json``: the class list, for the flow's indexing tasks (:func:`index_groups`);
- ``index.json``, written last: the class list, each split's shard list (path, size, version) and the sha256
  of its joined file. A folder without it is not an index yet.

``key`` hashes the layout, the root URL, the split and column names and the code of :mod:`ddpipe.formats`.
Indexing is sharded (:func:`plan_index`, :func:`index_part`, :func:`finish_index`): :func:`open_index` runs the
parts on ``runtime.index_threads`` threads; the ``distill`` flow runs them first as Prefect tasks, a group of
shards each (:func:`index_groups`, :func:`index_group`), so that a source of 10,000 tars is a few hundred tasks.

Every later run reads the index instead of listing the images; it lists only the split folders (one listing
per split) and refuses a source whose shards changed after indexing: a shard gone, added, or with another
size or version is a one-line error naming it. Reading an image checks its size against the index (a file
changed in place is an error naming it too). To index a changed source again, delete the index folder the
error names. The data fingerprint of a run is the sha256 of the split's joined index file.
"""

from __future__ import annotations

import copy
import hashlib
import io
import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from ddpipe.config import RunConfig
from ddpipe.data import DataSource, Split, subset_fingerprint, fashion_mnist, hold_out, slice_per_class
from ddpipe.decode import decode, decode_crops
from ddpipe.codehash import shared_key
from ddpipe.errors import DataError
from ddpipe.formats import INDEX_SCHEMA, ShardInfo, SourceSpec, class_names, index_shard, list_shards, read_entry
from ddpipe.store import Store, sha256_bytes, table_bytes

READ_COLUMNS = ("class_index", "file", "offset", "length", "row_group", "row")  # member: read when first named


def source_spec(cfg: RunConfig) -> SourceSpec:
    d = cfg.dataset
    if not d.root:
        raise DataError(f"dataset.root is required for {d.kind} datasets")
    options = cfg.store.storage_options if d.storage_options is None else d.storage_options
    return SourceSpec(d.kind, d.root.rstrip("/"), dict(options), d.image_column, d.label_column)


def index_store(cfg: RunConfig, spec: SourceSpec) -> Store:
    """``<store>/shared/datasets/<key>``."""
    d = cfg.dataset
    payload = {"kind": spec.kind, "root": spec.root, "splits": [d.train_split, d.test_split],
               "columns": [spec.image_column, spec.label_column]}
    return Store(cfg.store.uri, cfg.store.storage_options).child(f"shared/datasets/{shared_key(payload, index_shard)}")


@dataclass
class IndexPlan:
    """What indexing a source takes: the class list and every split's shards."""

    classes: list[str]
    shards: dict[str, list[ShardInfo]]


def plan_index(spec: SourceSpec, splits: tuple[str, str]) -> IndexPlan:
    """List the split folders (the only listing a run makes once an index exists) and the class names."""
    shards = {split: list_shards(spec, split) for split in splits}
    train, test = splits
    if not shards[train]:
        raise DataError(f"dataset split {spec.url(train)} has no {_unit(spec)}")
    classes = class_names(spec, shards[train])
    if spec.kind == "image-folder":
        unknown = [s.path for s in shards[test] if s.path.rsplit("/", 1)[-1] not in classes]
        if unknown:
            raise DataError(f"class '{unknown[0].rsplit('/', 1)[-1]}' is in {spec.url(test)} but not in "
                            f"{spec.url(train)}")
    return IndexPlan(classes, shards)


def _unit(spec: SourceSpec) -> str:
    return {"image-folder": "class folders", "webdataset": "tar shards", "parquet": "Parquet shards"}[spec.kind]


def part_path(shard: ShardInfo) -> str:
    return f"parts/{shard.path}.parquet"


def _shard_meta(shard: ShardInfo) -> dict:
    return {"path": shard.path, "size": shard.size, "version": shard.version}


def index_part(spec: SourceSpec, store: Store, shard: ShardInfo, classes: list[str]) -> int:
    """Index one shard into its part file, or reuse the part already there for the same shard; its row count."""
    rel = part_path(shard)
    if store.exists(rel):
        try:
            data = store.read_bytes(rel)
            meta = pq.read_schema(io.BytesIO(data)).metadata or {}
            if json.loads(meta.get(b"ddpipe_shard", b"{}")) == _shard_meta(shard):
                return pq.read_metadata(io.BytesIO(data)).num_rows
        except Exception:  # noqa: BLE001 - a damaged part is indexed again
            pass
    table = index_shard(spec, shard, classes)
    table = table.replace_schema_metadata({"ddpipe_shard": json.dumps(_shard_meta(shard))})
    store.write_bytes(rel, table_bytes(table))
    return table.num_rows


def finish_index(spec: SourceSpec, store: Store, plan: IndexPlan) -> dict:
    """Join each split's parts in shard order into ``<split>.parquet``, then write ``index.json``."""
    info = {"kind": spec.kind, "root": spec.root, "classes": plan.classes, "splits": {}}
    for split, shards in plan.shards.items():
        tables = [pq.read_table(io.BytesIO(store.read_bytes(part_path(s)))).replace_schema_metadata(None)
                  for s in shards]
        table = pa.concat_tables(tables) if tables else INDEX_SCHEMA.empty_table()
        data = table_bytes(table)
        store.write_bytes(f"{split}.parquet", data)
        info["splits"][split] = {"file": f"{split}.parquet", "sha256": sha256_bytes(data), "rows": table.num_rows,
                                 "shards": [_shard_meta(s) for s in shards]}
    store.write_bytes("index.json", json.dumps(info, indent=1).encode())
    return info


def build_index(spec: SourceSpec, store: Store, plan: IndexPlan, threads: int) -> dict:
    """Index every shard not indexed yet (``threads`` at a time), then join the parts."""
    shards = [s for split_shards in plan.shards.values() for s in split_shards]
    with ThreadPoolExecutor(max(1, threads)) as pool:
        list(pool.map(lambda s: index_part(spec, store, s, plan.classes), shards))
    return finish_index(spec, store, plan)


def check_unchanged(spec: SourceSpec, store: Store, info: dict, plan: IndexPlan) -> None:
    """Refuse a source whose shards differ from the index's: gone, added, or another size or version."""
    for split, shards in plan.shards.items():
        indexed = {s["path"]: s for s in info["splits"].get(split, {}).get("shards", [])}
        now = {s.path: _shard_meta(s) for s in shards}
        hint = f"delete {store.uri} to index the source again"
        for path in indexed:
            if path not in now:
                raise DataError(f"{spec.url(path)} is listed in the dataset index but is gone ({hint})")
        for path, meta in now.items():
            if path not in indexed:
                raise DataError(f"{spec.url(path)} was added after the source was indexed ({hint})")
            if meta != indexed[path]:
                raise DataError(f"{spec.url(path)} changed after the source was indexed ({hint})")


def index_groups(cfg: RunConfig) -> list[list[ShardInfo]]:
    """The shards still to index, in groups of at most ``orchestration.max_shards_per_stage`` groups (a Prefect
    task each); empty for Fashion-MNIST and for a source indexed already."""
    if cfg.dataset.kind == "fashion-mnist":
        return []
    spec, store, plan = _planned(cfg)
    if store.exists("index.json"):
        return []
    store.write_bytes("classes.json", json.dumps(plan.classes).encode(), if_changed=True)  # for index_group
    shards = [s for split_shards in plan.shards.values() for s in split_shards]
    size = -(-len(shards) // cfg.orchestration.max_shards_per_stage)
    return [shards[k : k + size] for k in range(0, len(shards), size)]


def index_group(cfg: RunConfig, shards: list[ShardInfo]) -> int:
    """Index ``shards`` (one group of :func:`index_groups`), reusing parts already done; their row count."""
    spec, store, plan = _planned(cfg, list_splits=False)
    classes = plan.classes if plan else store.read_json("classes.json")
    return sum(index_part(spec, store, s, classes) for s in shards)


def _planned(cfg: RunConfig, list_splits: bool = True) -> tuple[SourceSpec, Store, IndexPlan | None]:
    spec, d = source_spec(cfg), cfg.dataset
    store = index_store(cfg, spec)
    if not list_splits and store.exists("classes.json"):
        return spec, store, None
    return spec, store, plan_index(spec, (d.train_split, d.test_split))


def open_index(cfg: RunConfig) -> tuple[SourceSpec, Store, dict]:
    """The source's index, built first if the store has none (parts already done are reused); refuses a source
    that changed since."""
    spec, store, plan = _planned(cfg)
    if store.exists("index.json"):
        info = store.read_json("index.json")
        check_unchanged(spec, store, info, plan)
        return spec, store, info
    return spec, store, build_index(spec, store, plan, cfg.runtime.index_threads)


def read_split(store: Store, info: dict, split: str, columns=READ_COLUMNS) -> pa.Table:
    """A split's index rows (the columns reading needs), checked against the sha256 in ``index.json``."""
    entry = info["splits"][split]
    data = store.read_bytes(entry["file"])
    if sha256_bytes(data) != entry["sha256"]:
        raise DataError(f"dataset index {store.url(entry['file'])} does not match its index.json (delete "
                        f"{store.uri} to index the source again)")
    return pq.read_table(io.BytesIO(data), columns=list(columns), read_dictionary=["file"])


class IndexedSplit(Split):
    """A split read through the index: any image by position, from a file, a tar byte range or a Parquet row.
    At 11 M images it holds the index's columns as Arrow and NumPy arrays, about 1 GB (no Python object per
    image); tar member names are read from the index the first time an image is named."""

    def __init__(self, name: str, spec: SourceSpec, table: pa.Table, rows: np.ndarray | None, num_classes: int,
                 image_size: int, channels: int, fingerprint: str, members=None):
        self.spec = spec
        self.rows = rows  # positions in the index table (None: all of them, in order)
        self.file = table.column("file")  # dictionary-encoded and chunked: no copy, O(log chunks) access
        self.num = {c: table.column(c).to_numpy() for c in ("offset", "length", "row_group", "row")}
        self._members, self._member_source = None, members
        labels = np.asarray(table.column("class_index").to_numpy(), dtype=np.int64)
        super().__init__(name, labels if rows is None else labels[rows], num_classes, image_size, channels,
                         fingerprint)

    def subset(self, name, positions):
        view = copy.copy(self)  # shares the index columns
        view.name, view.rows = name, positions if self.rows is None else self.rows[positions]
        view.base_fingerprint = subset_fingerprint(self, positions)
        Split.__init__(view, name, self.labels[positions], self.num_classes, self.image_size, self.channels,
                       view.base_fingerprint)
        return view

    def _row(self, i: int) -> int:
        return int(i) if self.rows is None else int(self.rows[int(i)])

    def _member(self, r: int) -> str:
        if self._members is None:
            self._members = self._member_source() if self._member_source else None
        return self._members[r].as_py() if self._members is not None else ""

    def _numbers(self, r: int) -> tuple[int, int, int, int]:
        return tuple(int(self.num[c][r]) for c in ("offset", "length", "row_group", "row"))

    def _entry(self, i: int) -> tuple:
        r = self._row(i)
        member = self._member(r) if self.spec.kind == "webdataset" else ""
        return (self.file[r].as_py(), member, *self._numbers(r))

    def source_id(self, i: int) -> str:
        file, member, _, _, row_group, row = self._entry(i)
        file = file.split("/", 1)[1] if "/" in file else file  # relative to the split folder
        return f"{file}/{member}" if member else f"{file}#{row_group}.{row}" if row >= 0 else file

    def location(self, i: int) -> str:
        """Where image ``i`` is: its URL, ``<tar URL>:<member>`` or ``<Parquet URL>#<row group>.<row>``."""
        file, member, _, _, row_group, row = self._entry(i)
        return self.spec.url(file) + (f":{member}" if member else f"#{row_group}.{row}" if row >= 0 else "")

    def read(self, i: int) -> bytes:
        r = self._row(i)
        file = self.file[r].as_py()
        member = (lambda: self._member(r)) if self.spec.kind == "webdataset" else ""
        return read_entry(self.spec, file, member, *self._numbers(r))

    def decoded(self, i: int, reduce=1, size: int | None = None) -> tuple[torch.Tensor, float]:
        return decode(self.read(i), self.channels, lambda: self.location(i), reduce, size)

    def crops(self, i: int, make_boxes, size) -> tuple[torch.Tensor, torch.Tensor]:
        """As :meth:`Split.crops`, each crop resized by Pillow from the decoded image (:func:`decode_crops`)."""
        return decode_crops(self.read(i), self.channels, lambda: self.location(i), make_boxes, size)



def open_indexed(cfg: RunConfig) -> DataSource:
    """A webdataset, Parquet or image-folder source through its index."""
    spec, store, info = open_index(cfg)
    d = cfg.dataset
    classes = info["classes"]
    splits = {}
    for split, name, per_class in (("train", d.train_split, d.train_per_class), ("test", d.test_split,
                                                                                 d.test_per_class)):
        table = read_split(store, info, name)
        rows = None if per_class is None else slice_per_class(table.column("class_index").to_numpy(), per_class,
                                                              len(classes))
        fp = hashlib.sha256(f"{info['splits'][name]['sha256']}:{per_class}".encode()).hexdigest()
        members = (lambda name=name: read_split(store, info, name, ["member"]).column("member"))
        splits[split] = IndexedSplit(split, spec, table, rows, len(classes), cfg.image_size, cfg.channels, fp,
                                     members if spec.kind == "webdataset" else None)
        del table
    train, test = splits["train"].class_counts(), splits["test"].class_counts()
    for c, name in enumerate(classes):
        if train[c] == 0 and test[c] > 0:
            raise DataError(f"class '{name}' is in the {d.test_split} split but has no images in the "
                            f"{d.train_split} split")
        if train[c] == 0:
            raise DataError(f"class '{name}' has no images in the {d.train_split} split")
    return DataSource(spec.kind, classes, splits["train"], splits["test"])


def open_source(cfg: RunConfig) -> DataSource:
    """Open the dataset the config names (Fashion-MNIST in memory, any other kind through its index); raises
    DatasetNotFoundError / DataError with a one-line message."""
    return hold_out(cfg, fashion_mnist(cfg) if cfg.dataset.kind == "fashion-mnist" else open_indexed(cfg))
