"""KNN-Shapley data values (Jia et al. 2019, Theorem 1), exact or truncated to the nearest T neighbours.

For one utility point ``(x_u, y_u)`` the training set is sorted by distance to ``phi(x_u)``: ``alpha_1`` nearest
... ``alpha_N`` farthest, and ``m_i = 1[y_{alpha_i} = y_u]``. Then

    s_{alpha_N} = m_N / max(N, K)   (the paper's 1/N assumes K <= N)
    s_{alpha_i} = s_{alpha_{i+1}} + (m_i - m_{i+1}) / K * min(K, i) / i

These are the exact Shapley values of the KNN utility
``v(S) = (1/K) * sum_{j=1}^{min(K, |S|)} 1[y_{alpha_j(S)} = y_u]`` (``v(empty) = 0``).
With several utility points the utility, and hence the values, are averaged.

Truncation. For ranks i >= K the step is (m_i - m_{i+1}) / i, and unrolling it from s_N = m_N / N gives

    s_i = m_i / i - t_i,   t_i = sum_{j > i} m_j / (j (j - 1))  in  [0, 1/i - 1/N]

(the sum telescopes: sum_{j > i} 1 / (j (j - 1)) = 1/i - 1/N). So a point at rank i >= K has s_i in
[1/N, 1/i] when m_i = 1 and in [-(1/i - 1/N), 0] when m_i = 0. With T >= K only the T nearest points are
ranked (``torch.topk``); the recursion from s_T down to s_1 reads only m_1 .. m_T, so it is exact up to the one
unknown t_T. Both unknowns are replaced by their mean over all orders of the N - T points beyond rank T, given
c = the number of them with the utility label (known from the class counts):

    t_T                 ~  c / (N - T) * (1/T - 1/N)
    s of a point beyond T ~  m h - q_m (h - 1/N),   h = mean of 1/i over T < i <= N,  q_m = (c - m) / (N - T - 1)

Each estimate lies in the interval that holds the exact value (t_T in [0, 1/T - 1/N]; beyond T the intervals
above with i > T, and h, q_m in [1/N, 1/(T+1)] and [0, 1]). So every per-utility-point value is off by at most
the interval's width, 1/T - 1/N (ranks <= T all share t_T's error), and so is their average over the utility
points: ``truncation_error_bound(T, N) = 1/T - 1/N``. Being means, the estimates are typically far closer.
"""

from __future__ import annotations

import math
from typing import Any
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from lightning_repair.adapter import BatchAdapter
from lightning_repair.curvature import batches, checked_logits
from lightning_repair.distributed import SINGLE_PROCESS, Ranks
from lightning_repair.examples import Examples, Rows
from lightning_repair.identify.base import Progress, Scorer, ScoringInputs, no_progress
from lightning_repair.params import last_linear_name


