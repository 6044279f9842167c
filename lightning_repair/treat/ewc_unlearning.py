"""EWC deletion (Tanno et al. 2022, treatment 3): unlearn C by gradient ascent anchored by the Fisher.

θ⁻ = argmin_θ −Σ_{c ∈ C} ℓ(c; θ) + (1/γ)(θ − θ̂)ᵀ diag(F̂)(θ − θ̂). Ascent on C's loss is unbounded, so steps
are bounded and the parameters kept are those the check rates best: in the callback, accuracy on F_q among the
steps that keep accuracy on the guard sample R_q (correctly classified validation examples) within
``max_remaining_drop``; never F_h or test data.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn
from torch.utils.data import DataLoader

from lightning_repair.adapter import BatchAdapter
from lightning_repair.optimize import Check, FitResult, anchored_fit, as_check
from lightning_repair.treat.base import Treatment, TreatmentInputs


def ewc_unlearning(model: nn.Module, cause_loader: DataLoader, check: Check,
                   fisher: Sequence[Tensor], gamma: float = 0.02, lr: float = 3e-5, max_steps: int = 50,
                   eval_every: int = 5, patience: int = 3, adapter: BatchAdapter | None = None) -> FitResult:
    """Unlearns the causes from ``model`` in place; returns which step was kept and its check value.

    Args:
        model: a repair copy at θ̂; its trainable parameters move to θ⁻.
        cause_loader: the cause set C.
        check: rates each candidate, higher is better: a loader (its accuracy, e.g. F_q) or a function; the
            best step is kept (step 0, θ̂ itself, if none beats it).
        fisher: F̂ per trainable parameter.
        gamma: γ; the anchor is (1/γ) F̂ (the paper: γ ∈ [0.01, 0.05]).
        lr: Adam's learning rate.
        max_steps: bound on ascent steps.
        eval_every: steps between checks.
        patience: evaluations without improvement before stopping.
        adapter: how to read batches and logits.
    """
    return anchored_fit(model, cause_loader, direction=-1.0, fisher=fisher, anchor_weight=1.0 / gamma, lr=lr,
                        max_steps=max_steps, validate=as_check(check, adapter),
                        eval_every=eval_every, patience=patience, adapter=adapter)


class EWCUnlearning(Treatment):
    """EWC-regularised unlearning of the causes (the default treatment).

    Args:
        gamma: γ in the anchor (1/γ) F̂; larger moves further from θ̂.
        lr: Adam's learning rate for the ascent.
        max_steps: bound on ascent steps.
        eval_every: steps between checks (the early stopping).
        patience: checks without improvement before stopping.
    """

    needs_fisher = True

    def __init__(self, gamma: float = 0.02, lr: float = 3e-5, max_steps: int = 50, eval_every: int = 5,
                 patience: int = 3) -> None:
        if gamma <= 0 or lr <= 0 or max_steps < 1 or eval_every < 1 or patience < 1:
            raise ValueError("EWCUnlearning needs gamma > 0, lr > 0 and max_steps, eval_every, patience ≥ 1; got "
                             f"{gamma}, {lr}, {max_steps}, {eval_every}, {patience}.")
        self.gamma, self.lr, self.max_steps, self.eval_every, self.patience = gamma, lr, max_steps, eval_every, patience

    def treat(self, inputs: TreatmentInputs) -> None:
        ewc_unlearning(inputs.model, inputs.causes, inputs.check, inputs.fisher, self.gamma, self.lr,
                       self.max_steps, self.eval_every, self.patience, inputs.adapter)
