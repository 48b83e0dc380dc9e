"""Locks that keep concurrent ddpipe runs on one store from interleaving their writes.

Two kinds of work are locked (:func:`held`):

- a **run folder** (``<run>/run.lock``), for the whole of a run: a second ``ddpipe run`` of the same config
  on the same store (a deployment clicked twice, a schedule overlapping a manual run) is refused with one
  line naming the holder, before it writes anything;
- a **shared output** (``<store>/shared/<kind>/<key>/.lock``: a teacher, moments, baseline students), while
  it is computed: a run of another config that needs the same output waits, then reads what the first
  wrote instead of computing it again.

How a lock is held depends on the filesystem:

- **local disk**: ``flock`` on the lock file. The kernel drops it when the process ends, SIGKILL included,
  so a resumed run never waits on a dead one. The file is removed on release (a waiter that opened the
  old file retries on the new one).
- **S3**: a lease object written with S3's conditional writes: created with ``If-None-Match: *`` (only one
  creator succeeds), renewed every ``ttl/4`` seconds with ``If-Match: <etag>``, and deleted with
  ``If-Match`` on release. A lease not renewed for ``store.lock_ttl_s`` seconds, or left by a dead
  process on this host, is taken over with ``If-Match`` on its old etag, so of several processes taking
  over the same stale lease one wins. A holder whose renewal finds another etag has lost the lease:
  :func:`check` then refuses its next write.
- **anything else** (``memory://``): a lock per process, which is all such a store can be shared by.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import socket
import threading
import time
import uuid
from contextlib import contextmanager
from typing import Iterator

from ddpipe.errors import StoreError, first_line


class LockedError(StoreError):
    """The run folder is held by another ddpipe run."""


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _holder(info: dict | None) -> str:
    """'pid 123 on host h since 2026-12-03T05:00:00Z' from a lock's contents."""
    if not info:
        return "another process"
    return f"pid {info.get('pid', '?')} on host {info.get('host', '?')} since {info.get('since', '?')}"


def _alive_here(info: dict) -> bool:
    """False when ``info`` names a process of this host that no longer exists."""
    if info.get("host") != socket.gethostname() or not isinstance(info.get("pid"), int):
        return True
    try:
        os.kill(info["pid"], 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _parse(data: bytes) -> dict | None:
    try:
        info = json.loads(data)
    except ValueError:
        return None
    return info if isinstance(info, dict) else None


class _FileLock:
    """``flock`` on a local file; released by the kernel when the process dies."""

    lost = False  # a flock cannot be taken from its holder

    def __init__(self, path: str):
        self.path, self.fd = path, None

    def try_acquire(self, info: dict) -> dict | None:
        import fcntl

        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _parse(os.pread(fd, 4096, 0)) or {}
                os.close(fd)
                return holder
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:  # else the holder removed the file between our open and flock: lock the new one
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode(), 0)
        self.fd = fd
        return None

    def release(self) -> None:
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
        os.close(self.fd)  # closing the last descriptor drops the flock


class _ProcessLock:
    """A lock within this process only (stores no other process can share, such as ``memory://``)."""

    _locks: dict[str, threading.Lock] = {}
    _guard = threading.Lock()
    lost = False

    def __init__(self, key: str):
        with self._guard:
            self.lock = self._locks.setdefault(key, threading.Lock())

    def try_acquire(self, info: dict) -> dict | None:
        return None if self.lock.acquire(blocking=False) else {"pid": os.getpid(), "host": socket.gethostname()}

    def release(self) -> None:
        self.lock.release()