@dataclass(kw_only=True)
class KNNShapley(Scorer):
    """KNN-Shapley values (Jia et al. 2019; the report's proposal 2), truncated within a tolerance; score = −value.

    A negative value marks an example that hurts the K-nearest-neighbour classifier on the utility points, so
    the natural cause set needs no K, and the callback uses it when given no selection: {value < −harm_margin × v̄},
    where v̄ is the mean value of the round's examples (by the Shapley efficiency axiom, v(D) / N: what an average
    example adds to the KNN classifier's accuracy on the utility points). ``harm_margin=0`` is the plain
    {value < 0}.

    Under DDP (``inputs.ranks``) each rank embeds a share of D and of the utility points, and values against a
    share of the utility points; every rank ends with the same scores.

    Args:
        k: neighbours of the KNN utility.
        module: name of the module whose input is the embedding φ(x); default the last ``nn.Linear``.
        utility: ``"query"`` (F_q, the default) or ``"trusted"`` (F_q ∪ R_q: every validation example a method
            may read; the callback's R_q is half of the correctly classified ones).
        batch_size: at most this many utility points per distance computation (see ``CHUNK_ELEMENTS``).
        tolerance: the most any value may differ from the exact one; it sets the truncation T, the neighbours
            ranked per utility point, to the smallest with 1/T − 1/N ≤ tolerance (:func:`truncation_for`).
            None computes the exact values (a full sort of D per utility point).
        harm_margin: the natural cause set is the examples that hurt the utility by more than this many times
            what an average example adds to it (value < −harm_margin × mean value); 0: every negative value.
    """

    shardable = False

    k: int = 5
    module: str | None = None
    utility: str = "query"
    batch_size: int = 256
    # At N = 50,000 this ranks T = 8,334 neighbours per utility point (benchmarks/results/knn_speed.md).
    tolerance: float | None = 1e-4
    harm_margin: float = 0.0

    def __post_init__(self) -> None:
        if self.utility not in ("query", "trusted"):
            raise ValueError(f"utility must be 'query' or 'trusted', got {self.utility!r}.")
        if self.k < 1:
            raise ValueError(f"k must be ≥ 1, got {self.k}.")
        if self.tolerance is not None and not self.tolerance > 0:
            raise ValueError(f"tolerance must be > 0, got {self.tolerance!r}; use tolerance=None for exact values.")
        if not self.harm_margin >= 0:
            raise ValueError(f"harm_margin must be ≥ 0 (0: every negative value is a cause), got {self.harm_margin!r}.")

    def threshold_for(self, scores: Tensor) -> float:
        """value < −harm_margin × mean value, as a threshold on the scores (−value): harm_margin × mean value.
        The values of the round's examples sum to v(D) ≥ 0 (efficiency), so their mean is what an average example
        adds; truncation may leave it a hair below 0, which counts as 0."""
        mean_value = -float(scores.double().mean()) if len(scores) else 0.0
        return self.harm_margin * max(mean_value, 0.0)

    def score(self, inputs: ScoringInputs) -> Tensor:
        utility_loader = inputs.query if self.utility == "query" else inputs.trusted
        if utility_loader is None:
            raise ValueError("KNNShapley(utility='trusted') needs F_q ∪ R_q (`inputs.trusted`), which these inputs "
                             "do not provide.")
        model, ranks, adapter, recorded = inputs.model, inputs.ranks, inputs.adapter, inputs.recorded
        train_x, train_y = _shared_embeddings(model, inputs.train, "training", ranks, self.module, adapter,
                                              inputs.progress)
        if recorded is not None and recorded.module is _embedding_layer(model, self.module):
            # The round recorded these inputs over V already: no second pass over the utility points.
            utility_x, utility_y = recorded.query if self.utility == "query" else recorded.trusted
        else:
            utility_x, utility_y = _shared_embeddings(model, utility_loader, "validation", ranks, self.module,
                                                      adapter)
        truncation = None if self.tolerance is None else truncation_for(self.tolerance, len(train_y), self.k)
        return knn_shapley_scores(train_x, train_y, utility_x, utility_y, k=self.k, batch_size=self.batch_size,
                                  truncation=truncation, ranks=ranks).float().cpu()


DEFAULTS = KNNShapley()  # the functions below default to its hyperparameters

CHUNK_ELEMENTS = 2**21
"""Sizes a chunk of utility points, whatever ``batch_size``: its B × N distances are at most this many (8 MB in
float32), and its B × T bookkeeping of the nearest T (ranks, matches, increments, values: about eight float64 or
int64 arrays) at most an eighth of it per array (2 MB each). The round's memory then grows with N only by the
embeddings and a few numbers per example, and the exact values (T = N) hold no N × N-sized block either."""


