"""Identification and repair metrics: plain functions over score and label arrays (NumPy or torch).

Scores are oriented as everywhere in lightning-repair: a higher score means "more likely a cause", here
"more likely a flipped label". Tied scores are ranked as a random order of the tie would be on average: AUROC
takes average ranks, average precision steps over distinct thresholds (as scikit-learn does), and the detection
curve interpolates linearly across a tie, which is the expected count under random tie-breaking.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

# Slack for fraction × N landing a hair below an integer (0.29 × 100 = 28.999…).
_FRACTION_SLACK = 1e-9


def _scores_and_labels(scores: Any, is_flipped: Any) -> tuple[np.ndarray, np.ndarray]:
    """The inputs as a float64 and a bool 1-D array of equal length, checked."""
    scores = np.asarray(scores, dtype=np.float64)
    is_flipped = np.asarray(is_flipped)
    if scores.ndim != 1 or is_flipped.shape != scores.shape:
        raise ValueError(f"scores and is_flipped must be 1-D of equal length, got shapes {scores.shape} and "
                         f"{is_flipped.shape}.")
    if not np.isin(is_flipped, (0, 1)).all():
        raise ValueError("is_flipped must hold booleans (or 0/1), one per example.")
    if not np.isfinite(scores).all():
        raise ValueError("scores must be finite: rank NaN (already removed) examples out before measuring.")
    return scores, is_flipped.astype(bool)


def _count_flipped(is_flipped: np.ndarray, metric: str, need_clean: bool = False) -> int:
    """|flipped|, checked to be positive (and below N when the metric also needs a clean example)."""
    n_flipped = int(is_flipped.sum())
    if n_flipped == 0 or (need_clean and n_flipped == len(is_flipped)):
        need = "one flipped and one clean example" if need_clean else "one flipped example"
        raise ValueError(f"{metric} needs at least {need}; got {n_flipped} flipped of {len(is_flipped)}.")
    return n_flipped


def average_ranks(values: Any) -> np.ndarray:
    """Ranks 1..n of ``values`` in ascending order, each tie given the mean of the ranks it spans."""
    values = np.asarray(values, dtype=np.float64)
    order = np.argsort(values, kind="stable")
    ordered = values[order]
    # Start of each run of equal values, and the run's mean rank (positions are 0-based, ranks 1-based).
    starts = np.flatnonzero(np.r_[True, ordered[1:] != ordered[:-1]])
    ends = np.r_[starts[1:], len(values)]
    run_ranks = (starts + ends + 1) / 2.0
    ranks = np.empty(len(values))
    ranks[order] = np.repeat(run_ranks, ends - starts)
    return ranks


def auroc(scores: Any, is_flipped: Any) -> float:
    """Area under the ROC curve of ``scores`` separating flipped from clean examples.

    The probability that a random flipped example outscores a random clean one, ties counting half
    (Mann–Whitney U from average ranks). 0.5 is chance, 1 a perfect ranking.
    """
    scores, is_flipped = _scores_and_labels(scores, is_flipped)
    n_flipped = _count_flipped(is_flipped, "AUROC", need_clean=True)
    n_clean = len(scores) - n_flipped
    rank_sum = average_ranks(scores)[is_flipped].sum()
    return float((rank_sum - n_flipped * (n_flipped + 1) / 2.0) / (n_flipped * n_clean))


def _tie_groups(scores: np.ndarray, is_flipped: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Examples inspected and flips found after each group of tied scores, highest scores first."""
    order = np.argsort(-scores, kind="stable")
    ordered = scores[order]
    found = np.cumsum(is_flipped[order])
    ends = np.flatnonzero(np.r_[ordered[1:] != ordered[:-1], True])
    return ends + 1, found[ends]


def average_precision(scores: Any, is_flipped: Any) -> float:
    """Average precision: Σ_t (R_t − R_{t−1}) P_t over the distinct score thresholds t, highest first.

    P_t and R_t are the precision and recall of {score ≥ t}; the same step-wise definition as scikit-learn's
    ``average_precision_score``. Its chance level is the share of flipped examples.
    """
    scores, is_flipped = _scores_and_labels(scores, is_flipped)
    n_flipped = _count_flipped(is_flipped, "Average precision")
    inspected, found = _tie_groups(scores, is_flipped)
    recall = found / n_flipped
    precision = found / inspected
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def detection_curve(scores: Any, is_flipped: Any) -> tuple[np.ndarray, np.ndarray]:
    """The share of flips found against the share of the data inspected, highest scores first (Fig. 2c).

    Returns:
        ``(inspected, found)``, each of length N + 1: after inspecting the top k = 0, …, N examples,
        ``inspected[k] = k / N`` and ``found[k]`` = the expected share of all flipped examples among them.
    """
    scores, is_flipped = _scores_and_labels(scores, is_flipped)
    n_flipped = _count_flipped(is_flipped, "The detection curve")
    inspected, found = _tie_groups(scores, is_flipped)
    k = np.arange(len(scores) + 1)
    found_k = np.interp(k, np.r_[0, inspected], np.r_[0, found]) / n_flipped
    return k / len(scores), found_k


def found_at_fraction(scores: Any, is_flipped: Any, fraction: float = 0.2) -> float:
    """The share of flipped examples among the top ⌊fraction · N⌋ scores (the paper's "found at 20 %")."""
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction must be in [0, 1], got {fraction}.")
    _, found = detection_curve(scores, is_flipped)
    return float(found[math.floor(fraction * (len(found) - 1) + _FRACTION_SLACK)])


def precision_recall(selected: Any, is_flipped: Any) -> tuple[float, float]:
    """Precision and recall of a cause set C against the flipped examples.

    Args:
        selected: C, as dataset indices or as a boolean mask over the N examples.
        is_flipped: boolean mask over the N examples.

    Returns:
        ``(|C ∩ flipped| / |C|, |C ∩ flipped| / |flipped|)``; NaN where the denominator is 0.
    """
    is_flipped = np.asarray(is_flipped).astype(bool)
    selected = np.asarray(selected)
    if selected.dtype == bool:
        if selected.shape != is_flipped.shape:
            raise ValueError(f"A boolean selection must have one entry per example ({is_flipped.shape}), got "
                             f"{selected.shape}.")
        mask = selected
    else:
        indices = selected.astype(np.int64).ravel()
        if len(indices) and (indices.min() < 0 or indices.max() >= len(is_flipped)):
            raise ValueError(f"Selected indices must lie in [0, {len(is_flipped)}).")
        if len(np.unique(indices)) != len(indices):
            raise ValueError("Selected indices must be distinct: an example is a cause at most once.")
        mask = np.zeros(len(is_flipped), dtype=bool)
        mask[indices] = True
    hits = int((mask & is_flipped).sum())
    n_selected, n_flipped = int(mask.sum()), int(is_flipped.sum())
    return (hits / n_selected if n_selected else math.nan, hits / n_flipped if n_flipped else math.nan)


def gap_closed(repaired: float, noisy: float, oracle: float) -> float:
    """(repaired − noisy) / (oracle − noisy): 0 for no change, 1 for the clean-label model, < 0 for harm.

    NaN when the oracle is no better or worse than the noisy model (no gap to close).
    """
    gap = oracle - noisy
    return (repaired - noisy) / gap if gap else math.nan
