"""The store: a run folder on any fsspec filesystem, written atomically.

``Store("./runs/x")``, ``Store("s3://bucket/runs/x", {"client_kwargs": {"endpoint_url": ...}})`` or
``Store("memory://runs/x")``. Every write is atomic: on a local disk the bytes go to a temporary file in the
same folder that is then renamed over the target; on object stores a file is one PUT, which readers see
whole or not at all. A write returns a :class:`FileRecord` (path, sha256, bytes, rows) that manifests keep
and :meth:`Store.verify` checks later.

Stored formats: Parquet tables (:func:`table_bytes`) and torch objects (:func:`torch_bytes` /
:func:`torch_object`: teacher checkpoints, statistics, diffusion states), PNG images (:mod:`ddpipe.imageset`).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import uuid
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import BaseModel

from ddpipe.errors import CheckpointError, StoreError, first_line


class FileRecord(BaseModel):
    """One file written by a stage, relative to the run folder."""

    path: str
    sha256: str
    bytes: int
    rows: int | None = None


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def table_bytes(table: pa.Table) -> bytes:
    """A Parquet file's bytes; deterministic for the same table."""
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    return buf.getvalue()


def torch_bytes(obj: Any) -> bytes:
    """``torch.save`` of ``obj`` (tensors in plain dicts and lists) as bytes."""
    import torch

    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def torch_object(data: bytes, name: str) -> Any:
    """The object in :func:`torch_bytes` output (loaded on the CPU, tensors and plain types only); a
    :class:`~ddpipe.errors.CheckpointError` naming ``name`` (what the bytes are and where they came from) if they
    are not one."""
    import torch

    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - a truncated file, another format, a pickle with code: one clear error
        reason = first_line(e)
        raise CheckpointError(f"{name} is not readable: {e.__class__.__name__}: {reason}") from None


S3_PROTOCOLS = ("s3", "s3a")
S3_RETRIES = {"mode": "standard", "max_attempts": 10}


def fs_options(uri: str, options: dict[str, Any] | None) -> dict[str, Any]:
    """The fsspec options for ``uri``: the user's, plus on S3 the client's retry setting unless
    ``config_kwargs.retries`` sets one: botocore's standard mode, 10 attempts (500, 502, 503 SlowDown,
    504, throttling and connection errors, with exponential backoff and jitter, up to 20 s apart)."""
    out = dict(options or {})
    if uri.split("://", 1)[0] in S3_PROTOCOLS:
        config = dict(out.get("config_kwargs") or {})
        config.setdefault("retries", dict(S3_RETRIES))
        out["config_kwargs"] = config
    return out


CHECKED_PROTOCOLS = ("file", "local", "memory", *S3_PROTOCOLS)  # filesystems that ignore an unknown option


def unknown_storage_options(uri: str, options: dict[str, Any] | None) -> tuple[list[str], list[str]]:
    """The keys of ``options`` that the filesystem of ``uri`` does not take, and the keys it takes; ([], []) for a
    filesystem that cannot tell. fsspec's local, memory and S3 filesystems accept any keyword and ignore the ones
    they do not know (a misspelt ``endpoint_url`` would silently reach AWS): their known keys are the named
    parameters of their constructors, of fsspec's base class and of its listings cache."""
    import inspect

    from fsspec.dircache import DirCache

    protocol = uri.split("://", 1)[0] if "://" in uri else "file"
    if not options or protocol not in CHECKED_PROTOCOLS:
        return [], []
    try:
        cls = fsspec.get_filesystem_class(protocol)
    except (ImportError, ValueError):
        return [], []
    known = {"skip_instance_cache"}
    for klass in (*cls.__mro__, DirCache):
        init = klass.__dict__.get("__init__")
        if init is not None:
            known |= {p.name for p in inspect.signature(init).parameters.values()
                      if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.name not in ("self", "loop")}
    return sorted(k for k in options if k not in known), sorted(known)


