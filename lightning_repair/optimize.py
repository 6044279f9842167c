"""One anchored fine-tune serves θ₊F (EWC influence), EWC deletion and fine-tuning on D \\ C.

:func:`anchored_steps` minimises a data term plus c (θ − θ̂)ᵀ diag(F̂)(θ − θ̂) + (λ/2)‖θ − θ̂‖² with Adam and
yields its candidates; which one is kept is decided elsewhere (:mod:`lightning_repair.acceptance`).
"""

from __future__ import annotations

import collections
import copy
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.utils.data import DataLoader

from lightning_repair.acceptance import keep_best
from lightning_repair.adapter import BatchAdapter
from lightning_repair.curvature import batches, checked_logits, endless
from lightning_repair.params import anchor_penalty, detached, trainable


DataTerm = Callable[[Tensor, Tensor], Tensor]
"""The data term of one batch's objective from its logits and labels, e.g. ``mean_cross_entropy``."""


def mean_cross_entropy(logits: Tensor, labels: Tensor) -> Tensor:
    """The batch's mean cross-entropy: an unbiased estimate of the mean loss over the loader's examples."""
    return F.cross_entropy(logits, labels)


def total_cross_entropy(count: int) -> DataTerm:
    """The summed cross-entropy over ``count`` examples, estimated from one batch: (count / B) Σ_batch ℓ."""
    return lambda logits, labels: F.cross_entropy(logits, labels, reduction="sum") * (count / labels.shape[0])


def anchored_steps(model: nn.Module, loader: DataLoader, data_term: DataTerm, *,
                   parameters: Sequence[nn.Parameter] | None = None, fisher: Sequence[Tensor] | None = None,
                   anchor_weight: float = 0.0, l2: float = 0.0, lr: float, max_steps: int, every: int = 1,
                   adapter: BatchAdapter | None = None) -> Iterator[int]:
    """Adam steps on ``parameters`` of ``model``, in place, anchored at their values θ̂ when the walk starts.

    Each step minimises  data_term(batch) + c (θ − θ̂)ᵀ diag(F̂)(θ − θ̂) + (λ/2)‖θ − θ̂‖²  on the next batch of
    ``loader`` (cycled), and every ``every`` steps the step number is yielded with the model at that point: the
    candidates of a fine-tune, for :func:`~lightning_repair.acceptance.keep_best` to rate. The walk ends after
    ``max_steps`` or at the first non-finite objective (the model is then left at the last finite step).

    Args:
        model: a repair copy.
        loader: the examples of the data term.
        data_term: the objective's data part from (logits, labels) of one batch.
        parameters: those that move; default every trainable parameter of ``model``.
        fisher: F̂ per moving parameter, aligned with ``parameters``; None: no Fisher anchor.
        anchor_weight: c, the Fisher anchor's coefficient.
        l2: λ of the plain L2 anchor.
        lr: Adam's learning rate.
        max_steps: bound on optimizer steps.
        every: steps between yields.
        adapter: how to read batches and logits.
    """
    adapter = adapter or BatchAdapter()
    parameters = list(parameters) if parameters is not None else trainable(model)
    anchor = detached(parameters)
    optimizer = torch.optim.Adam(parameters, lr=lr)
    stream = endless(loader)
    try:
        for step, (inputs, labels) in zip(range(1, max_steps + 1), batches(stream, model, adapter)):
            with torch.enable_grad():
                objective = data_term(checked_logits(model, inputs, labels, adapter), labels)
                if fisher is not None and anchor_weight:
                    objective = objective + anchor_weight * anchor_penalty(parameters, anchor, fisher)
                if l2:
                    objective = objective + 0.5 * l2 * sum(((p - a) ** 2).sum() for p, a in zip(parameters, anchor))
                if not torch.isfinite(objective):
                    return
                optimizer.zero_grad(set_to_none=True)
                # `inputs=` keeps gradients off every parameter that does not move, trainable or not.
                objective.backward(inputs=parameters)
            optimizer.step()
            if step % every == 0:
                yield step
    finally:
        for p in parameters:
            p.grad = None


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


STOP_EVERY, STOP_PATIENCE = 5, 4  # early stopping: the held-back failures' loss, checked every 5 steps


@dataclass(frozen=True)
class FitDefaults:
    """The defaults of θ₊F's fit, written once: :func:`fit_to_failures`, EWC influence and energy alignment's θ₊F
    all read them from :data:`FIT_DEFAULTS`."""

    l2: float = 0.0
    lr: float = 1e-3
    max_steps: int = 100


FIT_DEFAULTS = FitDefaults()


def fit_to_failures(model: nn.Module, failure_loader: DataLoader, fisher: Sequence[Tensor] | None, n_train: int,
                    stop_loader: DataLoader | None = None, *, l2: float = FIT_DEFAULTS.l2,
                    lr: float = FIT_DEFAULTS.lr, max_steps: int = FIT_DEFAULTS.max_steps,
                    adapter: BatchAdapter | None = None) -> nn.Module:
    """θ₊F: a copy of ``model`` fitted to the failures under the EWC anchor (N/2) F̂ (``model`` is untouched).

    Args:
        model: the classifier at θ̂.
        failure_loader: the failures F_q the fit uses.
        fisher: F̂ per trainable parameter; None leaves only the L2 anchor.
        n_train: N, the number of training examples, which scales the anchor.
        stop_loader: failures held back for early stopping on their loss; None runs all ``max_steps``.
        l2: λ of the L2 anchor (the paper: 0).
        lr: Adam's learning rate.
        max_steps: bound on optimizer steps.
        adapter: how to read batches and logits.
    """
    adapter = adapter or BatchAdapter()
    plus = copy.deepcopy(model)
    steps = anchored_steps(plus, failure_loader, total_cross_entropy(len(failure_loader.dataset)), fisher=fisher,
                           anchor_weight=n_train / 2, l2=l2, lr=lr, max_steps=max_steps,
                           every=1 if stop_loader is None else STOP_EVERY, adapter=adapter)
    if stop_loader is None:
        collections.deque(steps, maxlen=0)  # run every step
    else:
        def stop_value(candidate: nn.Module) -> float:
            return -mean_loss(candidate, stop_loader, adapter)

        keep_best(plus, steps, stop_value, baseline=stop_value(plus), patience=STOP_PATIENCE)
    return plus