class _Lease:
    """A lease object on S3, created, renewed, taken over and deleted with conditional writes."""

    def __init__(self, fs, path: str, ttl: float):
        self.fs, self.path, self.ttl = fs, path, ttl
        self.bucket, self.key, _ = fs.split_path(path)
        self.etag: str | None = None
        self.lost = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.info: dict = {}

    def _put(self, info: dict, **condition) -> str:
        out = self.fs.call_s3("put_object", Bucket=self.bucket, Key=self.key, Body=json.dumps(info).encode(),
                              **condition)
        return out["ETag"]

    def _read(self) -> tuple[dict | None, str | None, float]:
        """The lease's contents, etag and age in seconds (by the server's clock of its last write)."""
        try:
            out = self.fs.call_s3("get_object", Bucket=self.bucket, Key=self.key)
        except FileNotFoundError:
            return None, None, 0.0
        body = _body(self.fs, out)
        age = (dt.datetime.now(dt.timezone.utc) - out["LastModified"]).total_seconds()
        return _parse(body) or {}, out["ETag"], age

    def try_acquire(self, info: dict) -> dict | None:
        self.info = info
        try:
            self.etag = self._put(info, IfNoneMatch="*")
        except FileExistsError:
            holder, etag, age = self._read()
            if holder is None:  # deleted since: try again
                return self.try_acquire(info)
            if holder.get("token") == info["token"]:  # our own create, retried after a lost response
                self.etag = etag
            elif age > self.ttl or not _alive_here(holder):
                try:
                    self.etag = self._put(info, IfMatch=etag)
                except OSError:  # another process took it over first, or our write landed and its answer was lost
                    if not self._ours():
                        return holder
            else:
                return holder
        self._thread = threading.Thread(target=self._renew, name=f"ddpipe-lease-{self.key}", daemon=True)
        self._thread.start()
        return None

    def _renew(self) -> None:
        while not self._stop.wait(self.ttl / 4):
            try:
                self.etag = self._put({**self.info, "renewed": _now()}, IfMatch=self.etag)
            except OSError:
                if not self._ours():  # taken over (412) or deleted: stop renewing
                    self.lost = True
                    return
                # still ours: a transient fault after the client's own retries, or a renewal that landed
                # but whose answer was lost (its retry then failed on the new etag): go on with the new etag

    def _ours(self) -> bool:
        """Whether the lease holds this lock's token (and then adopt its current etag)."""
        try:
            holder, etag, _ = self._read()
        except OSError:
            return True  # cannot tell now: the next renewal asks again
        if holder is not None and holder.get("token") == self.info.get("token"):
            self.etag = etag
            return True
        return False

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self.lost:
            return
        try:
            self.fs.call_s3("delete_object", Bucket=self.bucket, Key=self.key, IfMatch=self.etag)
        except OSError:
            pass  # taken over meanwhile, or already gone: it is not ours to delete
        self.fs.invalidate_cache(self.path)


def _body(fs, out) -> bytes:
    from fsspec.asyn import sync

    async def read():
        async with out["Body"] as stream:
            return await stream.read()

    return sync(fs.loop, read)


def _lock_for(store, rel: str, ttl: float):
    if store.local:
        return _FileLock(store.path(rel))
    if store.s3:
        return _Lease(store.fs, store.path(rel), ttl)
    return _ProcessLock(store.url(rel))


_held_here: dict[str, object] = {}


@contextmanager
def held(store, rel: str, what: str, wait: bool, ttl: float = 120.0) -> Iterator[None]:
    """Hold the lock ``rel`` of ``store`` for the ``with`` block. Held elsewhere: with ``wait``, poll until it
    is free (or stale); else raise :class:`LockedError` naming ``what`` and the holder."""
    url = store.url(rel)
    lock = _lock_for(store, rel, ttl)
    info = {"token": uuid.uuid4().hex, "pid": os.getpid(), "host": socket.gethostname(), "since": _now()}
    delay = 0.05
    while True:
        try:
            holder = lock.try_acquire(info)
        except OSError as e:
            raise StoreError(f"cannot lock {url}: {first_line(e)}") from None
        if holder is None:
            break
        if not wait:
            raise LockedError(f"{what} is in use by another ddpipe run ({_holder(holder)}); wait for it to finish "
                              f"or stop it")
        time.sleep(delay)
        delay = min(2 * delay, 2.0)
    _held_here[url] = lock
    try:
        yield
    finally:
        _held_here.pop(url, None)
        lock.release()


def check(store, rel: str) -> None:
    """Raise :class:`LockedError` when this process held the lock ``rel`` of ``store`` and has lost it (an S3
    lease not renewed in time and taken over), so that a write after that point never lands."""
    lock = _held_here.get(store.url(rel))
    if lock is not None and lock.lost:
        raise LockedError(f"lost the lock {store.url(rel)} to another ddpipe run (not renewed within "
                          f"store.lock_ttl_s); this run stops here")
