"""EWC deletion (Tanno et al. 2022, treatment 3): unlearn the causes C under an anchor weighted by the Fisher.

The paper's objective is  −Σ_{c ∈ C} ℓ(c; θ) + (1/γ)(θ − θ̂)ᵀ diag(F̂)(θ − θ̂),  gradient ascent on C's loss.
It is unbounded below: once |C| ≫ 2/γ the anchor cannot hold it, and Adam collapses a CNN to one class within
10–20 steps, while a learning rate small enough to avoid that barely moves θ̂ (measured; ``METHODS.md``).
By default this module minimises a bounded objective instead, averaged over C so that the anchor's weight means
the same at every |C|, the unlikelihood

    (1/|C|) Σ_{c ∈ C} −log(1 − p(y_c | x_c; θ)) + (1/γ)(θ − θ̂)ᵀ diag(F̂)(θ − θ̂),

which stops pushing once the given label is no longer predicted. Only the last linear layer moves by default.
Every ``eval_every`` steps the model is a candidate, and the acceptance rule picks among them (θ̂ if none wins).
``objective="ascent"`` keeps the paper's exact objective.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from lightning_repair.acceptance import Choice, Judge, as_judge, choose
from lightning_repair.adapter import BatchAdapter
from lightning_repair.optimize import DataTerm, anchored_steps, total_cross_entropy
from lightning_repair.params import check_finetune_modules, finetune_parameters, trainable
from lightning_repair.treat.base import Treatment, TreatmentInputs

Objective = Literal["unlikelihood", "ascent"]
OBJECTIVES = ("unlikelihood", "ascent")


def _check(objective: str, gamma: float, lr: float, max_steps: int, eval_every: int) -> None:
    if objective not in OBJECTIVES:
        raise ValueError(f"Unknown EWC deletion objective {objective!r}; choose one of {OBJECTIVES}.")
    if not gamma > 0 or not lr > 0 or max_steps < 1 or eval_every < 1:
        raise ValueError("EWC deletion needs gamma > 0, lr > 0, max_steps ≥ 1 and eval_every ≥ 1; got "
                         f"{gamma}, {lr}, {max_steps}, {eval_every}.")


@dataclass(kw_only=True)
class EWCUnlearning(Treatment):
    """EWC deletion: unlearn the causes under the Fisher anchor (the default treatment).

    Deviates from the paper by default: the data term is the bounded unlikelihood averaged over C, and only the
    last linear layer moves (see the module docstring); ``objective="ascent", modules="all"`` is the paper's.

    Args:
        objective: ``"unlikelihood"``: (1/|C|) Σ_C −log(1 − p(y_c | x_c)); ``"ascent"``: −Σ_C ℓ(c), the paper's.
        gamma: γ in the anchor (1/γ) F̂; larger moves further from θ̂.
        lr: Adam's learning rate.
        max_steps: bound on the steps.
        eval_every: steps between the candidates the judge rates.
        patience: candidates in a row without improvement before stopping.
        modules: layers that move: None, the last ``nn.Linear``; ``"all"``, every parameter in the repair scope;
            or module names.
    """

    needs_fisher = True

    objective: Objective = "unlikelihood"
    gamma: float = 0.1
    lr: float = 1e-3
    max_steps: int = 100
    eval_every: int = 2
    patience: int = 5
    modules: list[str] | Literal["all"] | None = None

    def __post_init__(self) -> None:
        _check(self.objective, self.gamma, self.lr, self.max_steps, self.eval_every)
        if self.patience < 1:
            raise ValueError(f"EWCUnlearning needs patience ≥ 1, got {self.patience}.")
        check_finetune_modules(self.modules)

    def candidates(self, inputs: TreatmentInputs) -> Iterator[int]:
        return ewc_unlearning_candidates(inputs.model, inputs.causes, inputs.fisher, objective=self.objective,
                                         gamma=self.gamma, lr=self.lr, max_steps=self.max_steps,
                                         eval_every=self.eval_every, modules=self.modules, adapter=inputs.adapter)


DEFAULTS = EWCUnlearning()  # the functions below default to its hyperparameters


def unlikelihood(logits: Tensor, labels: Tensor) -> Tensor:
    """Mean over the batch of −log(1 − p(y | x)), computed stably from the logits; ≥ 0 and bounded as p → 0."""
    log_p = torch.log_softmax(logits, dim=1)
    log_not_given = log_p.scatter(1, labels[:, None], float("-inf")).logsumexp(dim=1)  # log(1 − p(y | x))
    return -log_not_given.mean()


def unlearning_term(objective: Objective, n_causes: int) -> DataTerm:
    """The data term: the mean unlikelihood over C, or the paper's −Σ_C ℓ."""
    if objective == "unlikelihood":
        return unlikelihood
    ascent = total_cross_entropy(n_causes)
    return lambda logits, labels: -ascent(logits, labels)


