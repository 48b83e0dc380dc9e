"""CPU JPEG decode throughput: images per second per core for "decode + resize to 224 px", and RDED scoring against it.

    python benchmarks/decode_throughput.py [--images 400] [--data data/imagenet-shaped] [--workers 2]
                                           [--rded-classes 10] [--repeats 1] [--skip-rded]

Makes the ImageNet-shaped set under ``--data`` if it has no ``image-folder/`` (``scripts/imagenet_shaped.py``, 100
train and 50 val images per class: RGB JPEGs, shorter side 256-375 px, ~80 KB) and opens its image-folder layout
from local disk (index in a temporary store). Every training file is read once first, so that every path below
reads from the page cache. Over the first ``--images`` training images it measures:

1. naive: per image ``PIL.Image.open(path).convert("RGB")``, ``resize`` (shorter side 224, bilinear, which Pillow
   antialiases), centre crop, numpy -> torch; one process (the caller), torch threads 1;
2. ddpipe: ``Split.batches(indices, 32, runtime)`` with ``runtime.loader_workers`` = 0 (in the caller), 1 ..
   ``--workers``: total img/s, img/s per worker, and the CPU seconds of the main process (which only collects the
   batches); the workers' start is included;
3. ceiling: only ``Image.open(path).convert("RGB")`` + ``np.asarray`` (full decode, no resize) in 1 and ``--workers``
   processes over disjoint parts of the files (multiprocessing): img/s per process and in all; and the same with
   JPEG DCT scaling allowed (``im.draft`` at 1/2, 1/4, 1/8 while the shorter side stays >= 224). That needs a
   shorter side >= 448 px, which no image of this set has (256-375 px): the two ceilings decode the same pixels;
4. RDED scoring (``ddpipe.methods.rded.score_classes``) of ``--rded-classes`` classes with a tiny teacher, so that
   decoding dominates: ``convnet`` width 2, depth 1, no norm, 224 px input; 40 candidates per class, K = 5 crops,
   factor 2 (112 px patches), batch 100; loader_workers 0 and ``--workers``, torch threads 1 everywhere. Reported in
   candidate images per second against the ``--workers``-process decode ceiling of step 3; target: >= 80 % with 2
   workers on 2 cores. A candidate is decoded at reduced size only if all its K boxes stay >= 2 x 112 px on a side,
   which RDED's crop_scale (0.08, 1) rarely allows (the share is printed): its ceiling is the full decode. The
   teacher's forward pass alone (main process, 1 thread) is timed too: scoring cannot beat it, so the share of
   min(ceiling, teacher alone) is printed as well;
5. cores per GPU: ``cores = R_gpu / r_core`` with R_gpu = 25,000 img/s, an ASSUMED ResNet-18 inference rate of
   one H100 at 224 px (bf16 autocast, channels_last, large batches; not measured here), and r_core = the img/s per
   worker of ddpipe's path with 1 worker.

Timings are wall-clock (``--repeats`` > 1: the best run); run it on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import math
import multiprocessing as mp
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

SIZE = 224
GPU_RATE = 25_000  # assumed: ResNet-18 inference on one H100, 224 px, bf16 + channels_last


def naive(paths) -> None:
    import torch
    from PIL import Image

    for p in paths:
        im = Image.open(p).convert("RGB")
        w, h = im.size
        s = SIZE / min(w, h)
        nw, nh = max(SIZE, round(w * s)), max(SIZE, round(h * s))
        im = im.resize((nw, nh), Image.BILINEAR)
        left, top = (nw - SIZE) // 2, (nh - SIZE) // 2
        im = im.crop((left, top, left + SIZE, top + SIZE))
        torch.from_numpy(np.array(im)).permute(2, 0, 1).contiguous()


def _ceiling_proc(paths, draft: bool, barrier, queue) -> None:
    from PIL import Image

    barrier.wait()
    t0, reduced = time.perf_counter(), 0
    for p in paths:
        im = Image.open(p)
        w, h = im.size
        r = 1
        while draft and r < 8 and min(w, h) // (2 * r) >= SIZE:
            r *= 2
        if r > 1:
            im.draft("RGB", (w // r, h // r))
            reduced += 1
        np.asarray(im.convert("RGB"))
    queue.put((len(paths), time.perf_counter() - t0, reduced))


def ceiling(paths, procs: int, draft: bool) -> dict:
    """Full decode only, ``procs`` processes over disjoint parts of ``paths``."""
    ctx = mp.get_context("fork")
    barrier, queue = ctx.Barrier(procs), ctx.Queue()
    parts = np.array_split(np.arange(len(paths)), procs)
    ps = [ctx.Process(target=_ceiling_proc, args=([paths[i] for i in part], draft, barrier, queue)) for part in parts]
    for p in ps:
        p.start()
    out = [queue.get() for _ in ps]
    for p in ps:
        p.join()
    n, slowest = sum(o[0] for o in out), max(o[1] for o in out)
    return {"total": n / slowest, "per": sum(o[0] / o[1] for o in out) / procs, "reduced": sum(o[2] for o in out)}


def best(repeats: int, fn, *args) -> dict:
    """The run with the highest total rate of ``repeats`` calls ``fn(*args)`` (each returns a dict with 'total')."""
    return max((fn(*args) for _ in range(repeats)), key=lambda r: r["total"])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--images", type=int, default=400, help="first N training images (decode measurements)")
    p.add_argument("--data", default=str(ROOT / "data" / "imagenet-shaped"))
    p.add_argument("--workers", type=int, default=2, help="loader workers / processes of the multi-core runs")
    p.add_argument("--rded-classes", type=int, default=10, help="classes scored in the RDED measurement")
    p.add_argument("--repeats", type=int, default=1, help="runs per measurement; the best is reported")
    p.add_argument("--skip-rded", action="store_true")
    args = p.parse_args()
    if args.workers < 1 or args.images < 1 or args.repeats < 1:
        p.error("--workers, --images and --repeats must be >= 1")

    data = Path(args.data)
    if not (data / "image-folder").is_dir():
        sys.path.insert(0, str(ROOT / "scripts"))
        from imagenet_shaped import write_imagenet_shaped

        print("writing the ImageNet-shaped set:", write_imagenet_shaped(str(data), train_per_class=100,
                                                                         val_per_class=50))
    import torch

    from ddpipe.config import build_config
    from ddpipe.dataindex import open_source

    torch.set_num_threads(1)
    store = tempfile.TemporaryDirectory(prefix="ddpipe-decode-bench-")
    cfg = build_config({
        "name": "decode-bench", "dataset": {"kind": "image-folder", "root": str(data / "image-folder"),
                                            "image_size": SIZE},
        "store": {"uri": store.name}, "runtime": {"loader_workers": 0, "num_threads": 1},
        "method": {"name": "rded", "candidates_per_class": 40, "crops_per_image": 5, "factor": 2, "batch_size": 100},
    })
    source = open_source(cfg)
    split = source.train
    n = min(args.images, len(split))
    indices = np.arange(n)
    paths = [split.location(int(i)) for i in indices]
    for i in range(len(split)):  # page cache
        Path(split.location(i)).read_bytes()
    naive(paths[:8]), split.load(0)  # imports, first-call costs
    W = args.workers
    rows = []  # (what, processes, total img/s, img/s per process, note)

    def timed_naive():
        t0 = time.perf_counter()
        naive(paths)
        return {"total": n / (time.perf_counter() - t0)}

    r = best(args.repeats, timed_naive)
    rows.append(("naive PIL open+convert+resize+crop", 1, r["total"], r["total"], "caller, torch threads 1"))

    def timed_batches(workers):
        runtime = cfg.runtime.model_copy(update={"loader_workers": workers})
        t0, c0, got = time.perf_counter(), time.process_time(), 0
        for x, _ in split.batches(indices, 32, runtime):
            got += len(x)
        assert got == n and x.shape[1:] == (3, SIZE, SIZE)
        return {"total": n / (time.perf_counter() - t0), "main_cpu": time.process_time() - c0}

    per_worker = {}
    for w in [0, *range(1, W + 1)]:
        r = best(args.repeats, timed_batches, w)
        per = per_worker[w] = r["total"] / max(w, 1)
        what = "in the caller" if w == 0 else f"main process CPU {r['main_cpu']:.2f} s"
        rows.append((f"ddpipe split.batches(32), workers={w}", max(w, 1), r["total"], per, what))

    ceil = {}
    for draft in (False, True):
        for procs in sorted({1, W}):
            r = ceil[draft, procs] = best(args.repeats, ceiling, paths, procs, draft)
            note = f"DCT-reduced {r['reduced']}/{n} (needs shorter side >= {2 * SIZE})" if draft else "no resize"
            rows.append((f"ceiling open+convert+asarray{', draft' if draft else ''}", procs, r["total"], r["per"],
                         note))

    rded = None
    if not args.skip_rded:
        rded = run_rded(cfg, source, args, rows)

    print(f"\n{n} images of {data / 'image-folder'} (train), decode + resize to {SIZE} px, "
          f"torch {torch.__version__}, {mp.cpu_count()} CPUs")
    print(f"{'measurement':<46} {'procs':>5} {'img/s':>8} {'img/s/proc':>10}  note")
    for what, procs, total, per, note in rows:
        print(f"{what:<46} {procs:>5} {total:>8.1f} {per:>10.1f}  {note}")
    if rded is not None:
        (rate, teacher_rate), ceiling_rate = rded, ceil[False, W]["total"]
        ok = "meets" if rate >= 0.8 * ceiling_rate else "misses"
        print(f"RDED scoring with {W} workers = {100 * rate / ceiling_rate:.0f} % of the {W}-process full-decode "
              f"ceiling ({ok} the 80 % target); {100 * rate / min(ceiling_rate, teacher_rate):.0f} % of "
              f"min(ceiling, teacher forward alone)")
    per_core = per_worker[1]
    print(f"cores per H100 (ResNet-18 forward, 224 px): {GPU_RATE} img/s [assumed: bf16 + channels_last] / "
          f"{per_core:.1f} img/s per core [ddpipe, 1 worker] = {GPU_RATE / per_core:.0f} -> "
          f"{math.ceil(GPU_RATE / per_core)} cores (decode ceiling {ceil[False, 1]['total']:.1f} img/s/core: "
          f"{math.ceil(GPU_RATE / ceil[False, 1]['total'])} cores)")
    store.cleanup()


def run_rded(cfg, source, args, rows) -> tuple[float, float]:
    """RDED scoring with a tiny teacher, loader_workers 0 and ``--workers``: (candidates/s with ``--workers``,
    candidates/s of the teacher's forward pass alone)."""
    import torch
    from PIL import Image

    from ddpipe.augment import boxes_from_draws, generator
    from ddpipe.decode import reduction
    from ddpipe.methods import rded
    from ddpipe.models import ModelSpec
    from ddpipe.teacher import Teacher

    split, m, fmt, device = source.train, cfg.method, cfg.input_format, torch.device("cpu")
    spec = ModelSpec(name="convnet", width=2, depth=1, norm="none")  # metadata only: the model is below
    torch.manual_seed(0)
    # Nearly free, so that decoding dominates: a linear classifier on 8 x 8 average-pooled 224 px inputs.
    model = torch.nn.Sequential(torch.nn.AvgPool2d(8), torch.nn.Flatten(),
                                torch.nn.Linear(3 * (SIZE // 8) ** 2, source.num_classes)).eval()
    teacher = Teacher(model, spec, source.classes, SIZE, 3, fmt.mean, fmt.std, 0.0)
    classes = range(min(args.rded_classes, source.num_classes))
    plans = [(c, *rded.draw_candidates(split, c, m, 2, generator(cfg.seed, "scoring", c))) for c in classes]
    cands = sum(len(pl[1]) for pl in plans)
    k, patch = m.crops_per_image, SIZE // 2
    reduced = 0
    for _, candidates, draws in plans:
        for j, i in enumerate(candidates):
            w, h = Image.open(split.location(int(i))).size
            boxes = boxes_from_draws(tuple(d[j * k : (j + 1) * k] for d in draws), h, w, ratio=(1.0, 1.0))
            reduced += reduction(boxes, patch) > 1

    x = torch.zeros(m.batch_size, 3, patch, patch, dtype=torch.uint8)
    buffer = rded.scoring_buffer(m, fmt, 3, patch, device)
    rded.crop_losses(teacher, x, 0, m, fmt, device, cfg.runtime, buffer)
    t0 = time.perf_counter()
    rded.crop_losses(teacher, x, 0, m, fmt, device, cfg.runtime, buffer)
    teacher_rate = m.batch_size / k / (time.perf_counter() - t0)
    rows.append(("RDED teacher forward alone (no decode)", 1, teacher_rate, teacher_rate,
                 f"candidates/s, {k} crops each, batch {m.batch_size}"))

    def timed(workers):
        runtime = cfg.runtime.model_copy(update={"loader_workers": workers})
        t0, c0 = time.perf_counter(), time.process_time()
        tables = list(rded.score_classes(teacher, split, plans, m, 2, fmt, runtime, device))
        assert sum(t.num_rows for t in tables) == cands
        return {"total": cands / (time.perf_counter() - t0), "main_cpu": time.process_time() - c0}

    for w in (0, args.workers):
        r = best(args.repeats, timed, w)
        note = f"candidates/s; main CPU {r['main_cpu']:.2f} s; DCT-reduced {reduced}/{cands}"
        rows.append((f"RDED score_classes ({len(plans)} cls x {m.candidates_per_class}), workers={w}", max(w, 1),
                     r["total"], r["total"] / max(w, 1), note))
    return r["total"], teacher_rate


if __name__ == "__main__":
    main()
