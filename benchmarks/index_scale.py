"""The dataset index at ImageNet-21K-P scale: building, joining and reopening 11 million rows, indexing real tars.

    python benchmarks/index_scale.py [--entries 11000000] [--shards 10000] [--classes 10450] [--val-per-class 50]
                                     [--real-shards 20] [--per-shard 1100] [--threads 1,2] [--root DIR] [--skip-build]

What it measures, with ddpipe's own code (:mod:`ddpipe.dataindex`, :mod:`ddpipe.formats`) on a webdataset source:
1. build: ``<root>/data/{train,val}/shard-NNNNNN.tar`` as EMPTY placeholder files (--shards for train, about
   --shards/100 for val) and ``classes.txt``; each shard's index part written directly, in the format
   ``index_part`` writes (INDEX_SCHEMA rows, class-major labels, the shard's listed size and version in the
   ``ddpipe_shard`` metadata), --entries training rows and --val-per-class per class for val; then
   ``finish_index`` joins the parts into ``train.parquet``/``val.parquet`` and writes ``index.json``.
   Reported: seconds of the parts and of finish_index, the file sizes.
2. reopen, in a fresh subprocess (its peak RSS is the reopen's own, imports included and also shown apart):
   ``open_indexed`` (listing the placeholder shards, check_unchanged, reading and checking train.parquet and
   val.parquet), then ``class_indices``, ``source_id`` and ``_entry`` of one image. Targets: < 10 s, < 2 GB.
3. indexing throughput: --real-shards real tars of --per-shard samples (a 1,000-byte placeholder .jpg and a .cls
   each, written with tarfile) in ``<root>/real``; ``build_index`` timed per --threads count (the index folder
   deleted before each), in entries/s in total and per worker thread.
The root (default /dev/shm/ddpipe-index-scale, or under /tmp without /dev/shm) is removed at start unless
--skip-build, which reuses the data, index and tars already there (the throughput index is always rebuilt).
"""

from __future__ import annotations

import argparse
import io
import json
import resource
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from ddpipe import dataindex
from ddpipe.config import build_config
from ddpipe.formats import INDEX_SCHEMA, list_shards
from ddpipe.store import table_bytes


def rss_mb() -> float:
    # VmHWM: this process's peak since its exec (ru_maxrss would carry the parent's peak across the exec).
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def config(data: Path, store: Path):
    return build_config({"name": "x", "dataset": {"kind": "webdataset", "root": str(data), "image_size": 224},
                         "store": {"uri": str(store)}})


def class_list(classes: int) -> list[str]:
    return [f"n{c:08d}" for c in range(classes)]


def write_placeholders(data: Path, classes: int, train_shards: int, val_shards: int) -> None:
    data.mkdir(parents=True)
    (data / "classes.txt").write_text("".join(f"{n}\n" for n in class_list(classes)))
    for split, n in (("train", train_shards), ("val", val_shards)):
        (data / split).mkdir()
        for k in range(n):
            (data / split / f"shard-{k:06d}.tar").touch()


def write_parts(spec, store, shards, entries: int, classes: int, names: list[str]) -> int:
    """One part per shard, entries spread evenly over the shards, classes evenly over the entries (class-major)."""
    starts = (np.arange(classes, dtype=np.int64) * entries + classes - 1) // classes  # first entry of each class
    for k, shard in enumerate(shards):
        lo, hi = k * entries // len(shards), (k + 1) * entries // len(shards)
        e = np.arange(lo, hi, dtype=np.int64)
        cls = e * classes // entries
        jc = (e - starts[cls]).tolist()
        n, j = hi - lo, np.arange(hi - lo, dtype=np.int64)
        table = pa.table({
            "split": pa.array([shard.split] * n, pa.string()), "class_index": cls.astype(np.int32),
            "file": pa.array([shard.path] * n, pa.string()),
            "member": pa.array([f"{names[c]}_{i:06d}.jpg" for c, i in zip(cls.tolist(), jc)], pa.string()),
            "offset": 512 + 1536 * j, "length": np.full(n, 1024, np.int64), "row_group": np.full(n, -1, np.int32),
            "row": np.full(n, -1, np.int64), "file_size": np.full(n, shard.size, np.int64),
            "version": pa.array([shard.version] * n, pa.string())}, schema=INDEX_SCHEMA)
        table = table.replace_schema_metadata({"ddpipe_shard": json.dumps(dataindex._shard_meta(shard))})
        store.write_bytes(dataindex.part_path(shard), table_bytes(table))
    return entries


