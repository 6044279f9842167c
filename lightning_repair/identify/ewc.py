"""EWC influence (Tanno et al. 2022, the paper's best method).

θ₊F = argmin_θ Σ_{f ∈ F_q} ℓ(f; θ) + (N/2)(θ − θ̂)ᵀ diag(F̂)(θ − θ̂) + (λ/2)‖θ − θ̂‖², fitted with Adam and
early-stopped on a held-back 10 % of F_q; r(z) = ℓ(z; θ₊F) − ℓ(z; θ̂) = log p(z | θ̂) − log p(z | θ₊F).
Two forward passes over D, no per-example gradients.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.utils.data import DataLoader

from lightning_repair.adapter import BatchAdapter
from lightning_repair.curvature import batches, checked_logits
from lightning_repair.examples import Rows
from lightning_repair.identify.base import Progress, Scorer, ScoringInputs, no_progress
from lightning_repair.optimize import FIT_DEFAULTS, fit_to_failures


@torch.no_grad()
def loss_change(before: nn.Module, after: nn.Module, loader: DataLoader, adapter: BatchAdapter | None = None,
                progress: Progress = no_progress) -> Tensor:
    """ℓ(z; after) − ℓ(z; before) for every example of ``loader``, in order."""
    adapter = adapter or BatchAdapter()
    changes = Rows.of(loader)
    for index, (inputs, labels) in enumerate(batches(progress(loader, "repair: scoring"), before, adapter)):
        first = index == 0  # value checks read back to the host: the first batch only
        loss_after = F.cross_entropy(checked_logits(after, inputs, labels, adapter, check_values=first), labels,
                                     reduction="none")
        loss_before = F.cross_entropy(checked_logits(before, inputs, labels, adapter, check_values=first), labels,
                                      reduction="none")
        changes.append(loss_after - loss_before)
    return changes.tensor(torch.empty(0)).cpu()


def ewc_influence(model: nn.Module, train_loader: DataLoader, failure_loader: DataLoader,
                  fisher: Sequence[Tensor] | None, n_train: int, stop_loader: DataLoader | None = None, *,
                  l2: float = FIT_DEFAULTS.l2, lr: float = FIT_DEFAULTS.lr, max_steps: int = FIT_DEFAULTS.max_steps,
                  adapter: BatchAdapter | None = None, progress: Progress = no_progress) -> Tensor:
    """EWC influence r(z) = ℓ(z; θ₊F) − ℓ(z; θ̂) of every training example (higher: more likely a cause).

    Arguments as in :func:`fit_to_failures`, plus ``train_loader`` (the examples to score, in order) and
    ``progress`` (wraps the pass over it).
    """
    plus = fit_to_failures(model, failure_loader, fisher, n_train, stop_loader, l2=l2, lr=lr, max_steps=max_steps,
                           adapter=adapter)
    return loss_change(model, plus, train_loader, adapter, progress)


@dataclass(kw_only=True)
class EWCInfluence(Scorer):
    """EWC influence of Tanno et al. 2022: fit θ₊F to F_q under the Fisher anchor, score the loss change.

    Args:
        lr: Adam's learning rate for θ₊F.
        max_steps: bound on the optimizer steps of the fit.
        l2: λ, an extra L2 anchor (the paper: 0).
    """

    needs_fisher = True

    lr: float = FIT_DEFAULTS.lr
    max_steps: int = FIT_DEFAULTS.max_steps
    l2: float = FIT_DEFAULTS.l2

    def __post_init__(self) -> None:
        if self.lr <= 0 or self.max_steps < 1 or self.l2 < 0:
            raise ValueError(f"EWCInfluence needs lr > 0, max_steps ≥ 1 and l2 ≥ 0; got {self.lr}, {self.max_steps}, "
                             f"{self.l2}.")

    def score(self, inputs: ScoringInputs) -> Tensor:
        fit = inputs.query if inputs.query_fit is None else inputs.query_fit  # F_q without the early-stop part
        return ewc_influence(inputs.model, inputs.train, fit, inputs.fisher, inputs.n_train, inputs.stop, l2=self.l2,
                             lr=self.lr, max_steps=self.max_steps, adapter=inputs.adapter, progress=inputs.progress)
