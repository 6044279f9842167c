"""Exact KNN-Shapley data values (Jia et al. 2019, Theorem 1).

For one utility point ``(x_u, y_u)`` the training set is sorted by distance to
``phi(x_u)``: ``alpha_1`` nearest ... ``alpha_N`` farthest. Then

    s_{alpha_N} = 1[y_{alpha_N} = y_u] / max(N, K)   (the paper's 1/N assumes K <= N)
    s_{alpha_i} = s_{alpha_{i+1}}
                  + (1[y_{alpha_i} = y_u] - 1[y_{alpha_{i+1}} = y_u]) / K * min(K, i) / i

These are the exact Shapley values of the KNN utility
``v(S) = (1/K) * sum_{j=1}^{min(K, |S|)} 1[y_{alpha_j(S)} = y_u]`` (``v(empty) = 0``).
With several utility points the utility, and hence the values, are averaged.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from lightning_repair.adapter import BatchAdapter
from lightning_repair.curvature import batches, checked_logits
from lightning_repair.identify.base import Progress, Scorer, ScoringInputs, no_progress
from lightning_repair.params import last_linear_name


def _validate(
    train_embeddings: Tensor,
    train_labels: Tensor,
    utility_embeddings: Tensor,
    utility_labels: Tensor,
    k: int,
    batch_size: int,
) -> None:
    """Raise a ValueError describing the first malformed input.

    Args:
        train_embeddings: Training embeddings, expected shape (N, d).
        train_labels: Training labels, expected shape (N,).
        utility_embeddings: Utility-point embeddings, expected shape (U, d).
        utility_labels: Utility-point labels, expected shape (U,).
        k: Number of neighbours, expected >= 1.
        batch_size: Utility points per chunk, expected >= 1.
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


def knn_shapley_values(
    train_embeddings: Tensor,
    train_labels: Tensor,
    utility_embeddings: Tensor,
    utility_labels: Tensor,
    k: int = 5,
    batch_size: int = 256,
) -> Tensor:
    """Exact KNN-Shapley value of every training point, averaged over utility points.

    Ties in distance are broken by training index: among equidistant training
    points the lower index counts as nearer (stable sort). Runs on the inputs'
    device and uses O(batch_size * N) memory.

    Args:
        train_embeddings: Training embeddings phi(x), shape (N, d), floating point.
        train_labels: Training class labels, shape (N,).
        utility_embeddings: Utility-point embeddings, shape (U, d), floating point,
            on the same device as ``train_embeddings``.
        utility_labels: Utility-point class labels, shape (U,).
        k: Number of nearest neighbours K of the KNN utility; K > N is allowed.
        batch_size: Number of utility points whose distances are computed at once.

    Returns:
        Float64 tensor of shape (N,); higher means the point helps the KNN
        classifier label the utility points correctly.

    Raises:
        ValueError: If shapes, dtypes, ``k`` or ``batch_size`` are invalid, or
            either point set is empty.
    """
    _validate(train_embeddings, train_labels, utility_embeddings, utility_labels, k, batch_size)
    n = train_embeddings.shape[0]
    num_utility = utility_embeddings.shape[0]
    device = train_embeddings.device

    # Rank i (1-based) weight of the recursion: min(K, i) / (K * i), shared by all rows.
    ranks = torch.arange(1, n + 1, device=device, dtype=torch.float64)
    weights = torch.clamp(ranks, max=k) / (k * ranks)

    totals = torch.zeros(n, device=device, dtype=torch.float64)
    for start in range(0, num_utility, batch_size):
        chunk_emb = utility_embeddings[start : start + batch_size]
        chunk_lab = utility_labels[start : start + batch_size]
        # The non-matmul path gives exactly equal distances to duplicate points, so
        # the documented index tie-break holds and near-ties are not reordered by
        # cancellation error.
        dists = torch.cdist(
            chunk_emb, train_embeddings, compute_mode="donot_use_mm_for_euclid_dist"
        )
        order = torch.argsort(dists, dim=1, stable=True)  # (B, N): alpha_1 .. alpha_N
        match = (train_labels[order] == chunk_lab[:, None]).to(torch.float64)

        # increments[:, i] = s_i - s_{i+1} for i < N and s_N itself for the last rank,
        # so s is the reversed cumulative sum of the increments.
        increments = torch.empty_like(match)
        increments[:, :-1] = (match[:, :-1] - match[:, 1:]) * weights[:-1]
        # Theorem 1's base case m_N / N assumes K <= N; for K > N the utility is
        # additive and every value is m_i / K, which max(N, K) covers.
        increments[:, -1] = match[:, -1] / max(n, k)
        sorted_values = increments.flip(1).cumsum(1).flip(1)

        # Map values from rank order back to training index and sum over the chunk.
        per_point = torch.zeros_like(sorted_values).scatter_(1, order, sorted_values)
        totals += per_point.sum(0)
    return totals / num_utility


