"""Training dynamics: what a proxy model trained on the full training set does with every sample.

:func:`record_dynamics` trains a fresh proxy (the teacher's recipe, for a given number of steps) and, at
each checkpoint step, runs every training sample through it once (eval mode, no augmentation) and keeps
the sample's EL2N (||softmax - one-hot||_2) and whether it was classified correctly. The coreset scores of
:mod:`ddpipe.methods.selection.coreset` are computed from these records: EL2N at an early checkpoint (averaged
over proxy seeds), forgetting events between consecutive checkpoints, CAD-Prune's windowed standard deviation.

The ``dynamics`` stage trains a proxy per ``selection.seeds`` and writes ``dynamics/seedS.parquet``
(:func:`dynamics_table`), shared across runs in ``<store>/shared/dynamics/`` (el2n, forgetting, cad and ca2d at
one ipc use the same records).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Callable

import numpy as np
import pyarrow as pa
import torch
from torch import nn

from ddpipe import progress
from ddpipe.augment import generator, seed_for
from ddpipe.config import AugmentConfig, OptimConfig, RunConfig, RuntimeConfig
from ddpipe.data import Split, normalize
from ddpipe.methods.selection.coreset import el2n
from ddpipe.models import init_model
from ddpipe.pipeline import Context, Shard, Stage, shared_key, shared_outputs
from ddpipe.store import FileRecord, table_bytes
from ddpipe.train import autocast, batch_to, fit_classifier, to_device


@dataclass
class Dynamics:
    steps: np.ndarray  # int64 [K]: the step after which each checkpoint was taken
    el2n: np.ndarray  # float32 [K, n]
    correct: np.ndarray  # bool [K, n]
    indices: np.ndarray  # int64 [n]: the training-split positions of the samples, in column order


def checkpoint_steps(total_steps: int, checkpoints: int) -> list[int]:
    """``checkpoints`` steps spread evenly over the run, the last at ``total_steps`` (distinct; fewer when the
    run has fewer steps)."""
    return sorted({max(1, round(total_steps * (k + 1) / checkpoints)) for k in range(checkpoints)})


@torch.no_grad()
def sample_records(model: nn.Module, split: Split, indices: np.ndarray, mean, std, device, runtime: RuntimeConfig,
                   batch_size: int = 1000) -> tuple[np.ndarray, np.ndarray]:
    """(EL2N, correct) of every sample in ``split[indices]`` under ``model`` (eval mode, no augmentation)."""
    model.eval()
    scores, hits = [], []
    for images, labels in split.batches(indices, batch_size, runtime, device):
        with autocast(device, runtime):
            logits = model(batch_to(normalize(images, mean, std), device, runtime)).float().cpu()
        scores.append(el2n(logits.softmax(1), labels))
        hits.append(logits.argmax(1) == labels)
    return torch.cat(scores).numpy().astype(np.float32), torch.cat(hits).numpy()


def record_dynamics(model: nn.Module, split: Split, indices: np.ndarray, *, steps: int, checkpoints: int,
                    batch_size: int, optim: OptimConfig, augment: AugmentConfig, label_smoothing: float,
                    gen: torch.Generator, mean, std, device, runtime: RuntimeConfig,
                    progress: Callable[[int, int], None] | None = None) -> Dynamics:
    """Train ``model`` (fresh, on ``device``) on ``split[indices]`` for ``steps`` steps and record every
    sample at each of :func:`checkpoint_steps`."""
    indices = np.asarray(indices, dtype=np.int64)
    at = set(checkpoint_steps(steps, checkpoints))
    taken, scores, hits = [], [], []

    def on_step(step: int) -> None:
        if step in at:
            s, h = sample_records(model, split, indices, mean, std, device, runtime)
            taken.append(step)
            scores.append(s)
            hits.append(h)
        if progress:
            progress(step, steps)

    fit_classifier(model, split, indices, batch_size=batch_size, optim=optim, augment=augment,
                   label_smoothing=label_smoothing, total_steps=steps, gen=gen, mean=mean, std=std, device=device,
                   runtime=runtime, on_step=on_step)
    return Dynamics(np.array(taken, dtype=np.int64), np.stack(scores), np.stack(hits), indices)


def dynamics_table(d: Dynamics, labels: np.ndarray) -> pa.Table:
    """One row per sample: ``source_index``, ``class_index``, ``el2n`` and ``correct`` (one value per
    checkpoint); the checkpoint steps are in the schema metadata (``steps``, JSON)."""
    k = len(d.steps)
    table = pa.table({
        "source_index": pa.array(d.indices, pa.int64()),
        "class_index": pa.array(labels[d.indices].astype(np.int32), pa.int32()),
        "el2n": pa.FixedSizeListArray.from_arrays(pa.array(d.el2n.T.reshape(-1), pa.float32()), k),
        "correct": pa.FixedSizeListArray.from_arrays(pa.array(d.correct.T.reshape(-1), pa.bool_()), k),
    })
    return table.replace_schema_metadata({"steps": json.dumps([int(s) for s in d.steps])})


def read_dynamics(table: pa.Table) -> Dynamics:
    steps = np.array(json.loads(table.schema.metadata[b"steps"]), dtype=np.int64)
    k, n = len(steps), table.num_rows
    el2n_values = table["el2n"].combine_chunks().flatten().to_numpy().reshape(n, k).T.copy()
    correct = np.asarray(table["correct"].combine_chunks().flatten().to_pylist(), dtype=bool).reshape(n, k).T.copy()
    return Dynamics(steps, el2n_values, correct, table["source_index"].to_numpy())


# ---------------------------------------------------------------- the dynamics stage


def dynamics_steps(cfg: RunConfig, num_classes: int) -> int:
    """Training steps of each dynamics proxy. ``matched``: the samples the downstream students see (their steps x
    batch size) in proxy batches, never fewer than the checkpoints."""
    sel = cfg.method.selection
    if sel.steps != "matched":
        return max(sel.steps, sel.checkpoints)
    n = cfg.method.ipc * num_classes
    seen = cfg.student_steps(n) * cfg.student_batch_size(n)
    return max(sel.checkpoints, -(-seen // sel.batch_size))


def dynamics_shards(ctx: Context, num_classes: int) -> list[Shard]:
    return [Shard(id=f"seed{s}", seed=s) for s in range(ctx.cfg.method.selection.seeds)]


def run_dynamics(ctx: Context, shard: Shard, inputs) -> list[FileRecord]:
    """Train proxy ``shard.seed`` on the full training split and record every sample at each checkpoint."""
    cfg, split = ctx.cfg, ctx.source.train
    sel, t = cfg.method.selection, cfg.teacher
    spec = sel.proxy or t.model
    steps = dynamics_steps(cfg, ctx.source.num_classes)
    recipe = {k: v for k, v in json.loads(cfg.section_json("teacher"))["teacher"].items()
              if k in ("optim", "augment", "label_smoothing")}
    key = shared_key({
        "data": split.fingerprint, "recipe": recipe, "proxy": spec.model_dump(mode="json"), "steps": steps,
        "checkpoints": sel.checkpoints, "batch_size": sel.batch_size, "seed": [cfg.seed, shard.seed],
    }, code=run_dynamics)

    def compute() -> dict[str, bytes]:
        mean, std = cfg.normalization
        model = init_model(spec, cfg.channels, ctx.source.num_classes, cfg.image_size,
                           seed_for(cfg.seed, "dynamics", shard.seed, "init"))
        model = to_device(model, ctx.device, cfg.runtime)
        d = record_dynamics(
            model, split, np.arange(len(split)), steps=steps, checkpoints=sel.checkpoints, batch_size=sel.batch_size,
            optim=t.optim, augment=t.augment, label_smoothing=t.label_smoothing,
            gen=generator(cfg.seed, "dynamics", shard.seed, "data"), mean=mean, std=std, device=ctx.device,
            runtime=cfg.runtime, progress=progress.stepper("dynamics", shard.id, every=10),
        )
        return {"dynamics.parquet": table_bytes(dynamics_table(d, split.labels))}

    data = shared_outputs(cfg, "dynamics", key, compute)["dynamics.parquet"]
    return [ctx.store.write_bytes(f"dynamics/{shard.id}.parquet", data, rows=len(split))]


DYNAMICS = Stage("dynamics", ("dataset",), ("dataset", "teacher", "method", "evaluation"), dynamics_shards, run_dynamics,
                 doc="train proxies on the full set; record each sample's EL2N and correctness at checkpoints")