class Store:
    """A folder (the run folder) in an fsspec filesystem."""

    def __init__(self, uri: str, storage_options: dict[str, Any] | None = None):
        self.storage_options = dict(storage_options or {})
        try:
            self.fs, root = fsspec.core.url_to_fs(uri, **fs_options(uri, self.storage_options))
        except (ImportError, ValueError, TypeError) as e:
            raise StoreError(f"cannot open store '{uri}': {e}") from None
        self.root = root.rstrip("/")
        self.local = "file" in _protocols(self.fs)
        self.s3 = any(p in S3_PROTOCOLS for p in _protocols(self.fs))
        self.uri = self.root if self.local else self.fs.unstrip_protocol(self.root)
        self._folders: set[str] = set()  # local folders known to exist

    def child(self, name: str) -> "Store":
        """The store of a sub-folder (e.g. a run folder inside the store root)."""
        return Store(f"{self.uri}/{name}", self.storage_options)

    def path(self, rel: str) -> str:
        return f"{self.root}/{rel}" if rel else self.root

    def url(self, rel: str) -> str:
        return self.path(rel) if self.local else self.fs.unstrip_protocol(self.path(rel))

    # ---------------------------------------------------------------- writing
    def write_bytes(self, rel: str, data: bytes, rows: int | None = None, if_changed: bool = False) -> FileRecord:
        """Write ``data`` atomically. With ``if_changed``, a file that already holds these bytes is left alone."""
        path = self.path(rel)
        record = FileRecord.model_construct(path=rel, sha256=sha256_bytes(data), bytes=len(data), rows=rows)
        if if_changed and self.verify(record):
            return record
        try:
            if self.local:
                folder = os.path.dirname(path)
                if folder not in self._folders:  # one makedirs per folder, not per file (418,000 files at 21K-P)
                    os.makedirs(folder, exist_ok=True)
                    self._folders.add(folder)
                tmp = f"{path}.tmp-{uuid.uuid4().hex}"
                try:
                    f = open(tmp, "wb")
                except FileNotFoundError:  # the folder was removed since: make it again
                    os.makedirs(folder, exist_ok=True)
                    f = open(tmp, "wb")
                try:
                    with f:
                        f.write(data)
                    os.replace(tmp, path)
                except BaseException:  # a full disk, a signal: leave no temporary file behind
                    with contextlib.suppress(OSError):
                        os.unlink(tmp)
                    raise
            else:
                self.fs.pipe_file(path, data)
        except OSError as e:
            raise StoreError(f"cannot write {self.url(rel)}: {e}") from None
        return record

    def write_table(self, rel: str, table: pa.Table, if_changed: bool = False) -> FileRecord:
        return self.write_bytes(rel, table_bytes(table), rows=table.num_rows, if_changed=if_changed)

    def remove_temporaries(self) -> list[str]:
        """Remove the temporary files (``*.tmp-*``) of writes that never finished (a process killed mid-write) from
        this folder and its sub-folders; their paths. Local stores only: an object store has none (a file is one
        PUT). Call it only while no write into the folder is under way (the run lock held)."""
        if not self.local or not os.path.isdir(self.root):
            return []
        removed = []
        for folder, _, files in os.walk(self.root):
            for name in files:
                if ".tmp-" in name:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(os.path.join(folder, name))
                    removed.append(os.path.relpath(os.path.join(folder, name), self.root))
        return removed

    def remove(self, rel: str) -> None:
        try:
            if self.exists(rel):
                self.fs.rm(self.path(rel), recursive=True)
        except OSError as e:
            raise StoreError(f"cannot remove {self.url(rel)}: {e}") from None

    def check_writable(self) -> None:
        """Write, read back and delete a probe file; StoreError naming the URI if any step fails."""
        rel = f".ddpipe-probe-{uuid.uuid4().hex}"
        try:
            self.write_bytes(rel, b"ok")
            if self.read_bytes(rel) != b"ok":
                raise OSError("read back different bytes")
            self.fs.rm(self.path(rel))
        except Exception as e:  # s3fs raises botocore/aiohttp errors too
            reason = str(e).split(": ", 1)[-1] if isinstance(e, StoreError) else f"{e.__class__.__name__}: {e}"
            raise StoreError(f"store '{self.uri}' cannot be written: {reason}") from None

    # ---------------------------------------------------------------- reading
    def read_bytes(self, rel: str) -> bytes:
        try:
            return self.fs.cat_file(self.path(rel))
        except FileNotFoundError:
            raise StoreError(f"missing file {self.url(rel)}") from None
        except OSError as e:
            raise StoreError(f"cannot read {self.url(rel)}: {e}") from None

    def read_table(self, rel: str) -> pa.Table:
        return self._parsed(rel, lambda data: pq.read_table(io.BytesIO(data)), "a readable Parquet file",
                            (pa.ArrowException, OSError, ValueError))

    def read_json(self, rel: str) -> Any:
        return self._parsed(rel, json.loads, "valid JSON", (UnicodeDecodeError, json.JSONDecodeError))

    def _parsed(self, rel: str, parse, what: str, errors: tuple[type[Exception], ...]):
        """``parse`` of the bytes of ``rel``; a StoreError naming the file if they are not ``what``."""
        data = self.read_bytes(rel)
        try:
            return parse(data)
        except errors as e:
            raise StoreError(f"{self.url(rel)} is not {what} ({e.__class__.__name__}: {first_line(e, 160)}); it was "
                             f"cut short or overwritten") from None

    def exists(self, rel: str) -> bool:
        try:
            return self.fs.exists(self.path(rel))
        except OSError:
            return False

    def list(self, rel: str) -> list[str]:
        """Names of the files directly in folder ``rel`` (empty if it does not exist)."""
        try:
            entries = self.fs.ls(self.path(rel), detail=False)
        except (FileNotFoundError, OSError):
            return []
        return sorted(e.rstrip("/").rsplit("/", 1)[-1] for e in entries)

    def sizes_of(self, rels: list[str]) -> dict[str, int]:
        """Size of each file in ``rels`` that exists (one listing per folder, not one request per file)."""
        folders: dict[str, list[str]] = {}
        for rel in rels:
            folders.setdefault(rel.rsplit("/", 1)[0] if "/" in rel else "", []).append(rel)
        out = {}
        for folder in folders:
            try:
                if self.local:  # os.scandir: a stat per file without fsspec's per-entry overhead
                    with os.scandir(self.path(folder)) as it:
                        entries = [(e.name, e.stat().st_size) for e in it if e.is_file()]
                else:
                    entries = [(e["name"].rstrip("/").rsplit("/", 1)[-1], int(e.get("size") or 0))
                               for e in self.fs.ls(self.path(folder), detail=True)]
            except (FileNotFoundError, OSError):
                continue
            for name, size in entries:
                out[f"{folder}/{name}" if folder else name] = size
        return out

    def verify(self, record: FileRecord) -> bool:
        """True if the file exists with the recorded sha256 (and, for Parquet, the recorded row count)."""
        try:
            if self.local:
                with open(self.path(record.path), "rb") as f:
                    data = f.read()
            else:
                data = self.fs.cat_file(self.path(record.path))
        except (FileNotFoundError, OSError):
            return False
        if sha256_bytes(data) != record.sha256:
            return False
        if record.rows is not None and record.path.endswith(".parquet"):
            try:
                return pq.read_metadata(io.BytesIO(data)).num_rows == record.rows
            except Exception:
                return False
        return True


def _protocols(fs) -> tuple[str, ...]:
    p = fs.protocol
    return (p,) if isinstance(p, str) else tuple(p)
