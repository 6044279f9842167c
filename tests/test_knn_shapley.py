"""Tests for KNN-Shapley: exact against a brute-force Shapley reference, truncated against the exact values."""

import itertools
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import Tensor

from lightning_repair.distributed import SINGLE_PROCESS, Ranks
from lightning_repair.identify.knn_shapley import (KNNShapley, knn_shapley_scores, knn_shapley_values,
                                                   truncation_error_bound, truncation_for)

DDP_SCRIPT = Path(__file__).parent / "scripts" / "ddp_knn_shapley.py"


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


@pytest.mark.parametrize("harm_margin", [0.0, 1.0, 2.5])
def test_the_natural_cause_set_is_the_examples_hurting_by_more_than_a_margin_times_the_mean_value(
        harm_margin: float) -> None:
    """value < −harm_margin × v(D)/N, where v(D)/N, by efficiency, is the mean value (checked against the utility)."""
    from lightning_repair.selection import select_causes

    train_emb, train_lab, util_emb, util_lab = _random_problem(3, 40, 4)
    values = knn_shapley_values(train_emb, train_lab, util_emb, util_lab, k=3)
    full = _knn_utility(tuple(range(40)), train_emb, train_lab, util_emb, util_lab, 3)
    scorer = KNNShapley(k=3, harm_margin=harm_margin)
    threshold = scorer.threshold_for(-values)
    assert threshold == pytest.approx(harm_margin * full / 40, abs=1e-12)
    causes = set(select_causes(-values, threshold=threshold).tolist())
    expected = set(torch.nonzero(values < -harm_margin * full / 40).flatten().tolist())
    assert causes == expected and (harm_margin > 0 or causes == set(torch.nonzero(values < 0).flatten().tolist()))
    if harm_margin == 2.5:
        assert causes < set(torch.nonzero(values < 0).flatten().tolist())  # a real margin: fewer causes


def test_a_mean_value_below_zero_from_truncation_counts_as_zero_and_a_negative_margin_is_refused() -> None:
    assert KNNShapley(harm_margin=1.0).threshold_for(torch.tensor([1e-9, 0.0, 2e-9])) == 0.0
    with pytest.raises(ValueError, match="harm_margin must be ≥ 0"):
        KNNShapley(harm_margin=-1.0)


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


@pytest.mark.parametrize("truncation", [None, 6])
def test_batch_size_invariance(truncation: int | None) -> None:
    train_emb, train_lab, util_emb, util_lab = _random_problem(3, 50, 37)
    problem = (train_emb, train_lab, util_emb, util_lab)
    one = knn_shapley_values(*problem, k=4, batch_size=1, truncation=truncation)
    many = knn_shapley_values(*problem, k=4, batch_size=256, truncation=truncation)
    odd = knn_shapley_values(*problem, k=4, batch_size=10, truncation=truncation)
    torch.testing.assert_close(one, many, atol=1e-12, rtol=0)
    torch.testing.assert_close(odd, many, atol=1e-12, rtol=0)


@pytest.mark.parametrize("truncation", [None, 1])
def test_ties_broken_by_training_index(truncation: int | None) -> None:
    # Two identical training points with different labels: the lower index is nearer.
    train_emb = torch.tensor([[1.0, 1.0], [1.0, 1.0]])
    train_lab = torch.tensor([0, 1])
    values = knn_shapley_values(train_emb, train_lab, torch.zeros(1, 2), torch.tensor([0]), k=1,
                                truncation=truncation)
    # Sorted order (0, 1): s_2 = 0 / 2 = 0 and s_1 = s_2 + (1 - 0) / 1 * 1 / 1 = 1.
    torch.testing.assert_close(values, torch.tensor([1.0, 0.0], dtype=torch.float64))


def _truncated_reference(
    train_emb: Tensor, train_lab: Tensor, util_emb: Tensor, util_lab: Tensor, k: int, t: int
) -> Tensor:
    """The values truncated at rank T as the module docstring defines them, in plain Python (exact for T = N).

    Args:
        train_emb: Training embeddings (N, d).
        train_lab: Training labels (N,).
        util_emb: Utility embeddings (U, d).
        util_lab: Utility labels (U,).
        k: Number of neighbours, at most T.
        t: Truncation T, at most N.
    """
    n = len(train_lab)
    values = torch.zeros(n, dtype=torch.float64)
    for x_u, y_u in zip(util_emb, util_lab):
        dists = [float(torch.linalg.norm(e - x_u)) for e in train_emb]
        order = sorted(range(n), key=dists.__getitem__)  # stable: equal distances by index
        m = [int(train_lab[j] == y_u) for j in order]
        c = sum(m[t:])
        s = m[t - 1] / t - (c / (n - t) * (1 / t - 1 / n) if t < n else 0.0)
        values[order[t - 1]] += s
        for i in range(t - 1, 0, -1):  # rank i (1-based) from rank i + 1
            s += (m[i - 1] - m[i]) / k * min(k, i) / i
            values[order[i - 1]] += s
        if t < n:
            h = sum(1 / i for i in range(t + 1, n + 1)) / (n - t)
            for j in order[t:]:
                m_j = int(train_lab[j] == y_u)
                values[j] += m_j * h - (c - m_j) / max(n - t - 1, 1) * (h - 1 / n)
    return values / len(util_lab)


