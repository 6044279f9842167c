"""Baselines every comparison needs: the per-example training loss and random scores."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.utils.data import DataLoader

from lightning_repair.adapter import BatchAdapter
from lightning_repair.curvature import batches, checked_logits
from lightning_repair.identify.base import Progress, Scorer, ScoringInputs, no_progress


@torch.no_grad()
def training_loss(model: nn.Module, loader: DataLoader, *, adapter: BatchAdapter | None = None,
                  progress: Progress = no_progress) -> Tensor:
    """r(z) = ℓ(z; θ̂) for every example of ``loader``: flipped labels tend to have high loss until memorised."""
    adapter = adapter or BatchAdapter()
    losses = [F.cross_entropy(checked_logits(model, x, y, adapter, check_values=index == 0), y, reduction="none")
              for index, (x, y) in enumerate(batches(progress(loader, "repair: scoring"), model, adapter))]
    return torch.cat(losses).cpu() if losses else torch.empty(0)  # on the device until the end: no sync per batch


@dataclass(kw_only=True)
class TrainingLoss(Scorer):
    """Baseline: rank by the per-example training loss ℓ(z; θ̂); ignores the failures."""

    def score(self, inputs: ScoringInputs) -> Tensor:
        return training_loss(inputs.model, inputs.train, adapter=inputs.adapter, progress=inputs.progress)


@dataclass(kw_only=True)
class RandomScores(Scorer):
    """Baseline: uniform random scores, seeded per round."""

    shardable = False  # drawn for all of D at once, so every rank draws the same

    def score(self, inputs: ScoringInputs) -> Tensor:
        return torch.rand(len(inputs.train.dataset), generator=torch.Generator().manual_seed(inputs.seed))
