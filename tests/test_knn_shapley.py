"""Tests for exact KNN-Shapley against a brute-force Shapley reference."""

import itertools
import math

import pytest
import torch
from torch import Tensor

from lightning_repair.identify.knn_shapley import knn_shapley_scores, knn_shapley_values


def _knn_utility(
    subset: tuple[int, ...],
    train_emb: Tensor,
    train_lab: Tensor,
    util_emb: Tensor,
    util_lab: Tensor,
    k: int,
) -> float:
    """KNN utility v(S) averaged over utility points (v(empty) = 0).

    Args:
        subset: Training indices in S.
        train_emb: Training embeddings (N, d).
        train_lab: Training labels (N,).
        util_emb: Utility embeddings (U, d).
        util_lab: Utility labels (U,).
        k: Number of neighbours.
    """
    if not subset:
        return 0.0
    total = 0.0
    for x_u, y_u in zip(util_emb, util_lab):
        dists = [float(torch.linalg.norm(train_emb[j] - x_u)) for j in subset]
        nearest = [subset[j] for j in sorted(range(len(subset)), key=dists.__getitem__)][:k]
        total += sum(int(train_lab[j] == y_u) for j in nearest) / k
    return total / len(util_emb)


def _brute_force_shapley(
    train_emb: Tensor, train_lab: Tensor, util_emb: Tensor, util_lab: Tensor, k: int
) -> Tensor:
    """Exact Shapley values by enumerating every subset of the training set.

    Args:
        train_emb: Training embeddings (N, d).
        train_lab: Training labels (N,).
        util_emb: Utility embeddings (U, d).
        util_lab: Utility labels (U,).
        k: Number of neighbours.
    """
    n = train_emb.shape[0]
    utility = {
        subset: _knn_utility(subset, train_emb, train_lab, util_emb, util_lab, k)
        for size in range(n + 1)
        for subset in itertools.combinations(range(n), size)
    }
    values = torch.zeros(n, dtype=torch.float64)
    for i in range(n):
        others = [j for j in range(n) if j != i]
        for size in range(n):
            weight = math.factorial(size) * math.factorial(n - size - 1) / math.factorial(n)
            for subset in itertools.combinations(others, size):
                with_i = tuple(sorted(subset + (i,)))
                values[i] += weight * (utility[with_i] - utility[subset])
    return values


def _random_problem(seed: int, n: int, u: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return (
        torch.randn(n, 2, generator=gen, dtype=torch.float64),
        torch.randint(0, 3, (n,), generator=gen),
        torch.randn(u, 2, generator=gen, dtype=torch.float64),
        torch.randint(0, 3, (u,), generator=gen),
    )


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("k", [1, 2, 3, 5, 9])
@pytest.mark.parametrize(("n", "u"), [(7, 1), (8, 2), (7, 3)])
def test_matches_brute_force(seed: int, k: int, n: int, u: int) -> None:
    train_emb, train_lab, util_emb, util_lab = _random_problem(seed, n, u)
    expected = _brute_force_shapley(train_emb, train_lab, util_emb, util_lab, k)
    actual = knn_shapley_values(train_emb, train_lab, util_emb, util_lab, k=k)
    assert actual.dtype == torch.float64
    torch.testing.assert_close(actual, expected, atol=1e-9, rtol=0)


@pytest.mark.parametrize("k", [1, 3, 5, 20])
def test_efficiency_axiom(k: int) -> None:
    train_emb, train_lab, util_emb, util_lab = _random_problem(7, 30, 1)
    values = knn_shapley_values(train_emb, train_lab, util_emb, util_lab, k=k)
    full = _knn_utility(tuple(range(30)), train_emb, train_lab, util_emb, util_lab, k)
    assert values.sum().item() == pytest.approx(full, abs=1e-12)


def test_mislabeled_nearest_point_is_negative() -> None:
    train_emb = torch.tensor([[0.1, 0.0], [0.2, 0.0], [3.0, 0.0], [4.0, 0.0], [5.0, 0.0]])
    train_lab = torch.tensor([1, 0, 0, 1, 1])  # index 0 is mislabeled, index 1 is correct
    util_emb = torch.tensor([[0.0, 0.0]])
    util_lab = torch.tensor([0])
    values = knn_shapley_values(train_emb, train_lab, util_emb, util_lab, k=2)
    assert values[0] < 0
    assert values[1] > 0
    scores = knn_shapley_scores(train_emb, train_lab, util_emb, util_lab, k=2)
    torch.testing.assert_close(scores, -values)
    assert scores.argmax().item() == 0


def test_batch_size_invariance() -> None:
    train_emb, train_lab, util_emb, util_lab = _random_problem(3, 50, 37)
    one = knn_shapley_values(train_emb, train_lab, util_emb, util_lab, k=4, batch_size=1)
    many = knn_shapley_values(train_emb, train_lab, util_emb, util_lab, k=4, batch_size=256)
    odd = knn_shapley_values(train_emb, train_lab, util_emb, util_lab, k=4, batch_size=10)
    torch.testing.assert_close(one, many, atol=1e-12, rtol=0)
    torch.testing.assert_close(odd, many, atol=1e-12, rtol=0)


def test_ties_broken_by_training_index() -> None:
    # Two identical training points with different labels: the lower index is nearer.
    train_emb = torch.tensor([[1.0, 1.0], [1.0, 1.0]])
    train_lab = torch.tensor([0, 1])
    values = knn_shapley_values(train_emb, train_lab, torch.zeros(1, 2), torch.tensor([0]), k=1)
    # Sorted order (0, 1): s_2 = 0 / 2 = 0 and s_1 = s_2 + (1 - 0) / 1 * 1 / 1 = 1.
    torch.testing.assert_close(values, torch.tensor([1.0, 0.0], dtype=torch.float64))


_GOOD = (torch.randn(4, 2), torch.tensor([0, 1, 0, 1]), torch.randn(2, 2), torch.tensor([0, 1]))


@pytest.mark.parametrize(
    ("args", "kwargs", "match"),
    [
        ((torch.randn(4), *_GOOD[1:]), {}, "train_embeddings must be 2-D"),
        ((_GOOD[0], _GOOD[1], torch.randn(2), _GOOD[3]), {}, "utility_embeddings must be 2-D"),
        ((_GOOD[0], torch.zeros(4, 1, dtype=torch.long), *_GOOD[2:]), {}, "train_labels must be 1-D"),
        ((*_GOOD[:3], torch.zeros(2, 3)), {}, "utility_labels must be 1-D"),
        ((_GOOD[0], torch.tensor([0, 1, 0]), *_GOOD[2:]), {}, "train_labels has 3 entries"),
        ((*_GOOD[:3], torch.tensor([0])), {}, "utility_labels has 1 entries"),
        ((_GOOD[0], _GOOD[1], torch.randn(2, 3), _GOOD[3]), {}, "Embedding dimensions differ"),
        ((torch.zeros(0, 2), torch.zeros(0, dtype=torch.long), *_GOOD[2:]), {}, "training set is empty"),
        ((*_GOOD[:2], torch.zeros(0, 2), torch.zeros(0, dtype=torch.long)), {}, "failure set is empty"),
        ((torch.ones(4, 2, dtype=torch.long), *_GOOD[1:]), {}, "floating point"),
        (_GOOD, {"k": 0}, "k must be an integer >= 1"),
        (_GOOD, {"k": 2.0}, "k must be an integer >= 1"),
        (_GOOD, {"batch_size": 0}, "batch_size must be an integer >= 1"),
    ],
)
def test_input_validation(args: tuple[Tensor, ...], kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        knn_shapley_values(*args, **kwargs)
