"""Coreset selection: which real images of a class to keep.

Geometric selections work on one class's feature vectors (the teacher's penultimate features):

- :func:`herding`: greedy herding (Welling 2009, as iCaRL and DeepCore use it): each step keeps the point
  that brings the mean of the kept points closest to the class mean;
- :func:`k_center_greedy`: the greedy 2-approximation of k-center (Sener & Savarese 2018): each step keeps
  the point farthest from everything kept so far.

Training-dynamics scores work on what a model trained on the full set did with each sample:

- :func:`el2n`: the L2 norm of softmax output minus the one-hot label (Paul et al. 2021), per sample;
- :func:`forgetting_events`: how often a sample goes from classified correctly to incorrectly between
  consecutive presentations (Toneva et al. 2019); a sample never classified correctly counts as forgotten
  at every presentation (the paper's convention: such samples are the most "forgettable");
- :func:`cad_scores`: CAD-Prune's compute-aware difficulty, the standard deviation of each sample's EL2N
  over a sliding window of J consecutive checkpoints (unbiased, as Dynamic Uncertainty), averaged over the
  last W windows (the last one ends at the last checkpoint).

All functions are deterministic given their inputs (ties go to the lowest index).
"""

from __future__ import annotations

import numpy as np
import torch


def herding(features: torch.Tensor, k: int) -> list[int]:
    """Indices of ``k`` rows of ``features`` [n, d] chosen by greedy herding, in the order chosen."""
    x = features.double()
    n = len(x)
    _check_k(k, n)
    target = x.mean(0)
    chosen: list[int] = []
    total = torch.zeros_like(target)
    free = torch.ones(n, dtype=torch.bool)
    for t in range(1, k + 1):
        dist = ((target - (total + x) / t) ** 2).sum(1)
        dist[~free] = float("inf")
        i = int(torch.argmin(dist))
        chosen.append(i)
        total += x[i]
        free[i] = False
    return chosen


def k_center_greedy(features: torch.Tensor, k: int, first: int | None = None) -> list[int]:
    """Indices of ``k`` rows chosen by greedy k-center. The first is ``first`` or, by default, the point
    closest to the mean; each next one maximises its distance to the nearest chosen point."""
    x = features.double()
    n = len(x)
    _check_k(k, n)
    if first is None:
        first = int(torch.argmin(((x - x.mean(0)) ** 2).sum(1)))
    chosen = [first]
    nearest = ((x - x[first]) ** 2).sum(1)
    for _ in range(k - 1):
        i = int(torch.argmax(nearest))
        chosen.append(i)
        nearest = torch.minimum(nearest, ((x - x[i]) ** 2).sum(1))
    return chosen


def el2n(probabilities: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """||softmax output - one-hot label||_2 per sample; ``probabilities`` [n, C], ``labels`` [n]."""
    onehot = torch.nn.functional.one_hot(labels.long(), probabilities.shape[1]).to(probabilities.dtype)
    return torch.linalg.vector_norm(probabilities - onehot, dim=1)


def forgetting_events(correct: np.ndarray) -> np.ndarray:
    """Forgetting events per sample from ``correct`` [presentations, n] (bool, in presentation order)."""
    correct = np.asarray(correct, dtype=bool)
    events = (correct[:-1] & ~correct[1:]).sum(0)
    never_learned = ~correct.any(0)
    return np.where(never_learned, correct.shape[0], events)


def cad_scores(el2n_by_checkpoint: np.ndarray, window: int, last: int) -> np.ndarray:
    """CAD-Prune scores from ``el2n_by_checkpoint`` [checkpoints, n]: the unbiased standard deviation
    of each sample's EL2N over every window of ``window`` consecutive checkpoints, averaged over the last
    ``last`` windows."""
    values = np.asarray(el2n_by_checkpoint, dtype=np.float64)
    k = values.shape[0]
    if not 2 <= window <= k:
        raise ValueError(f"CAD window J={window} needs 2 <= J <= checkpoints ({k})")
    windows = k - window + 1
    if not 1 <= last <= windows:
        raise ValueError(f"CAD last W={last} needs 1 <= W <= number of windows ({windows})")
    stds = np.stack([values[s : s + window].std(0, ddof=1) for s in range(windows - last, windows)])
    return stds.mean(0)


def top_k(scores: np.ndarray, k: int, largest: bool = True) -> list[int]:
    """Indices of the ``k`` largest (or smallest) scores, ties broken by the lower index."""
    scores = np.asarray(scores, dtype=np.float64)
    _check_k(k, len(scores))
    order = np.argsort(-scores if largest else scores, kind="stable")
    return [int(i) for i in order[:k]]


def _check_k(k: int, n: int) -> None:
    if not 1 <= k <= n:
        raise ValueError(f"cannot select {k} of {n} samples")
