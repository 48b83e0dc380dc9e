"""ImageNet-21K-P at scale without the data: the planning, sharding and merge code on manifests of that shape.

    python benchmarks/scale_manifests.py [--config configs/imagenet21k-p-rded-ipc10.yaml] [--ipc 20]
                                         [--classes 10450] [--images 11000000] [--store memory://scale]

What runs is ddpipe's own code, on a source listing of 11 million training files in 10,450 classes:
- the dataset stage (``run_dataset``: class sizes checked, classes.parquet) through ``pipeline.run_shard``;
- ``make_plan`` for every stage of the config's method, and the task runs a ``distill`` flow run makes;
- every shard of the per-class stages through ``pipeline.run_shard`` (key, record, validation), each
  writing the files its real stage writes, by the same names, with a short placeholder as contents (per
  class: the scoring table, a provenance table per set, a labels table per set; with --with-images also
  one file per image, 418,000 more);
- ``finalize_stage`` merging every stage's shard records into its manifest, and ``status``.
The store is a fresh local folder; /dev/shm (tmpfs) measures the code rather than this machine's slow
file creation (about 0.8 ms per new file on its disk). fsspec's memory:// works too but lists a folder
by scanning every file, so it is quadratic at this size.
It prints the time of each phase, the total, the peak resident memory and the manifest sizes.
"""

from __future__ import annotations

import argparse
import dataclasses
import resource
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from ddpipe.config import load_config  # noqa: E402
from ddpipe.data import ArraySplit, DataSource  # noqa: E402
from ddpipe.imageset import image_path  # noqa: E402
from ddpipe.pipeline import Context, finalize_stage, flow_task_runs, make_plan, run_shard, status  # noqa: E402
from ddpipe.stages import stages_for  # noqa: E402


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def listing(num_classes: int, images: int, rng) -> tuple[list[str], list[str], np.ndarray]:
    """Class names (WordNet ids) and one path per training file, class-major, ~images/num_classes per class."""
    classes = [f"n{10000000 + 937 * c:08d}" for c in range(num_classes)]
    mean = images // num_classes
    counts = rng.integers(mean // 2, mean * 3 // 2, num_classes)
    diff = images - int(counts.sum())
    counts += diff // num_classes
    counts[:diff % num_classes] += 1
    labels = np.repeat(np.arange(num_classes, dtype=np.int64), counts)
    files = [f"{classes[c]}/{classes[c]}_{k}.JPEG" for c, n in enumerate(counts.tolist()) for k in range(n)]
    return classes, files, labels


WITH_IMAGES = False  # --with-images: also one placeholder file per image PNG
STAGE_SECONDS = [0.0]  # time spent inside the placeholder stage bodies


def placeholder_outputs(ctx: Context, stage: str, shard) -> list:
    """The files the real stage writes for ``shard`` (same names), each holding a short placeholder."""
    start = time.perf_counter()
    cfg, store = ctx.cfg, ctx.store
    ipc = cfg.method.ipc
    files = []
    for c in shard.classes:
        if stage == "scoring":
            names = [f"scoring/class={c:05d}.parquet"]
        else:
            set_name = shard.set or ("distilled" if stage == "synthesis" else "random")
            if stage == "labels":
                names = [f"{set_name}/labels/class={c:05d}.parquet"]
            else:
                names = [f"{set_name}/provenance/class={c:05d}.parquet"]
                names += [image_path(set_name, c, j) for j in range(ipc)] if WITH_IMAGES else []
        files += [store.write_bytes(name, f"placeholder {name}".encode()) for name in names]
    STAGE_SECONDS[0] += time.perf_counter() - start
    return files


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default=str(ROOT / "configs" / "imagenet21k-p-rded-ipc10.yaml"))
    p.add_argument("--ipc", type=int, default=20)
    p.add_argument("--classes", type=int, default=10_450)
    p.add_argument("--images", type=int, default=11_000_000)
    tmpfs = Path("/dev/shm")
    p.add_argument("--store", default=str((tmpfs if tmpfs.is_dir() else Path("/tmp")) / "ddpipe-scale-bench"))
    p.add_argument("--with-images", action="store_true", help="also write a placeholder file per image")
    args = p.parse_args()
    global WITH_IMAGES
    WITH_IMAGES = args.with_images
    if "://" not in args.store:
        import shutil

        shutil.rmtree(args.store, ignore_errors=True)  # a fresh store: nothing to reuse
    cfg = load_config(args.config, [f"method.ipc={args.ipc}", f"store.uri={args.store}"])
    rng = np.random.default_rng(0)
    start = t = time.perf_counter()
    phases = {}

    def phase(name):
        nonlocal t
        now = time.perf_counter()
        phases[name] = now - t
        t = now

    classes, files, labels = listing(args.classes, args.images, rng)
    test_labels = np.repeat(np.arange(args.classes), 50)
    # The images are never read here: splits with the listing's labels and one placeholder image.
    pixel = np.zeros((1, 3, 1, 1), np.uint8)
    train = ArraySplit("train", pixel, labels, args.classes, "train")
    test = ArraySplit("val", pixel, test_labels, args.classes, "val")
    phase(f"source listing ({len(files):,} files)")

    ctx = Context(cfg)
    ctx._cache["source"] = DataSource(kind="image-folder", classes=classes, train=train, test=test)
    stages = stages_for(cfg)
    dataset = stages[0]
    manifests = {"dataset": finalize_stage(ctx, dataset, dataset.plan(ctx, 0),
                                           [run_shard(ctx, dataset, s, {}) for s in dataset.plan(ctx, 0)])}
    phase("dataset stage (class sizes, classes.parquet)")

    plan = make_plan(ctx, stages, args.classes)
    phase("plan (manifests/plan.parquet)")

    per_class = [s for s in stages if s.name in ("scoring", "synthesis", "random_subset", "labels")]
    shards_done = rows = 0
    for stage in per_class:
        fake = dataclasses.replace(stage, run=lambda c, shard, inputs, n=stage.name: placeholder_outputs(c, n, shard))
        inputs = {name: manifests[name] for name in stage.inputs if name in manifests}
        for name in stage.inputs:  # upstream stages not simulated here (teacher) get an empty manifest
            inputs.setdefault(name, manifests["dataset"])
        results = [run_shard(ctx, fake, shard, inputs) for shard in plan[stage.name]]
        manifests[stage.name] = finalize_stage(ctx, fake, plan[stage.name], results)
        shards_done += len(results)
        rows += manifests[stage.name].files
        phase(f"{stage.name}: {len(results)} shards -> manifest of {manifests[stage.name].files:,} files")
    report = status(ctx.store)
    phase("status")
    total = time.perf_counter() - start

    print(f"config {args.config} ipc={args.ipc} classes={args.classes:,} images={args.images:,} store={args.store}")
    for name, seconds in phases.items():
        print(f"  {seconds:7.2f} s  {name}")
    print(f"total {total:.1f} s (of which {STAGE_SECONDS[0]:.1f} s writing the placeholder outputs), "
          f"peak RSS {rss_mb():,.0f} MB")
    print(f"stages {', '.join(f'{s.name}={len(plan[s.name])}' for s in stages)}")
    print(f"task runs of one distill flow run: {flow_task_runs(plan):,}")
    print(f"shards run here: {shards_done:,}, manifest rows: {rows:,}, "
          f"stages complete: {sum(r['complete'] for r in report)}/{len(report)}")


if __name__ == "__main__":
    main()
