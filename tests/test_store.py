import os
import stat

import pyarrow as pa
import pytest

from ddpipe.errors import StoreError
from ddpipe.store import Store


@pytest.mark.parametrize("kind", ["local", "memory"])
def test_atomic_write_then_verify_and_detect_corruption(tmp_path, kind):
    uri = str(tmp_path / "s") if kind == "local" else f"memory://ddpipe-test-{tmp_path.name}"
    store = Store(uri)
    rec = store.write_bytes("a/b/c.bin", b"hello")
    assert store.read_bytes("a/b/c.bin") == b"hello" and store.verify(rec)
    table = store.write_table("t/x.parquet", pa.table({"v": [1, 2, 3]}))
    assert table.rows == 3 and store.verify(table) and store.read_table("t/x.parquet").num_rows == 3
    store.fs.pipe_file(store.path("a/b/c.bin"), b"HELLO")  # changed behind the store's back
    assert not store.verify(rec)
    assert store.sizes_of(["a/b/c.bin", "t/x.parquet", "t/missing"]) == {"a/b/c.bin": 5, "t/x.parquet": table.bytes}
    if kind == "local":
        leftovers = [f for _, _, files in os.walk(tmp_path) for f in files if ".tmp-" in f]
        assert leftovers == []


def test_parquet_row_count_is_validated(tmp_path):
    store = Store(str(tmp_path))
    rec = store.write_table("x.parquet", pa.table({"v": [1, 2]}))
    assert not store.verify(rec.model_copy(update={"rows": 3}))


def test_unwritable_store_is_a_clear_error(tmp_path):
    ro = tmp_path / "readonly"
    ro.mkdir()
    ro.chmod(stat.S_IRUSR | stat.S_IXUSR)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    for uri in (str(blocker / "runs"),) + ((str(ro / "runs"),) if os.geteuid() != 0 else ()):
        with pytest.raises(StoreError, match="cannot be written"):
            Store(uri).check_writable()
    with pytest.raises(StoreError):
        Store("nosuchprotocol://x/y")


def test_torch_objects_round_trip_and_bad_bytes_are_one_named_error():
    import torch

    from ddpipe.errors import CheckpointError
    from ddpipe.methods.recovery.statistics import read_statistics
    from ddpipe.store import torch_bytes, torch_object

    obj = {"w": torch.arange(6.0).view(2, 3), "step": 7, "names": ["a", "b"]}
    back = torch_object(torch_bytes(obj), "state.pt")
    assert torch.equal(back["w"], obj["w"]) and back["step"] == 7 and back["names"] == ["a", "b"]
    assert torch_bytes(obj) == torch_bytes(obj)  # the same object gives the same bytes
    full = torch_bytes(obj)
    for bad in (b"not a torch file", full[: len(full) // 2]):
        with pytest.raises(CheckpointError, match="teacher checkpoint s3://b/t.pt is not readable"):
            torch_object(bad, "teacher checkpoint s3://b/t.pt")
    with pytest.raises(CheckpointError, match="stats.pt is not a ddpipe-statistics/1 file"):
        read_statistics(full, "stats.pt")  # readable, but not a statistics file


def test_write_that_fills_the_disk_leaves_no_temporary_file(tmp_path, monkeypatch):
    import builtins
    import errno

    class FullDisk:
        def __init__(self, f):
            self.f = f

        def write(self, data):
            raise OSError(errno.ENOSPC, "No space left on device")

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    real_open = builtins.open
    monkeypatch.setattr("ddpipe.store.open", lambda path, mode="r": FullDisk(real_open(path, mode)), raising=False)
    store = Store(str(tmp_path / "s"))
    with pytest.raises(StoreError, match=r"cannot write .*x.parquet: .*No space left on device"):
        store.write_table("stage/x.parquet", pa.table({"v": [1, 2]}))
    assert sorted(p.name for p in (tmp_path / "s").rglob("*")) == ["stage"]  # no x.parquet.tmp-*, no x.parquet


def test_temporaries_of_a_killed_write_are_removed_when_the_run_starts(tmp_path):
    from ddpipe.pipeline import context_for, prepare, run_store

    from conftest import smoke_config

    cfg = smoke_config(tmp_path / "runs")
    folder = tmp_path / "runs" / cfg.run_name
    (folder / "scoring").mkdir(parents=True)
    stale = [folder / "scoring" / "class=00001.parquet.tmp-0f3a", folder / "report.json.tmp-77"]
    for path in stale:
        path.write_bytes(b"")  # what SIGKILL mid-write leaves
    (folder / "scoring" / "class=00000.parquet").write_bytes(b"kept")
    shared = tmp_path / "runs" / "shared" / "teachers" / "k" / "teacher.pt.tmp-1"  # another run's: not touched
    shared.parent.mkdir(parents=True)
    shared.write_bytes(b"")
    prepare(context_for(cfg))
    assert not any(p.exists() for p in stale) and (folder / "scoring" / "class=00000.parquet").exists()
    assert shared.exists() and run_store(cfg).read_bytes("config.yaml")
