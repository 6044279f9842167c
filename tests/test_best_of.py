"""BestOf: each treatment starts from θ̂, and the acceptance rule keeps the best candidate across them."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_repair.acceptance import Judge
from lightning_repair.adapter import BatchAdapter
from lightning_repair.treat import BestOf, Treatment, TreatmentInputs


class SetBias(Treatment):
    """Candidates: class 1's bias set to each value in turn; records the bias it started from."""

    def __init__(self, *values: float) -> None:
        self.values, self.started_from = values, None

    def candidates(self, inputs):
        bias = inputs.model.bias
        self.started_from = float(bias[1])
        for value in self.values:
            with torch.no_grad():
                bias[1] = value
            yield value


def _inputs(causes: int = 1) -> TreatmentInputs:
    """A 1-D threshold model; the failures F_q are class-1 points the model calls class 0. ``causes``: the size
    of C (0: the round's control, with nothing removed)."""
    model = nn.Linear(1, 2)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[0.0], [0.0]]))
        model.bias.copy_(torch.tensor([0.3, -1.0]))
    failures = DataLoader(TensorDataset(torch.zeros(40, 1), torch.ones(40, dtype=torch.long)), batch_size=16)
    cause_set = DataLoader(TensorDataset(torch.zeros(causes, 1), torch.zeros(causes, dtype=torch.long)))
    kept = DataLoader(TensorDataset(torch.zeros(8, 1), torch.zeros(8, dtype=torch.long)), batch_size=4)
    judge = Judge.accuracy_on(model, failures)
    return TreatmentInputs(model=model, causes=cause_set, kept=kept, query=failures, judge=judge, fisher=None,
                           n_train=10, adapter=BatchAdapter())


def test_best_of_keeps_the_best_treatment_and_starts_each_from_theta_hat():
    useless, fixing = SetBias(-2.0, -3.0), SetBias(-0.5, 1.0)
    inputs = _inputs()
    choice = BestOf(treatments=[useless, fixing]).treat(inputs)
    assert choice.label == "SetBias:1.0" and choice.rated == 4
    assert float(inputs.model.bias[1]) == 1.0
    assert useless.started_from == fixing.started_from == -1.0  # not where the first treatment left it


def test_best_of_keeps_theta_hat_when_no_treatment_is_accepted():
    inputs = _inputs()
    choice = BestOf(treatments=[SetBias(-2.0), SetBias(-5.0)]).treat(inputs)
    assert choice.label is None
    assert float(inputs.model.bias[1]) == -1.0


def test_best_of_needs_fisher_when_any_treatment_does():
    from lightning_repair.treat import EWCUnlearning, Finetune

    assert BestOf(treatments=[Finetune(), EWCUnlearning()]).needs_fisher
    assert not BestOf(treatments=[Finetune()]).needs_fisher
    assert BestOf().needs_fisher  # the default includes EWC deletion
    with pytest.raises(ValueError, match="non-empty list"):
        BestOf(treatments=[])


class SetBiasOnKept(SetBias):
    trains_on_kept = True


def test_best_of_with_nothing_removed_runs_only_the_treatments_that_train_on_the_kept_data():
    """The round's control runs BestOf with C empty: a treatment that only takes C out has nothing to do (EWC
    deletion would fail to draw from an empty C), and one that trains on D \\ C runs as in the repair."""
    removes, trains = SetBias(1.0), SetBiasOnKept(1.0)
    choice = BestOf(treatments=[removes, trains]).treat(_inputs(causes=0))
    assert removes.started_from is None and trains.started_from == -1.0
    assert choice.label == "SetBiasOnKept:1.0" and choice.rated == 1


def test_the_default_best_of_runs_its_control_without_drawing_from_an_empty_cause_set():
    from lightning_repair.treat import EWCUnlearning, Finetune, NewtonRemoval

    inputs = _inputs(causes=0)
    treatments = [EWCUnlearning(), NewtonRemoval(gamma_multipliers=(1.0,)), Finetune(steps=2, eval_every=1)]
    choice = BestOf(treatments=treatments).treat(inputs)  # EWC deletion alone would raise on the empty C
    assert choice.rated >= 1