def _validate(
    train_embeddings: Tensor,
    train_labels: Tensor,
    utility_embeddings: Tensor,
    utility_labels: Tensor,
    k: int,
    batch_size: int,
    truncation: int | None,
) -> None:
    """Raise a ValueError describing the first malformed input.

    Args:
        train_embeddings: Training embeddings, expected shape (N, d).
        train_labels: Training labels, expected shape (N,).
        utility_embeddings: Utility-point embeddings, expected shape (U, d).
        utility_labels: Utility-point labels, expected shape (U,).
        k: Number of neighbours, expected >= 1.
        batch_size: Utility points per chunk, expected >= 1.
        truncation: Neighbours ranked per utility point, expected None or >= k.
    """
    if train_embeddings.dim() != 2:
        raise ValueError(
            f"train_embeddings must be 2-D (N, d), got shape {tuple(train_embeddings.shape)}; "
            "flatten per-example features before calling."
        )
    if utility_embeddings.dim() != 2:
        raise ValueError(
            f"utility_embeddings must be 2-D (U, d), got shape {tuple(utility_embeddings.shape)}; "
            "flatten per-example features before calling."
        )
    if train_labels.dim() != 1:
        raise ValueError(
            f"train_labels must be 1-D (N,), got shape {tuple(train_labels.shape)}; "
            "pass class indices, not one-hot or logits."
        )
    if utility_labels.dim() != 1:
        raise ValueError(
            f"utility_labels must be 1-D (U,), got shape {tuple(utility_labels.shape)}; "
            "pass class indices, not one-hot or logits."
        )
    if not (train_embeddings.is_floating_point() and utility_embeddings.is_floating_point()):
        raise ValueError(
            "train_embeddings and utility_embeddings must be floating point, got "
            f"{train_embeddings.dtype} and {utility_embeddings.dtype}; cast them with .float()."
        )
    n = train_embeddings.shape[0]
    if n < 1:
        raise ValueError("The training set is empty (N = 0); pass at least one training point.")
    if utility_embeddings.shape[0] < 1:
        raise ValueError(
            "The failure set is empty (U = 0 utility points); pass at least one failing "
            "example to value the training data against."
        )
    if train_labels.shape[0] != n:
        raise ValueError(
            f"train_labels has {train_labels.shape[0]} entries but train_embeddings has {n} rows; "
            "they must describe the same training points."
        )
    if utility_labels.shape[0] != utility_embeddings.shape[0]:
        raise ValueError(
            f"utility_labels has {utility_labels.shape[0]} entries but utility_embeddings has "
            f"{utility_embeddings.shape[0]} rows; they must describe the same utility points."
        )
    if train_embeddings.shape[1] != utility_embeddings.shape[1]:
        raise ValueError(
            f"Embedding dimensions differ: train d={train_embeddings.shape[1]}, utility "
            f"d={utility_embeddings.shape[1]}; embed both sets with the same model."
        )
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be an integer >= 1, got {k!r}.")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}.")
    if truncation is not None and (isinstance(truncation, bool) or not isinstance(truncation, int)
                                   or truncation < k):
        raise ValueError(f"truncation must be None (exact) or an integer >= k = {k}, got {truncation!r}; "
                         "the truncated recursion starts at a rank where min(K, i) = K.")


def truncation_error_bound(truncation: int | None, n: int) -> float:
    """The most any value can differ from the exact one when ranking ``truncation`` of ``n`` points: 1/T − 1/N.

    Zero when exact (``truncation`` None or at least ``n``). See the module docstring for the proof.
    """
    if truncation is None or truncation >= n:
        return 0.0
    return 1 / truncation - 1 / n


def truncation_for(tolerance: float, n: int, k: int) -> int | None:
    """The smallest truncation T ≥ ``k`` whose :func:`truncation_error_bound` is at most ``tolerance``.

    Args:
        tolerance: the largest allowed change of any value, > 0.
        n: N, the number of training points.
        k: K of the KNN utility.

    Returns:
        T, or None when only T ≥ N (the exact values) meets the tolerance.
    """
    if not tolerance > 0:
        raise ValueError(f"tolerance must be > 0, got {tolerance!r}; use tolerance=None for exact values.")
    truncation = max(k, math.ceil(1 / (tolerance + 1 / n)))  # 1/T - 1/N <= tolerance
    return None if truncation >= n else truncation