def _duplicates_problem(seed: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """40 training points on 8 distinct float32 rows of 64 dimensions, so groups of duplicates straddle ranks."""
    gen = torch.Generator().manual_seed(seed)
    distinct = torch.randn(8, 64, generator=gen)
    return (distinct[torch.randint(0, 8, (40,), generator=gen)], torch.randint(0, 2, (40,), generator=gen),
            torch.randn(6, 64, generator=gen), torch.randint(0, 2, (6,), generator=gen))


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("truncation", [3, 7, 13, 39, 40])
def test_truncated_and_duplicates_match_the_reference(seed: int, truncation: int) -> None:
    # Duplicates get different matmul roundings (different kernels for different columns); they must still tie
    # exactly, the lower index nearer, also when topk keeps only part of a group.
    problem = _duplicates_problem(seed)
    expected = _truncated_reference(*problem, k=3, t=truncation)
    actual = knn_shapley_values(*problem, k=3, truncation=truncation, batch_size=4)
    torch.testing.assert_close(actual, expected, atol=1e-12, rtol=0)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("truncation", [5, 20, 100])
def test_truncated_values_within_the_bound(seed: int, truncation: int) -> None:
    train_emb, train_lab, util_emb, util_lab = _random_problem(seed, 300, 40)
    exact = knn_shapley_values(train_emb, train_lab, util_emb, util_lab, k=5)
    truncated = knn_shapley_values(train_emb, train_lab, util_emb, util_lab, k=5, truncation=truncation)
    error = (truncated - exact).abs().max().item()
    assert 0 < error <= truncation_error_bound(truncation, 300)


def _adversarial_problem(n: int, t: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Rank i at distance i from the one utility point; its label only at ranks T+1 .. T+100, just past T."""
    labels = torch.zeros(n, dtype=torch.long)
    labels[t : t + 100] = 1
    return (torch.arange(1, n + 1, dtype=torch.float64)[:, None], labels, torch.zeros(1, 1, dtype=torch.float64),
            torch.tensor([1]))


def test_bound_is_nearly_reached_and_the_tolerance_holds() -> None:
    # The bound 1/T - 1/N is nearly reached when all the tail's matches sit just past rank T.
    n = 2000
    problem = _adversarial_problem(n, 10)
    error = (knn_shapley_values(*problem, k=1, truncation=10) - knn_shapley_values(*problem, k=1)).abs().max()
    assert 0.8 * truncation_error_bound(10, n) < error <= truncation_error_bound(10, n)

    # truncation_for meets its tolerance on such data; a quarter of its T does not.
    tolerance = 0.01
    t = truncation_for(tolerance, n, 1)
    for truncation, within in ((t, True), (t // 4, False)):
        problem = _adversarial_problem(n, truncation)
        exact = knn_shapley_values(*problem, k=1)
        error = (knn_shapley_values(*problem, k=1, truncation=truncation) - exact).abs().max().item()
        assert (error <= tolerance) == within, (truncation, error)


def test_truncation_for() -> None:
    assert truncation_for(1e-3, 50_000, 5) == 981  # 1/981 - 1/50000 <= 1e-3 < 1/980 - 1/50000
    assert truncation_error_bound(981, 50_000) <= 1e-3 < truncation_error_bound(980, 50_000)
    assert truncation_for(0.5, 1000, 5) == 5  # never below K
    assert truncation_for(1e-3, 20, 5) is None  # only the exact values meet it
    assert truncation_error_bound(None, 20) == truncation_error_bound(20, 20) == 0.0
    with pytest.raises(ValueError, match="tolerance must be > 0"):
        truncation_for(0.0, 100, 5)
    with pytest.raises(ValueError, match="tolerance must be > 0"):
        KNNShapley(tolerance=-1e-3)


@pytest.mark.parametrize(("k", "truncation"), [(3, 7), (3, 50), (9, 9)])
def test_truncation_reaching_n_is_exact(k: int, truncation: int) -> None:
    train_emb, train_lab, util_emb, util_lab = _random_problem(4, 7, 3)
    expected = _brute_force_shapley(train_emb, train_lab, util_emb, util_lab, k)
    actual = knn_shapley_values(train_emb, train_lab, util_emb, util_lab, k=k, truncation=truncation)
    torch.testing.assert_close(actual, expected, atol=1e-9, rtol=0)


def test_ranks_single_process_is_the_identity() -> None:
    indices = torch.arange(5)
    torch.testing.assert_close(SINGLE_PROCESS.gather(indices, lambda share: share * 2), indices * 2)
    tensor = torch.ones(3)
    assert SINGLE_PROCESS.sum(tensor) is tensor
    shares = [Ranks(rank, 3).share(10) for rank in range(3)]
    assert shares == [slice(0, 4), slice(4, 8), slice(8, 10)]
    assert Ranks(1, 2).share(1) == slice(1, 1)  # more ranks than items: the last ones get none


def test_ddp_ranks_share_the_work_and_get_the_single_process_values(tmp_path: Path) -> None:
    run = subprocess.run([sys.executable, str(DDP_SCRIPT), str(tmp_path)], capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    single = torch.load(tmp_path / "single.pt")
    assert single["embedded"] == [101, 101]
    for rank in (0, 1):
        sharded = torch.load(tmp_path / f"rank_{rank}.pt")
        assert sharded.keys() == single.keys()
        for name, values in single.items():
            if name == "embedded":  # each rank embeds its own share of D: 51 and 50 of 101
                assert sharded[name] == [[51, 50][rank]] * 2
            else:  # the function in float64; the scorer in float32, whose embeddings see other batches
                torch.testing.assert_close(sharded[name], values, atol=1e-12 if values.dtype == torch.float64
                                           else 1e-6, rtol=0, msg=name)


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
        (_GOOD, {"k": 2, "truncation": 1}, "truncation must be None \\(exact\\) or an integer >= k = 2"),
        (_GOOD, {"truncation": 3.0}, "truncation must be None"),
    ],
)
def test_input_validation(args: tuple[Tensor, ...], kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        knn_shapley_values(*args, **kwargs)
