"""One anchored, early-stopped fine-tune serves θ₊F (EWC influence) and EWC unlearning (treatment 3).

Minimises  s · (n/B) Σ_{batch} ℓ(z; θ) + c (θ − θ̂)ᵀ diag(F̂)(θ − θ̂) + (λ/2)‖θ − θ̂‖²  with Adam, where s = +1
fits the data and s = −1 unlearns it; keeps the parameters with the best validation value seen.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Union

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.utils.data import DataLoader

from lightning_repair.adapter import BatchAdapter
from lightning_repair.curvature import batches, checked_logits
from lightning_repair.params import anchor_penalty, detached, trainable


Check = Union[DataLoader, Callable[[nn.Module], float]]
"""How a treatment judges a candidate model, higher is better: a loader (its accuracy) or any function."""


def as_check(check: Check, adapter: BatchAdapter | None = None) -> Callable[[nn.Module], float]:
    """A loader becomes "accuracy on it"; a function is used as it is."""
    if isinstance(check, DataLoader):
        return lambda model: accuracy_of(model, check, adapter)
    return check


def guarded_accuracy(model: nn.Module, query: DataLoader, guard: DataLoader, max_drop: float,
                     adapter: BatchAdapter | None = None) -> Callable[[nn.Module], float]:
    """Accuracy on the failures F_q, for models that keep their accuracy on the guard R_q within ``max_drop`` of
    ``model``'s (θ̂); −∞ for the others, so θ̂ itself always qualifies.

    The callback judges treatments with this, consistent with its rollback rule on R.
    """
    floor = accuracy_of(model, guard, adapter) - max_drop

    def check(candidate: nn.Module) -> float:
        if accuracy_of(candidate, guard, adapter) < floor:
            return float("-inf")
        return accuracy_of(candidate, query, adapter)

    return check


@dataclass(frozen=True)
class FitResult:
    """Outcome of :func:`anchored_fit`: the step kept (0: θ̂ itself), its validation value, steps run."""

    best_step: int
    best_value: float
    steps: int


def anchored_fit(model: nn.Module, loader: DataLoader, *, direction: float, fisher: Sequence[Tensor] | None,
                 anchor_weight: float, l2: float = 0.0, lr: float = 1e-3, max_steps: int = 100,
                 validate: Callable[[nn.Module], float] | None = None, eval_every: int = 5, patience: int = 4,
                 adapter: BatchAdapter | None = None) -> FitResult:
    """Fine-tunes ``model``'s trainable parameters in place, anchored at their current values θ̂.

    Args:
        model: a repair copy; its trainable parameters move.
        loader: the examples whose summed loss is fitted (``direction=+1``) or unlearned (``direction=-1``).
        direction: +1 or −1, the sign s of the data term.
        fisher: F̂ per trainable parameter for the anchor, or None for no Fisher anchor.
        anchor_weight: c, the anchor coefficient (N/2 for θ₊F, 1/γ for EWC unlearning).
        l2: λ of the plain L2 anchor.
        lr: Adam's learning rate.
        max_steps: bound on optimizer steps.
        validate: higher-is-better value of the model, checked every ``eval_every`` steps and at step 0; the
            best parameters are kept. None keeps the last step.
        eval_every: steps between validations.
        patience: stop after this many validations without improvement.
        adapter: how to read batches and logits.
    """
    adapter = adapter or BatchAdapter()
    parameters = trainable(model)
    anchor = detached(parameters)
    optimizer = torch.optim.Adam(parameters, lr=lr)
    count = len(loader.dataset)
    best = FitResult(0, validate(model) if validate else float("nan"), 0)
    best_parameters = detached(parameters)
    stale, step = 0, 0
    stream = itertools.chain.from_iterable(itertools.repeat(loader))
    with torch.enable_grad():
        for step, (inputs, labels) in zip(range(1, max_steps + 1), batches(stream, model, adapter)):
            logits = checked_logits(model, inputs, labels, adapter)
            data_term = F.cross_entropy(logits, labels, reduction="sum") * (count / labels.shape[0])
            objective = direction * data_term
            if fisher is not None:
                objective = objective + anchor_weight * anchor_penalty(parameters, anchor, fisher)
            if l2:
                objective = objective + 0.5 * l2 * sum(((p - a) ** 2).sum() for p, a in zip(parameters, anchor))
            if not torch.isfinite(objective):
                break
            optimizer.zero_grad(set_to_none=True)
            objective.backward()
            optimizer.step()
            if validate is None or step % eval_every:
                continue
            value = validate(model)
            if value > best.best_value:
                best, best_parameters, stale = FitResult(step, value, step), detached(parameters), 0
            else:
                stale += 1
                if stale >= patience:
                    break
    for p in parameters:
        p.grad = None
    if validate is None:
        return FitResult(step, float("nan"), step)
    with torch.no_grad():
        for p, kept in zip(parameters, best_parameters):
            p.copy_(kept)
    return FitResult(best.best_step, best.best_value, step)


@torch.no_grad()
def mean_loss(model: nn.Module, loader: DataLoader, adapter: BatchAdapter | None = None) -> float:
    """Mean cross-entropy over the loader's examples."""
    adapter = adapter or BatchAdapter()
    total, count = 0.0, 0
    for inputs, labels in batches(loader, model, adapter):
        total += F.cross_entropy(checked_logits(model, inputs, labels, adapter), labels, reduction="sum").item()
        count += labels.shape[0]
    return total / max(count, 1)


@torch.no_grad()
def accuracy_of(model: nn.Module, loader: DataLoader, adapter: BatchAdapter | None = None) -> float:
    """Accuracy over the loader's examples."""
    adapter = adapter or BatchAdapter()
    correct, count = 0, 0
    for inputs, labels in batches(loader, model, adapter):
        correct += (checked_logits(model, inputs, labels, adapter).argmax(1) == labels).sum().item()
        count += labels.shape[0]
    return correct / max(count, 1)