class _Duplicates:
    """Exact duplicate rows of the training embeddings, so that they tie exactly and in index order.

    A matmul may round the distances to identical rows differently (different kernels for different columns),
    so the distances of a group's later members are copied from its first, lowest-index member; the sort then
    keeps them in index order, and :meth:`in_index_order` puts right what ``topk`` leaves unordered.
    """

    def __init__(self, train: Tensor) -> None:
        _, inverse = torch.unique(train, dim=0, return_inverse=True)
        n = train.shape[0]
        positions = torch.arange(n, device=train.device)
        first = torch.full((int(inverse.max()) + 1,), n, device=train.device)
        self.leader = first.scatter_reduce_(0, inverse, positions, "amin")[inverse]  # lowest index of the group
        self.later = torch.nonzero(self.leader != positions).flatten()
        self.any = len(self.later) > 0
        # members lists every point grouped by leader, in index order; start[i] is where i's group begins.
        self.members = torch.argsort(self.leader, stable=True)
        self.start = torch.searchsorted(self.leader[self.members], self.leader)

    def tie(self, distances: Tensor) -> None:
        """Gives every duplicate exactly its group leader's distances, in place."""
        distances[:, self.later] = distances[:, self.leader[self.later]]

    def in_index_order(self, order: Tensor, distances: Tensor) -> Tensor:
        """``order`` (B, T), at ``distances`` (B, T), with each duplicate group's places given to its lowest indices.

        The groups' members come in index order, and a group whose first members topk left out gets them back
        in place of its later ones.
        """
        leader = self.leader[order]
        by_leader = torch.argsort(leader, dim=1, stable=True)
        by_distance = by_leader.gather(1, torch.argsort(distances.gather(1, by_leader), dim=1, stable=True))
        leader = leader.gather(1, by_distance)  # sorted by (distance, leader): each group's places are adjacent
        place = torch.arange(order.shape[1], device=order.device).expand_as(order)
        new_group = torch.ones_like(leader, dtype=torch.bool)
        new_group[:, 1:] = leader[:, 1:] != leader[:, :-1]
        group_start = torch.where(new_group, place, 0).cummax(dim=1).values
        return self.members[self.start[leader] + place - group_start]


def _nearest(distances: Tensor, truncation: int, duplicates: _Duplicates) -> Tensor:
    """Training indices (B, T) of each row's ``truncation`` nearest points, nearest first, ties by index."""
    if duplicates.any:
        duplicates.tie(distances)
    if truncation == distances.shape[1]:
        return torch.sort(distances, dim=1, stable=True).indices
    nearest = torch.topk(distances, truncation, dim=1, largest=False, sorted=True)
    return duplicates.in_index_order(nearest.indices, nearest.values) if duplicates.any else nearest.indices