def write_tars(real: Path, classes: int, shards: int, per_shard: int) -> None:
    """Real tars: per sample a 1,000-byte placeholder .jpg and its .cls; one small val tar."""
    real.mkdir(parents=True)
    (real / "classes.txt").write_text("".join(f"{n}\n" for n in class_list(classes)))
    total = shards * per_shard
    for split, count, size in (("train", shards, per_shard), ("val", 1, 10)):
        (real / split).mkdir()
        for k in range(count):
            with tarfile.open(real / split / f"shard-{k:06d}.tar", "w") as tar:
                for j in range(size):
                    e = k * per_shard + j
                    for ext, payload in (("jpg", b"\xff" * 1000), ("cls", str(e * classes // total).encode())):
                        info = tarfile.TarInfo(f"s{e:09d}.{ext}")
                        info.size = len(payload)
                        tar.addfile(info, io.BytesIO(payload))


def reopen(data: Path, store: Path) -> None:
    """Phase 2, run in its own process."""
    base = rss_mb()
    cfg = config(data, store)
    t = time.perf_counter()
    source = dataindex.open_indexed(cfg)
    seconds, peak = time.perf_counter() - t, rss_mb()
    train = source.train
    i = min(5_000_000, len(train) - 1)
    c = min(123, source.num_classes - 1)
    t = time.perf_counter()
    members = train.class_indices(c)
    t_cls = time.perf_counter() - t
    t = time.perf_counter()
    sid = train.source_id(i)
    t_sid = time.perf_counter() - t
    t = time.perf_counter()
    entry = train._entry(i)
    t_entry = time.perf_counter() - t
    t = time.perf_counter()
    spec = dataindex.source_spec(cfg)
    n_shards = sum(len(list_shards(spec, s)) for s in ("train", "val"))
    t_list = time.perf_counter() - t
    ok = "OK" if seconds < 10 and peak < 2048 else "OVER TARGET"
    print(f"  {seconds:7.2f} s  open_indexed (target < 10 s), peak RSS {peak:,.0f} MB (target < 2,048 MB; "
          f"{base:,.0f} MB after imports) -> {ok}")
    print(f"           len(train)={len(train):,} len(test)={len(source.test):,} classes={source.num_classes:,}")
    print(f"  {t_list:7.4f} s  listing {n_shards:,} shards alone (list_shards again, warm cache)")
    print(f"  {t_cls:7.4f} s  train.class_indices({c}): {len(members):,} images")
    print(f"  {t_sid:7.4f} s  train.source_id({i:,}) = {sid}")
    print(f"  {t_entry:7.4f} s  train._entry({i:,}) = {entry}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--entries", type=int, default=11_000_000)
    p.add_argument("--shards", type=int, default=10_000)
    p.add_argument("--classes", type=int, default=10_450)
    p.add_argument("--val-per-class", type=int, default=50)
    p.add_argument("--real-shards", type=int, default=20)
    p.add_argument("--per-shard", type=int, default=1100)
    p.add_argument("--threads", default="1,2", help="build_index thread counts to time, comma-separated")
    tmpfs = Path("/dev/shm")
    p.add_argument("--root", default=str((tmpfs if tmpfs.is_dir() else Path("/tmp")) / "ddpipe-index-scale"))
    p.add_argument("--skip-build", action="store_true", help="reuse the data, index and tars already under --root")
    p.add_argument("--reopen", action="store_true", help=argparse.SUPPRESS)  # phase 2's subprocess
    args = p.parse_args()
    root = Path(args.root)
    data, store_dir, real = root / "data", root / "store", root / "real"
    if args.reopen:
        return reopen(data, store_dir)
    if args.entries < args.classes:
        p.error("--entries must be at least --classes (every class needs training images)")

    print(f"entries={args.entries:,} shards={args.shards:,} classes={args.classes:,} root={root}")
    cfg = config(data, store_dir)
    spec = dataindex.source_spec(cfg)
    store = dataindex.index_store(cfg, spec)
    if not args.skip_build:
        shutil.rmtree(root, ignore_errors=True)
        val_shards = max(1, args.shards // 100)
        print("1. build (placeholder shards, parts written directly, finish_index)")
        t = time.perf_counter()
        write_placeholders(data, args.classes, args.shards, val_shards)
        shards = {s: list_shards(spec, s) for s in ("train", "val")}
        print(f"  {time.perf_counter() - t:7.2f} s  {args.shards:,} + {val_shards:,} placeholder shards, listed")
        names = class_list(args.classes)
        t = time.perf_counter()
        rows = write_parts(spec, store, shards["train"], args.entries, args.classes, names)
        rows += write_parts(spec, store, shards["val"], args.val_per_class * args.classes, args.classes, names)
        print(f"  {time.perf_counter() - t:7.2f} s  {len(shards['train']) + len(shards['val']):,} parts written "
              f"({rows:,} rows), peak RSS {rss_mb():,.0f} MB")
        t = time.perf_counter()
        info = dataindex.finish_index(spec, store, dataindex.IndexPlan(names, shards))
        print(f"  {time.perf_counter() - t:7.2f} s  finish_index, peak RSS {rss_mb():,.0f} MB")
        parts = sum(f.stat().st_size for f in Path(store.root, "parts").rglob("*.parquet"))
        sizes = {f: Path(store.root, f).stat().st_size / 2**20 for f in ("train.parquet", "val.parquet", "index.json")}
        print("           " + ", ".join(f"{f} {mb:,.1f} MB" for f, mb in sizes.items())
              + f", parts {parts / 2**20:,.1f} MB; rows train {info['splits']['train']['rows']:,}"
              f" val {info['splits']['val']['rows']:,}")

    print("2. reopen (fresh process)")
    sys.stdout.flush()
    subprocess.run([sys.executable, __file__, "--reopen", "--root", str(root)], check=True)

    print(f"3. indexing real tars ({args.real_shards} x {args.per_shard:,} samples + a val tar of 10)")
    if not args.skip_build:
        t = time.perf_counter()
        write_tars(real, args.classes, args.real_shards, args.per_shard)
        print(f"  {time.perf_counter() - t:7.2f} s  tars written")
    rcfg = config(real, store_dir)
    rspec = dataindex.source_spec(rcfg)
    rstore = dataindex.index_store(rcfg, rspec)
    plan = dataindex.plan_index(rspec, ("train", "val"))
    for threads in (int(x) for x in args.threads.split(",")):
        shutil.rmtree(rstore.root, ignore_errors=True)
        t = time.perf_counter()
        info = dataindex.build_index(rspec, rstore, plan, threads)
        seconds = time.perf_counter() - t
        n = sum(s["rows"] for s in info["splits"].values())
        print(f"  {seconds:7.2f} s  build_index threads={threads}: {n:,} entries, {n / seconds:,.0f} entries/s, "
              f"{n / seconds / threads:,.0f} per thread")
    print(f"peak RSS {rss_mb():,.0f} MB")


if __name__ == "__main__":
    main()
