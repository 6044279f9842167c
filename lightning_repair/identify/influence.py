"""Linear (natural-gradient) influence and its identity-curvature baseline, gradient dot (TracIn).

g_F = Σ_{f ∈ F_q} ∇ℓ(f; θ̂), v = (F̂ + δ)⁻¹ g_F; r(z) = −∇ℓ(z; θ̂)ᵀ v is the first-order change of ℓ(z) along
the step θ̂ − γv that fits the failures (γ = 1: γ only scales). A cause is an example whose loss rises when
the model learns its failures.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from lightning_repair.adapter import BatchAdapter
from lightning_repair.curvature import batches, loss_gradient, per_example_gradients
from lightning_repair.identify.base import Progress, Scorer, ScoringInputs, no_progress


def natural_gradient(gradient: Sequence[Tensor], fisher: Sequence[Tensor] | None,
                     damping: float = 1e-3) -> list[Tensor]:
    """(F̂ + δ)⁻¹ g elementwise, with δ = ``damping`` × mean(F̂); g itself when ``fisher`` is None."""
    if fisher is None:
        return list(gradient)
    if damping <= 0:
        raise ValueError(f"damping must be > 0 to invert the Fisher, got {damping}.")
    delta = damping * torch.cat([f.flatten() for f in fisher]).mean()
    delta = torch.clamp(delta, min=torch.finfo(delta.dtype).tiny)
    return [g / (f + delta) for g, f in zip(gradient, fisher)]


def gradient_alignment(model: nn.Module, loader: DataLoader, direction: Sequence[Tensor],
                       adapter: BatchAdapter | None = None, progress: Progress = no_progress) -> Tensor:
    """∇ℓ(z; θ̂)ᵀ ``direction`` for every example of ``loader``, from BackPACK per-example gradients."""
    alignments = []
    for inputs, labels in batches(progress(loader, "repair: scoring"), model, adapter or BatchAdapter()):
        grads, _ = per_example_gradients(model, inputs, labels, adapter)
        alignment = sum((g.flatten(1) * d.flatten()).sum(dim=1) for g, d in zip(grads, direction))
        alignments.append(alignment.detach().cpu())
    return torch.cat(alignments) if alignments else torch.empty(0)


def linear_influence(model: nn.Module, train_loader: DataLoader, failure_loader: DataLoader,
                     fisher: Sequence[Tensor] | None, damping: float = 1e-3, adapter: BatchAdapter | None = None,
                     progress: Progress = no_progress) -> Tensor:
    """Linear influence r(z) = −∇ℓ(z)ᵀ (F̂ + δ)⁻¹ g_F of every training example on the failures.

    Args:
        model: the classifier at θ̂.
        train_loader: the training examples to score, in order.
        failure_loader: the failures F_q.
        fisher: the diagonal Fisher F̂ per trainable parameter; None uses the identity (gradient dot, TracIn).
        damping: δ relative to the mean of F̂.
        adapter: how to read batches and logits.
        progress: wraps the pass over ``train_loader``.

    Returns:
        One score per training example (higher: more likely a cause).
    """
    direction = natural_gradient(loss_gradient(model, failure_loader, adapter), fisher, damping)
    return -gradient_alignment(model, train_loader, direction, adapter, progress)


class LinearInfluence(Scorer):
    """Linear (natural-gradient) influence of Tanno et al. 2022: one pass over D with per-example gradients.

    Args:
        damping: δ added to the Fisher before inverting it, relative to the Fisher's mean entry.
    """

    needs_fisher = True

    def __init__(self, damping: float = 1e-3) -> None:
        if damping <= 0:
            raise ValueError(f"damping must be > 0, got {damping}.")
        self.damping = damping

    def score(self, inputs: ScoringInputs) -> Tensor:
        return linear_influence(inputs.model, inputs.train, inputs.query, inputs.fisher, self.damping,
                                inputs.adapter, inputs.progress)


class GradientDot(Scorer):
    """Baseline: r(z) = −∇ℓ(z)ᵀ g_F, linear influence with the identity instead of the Fisher (TracIn at one
    checkpoint)."""

    def score(self, inputs: ScoringInputs) -> Tensor:
        return linear_influence(inputs.model, inputs.train, inputs.query, None, adapter=inputs.adapter,
                                progress=inputs.progress)