def ewc_unlearning_candidates(model: nn.Module, cause_loader: DataLoader, fisher: Sequence[Tensor], *,
                              objective: Objective = DEFAULTS.objective, gamma: float = DEFAULTS.gamma,
                              lr: float = DEFAULTS.lr, max_steps: int = DEFAULTS.max_steps,
                              eval_every: int = DEFAULTS.eval_every,
                              modules: Sequence[str] | Literal["all"] | None = DEFAULTS.modules,
                              adapter: BatchAdapter | None = None) -> Iterator[int]:
    """Adam steps of EWC deletion on ``model`` in place, yielding the step every ``eval_every`` steps.

    Args:
        model: a repair copy at θ̂.
        cause_loader: the cause set C.
        fisher: F̂ per trainable parameter of ``model`` (the per-example mean).
        objective: ``"unlikelihood"`` (bounded, the default) or ``"ascent"`` (the paper's −Σ_C ℓ).
        gamma: γ of the anchor (1/γ) F̂; larger lets the model move further.
        lr: Adam's learning rate.
        max_steps: bound on the steps.
        eval_every: steps between candidates.
        modules: which layers move: None, the last ``nn.Linear``; ``"all"``; or module names.
        adapter: how to read batches and logits.
    """
    _check(objective, gamma, lr, max_steps, eval_every)
    moving = finetune_parameters(model, modules)
    fisher_of = {id(p): f for p, f in zip(trainable(model), fisher)}
    return anchored_steps(model, cause_loader, unlearning_term(objective, len(cause_loader.dataset)),
                          parameters=moving, fisher=[fisher_of[id(p)] for p in moving], anchor_weight=1.0 / gamma,
                          lr=lr, max_steps=max_steps, every=eval_every, adapter=adapter)


def ewc_unlearning(model: nn.Module, cause_loader: DataLoader, judge: Judge | DataLoader,
                   fisher: Sequence[Tensor], *, objective: Objective = DEFAULTS.objective,
                   gamma: float = DEFAULTS.gamma, lr: float = DEFAULTS.lr, max_steps: int = DEFAULTS.max_steps,
                   eval_every: int = DEFAULTS.eval_every, patience: int | None = DEFAULTS.patience,
                   modules: Sequence[str] | Literal["all"] | None = DEFAULTS.modules,
                   adapter: BatchAdapter | None = None) -> Choice:
    """Unlearns the causes from ``model`` in place and keeps the step the judge accepts best (θ̂ if none).

    Arguments as in :func:`ewc_unlearning_candidates`, plus ``judge`` (the acceptance rule's judge, or a loader
    whose accuracy judges, e.g. F_q) and ``patience`` (candidates without improvement before stopping).
    """
    judge = as_judge(judge, model, adapter)
    steps = ewc_unlearning_candidates(model, cause_loader, fisher, objective=objective, gamma=gamma, lr=lr,
                                      max_steps=max_steps, eval_every=eval_every, modules=modules, adapter=adapter)
    return choose(model, steps, judge, patience)
