"""Manifests: the Parquet records of what each stage wrote, and the small models passed between tasks.

Inside a run folder:

- ``manifests/plan.parquet``: every (stage, shard) the run will do (:data:`PLAN_SCHEMA`).
- ``manifests/<stage>/<shard>.parquet``: a shard's record, one row per output file
  (:data:`RECORD_SCHEMA`). It is written only after the shard's outputs are written and validated, so
  its presence means "done".
- ``manifests/<stage>.parquet``: the stage manifest, every shard record of the stage concatenated in
  shard order; written once all shards are done. Its sha256 is the stage's content hash, which enters
  the cache keys of the stages that read it.

Tasks exchange :class:`ShardResult` and :class:`StageManifest` (paths, hashes, counts), never data.
"""

from __future__ import annotations

import io

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from pydantic import BaseModel

from ddpipe.store import FileRecord, Store

RECORD_SCHEMA = pa.schema(
    [
        pa.field("stage", pa.string(), nullable=False),
        pa.field("shard", pa.string(), nullable=False),
        pa.field("key", pa.string(), nullable=False),  # cache key the outputs were computed under
        pa.field("path", pa.string(), nullable=False),  # output file, relative to the run folder
        pa.field("sha256", pa.string(), nullable=False),
        pa.field("bytes", pa.int64(), nullable=False),
        pa.field("rows", pa.int64()),  # rows of a table output; null for other files
    ]
)

PLAN_SCHEMA = pa.schema(
    [
        pa.field("stage", pa.string(), nullable=False),
        pa.field("shard", pa.string(), nullable=False),
        pa.field("classes", pa.list_(pa.int32()), nullable=False),  # classes of a per-class shard; else empty
    ]
)


class ShardResult(BaseModel):
    """What a finished shard returns: where its record is and what it holds."""

    stage: str
    shard: str
    key: str
    record: str  # path of the shard record, relative to the run folder
    sha256: str  # of the shard record file
    files: int
    bytes: int
    rows: int
    reused: bool = False  # true when valid outputs from an earlier run were kept


class StageManifest(BaseModel):
    """A finished stage: its manifest file and its content hash."""

    stage: str
    path: str
    sha256: str
    shards: int
    files: int
    bytes: int
    rows: int


def record_path(stage: str, shard: str) -> str:
    return f"manifests/{stage}/{shard}.parquet"


def stage_path(stage: str) -> str:
    return f"manifests/{stage}.parquet"


def records_table(stage: str, shard: str, key: str, files: list[FileRecord]) -> pa.Table:
    files = sorted(files, key=lambda f: f.path)
    return pa.table(
        {
            "stage": [stage] * len(files),
            "shard": [shard] * len(files),
            "key": [key] * len(files),
            "path": [f.path for f in files],
            "sha256": [f.sha256 for f in files],
            "bytes": [f.bytes for f in files],
            "rows": [f.rows for f in files],
        },
        schema=RECORD_SCHEMA,
    )


def files_of(table: pa.Table) -> list[FileRecord]:
    return [FileRecord(path=r["path"], sha256=r["sha256"], bytes=r["bytes"], rows=r["rows"]) for r in table.to_pylist()]


def parse_record(data: bytes) -> pa.Table | None:
    """A shard record's table, or None if the bytes are torn or not a record."""
    try:
        table = pq.read_table(io.BytesIO(data))
    except Exception:
        return None
    return table if table.schema.equals(RECORD_SCHEMA) else None


def shard_result(stage: str, shard: str, key: str, record: FileRecord, table: pa.Table, reused: bool) -> ShardResult:
    files = files_of(table)
    return ShardResult(
        stage=stage, shard=shard, key=key, record=record.path, sha256=record.sha256, files=len(files),
        bytes=sum(f.bytes for f in files), rows=sum(f.rows or 0 for f in files), reused=reused,
    )


def write_stage_manifest(store: Store, stage: str, records: list[pa.Table]) -> StageManifest:
    """Concatenate the shard records (in shard order) into the stage manifest."""
    table = pa.concat_tables(records) if records else RECORD_SCHEMA.empty_table()
    rec = store.write_table(stage_path(stage), table, if_changed=True)
    files = files_of(table)
    return StageManifest(
        stage=stage, path=rec.path, sha256=rec.sha256, shards=len(records), files=len(files),
        bytes=sum(f.bytes for f in files), rows=sum(f.rows or 0 for f in files),
    )


def stage_files(store: Store, manifest: StageManifest, shard: str | None = None) -> list[FileRecord]:
    """Output files of a finished stage (optionally of one shard)."""
    table = store.read_table(manifest.path)
    if shard is not None:
        table = table.filter(pc.equal(table["shard"], shard))
    return files_of(table)


def plan_table(rows: list[tuple[str, str, tuple[int, ...]]]) -> pa.Table:
    return pa.table(
        {"stage": [r[0] for r in rows], "shard": [r[1] for r in rows], "classes": [list(r[2]) for r in rows]},
        schema=PLAN_SCHEMA,
    )
