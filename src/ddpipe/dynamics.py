"""Training dynamics: what a proxy model trained on the full training set does with every sample.

:func:`record_dynamics` trains a fresh proxy (the teacher's recipe, for a given number of steps) and, at
each checkpoint step, runs every training sample through it once (eval mode, no augmentation) and keeps
the sample's EL2N (||softmax - one-hot||_2) and whether it was classified correctly. The coreset scores of
:mod:`ddpipe.coreset` are computed from these records: EL2N at an early checkpoint (averaged over proxy
seeds), forgetting events between consecutive checkpoints, CAD-Prune's windowed standard deviation.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Callable

import numpy as np
import pyarrow as pa
import torch
from torch import nn

from ddpipe.config import AugmentConfig, OptimConfig, RuntimeConfig
from ddpipe.coreset import el2n
from ddpipe.data import Split, normalize
from ddpipe.train import autocast, batch_to, fit_classifier


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
    for images, labels in split.batches(indices, batch_size, runtime.loader_workers):
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