def knn_shapley_scores(
    train_embeddings: Tensor,
    train_labels: Tensor,
    utility_embeddings: Tensor,
    utility_labels: Tensor,
    k: int = 5,
    batch_size: int = 256,
) -> Tensor:
    """Negated KNN-Shapley values, so that higher = more likely a cause of failures.

    Args:
        train_embeddings: Training embeddings phi(x), shape (N, d), floating point.
        train_labels: Training class labels, shape (N,).
        utility_embeddings: Failure-set embeddings, shape (U, d), floating point.
        utility_labels: Failure-set class labels, shape (U,).
        k: Number of nearest neighbours K of the KNN utility.
        batch_size: Number of utility points whose distances are computed at once.

    Returns:
        Float64 tensor of shape (N,) equal to ``-knn_shapley_values(...)``.
    """
    return -knn_shapley_values(
        train_embeddings,
        train_labels,
        utility_embeddings,
        utility_labels,
        k=k,
        batch_size=batch_size,
    )


def embedding_module(model: nn.Module) -> str:
    """Name of the model's last ``nn.Linear``, whose input is the default embedding."""
    name = last_linear_name(model)
    if name is None:
        raise ValueError("KNN-Shapley takes embeddings at the input of the last nn.Linear, and the model has "
                         "none; name the embedding module with `KNNShapley(module=...)`.")
    return name


@torch.no_grad()
def embeddings(model: nn.Module, loader: DataLoader, module: str | None = None,
               adapter: BatchAdapter | None = None, progress: Progress = no_progress) -> tuple[Tensor, Tensor]:
    """φ(x), the flattened input of ``module`` (default: the last linear layer), and labels, for ``loader``."""
    adapter = adapter or BatchAdapter()
    name = module or embedding_module(model)
    modules = dict(model.named_modules())
    if name not in modules:
        raise ValueError(f"KNNShapley(module={name!r}): the model has no such module.")
    captured: list[Tensor] = []
    handle = modules[name].register_forward_pre_hook(lambda _, args: captured.append(args[0].flatten(1)))
    features, labels = [], []
    try:
        for inputs, y in batches(progress(loader, "repair: embedding"), model, adapter):
            checked_logits(model, inputs, y, adapter)
            features.append(captured.pop().float())
            labels.append(y)
    finally:
        handle.remove()
    return torch.cat(features), torch.cat(labels)


class KNNShapley(Scorer):
    """Exact KNN-Shapley values (Jia et al. 2019; the report's proposal 2); score = −value.

    A negative value marks an example that hurts the K-nearest-neighbour classifier on the utility points, so
    the natural cause set is {value < 0} and needs no K: the callback uses it when given no selection.

    Args:
        k: neighbours of the KNN utility.
        module: name of the module whose input is the embedding φ(x); default the last ``nn.Linear``.
        utility: ``"query"`` (F_q, the default) or ``"trusted"`` (F_q ∪ R_q: every validation example a method
            may read; the callback's R_q is half of the correctly classified ones).
        batch_size: utility points per distance computation.
    """

    natural_threshold = 0.0
    shardable = False

    def __init__(self, k: int = 5, module: str | None = None, utility: str = "query",
                 batch_size: int = 256) -> None:
        if utility not in ("query", "trusted"):
            raise ValueError(f"utility must be 'query' or 'trusted', got {utility!r}.")
        if k < 1:
            raise ValueError(f"k must be ≥ 1, got {k}.")
        self.k, self.module, self.utility, self.batch_size = k, module, utility, batch_size

    def score(self, inputs: ScoringInputs) -> Tensor:
        utility_loader = inputs.query if self.utility == "query" else inputs.trusted
        if utility_loader is None:
            raise ValueError("KNNShapley(utility='trusted') needs F_q ∪ R_q (`inputs.trusted`), which these inputs do "
                             "not provide.")
        train_x, train_y = embeddings(inputs.model, inputs.train, self.module, inputs.adapter, inputs.progress)
        utility_x, utility_y = embeddings(inputs.model, utility_loader, self.module, inputs.adapter)
        return knn_shapley_scores(train_x, train_y, utility_x, utility_y, self.k, self.batch_size).float().cpu()
