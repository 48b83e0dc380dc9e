"""The generated pool: how real it looks (the ``quality`` stage) and which of its images are kept (the
diffusion method's ``synthesis`` stage).

``quality`` writes ``generation/quality.json`` (the teacher's accuracy on the pool, overall and per class, and
the Frechet distance between teacher features of the pool and of real validation images) and ``generation/grid.png``
(the first 10 images of every class). ``synthesis`` keeps ``ipc`` images per class by
``method.diffusion.select``: random, realism (lowest teacher cross-entropy) or diversity (k-center greedy on
teacher features).
"""

from __future__ import annotations

import json

import numpy as np
import torch

from ddpipe.augment import generator
from ddpipe.data import ArraySplit, normalize
from ddpipe.errors import DataError
from ddpipe.imageset import image_grid, png_bytes, read_class, synthetic_row, write_class
from ddpipe.methods.selection.coreset import k_center_greedy, top_k
from ddpipe.pipeline import Context, Shard, Stage, class_groups, single_shard
from ddpipe.store import FileRecord
from ddpipe.teacher import teacher_of
from ddpipe.train import penultimate_features, predict_logits


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Frechet distance between Gaussians fitted to two feature sets [n, d] (FID's formula on any features):
    |mu_a - mu_b|^2 + tr(S_a) + tr(S_b) - 2 tr((S_a S_b)^1/2), in float64 via symmetric eigendecompositions."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1] or min(len(a), len(b)) < 2:
        raise ValueError(f"frechet_distance needs two [n>=2, d] feature sets of the same d (got {a.shape}, {b.shape})")
    mu = a.mean(0) - b.mean(0)
    sa, sb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    w, v = np.linalg.eigh(sa)
    root_a = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    cross = np.linalg.eigvalsh(root_a @ sb @ root_a)
    value = mu @ mu + np.trace(sa) + np.trace(sb) - 2 * np.sqrt(np.clip(cross, 0, None)).sum()
    return float(max(value, 0.0))


def generated_class(ctx: Context, c: int) -> tuple[list[str], torch.Tensor]:
    """Class ``c``'s generated pool: image paths and uint8 images."""
    return read_class(ctx.store, "generated", c, ctx.cfg.channels)


def run_quality(ctx: Context, shard: Shard, inputs) -> list[FileRecord]:
    """How real the generated pool looks to the teacher: its accuracy on the pool (per class and overall) and the
    Frechet distance between teacher features of the pool and of real validation images; a sample grid PNG."""
    cfg, src = ctx.cfg, ctx.source
    teacher = teacher_of(ctx, inputs).model
    mean, std = cfg.normalization
    pools = [generated_class(ctx, c)[1] for c in range(src.num_classes)]
    pool = ArraySplit("generated", torch.cat(pools).numpy(),
                      np.concatenate([np.full(len(p), c) for c, p in enumerate(pools)]), src.num_classes, "generated")
    everything = np.arange(len(pool))
    logits = predict_logits(teacher, normalize(pool.images, mean, std), cfg.labels.batch_size, ctx.device, cfg.runtime)
    correct = logits.argmax(1).numpy() == pool.labels
    real = src.val if src.val is not None and len(src.val) else src.train  # never the test split
    n_ref = min(cfg.method.diffusion.reference_images, len(real))
    ref = np.sort(torch.randperm(len(real), generator=generator(cfg.seed, "quality"))[:n_ref].numpy())
    fd = frechet_distance(penultimate_features(teacher, pool, everything, mean, std, ctx.device, cfg.runtime).numpy(),
                          penultimate_features(teacher, real, ref, mean, std, ctx.device, cfg.runtime).numpy())
    quality = {
        "generated_images": len(pool), "reference_images": n_ref, "frechet_distance": round(fd, 6),
        "teacher_accuracy": round(float(correct.mean()), 6),
        "teacher_accuracy_per_class": {src.classes[c]: round(float(correct[pool.labels == c].mean()), 6)
                                       for c in range(src.num_classes)},
    }
    return [ctx.store.write_bytes("generation/quality.json", json.dumps(quality, indent=1).encode()),
            ctx.store.write_bytes("generation/grid.png", png_bytes(image_grid([p[:10] for p in pools])))]


def generated_picks(ctx: Context, select: str, c: int, images: torch.Tensor,
                    teacher: torch.nn.Module) -> tuple[list[int], np.ndarray | None]:
    """Which ``method.ipc`` of class ``c``'s generated ``images`` the rule ``select`` keeps (random, realism or
    diversity; see ``method.diffusion.select``), with their realism scores for realism (else None)."""
    cfg = ctx.cfg
    ipc, (mean, std) = cfg.method.ipc, cfg.normalization
    if select == "random":
        return torch.randperm(len(images), generator=generator(cfg.seed, "generated-select", c))[:ipc].tolist(), None
    if select == "realism":
        logits = predict_logits(teacher, normalize(images, mean, std), cfg.labels.batch_size, ctx.device, cfg.runtime)
        scores = torch.nn.functional.cross_entropy(logits, torch.full((len(images),), c), reduction="none").numpy()
        picks = top_k(scores, ipc, largest=False)
        return picks, scores[picks]
    pool = ArraySplit("generated", images.numpy(), np.full(len(images), c), ctx.source.num_classes, "generated")
    feats = penultimate_features(teacher, pool, np.arange(len(pool)), mean, std, ctx.device, cfg.runtime)
    return k_center_greedy(feats, ipc), None


def run_generated_selection(ctx: Context, shard: Shard, inputs) -> list[FileRecord]:
    """Reduce each class's generated pool to ``ipc`` images by ``method.diffusion.select``."""
    cfg = ctx.cfg
    teacher = teacher_of(ctx, inputs).model
    files = []
    for c in shard.classes:
        paths, images = generated_class(ctx, c)
        if len(images) < cfg.method.ipc:
            raise DataError(f"class {c}: {len(images)} generated images, fewer than method.ipc={cfg.method.ipc} "
                            "(raise method.diffusion.time_budget_s or images_per_class)")
        picks, scores = generated_picks(ctx, cfg.method.diffusion.select, c, images, teacher)
        size = cfg.image_size
        rows = [synthetic_row(c, j, size, source_id=paths[i], crop=size,
                              score=None if scores is None else float(scores[j])) for j, i in enumerate(picks)]
        files += write_class(ctx.store, "distilled", c, images[picks], rows)
    return files


QUALITY = Stage("quality", ("dataset", "teacher", "generation"), ("dataset", "method"), single_shard("quality"),
                run_quality, doc="teacher accuracy and Frechet distance of the generated pool; a sample grid")
GENERATED_SELECTION = Stage("synthesis", ("dataset", "teacher", "generation"), ("dataset", "method"), class_groups,
                            run_generated_selection, doc="keep ipc generated images per class")
