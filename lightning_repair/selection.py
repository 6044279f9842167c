"""Selecting the cause set C from the scores."""

from __future__ import annotations

import torch
from torch import Tensor


def ranked(scores: Tensor) -> Tensor:
    """Indices of ``scores`` from the highest score to the lowest, NaN scores (removed examples) left out; equal
    scores keep their index order."""
    eligible = torch.nonzero(~torch.isnan(scores)).flatten()
    return eligible[torch.argsort(scores[eligible], descending=True, stable=True)]


def select_causes(scores: Tensor, top_k: int | None = None, top_fraction: float | None = None,
                  threshold: float | None = None) -> Tensor:
    """Dataset indices of the causes C, highest score first. NaN scores (already removed) are never chosen.

    Exactly one rule applies:

    Args:
        scores: one score per training example (higher: more likely a cause); NaN marks excluded examples.
        top_k: the k highest scores.
        top_fraction: the highest ``top_fraction × len(scores)`` scores.
        threshold: every score above ``threshold`` (the paper's r(z) > 0; KNN-Shapley's value < 0).
    """
    rules = [rule for rule in (top_k, top_fraction, threshold) if rule is not None]
    if len(rules) != 1:
        raise ValueError("Give exactly one of top_k, top_fraction or threshold to select the causes.")
    order = ranked(scores)
    if threshold is not None:
        return order[scores[order] > threshold]
    count = top_k if top_k is not None else round(top_fraction * len(scores))
    return order[:count]


def check_selection(top_k: int | None, top_fraction: float | None, threshold: float | None) -> None:
    """Raises a clear error for a selection rule that cannot be applied."""
    if sum(rule is not None for rule in (top_k, top_fraction, threshold)) > 1:
        raise ValueError(f"Give only one of top_k ({top_k}), top_fraction ({top_fraction}) or threshold "
                         f"({threshold}).")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be ≥ 1, got {top_k}.")
    if top_fraction is not None and not 0.0 < top_fraction < 1.0:
        raise ValueError(f"top_fraction must be in (0, 1), got {top_fraction}.")