def knn_shapley_values(
    train_embeddings: Tensor,
    train_labels: Tensor,
    utility_embeddings: Tensor,
    utility_labels: Tensor,
    *,
    k: int = DEFAULTS.k,
    batch_size: int = DEFAULTS.batch_size,
    truncation: int | None = None,
    ranks: Ranks = SINGLE_PROCESS,
) -> Tensor:
    """KNN-Shapley value of every training point, averaged over utility points; exact or truncated.

    Distances come from one matmul per chunk of utility points (‖b‖² − 2a·b, the squared distance less ‖a‖²,
    which does not change a row's order; both sets centred on the training mean to keep the cancellation error
    small), on the inputs' device, with no host synchronisation inside the loop. Exact duplicate training points
    tie exactly and the lower index counts as nearer; distinct points whose distances differ by less than the
    matmul's rounding (about 1e-7 of the squared norms in float32) may come in either order, which may then
    differ between devices or chunk sizes. Memory is O(batch_size * N).

    Args:
        train_embeddings: Training embeddings phi(x), shape (N, d), floating point.
        train_labels: Training class labels, shape (N,).
        utility_embeddings: Utility-point embeddings, shape (U, d), floating point,
            on the same device as ``train_embeddings``.
        utility_labels: Utility-point class labels, shape (U,).
        k: Number of nearest neighbours K of the KNN utility; K > N is allowed.
        batch_size: At most this many utility points whose distances are computed at once (fewer when
            N or T is large: see ``CHUNK_ELEMENTS``).
        truncation: T, the neighbours ranked per utility point (``torch.topk``): every value then differs from
            the exact one by at most ``truncation_error_bound(T, N) = 1/T - 1/N`` (module docstring). None (the
            default) or T ≥ N gives the exact values. :func:`truncation_for` picks T from a tolerance.
        ranks: the processes to split the utility points across; each computes the values of its share, and
            the shares' sums are added on every rank, which then holds the single-process result. The
            embeddings must be the same on every rank.

    Returns:
        Float64 tensor of shape (N,); higher means the point helps the KNN
        classifier label the utility points correctly.

    Raises:
        ValueError: If shapes, dtypes, ``k``, ``batch_size`` or ``truncation`` are invalid, or
            either point set is empty.
    """
    _validate(train_embeddings, train_labels, utility_embeddings, utility_labels, k, batch_size, truncation)
    n = train_embeddings.shape[0]
    num_utility = utility_embeddings.shape[0]
    device = train_embeddings.device
    t = n if truncation is None else min(truncation, n)

    dtype = torch.promote_types(train_embeddings.dtype, utility_embeddings.dtype)
    center = train_embeddings.to(dtype).mean(0)
    train = train_embeddings.to(dtype) - center
    squared_norms = (train * train).sum(1)
    duplicates = _Duplicates(train)

    # Rank i (1-based) weight of the recursion: min(K, i) / (K * i), shared by all rows.
    rank = torch.arange(1, t + 1, device=device, dtype=torch.float64)
    weights = torch.clamp(rank, max=k) / (k * rank)

    # For truncation: per class, how many training points carry it; per utility point, the class's slot.
    classes, train_class, class_sizes = torch.unique(train_labels, return_inverse=True, return_counts=True)
    slot = torch.searchsorted(classes, utility_labels).clamp(max=len(classes) - 1)
    known = classes[slot] == utility_labels
    utility_class = torch.where(known, slot, len(classes))  # an extra slot for labels no training point has
    same_label = torch.where(known, class_sizes[slot], 0).to(torch.float64)
    beyond = n - t
    tail_ranks = torch.arange(t + 1, n + 1, device=device, dtype=torch.float64)
    mean_inverse_rank = (1 / tail_ranks).mean() if beyond else 0.0  # h
    # Beyond-T estimates summed over utility points: for every training point, plus per class for its own label.
    beyond_all = torch.zeros((), device=device, dtype=torch.float64)
    beyond_by_class = torch.zeros(len(classes) + 1, device=device, dtype=torch.float64)

    totals = torch.zeros(n, device=device, dtype=torch.float64)
    mine = ranks.share(num_utility)
    rows = max(1, min(batch_size, CHUNK_ELEMENTS // n, CHUNK_ELEMENTS // (8 * t)))  # within CHUNK_ELEMENTS' budget
    for start in range(mine.start, mine.stop, rows):
        stop = min(start + rows, mine.stop)
        chunk_lab = utility_labels[start:stop]
        # ‖a - b‖² - ‖a‖²: the utility point's own norm does not change the order along its row.
        distances = torch.addmm(squared_norms, utility_embeddings[start:stop].to(dtype) - center, train.T, alpha=-2)
        order = _nearest(distances, t, duplicates)  # (B, T): alpha_1 .. alpha_T
        match = (train_labels[order] == chunk_lab[:, None]).to(torch.float64)

        # increments[:, i] = s_i - s_{i+1} for i < T and s_T itself for the last rank,
        # so s is the reversed cumulative sum of the increments.
        increments = torch.empty_like(match)
        increments[:, :-1] = (match[:, :-1] - match[:, 1:]) * weights[:-1]
        if beyond == 0:
            # Theorem 1's base case m_N / N assumes K <= N; for K > N the utility is
            # additive and every value is m_i / K, which max(N, K) covers.
            increments[:, -1] = match[:, -1] / max(n, k)
            totals.index_add_(0, order.flatten(), increments.flip(1).cumsum(1).flip(1).flatten())
            continue
        # Truncated at T < N (so K <= T): the means over the orders of the points beyond T (module docstring).
        tail_matches = same_label[start:stop] - match.sum(1)  # c
        increments[:, -1] = match[:, -1] / t - tail_matches / beyond * (1 / t - 1 / n)
        spread = max(beyond - 1, 1)  # q_m's denominator; with one point beyond T its weight h - 1/N is 0
        if_match = mean_inverse_rank - (tail_matches - 1) / spread * (mean_inverse_rank - 1 / n)
        if_not = -tail_matches / spread * (mean_inverse_rank - 1 / n)
        # Every point gets the estimate for its label; the T nearest trade it for their recursion value.
        beyond_all += if_not.sum()
        beyond_by_class.index_add_(0, utility_class[start:stop], if_match - if_not)
        estimate = torch.where(match.bool(), if_match[:, None], if_not[:, None])
        sorted_values = increments.flip(1).cumsum(1).flip(1)
        totals.index_add_(0, order.flatten(), (sorted_values - estimate).flatten())
    if beyond:
        totals += beyond_all + beyond_by_class[train_class]
    return ranks.sum(totals) / num_utility


def knn_shapley_scores(*args: Any, **kwargs: Any) -> Tensor:
    """Negated :func:`knn_shapley_values`, with the same arguments, so that higher = more likely a cause."""
    return -knn_shapley_values(*args, **kwargs)


def embedding_module(model: nn.Module) -> str:
    """Name of the model's last ``nn.Linear``, whose input is the default embedding."""
    name = last_linear_name(model)
    if name is None:
        raise ValueError("KNN-Shapley takes embeddings at the input of the last nn.Linear, and the model has "
                         "none; name the embedding module with `KNNShapley(module=...)`.")
    return name


def _embedding_layer(model: nn.Module, module: str | None) -> nn.Module:
    """The module whose input is φ(x): the one named ``module``, by default the last ``nn.Linear``."""
    name = module or embedding_module(model)
    modules = dict(model.named_modules())
    if name not in modules:
        raise ValueError(f"KNNShapley(module={name!r}): the model has no such module.")
    return modules[name]


@torch.no_grad()
def embeddings(model: nn.Module, loader: DataLoader, module: str | None = None,
               adapter: BatchAdapter | None = None, progress: Progress = no_progress) -> tuple[Tensor, Tensor]:
    """φ(x), the flattened input of ``module`` (default: the last linear layer), and labels, for ``loader``."""
    adapter = adapter or BatchAdapter()
    captured: list[Tensor] = []
    layer = _embedding_layer(model, module)
    handle = layer.register_forward_pre_hook(lambda _, args: captured.append(args[0].flatten(1)))
    features, labels = Rows.of(loader), Rows.of(loader)
    try:
        for index, (inputs, y) in enumerate(batches(progress(loader, "repair: embedding"), model, adapter)):
            checked_logits(model, inputs, y, adapter, check_values=index == 0)
            features.append(captured.pop().float())
            labels.append(y)
    finally:
        handle.remove()
    return features.tensor(torch.empty(0, 0)), labels.tensor(torch.empty(0, dtype=torch.long))


def _shared_embeddings(model: nn.Module, loader: DataLoader, role: str, ranks: Ranks, module: str | None,
                       adapter: BatchAdapter, progress: Progress = no_progress) -> tuple[Tensor, Tensor]:
    """:func:`embeddings` of all of ``loader`` (map-style, in order) on every rank, each rank embedding a share."""
    def embed(share: Tensor) -> Tensor:
        part = loader if len(share) == len(loader.dataset) else (
            Examples.from_dataloader(loader, role).subset(share).loader())
        features, labels = embeddings(model, part, module, adapter, progress)
        return torch.cat([features, labels[:, None].to(features.dtype)], dim=1)  # one gather carries both

    both = ranks.gather(torch.arange(len(loader.dataset)), embed)
    return both[:, :-1], both[:, -1].long()
