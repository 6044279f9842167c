"""Linear (natural-gradient) influence and its identity-curvature baseline, gradient dot (TracIn).

g_F = Σ_{f ∈ F_q} ∇ℓ(f; θ̂), v = (F̂ + δ)⁻¹ g_F; r(z) = −∇ℓ(z; θ̂)ᵀ v is the first-order change of ℓ(z) along
the step θ̂ − γv that fits the failures (γ = 1: γ only scales). A cause is an example whose loss rises when
the model learns its failures.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn
from torch.autograd import forward_ad
from torch.nn import functional as F
from torch.utils.data import DataLoader

from lightning_repair.adapter import BatchAdapter
from lightning_repair.curvature import (FISHER_DAMPING, AdapterLogits, batches, choose_backend, loss_gradient,
                                       natural_gradient, per_example_gradients)
from lightning_repair.examples import Rows
from lightning_repair.identify.base import Progress, Scorer, ScoringInputs, no_progress

ScoringMethod = Literal["jvp", "backpack"]
SCORING_METHODS = ("jvp", "backpack")


def _check_method(method: str) -> None:
    if method not in SCORING_METHODS:
        raise ValueError(f"Unknown scoring method {method!r}; choose one of {SCORING_METHODS}.")


@dataclass(kw_only=True)
class LinearInfluence(Scorer):
    """Linear (natural-gradient) influence of Tanno et al. 2022: one pass over D with per-example gradients.

    Args:
        damping: δ added to the Fisher before inverting it, relative to the Fisher's mean entry.
        method: how to get ∇ℓ(z)ᵀv: ``"jvp"`` (forward-mode AD, about one forward pass over the training set;
            falls back to ``"backpack"`` with a warning on models it cannot differentiate) or ``"backpack"``
            (BackPACK per-example gradients). Same scores.
    """

    needs_fisher = True

    damping: float = FISHER_DAMPING
    method: ScoringMethod = "jvp"

    def __post_init__(self) -> None:
        if self.damping <= 0:
            raise ValueError(f"damping must be > 0, got {self.damping}.")
        _check_method(self.method)

    def score(self, inputs: ScoringInputs) -> Tensor:
        return linear_influence(inputs.model, inputs.train, inputs.query, inputs.fisher, damping=self.damping,
                                method=self.method, adapter=inputs.adapter, progress=inputs.progress)


DEFAULTS = LinearInfluence()  # the functions below default to its hyperparameters


@dataclass(kw_only=True)
class GradientDot(Scorer):
    """Baseline: r(z) = −∇ℓ(z)ᵀ g_F, linear influence with the identity instead of the Fisher (TracIn at one
    checkpoint).

    Args:
        method: how to get ∇ℓ(z)ᵀg_F: ``"jvp"`` (forward-mode AD, the default) or ``"backpack"``; see
            :class:`LinearInfluence`.
    """

    method: ScoringMethod = DEFAULTS.method

    def __post_init__(self) -> None:
        _check_method(self.method)

    def score(self, inputs: ScoringInputs) -> Tensor:
        return linear_influence(inputs.model, inputs.train, inputs.query, None, method=self.method,
                                adapter=inputs.adapter, progress=inputs.progress)


def gradient_alignment(model: nn.Module, loader: DataLoader, direction: Sequence[Tensor],
                       adapter: BatchAdapter | None = None, progress: Progress = no_progress) -> Tensor:
    """∇ℓ(z; θ̂)ᵀ ``direction`` for every example of ``loader``, from per-example gradients (BackPACK, or
    ``torch.func`` where BackPACK cannot follow the model)."""
    alignments = Rows.of(loader)
    adapter = adapter or BatchAdapter()
    # BackPACK where its first-order extensions follow the model, else torch.func: the same numbers.
    backend, _ = choose_backend(model, loader, "empirical", adapter)
    for index, (inputs, labels) in enumerate(batches(progress(loader, "repair: scoring"), model, adapter)):
        grads, _ = per_example_gradients(model, inputs, labels, adapter, backend=backend, check_values=index == 0)
        alignment = sum((g.flatten(1) * d.flatten()).sum(dim=1) for g, d in zip(grads, direction))
        alignments.append(alignment.detach())
    return alignments.tensor(torch.empty(0)).cpu()


class ForwardADUnsupportedError(NotImplementedError):
    """The model uses an operation without a forward-mode derivative; score with ``method="backpack"``."""


def _is_forward_ad_gap(error: BaseException) -> bool:
    """Whether ``error`` is PyTorch saying an operation has no forward-mode (JVP) formula."""
    message = str(error).lower()
    return isinstance(error, (NotImplementedError, RuntimeError)) and any(
        key in message for key in ("forward ad", "forward mode ad", "forward-mode", "jvp"))


def directional_derivatives(model: nn.Module, loader: DataLoader, direction: Sequence[Tensor],
                            adapter: BatchAdapter | None = None, progress: Progress = no_progress) -> Tensor:
    """∇ℓ(z; θ̂)ᵀ ``direction`` for every example of ``loader``, by forward-mode AD (one JVP per batch).

    The same numbers as :func:`gradient_alignment` for about one forward pass over ``loader`` (carrying tangents):
    the trainable parameters become dual numbers θ̂ + ε·direction (``torch.autograd.forward_ad``), swapped into
    the model with :func:`torch.func.functional_call` around the adapter's logits call, so any module and any
    :class:`BatchAdapter` work. Frozen parameters and buffers stay plain tensors (zero tangent). One JVP of the
    ``reduction="none"`` cross-entropy gives the directional derivatives of the whole batch. The pass runs in the
    model's device, dtype and mode (repair copies are in eval mode), without autograd (no parameter gradients);
    results stay on the device and are moved to the CPU once at the end.

    Args:
        model: the classifier at θ̂.
        loader: the examples, in order.
        direction: one tensor per trainable parameter (:func:`~lightning_repair.params.trainable` order).
        adapter: how to read batches and logits.
        progress: wraps the pass over ``loader``.

    Returns:
        One float per example, on the CPU, in the model's dtype.

    Raises:
        ForwardADUnsupportedError: an operation of the model has no forward-mode derivative in this PyTorch;
            use :func:`gradient_alignment` (``method="backpack"``) instead.
    """
    adapter = adapter or BatchAdapter()
    named = [(f"model.{name}", p) for name, p in model.named_parameters() if p.requires_grad]
    if len(named) != len(direction):
        raise ValueError(f"The direction has {len(direction)} tensors but the model has {len(named)} trainable "
                         "parameters.")
    tangents = [d.detach().to(device=p.device, dtype=p.dtype) for (_, p), d in zip(named, direction)]
    call = AdapterLogits(model, adapter, checked=True)
    derivatives = Rows.of(loader)
    with torch.no_grad(), forward_ad.dual_level():
        duals = {name: forward_ad.make_dual(p.detach(), t) for (name, p), t in zip(named, tangents)}
        for index, (inputs, labels) in enumerate(batches(progress(loader, "repair: scoring"), model, adapter)):
            call.check_values = index == 0  # value checks read back to the host: the first batch only
            try:
                logits = torch.func.functional_call(call, duals, (inputs, labels))
            except (NotImplementedError, RuntimeError) as error:
                if _is_forward_ad_gap(error):
                    raise ForwardADUnsupportedError(
                        f"Forward-mode AD failed on this model: {error} Score with method='backpack' "
                        "(BackPACK per-example gradients) instead.") from error
                raise
            losses = F.cross_entropy(logits, labels, reduction="none")
            tangent = forward_ad.unpack_dual(losses).tangent
            derivatives.append(torch.zeros_like(losses) if tangent is None else tangent)
    return derivatives.tensor(torch.empty(0)).cpu()


def _alignment(model: nn.Module, loader: DataLoader, direction: Sequence[Tensor], *, method: ScoringMethod,
               adapter: BatchAdapter | None, progress: Progress) -> Tensor:
    """∇ℓ(z; θ̂)ᵀ ``direction`` for every example of ``loader`` by ``method``.

    ``"jvp"``: :func:`directional_derivatives`, about one forward pass; if the model uses an operation without a
    forward-mode derivative it warns, naming the operation, and falls back to ``"backpack"``.
    ``"backpack"``: :func:`gradient_alignment`, from BackPACK per-example gradients (a backward pass per batch
    and B gradient copies in memory).
    """
    _check_method(method)
    if method == "jvp":
        try:
            return directional_derivatives(model, loader, direction, adapter, progress)
        except ForwardADUnsupportedError as error:
            warnings.warn(f"{error.__cause__} Falling back to method='backpack'; pass method='backpack' to skip "
                          "this attempt.", RuntimeWarning, stacklevel=2)
    return gradient_alignment(model, loader, direction, adapter, progress)


def linear_influence(model: nn.Module, train_loader: DataLoader, failure_loader: DataLoader,
                     fisher: Sequence[Tensor] | None, *, damping: float = DEFAULTS.damping,
                     method: ScoringMethod = DEFAULTS.method, adapter: BatchAdapter | None = None,
                     progress: Progress = no_progress) -> Tensor:
    """Linear influence r(z) = −∇ℓ(z)ᵀ (F̂ + δ)⁻¹ g_F of every training example on the failures.

    Args:
        model: the classifier at θ̂.
        train_loader: the training examples to score, in order.
        failure_loader: the failures F_q.
        fisher: the diagonal Fisher F̂ per trainable parameter; None uses the identity (gradient dot, TracIn).
        damping: δ relative to the mean of F̂.
        method: ``"jvp"`` (default): forward-mode directional derivatives, about one forward pass over the
            training set, falling back to ``"backpack"`` with a warning if the model has an operation without a
            forward-mode derivative; ``"backpack"``: BackPACK per-example gradients. Both give the same scores.
        adapter: how to read batches and logits.
        progress: wraps the pass over ``train_loader``.

    Returns:
        One score per training example (higher: more likely a cause).
    """
    direction = natural_gradient(loss_gradient(model, failure_loader, adapter), fisher, damping=damping)
    return -_alignment(model, train_loader, direction, method=method, adapter=adapter, progress=progress)
