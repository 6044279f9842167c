"""The interface every treatment implements."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

from torch import Tensor, nn
from torch.utils.data import DataLoader

from lightning_repair.adapter import BatchAdapter
from lightning_repair.optimize import Check


@dataclass(frozen=True)
class TreatmentInputs:
    """What a treatment may read in one repair round.

    Attributes:
        model: a repair copy at θ̂ (eval mode, only scoped parameters trainable); the treatment moves it to θ⁻.
        causes: the cause set C, shuffled.
        kept: D \\ C, shuffled.
        query: the failures F_q (e.g. to fit θ₊F).
        check: how to rate a candidate model when choosing a step size or stopping early, higher is better: a
            loader (its accuracy) or a function. The callback's: accuracy on F_q among models that keep accuracy
            on the guard sample R_q within half of ``max_remaining_drop`` (−∞ otherwise), leaving room for the
            rollback rule's check on R. F_q and R_q are the only
            validation data a treatment may use.
        fisher: F̂ per scoped parameter, or None when the treatment does not need it.
        n_train: N, the number of training examples.
        adapter: how to read batches and logits.
        seed: seed for anything random in this round.
    """

    model: nn.Module
    causes: DataLoader
    kept: DataLoader
    query: DataLoader
    check: Check
    fisher: list[Tensor] | None
    n_train: int
    adapter: BatchAdapter
    seed: int = 0


class Treatment(ABC):
    """Moves the model from θ̂ to θ⁻, erasing what it learnt from the causes C.

    Attributes:
        needs_fisher: whether :meth:`treat` reads ``inputs.fisher``.
    """

    needs_fisher: bool = False

    @abstractmethod
    def treat(self, inputs: TreatmentInputs) -> None:
        """Updates ``inputs.model``'s trainable parameters in place."""

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({fields})"
