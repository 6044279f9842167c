"""Several treatments from the same θ̂, and the one rule keeps the best candidate among all of them."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

from torch import nn

from lightning_repair.acceptance import Choice, choose
from lightning_repair.params import assign_, detached, trainable
from lightning_repair.treat.base import Treatment, TreatmentInputs
from lightning_repair.treat.ewc_unlearning import EWCUnlearning
from lightning_repair.treat.finetune import Finetune
from lightning_repair.treat.newton import NewtonRemoval


@dataclass(kw_only=True)
class BestOf(Treatment):
    """Runs each treatment from θ̂ and keeps the candidate the acceptance rule rates best across all of them.

    Each treatment chooses among its own candidates as it would alone (with its own patience); the winner is the
    treatment whose choice has the largest gain beyond noise (gain − margin · SE) on F_q ∪ R_q, and θ̂ when none
    is accepted. It costs the sum of its treatments. Which one won is the round's ``candidate``,
    ``"<Treatment>:<its candidate>"``.

    Args:
        treatments: the treatments to try, in order (ties keep the earlier one); default EWC deletion, Newton
            removal and fine-tuning on D \\\\ C.
    """

    treatments: list[Treatment] = field(default_factory=lambda: [EWCUnlearning(), NewtonRemoval(), Finetune()])

    def __post_init__(self) -> None:
        if not self.treatments or not all(isinstance(t, Treatment) for t in self.treatments):
            raise ValueError(f"BestOf needs a non-empty list of treatments, got {self.treatments!r}.")
        self.treatments = list(self.treatments)

    @property
    def needs_fisher(self) -> bool:  # type: ignore[override]
        return any(t.needs_fisher for t in self.treatments)

    @property
    def trains_on_kept(self) -> bool:  # type: ignore[override]
        """Whether any of its treatments trains on D \\ C: then the round's control runs BestOf with nothing
        removed, and the repair must beat the best of those treatments on all of D."""
        return any(t.trains_on_kept for t in self.treatments)

    @property
    def moves_weights(self) -> bool:  # type: ignore[override]
        return any(t.moves_weights for t in self.treatments)

    def check_scope(self, model: nn.Module) -> None:
        for treatment in self.treatments:
            treatment.check_scope(model)

    def applicable(self, inputs: TreatmentInputs) -> list[Treatment]:
        """The treatments to run: all of them, or with nothing removed (the round's control) those that train on
        D \\ C; the others have nothing to take out."""
        if len(inputs.causes.dataset) > 0:
            return self.treatments
        return [t for t in self.treatments if t.trains_on_kept]

    def candidates(self, inputs: TreatmentInputs) -> Iterator[str]:
        """Every treatment's candidates in turn, each treatment starting from θ̂."""
        parameters = trainable(inputs.model)
        start = detached(parameters)
        for treatment in self.applicable(inputs):
            assign_(parameters, start)
            for label in treatment.candidates(inputs):
                yield f"{type(treatment).__name__}:{label}"

    def treat(self, inputs: TreatmentInputs) -> Choice:
        parameters = trainable(inputs.model)
        start = detached(parameters)
        best, best_parameters, rated = Choice(None, 0.0, 0), start, 0
        for treatment in self.applicable(inputs):
            assign_(parameters, start)
            choice = choose(inputs.model, treatment.candidates(inputs), inputs.judge, treatment.patience)
            rated += choice.rated
            if choice.label is not None and choice.value > best.value:
                best = Choice(f"{type(treatment).__name__}:{choice.label}", choice.value, 0)
                best_parameters = detached(parameters)
        assign_(parameters, best_parameters)
        return Choice(best.label, best.value, rated)
