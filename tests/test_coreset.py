"""Coreset selections and training-dynamics scores: hand examples, direct computations, real images."""

import itertools

import numpy as np
import pytest
import torch

from ddpipe.methods.selection.coreset import cad_scores, el2n, forgetting_events, herding, k_center_greedy, top_k


def test_herding_picks_the_point_closest_to_the_running_mean():
    x = torch.tensor([[0.0], [10.0], [4.0], [6.0], [5.2]])  # class mean 5.04
    # step 1: 5.2 is nearest the mean; step 2: (5.2 + 4) / 2 = 4.6 beats (5.2 + 6) / 2 = 5.6;
    # step 3: (9.2 + 6) / 3 = 5.07 beats (9.2 + 10) / 3 = 6.4 and (9.2 + 0) / 3 = 3.07
    assert herding(x, 3) == [4, 2, 3]


def test_k_center_greedy_maximises_the_minimum_distance():
    x = torch.tensor([[0.0, 0.0], [1.0, 0.0], [2.0, 0.0], [10.0, 0.0], [5.0, 4.0], [9.0, 1.0]])
    chosen = k_center_greedy(x, 3, first=0)
    assert chosen == [0, 3, 4]

    def min_gap(ix):
        return min(float(torch.dist(x[a], x[b])) for a, b in itertools.combinations(ix, 2))

    best = max(min_gap((0, *rest)) for rest in itertools.combinations(range(1, 6), 2))
    assert min_gap(chosen) == pytest.approx(best)


@pytest.mark.fmnist
def test_selections_on_real_images(trained_teacher):
    """On one Fashion-MNIST class: herding's 10 images have a mean closer to the class mean than random
    picks; k-center's spread (minimum pairwise distance) is wider than random picks'."""
    cfg, source, _ = trained_teacher
    idx = source.train.class_indices(0)[:200]
    x = source.train.batch(idx).float().flatten(1)
    mean = x.mean(0)
    g = torch.Generator().manual_seed(0)
    randoms = [torch.randperm(len(x), generator=g)[:10].tolist() for _ in range(20)]
    herd = herding(x, 10)
    assert float(torch.dist(x[herd].mean(0), mean)) < min(float(torch.dist(x[r].mean(0), mean)) for r in randoms)
    spread = lambda ix: float(torch.pdist(x[ix]).min())  # noqa: E731
    assert spread(k_center_greedy(x, 10)) > max(spread(r) for r in randoms)


def test_el2n_matches_a_direct_computation():
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.0, 0.0, 0.0], [-3.0, 1.0, 4.0]])
    labels = torch.tensor([0, 2, 1])
    p = logits.softmax(1)
    direct = [float(np.sqrt(sum((float(p[i, c]) - (c == int(labels[i]))) ** 2 for c in range(3)))) for i in range(3)]
    assert el2n(p, labels).tolist() == pytest.approx(direct)
    assert float(el2n(torch.eye(3), torch.arange(3)).max()) == 0.0


def test_forgetting_events_count_correct_to_incorrect_transitions():
    correct = np.array([[1, 0, 0, 1], [0, 0, 1, 1], [1, 0, 0, 1], [0, 0, 1, 1]], dtype=bool)
    # sample 0: 1 0 1 0 -> 2 events; sample 1 never learned -> 4 (every presentation); sample 2: 0 1 0 1 -> 1
    assert forgetting_events(correct).tolist() == [2, 4, 1, 0]


def test_cad_scores_match_a_direct_computation():
    rng = np.random.default_rng(0)
    values = rng.random((7, 5))  # 7 checkpoints, 5 samples
    window, last = 3, 2  # windows start at 0..4; the last two start at 3 and 4
    direct = [(np.std(values[3:6, i], ddof=1) + np.std(values[4:7, i], ddof=1)) / 2 for i in range(5)]
    assert cad_scores(values, window, last) == pytest.approx(direct)
    with pytest.raises(ValueError, match="W=6"):
        cad_scores(values, window, 6)
    with pytest.raises(ValueError, match="J=8"):
        cad_scores(values, 8, 1)


def test_top_k_breaks_ties_by_index():
    assert top_k(np.array([0.5, 0.9, 0.5, 0.9]), 3) == [1, 3, 0]
    assert top_k(np.array([0.5, 0.9, 0.5, 0.9]), 3, largest=False) == [0, 2, 1]
