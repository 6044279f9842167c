"""cleanlab, the peer that finds label errors without looking at the failures (Northcutt et al. 2021).

Confident learning needs out-of-sample predicted probabilities: K models, each trained like the noisy
reference (same CNN, optimiser and epochs) on K − 1 folds, predict the fold they did not see.
"""

from __future__ import annotations

import time

import numpy as np
import torch
from torch import Tensor

from benchmarks.training import Split, new_model, probabilities, train


def cross_validated_probabilities(data: Split, folds: int, epochs: int, seed: int) -> tuple[Tensor, float]:
    """Out-of-fold softmax probabilities of every example of ``data``, from stratified K-fold training.

    Returns:
        An (N, classes) tensor and the wall seconds the K trainings and predictions took.
    """
    from sklearn.model_selection import StratifiedKFold

    splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    result = None
    start = time.perf_counter()
    for fit, held in splitter.split(np.zeros(len(data)), data.y.numpy()):
        model = new_model(seed)
        train(model, data.subset(torch.from_numpy(fit)), epochs, seed)
        held = torch.from_numpy(held)
        fold_probabilities = probabilities(model, data.x[held])
        if result is None:
            result = torch.zeros(len(data), fold_probabilities.shape[1])
        result[held] = fold_probabilities
    return result, time.perf_counter() - start


def cleanlab_issues(labels: Tensor, pred_probs: Tensor) -> tuple[Tensor, Tensor]:
    """cleanlab's label issues and scores from out-of-sample probabilities.

    Returns:
        ``(scores, issues)``: 1 − cleanlab's label quality (self-confidence), higher = more likely mislabelled;
        and the dataset indices ``find_label_issues`` flags (its default, ``prune_by_noise_rate``).
    """
    from cleanlab.filter import find_label_issues
    from cleanlab.rank import get_label_quality_scores

    labels_np, probs_np = labels.numpy(), pred_probs.double().numpy()
    issues = find_label_issues(labels_np, probs_np, n_jobs=1)
    quality = get_label_quality_scores(labels_np, probs_np)
    return torch.from_numpy(1.0 - quality).float(), torch.from_numpy(np.flatnonzero(issues))
