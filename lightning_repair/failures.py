"""The failure set F: the validation examples the model misclassifies, split into F_q and F_h.

F_q (query) is the only part of F any method may use; F_h (holdout) is measured only, to see whether a repair
generalises. The correctly classified rest of V is split likewise: a guard sample R_q (half of it by default) that
treatments and scorers may use so as not to break what works, and R, measured only. Whether a repair is kept is
decided on F_h and R alone (:mod:`lightning_repair.acceptance`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from lightning_repair.adapter import BatchAdapter
from lightning_repair.curvature import batches, checked_logits
from lightning_repair.examples import Rows


@dataclass(frozen=True)
class FailureSet:
    """Validation dataset indices of F_q, F_h and R, and the model's predictions on all of V.

    Attributes:
        query: F_q, the failures methods may use.
        holdout: F_h, failures only measured.
        guard: R_q, correctly classified examples treatments may use to check they break nothing.
        remaining: R, the other correctly classified examples, only measured.
        dropped: failures left out because there were more than ``max_failures``.
        predictions: the predicted class of every validation example, in dataset order.
    """

    query: Tensor
    holdout: Tensor
    guard: Tensor
    remaining: Tensor
    dropped: int
    predictions: Tensor

    @property
    def size(self) -> int:
        """|F| (kept failures)."""
        return len(self.query) + len(self.holdout)


@torch.no_grad()
def predict(model: nn.Module, loader: DataLoader, adapter: BatchAdapter | None = None) -> tuple[Tensor, Tensor]:
    """Predicted classes and given labels of every example of ``loader``, in order, on the CPU (one copy back at
    the end, none per batch)."""
    adapter = adapter or BatchAdapter()
    predictions, labels = Rows.of(loader), Rows.of(loader)
    for index, (inputs, y) in enumerate(batches(loader, model, adapter)):
        predictions.append(checked_logits(model, inputs, y, adapter, check_values=index == 0).argmax(dim=1))
        labels.append(y)
    empty = torch.empty(0, dtype=torch.long)
    return predictions.tensor(empty).cpu(), labels.tensor(empty).cpu()


def split_failures(predictions: Tensor, labels: Tensor, query_fraction: float = 0.5,
                   max_failures: int | None = None, seed: int = 0, guard_fraction: float = 0.5) -> FailureSet:
    """Splits validation examples into F_q, F_h, R_q and R with a seeded permutation.

    Args:
        predictions: predicted class per validation example.
        labels: trusted label per validation example.
        query_fraction: share of F that goes to F_q.
        max_failures: keep at most this many failures (a seeded random subset) to bound the work.
        seed: seed of the permutation.
        guard_fraction: share of the correctly classified examples that goes to R_q; the rest is R.
    """
    if not 0.0 < query_fraction <= 1.0:
        raise ValueError(f"query_fraction must be in (0, 1], got {query_fraction}.")
    if not 0.0 <= guard_fraction < 1.0:
        raise ValueError(f"guard_fraction must be in [0, 1), got {guard_fraction}.")
    failed = predictions != labels
    failures = torch.nonzero(failed).flatten()
    generator = torch.Generator().manual_seed(seed)
    failures = failures[torch.randperm(len(failures), generator=generator)]
    dropped = 0
    if max_failures is not None and len(failures) > max_failures:
        dropped = len(failures) - max_failures
        failures = failures[:max_failures]
    n_query = round(query_fraction * len(failures))
    if len(failures) >= 2:
        n_query = min(max(n_query, 1), len(failures) - (query_fraction < 1.0))
    correct = torch.nonzero(~failed).flatten()
    correct = correct[torch.randperm(len(correct), generator=generator)]
    n_guard = int(guard_fraction * len(correct))
    return FailureSet(
        query=failures[:n_query].sort().values,
        holdout=failures[n_query:].sort().values,
        guard=correct[:n_guard].sort().values,
        remaining=correct[n_guard:].sort().values,
        dropped=dropped,
        predictions=predictions,
    )


def hold_back(query: Tensor, fraction: float, seed: int = 0) -> tuple[Tensor, Tensor | None]:
    """Splits F_q into the part a fit uses and a held-back ``fraction`` for early stopping (θ₊F's 10 %).

    Returns sorted index tensors; the held-back part is None when it would be empty or all of F_q.
    """
    n_stop = int(fraction * len(query))
    if n_stop == 0 or n_stop == len(query):
        return query, None
    order = query[torch.randperm(len(query), generator=torch.Generator().manual_seed(seed))]
    return order[n_stop:].sort().values, order[:n_stop].sort().values


def accuracy(predictions: Tensor, labels: Tensor, indices: Tensor) -> float:
    """Accuracy on the examples at ``indices``; NaN for an empty set."""
    if len(indices) == 0:
        return float("nan")
    return (predictions[indices] == labels[indices]).double().mean().item()
