"""A check that the user trains with cross-entropy on the model's logits, which every scorer and treatment assumes."""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor
from torch.nn import functional as F

from lightning_repair.adapter import BatchAdapter
from lightning_repair.curvature import forked_rng

LOSS_TOLERANCE = 0.15


@torch.no_grad()
def check_cross_entropy(model: torch.nn.Module, batch: Any, training_loss: float, adapter: BatchAdapter) -> bool:
    """Warns when the user's training loss on ``batch`` is far from the mean cross-entropy of the model's logits.

    Scores and treatments assume the model is trained with cross-entropy on its logits; label smoothing, an MSE
    loss or large added terms break that assumption. The extra forward pass leaves the module as it was: its
    buffers (BatchNorm statistics) are restored and its random draws (dropout) come from a forked RNG. Dropout
    makes the two differ a little, hence the tolerance; an untrained model's near-uniform outputs hide label
    smoothing, hence a check at every epoch's start.
    Returns False when it warned.
    """
    labels = adapter.labels(batch).to(model.device)
    buffers = [(buffer, buffer.clone()) for buffer in model.buffers()]
    with forked_rng(model):  # a train-mode forward pass draws dropout masks and updates BatchNorm statistics
        logits = adapter.logits(model, adapter.inputs(batch))
    for buffer, before in buffers:
        buffer.copy_(before)
    if not isinstance(logits, Tensor) or logits.dim() != 2 or not ((0 <= labels) & (labels < logits.shape[1])).all():
        return True  # not class logits: the round's own checks explain what is wrong
    cross_entropy = F.cross_entropy(logits, labels).item()
    if abs(training_loss - cross_entropy) <= LOSS_TOLERANCE * max(abs(cross_entropy), 1e-3):
        return True
    rank_zero_warn(
        f"RepairCallback: the training loss of the first batch ({training_loss:.4g}) differs from the cross-entropy "
        f"of the model's logits ({cross_entropy:.4g}). lightning-repair's scores and treatments assume a classifier "
        "trained with plain cross-entropy on its logits; with another loss (label smoothing, MSE, large regularisers) "
        "the causes it finds and the repairs it makes follow cross-entropy, not your objective.")
    return False
