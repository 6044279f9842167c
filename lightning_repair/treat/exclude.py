"""No unlearning step: the causes leave training and the rest of the fit unlearns them."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from torch import nn

from lightning_repair.treat.base import Treatment, TreatmentInputs


@dataclass(kw_only=True)
class Exclude(Treatment):
    """Moves no weight: the round only takes its causes C out of training, and the epochs after it train on D \\ C.

    The cheapest round: after the scores only the suspects CSV's rows are predicted (no fine-tune, control,
    judgement or prediction of V after). It suits a fit with many epochs left after its rounds, whose own training
    on D \\ C unlearns the causes. The acceptance rule judges weights, and this treatment leaves θ̂'s, so its rounds
    are kept: their causes always leave training.
    """

    moves_weights = False

    def check_scope(self, model: nn.Module) -> None:
        """Moves no parameter, so any repair scope will do."""

    def candidates(self, inputs: TreatmentInputs) -> Iterator[object]:
        yield from ()
