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


def _inputs() -> TreatmentInputs:
    """A 1-D threshold model; the failures F_q are class-1 points the model calls class 0."""
    model = nn.Linear(1, 2)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[0.0], [0.0]]))
        model.bias.copy_(torch.tensor([0.3, -1.0]))
    failures = DataLoader(TensorDataset(torch.zeros(40, 1), torch.ones(40, dtype=torch.long)), batch_size=16)
    empty = DataLoader(TensorDataset(torch.zeros(0, 1), torch.zeros(0, dtype=torch.long)))
    judge = Judge.accuracy_on(model, failures)
    return TreatmentInputs(model=model, causes=empty, kept=empty, query=failures, judge=judge, fisher=None,
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
