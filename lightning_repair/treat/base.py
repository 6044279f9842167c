"""The interface every treatment implements: it proposes candidate repairs, and one rule chooses among them."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Literal

from torch import Tensor, nn
from torch.utils.data import DataLoader

from lightning_repair.acceptance import Choice, Judge, choose
from lightning_repair.adapter import BatchAdapter
from lightning_repair.method import Method
from lightning_repair.params import finetune_parameters


@dataclass(frozen=True)
class TreatmentInputs:
    """What a treatment may read in one repair round.

    Attributes:
        model: a repair copy at θ̂ (eval mode, only scoped parameters trainable); the treatment moves it to θ⁻.
        causes: the cause set C, shuffled.
        kept: D \\ C, shuffled.
        query: the failures F_q (e.g. to fit θ₊F).
        judge: rates candidates by the acceptance rule against θ̂; in the callback on F_q and the guard sample
            R_q, the only validation data a treatment may read.
        fisher: F̂ per scoped parameter, or None when the treatment does not need it.
        n_train: N, the number of training examples.
        adapter: how to read batches and logits.
        seed: seed for anything random in this round.
    """

    model: nn.Module
    causes: DataLoader
    kept: DataLoader
    query: DataLoader
    judge: Judge
    fisher: list[Tensor] | None
    n_train: int
    adapter: BatchAdapter
    seed: int = 0


class Treatment(Method, ABC):
    """Moves the model from θ̂ to θ⁻, erasing what it learnt from the causes C.

    A treatment only proposes candidates (:meth:`candidates`); :func:`~lightning_repair.acceptance.choose` keeps
    the one the judge accepts with the largest gain beyond noise, or θ̂ when it accepts none.

    Attributes:
        needs_fisher: whether :meth:`candidates` reads ``inputs.fisher``.
        trains_on_kept: whether the treatment trains on D \\ C, so that part of what it gains is extra training. The
            round then also runs it with nothing removed (the control) and keeps the repair only if it beats that.
        patience: stop after this many candidates in a row that do not improve on the best rating seen; None
            rates them all.
        moves_weights: False for a treatment that only takes C out of training (:class:`Exclude`).
    """

    needs_fisher: bool = False
    trains_on_kept: bool = False
    patience: int | None = None
    moves_weights: bool = True

    @property
    def moving_modules(self) -> Sequence[str] | Literal["all"] | None:
        """The layers the treatment moves, as :func:`~lightning_repair.params.finetune_parameters` reads them: its
        ``modules`` where it has them, else every trainable parameter."""
        return getattr(self, "modules", "all")

    def check_scope(self, model: nn.Module) -> None:
        """Raises ValueError where the treatment would move no parameter of ``model``, a repair copy (only the
        repair scope trainable): the callback asks before training starts, not at the first round."""
        finetune_parameters(model, self.moving_modules)

    @abstractmethod
    def candidates(self, inputs: TreatmentInputs) -> Iterator[object]:
        """Moves ``inputs.model``'s trainable parameters through candidate repairs in place, yielding a label
        (a step, a step size) with the model at each."""

    def treat(self, inputs: TreatmentInputs) -> Choice:
        """Leaves ``inputs.model`` at the chosen candidate (θ̂ when none is accepted) and says which it was."""
        return choose(inputs.model, self.candidates(inputs), inputs.judge, self.patience)
