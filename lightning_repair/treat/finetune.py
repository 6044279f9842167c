"""Fine-tuning on D \\ C from θ̂ (the paper's reference treatment)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Literal

from torch import nn
from torch.utils.data import DataLoader

from lightning_repair.acceptance import Choice, Judge, as_judge, choose
from lightning_repair.adapter import BatchAdapter
from lightning_repair.optimize import anchored_steps, mean_cross_entropy
from lightning_repair.params import check_finetune_modules, finetune_parameters
from lightning_repair.treat.base import Treatment, TreatmentInputs


@dataclass(kw_only=True)
class Finetune(Treatment):
    """Fine-tune on D \\ C, keeping the step the acceptance rule rates best. Training then goes on without C.

    Args:
        steps: Adam steps on D \\ C within the round.
        lr: Adam's learning rate.
        eval_every: steps between the candidates the judge rates.
        modules: layers that move: ``"all"`` (default), every parameter in the repair scope; None, the last
            ``nn.Linear`` (the head: its candidates are then judged from the round's cached head inputs, without a
            forward pass over the validation data); or module names.
    """

    steps: int = 100
    lr: float = 1e-3
    eval_every: int = 10
    modules: list[str] | Literal["all"] | None = "all"
    trains_on_kept = True  # a fine-tune on D gains too; the round's control tells the removal's share

    def __post_init__(self) -> None:
        if self.steps < 1 or self.lr <= 0 or self.eval_every < 1:
            raise ValueError(f"Finetune needs steps ≥ 1, lr > 0 and eval_every ≥ 1, got {self.steps}, {self.lr}, "
                             f"{self.eval_every}. A round is kept only when its treatment raises validation accuracy, "
                             "so a fine-tune of 0 steps would always be rolled back.")
        check_finetune_modules(self.modules)

    def candidates(self, inputs: TreatmentInputs) -> Iterator[int]:
        return finetune_candidates(inputs.model, inputs.kept, steps=self.steps, lr=self.lr, eval_every=self.eval_every,
                                   modules=self.modules, adapter=inputs.adapter)


DEFAULTS = Finetune()  # the functions below default to its hyperparameters


def finetune_candidates(model: nn.Module, kept_loader: DataLoader, *, steps: int = DEFAULTS.steps,
                        lr: float = DEFAULTS.lr, eval_every: int = DEFAULTS.eval_every,
                        modules: Sequence[str] | Literal["all"] | None = DEFAULTS.modules,
                        adapter: BatchAdapter | None = None) -> Iterator[int]:
    """Adam steps on D \\ C (``kept_loader``, shuffled) of the ``modules`` that move, yielding every ``eval_every``
    steps and after the last."""
    last = 0
    for last in anchored_steps(model, kept_loader, mean_cross_entropy, parameters=finetune_parameters(model, modules),
                               lr=lr, max_steps=steps, every=1, adapter=adapter):
        if last % eval_every == 0 or last == steps:
            yield last


def finetune(model: nn.Module, kept_loader: DataLoader, judge: Judge | DataLoader, *, steps: int = DEFAULTS.steps,
             lr: float = DEFAULTS.lr, eval_every: int = DEFAULTS.eval_every,
             modules: Sequence[str] | Literal["all"] | None = DEFAULTS.modules,
             adapter: BatchAdapter | None = None) -> Choice:
    """Fine-tunes ``model`` in place on D \\ C and keeps the step ``judge`` accepts best (θ̂ if none).

    Args:
        model: a repair copy at θ̂.
        kept_loader: D \\ C, shuffled.
        judge: the acceptance rule's judge, or a loader whose accuracy judges (e.g. F_q).
        steps: Adam steps.
        lr: Adam's learning rate.
        eval_every: steps between candidates.
        modules: which layers move: ``"all"``; None, the last ``nn.Linear``; or module names.
        adapter: how to read batches and logits.
    """
    judge = as_judge(judge, model, adapter)
    candidates = finetune_candidates(model, kept_loader, steps=steps, lr=lr, eval_every=eval_every, modules=modules,
                                     adapter=adapter)
    return choose(model, candidates, judge)
