"""The acceptance rule against hand-computed cases, and the one chooser every treatment uses."""

import math

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_repair.acceptance import Judge, compare, estimated_accuracy, keep_best


def correct(n: int, right: int) -> torch.Tensor:
    """n examples, the first ``right`` of them classified correctly."""
    return torch.arange(n) < right


def test_fixing_one_failure_while_r_drops_a_point_is_rejected():
    # |V| = 1000: 100 failures (π_F = 0.1), F_h = 50 of them, R = 900 correct.
    verdict = compare(correct(50, 0), correct(50, 1), correct(900, 900), correct(900, 891), 0.1)
    assert verdict.gain == pytest.approx(0.1 * 1 / 50 - 0.9 * 9 / 900)  # +0.002 − 0.009 = −0.007
    assert not verdict.accepted
    assert verdict.remaining_drop == pytest.approx(0.01)


def test_many_fixes_for_a_few_breaks_are_accepted():
    # The paper's EWC deletion result (F 0.43, R 0.92) on a model with 30 % failures: a large net gain.
    verdict = compare(correct(200, 0), correct(200, 86), correct(700, 700), correct(700, 644), 0.3)
    gain = 0.3 * 86 / 200 - 0.7 * 56 / 700
    assert verdict.gain == pytest.approx(gain)  # +0.129 − 0.056 = +0.073
    assert verdict.standard_error == pytest.approx(math.sqrt(0.3 ** 2 * 86 / 200 ** 2 + 0.7 ** 2 * 56 / 700 ** 2))
    assert verdict.accepted and verdict.lower_bound == pytest.approx(gain - 2 * verdict.standard_error)


def test_one_part_is_mcnemars_test():
    # For failures alone (π_F = 1), gain / SE is McNemar's z = (b − c) / √(b + c).
    before = torch.tensor([0, 0, 0, 0, 0, 1, 1, 0, 0, 0], dtype=torch.bool)
    after = torch.tensor([1, 1, 1, 1, 0, 0, 1, 0, 0, 0], dtype=torch.bool)  # b = 4 fixed, c = 1 broken
    verdict = compare(before, after, torch.zeros(0, dtype=torch.bool), torch.zeros(0, dtype=torch.bool), 1.0)
    assert verdict.gain / verdict.standard_error == pytest.approx((4 - 1) / math.sqrt(4 + 1))
    assert not verdict.accepted  # z = 1.34 < 2
    assert compare(before, after, torch.zeros(0, dtype=torch.bool), torch.zeros(0, dtype=torch.bool), 1.0,
                   margin=1.0).accepted


def test_few_fixes_are_noise_and_ties_keep_theta_hat():
    assert not compare(correct(1, 0), correct(1, 1), correct(10, 10), correct(10, 10), 0.5).accepted  # z = 1
    assert not compare(correct(100, 0), correct(100, 3), correct(900, 900), correct(900, 900), 0.1).accepted
    assert compare(correct(100, 0), correct(100, 5), correct(900, 900), correct(900, 900), 0.1).accepted  # z = 2.2
    tie = compare(correct(10, 0), correct(10, 0), correct(10, 10), correct(10, 10), 0.5)
    assert tie.gain == 0 and tie.standard_error == 0 and not tie.accepted


def test_parts_are_weighted_by_their_share_of_v_not_their_sample_size():
    # An unweighted pool of F_h (50) and R (50) would count failures as half of V and accept this repair.
    verdict = compare(correct(50, 0), correct(50, 20), correct(50, 50), correct(50, 40), 0.1)
    assert verdict.gain == pytest.approx(0.1 * 20 / 50 - 0.9 * 10 / 50) and verdict.gain < 0
    assert not verdict.accepted


def test_optional_cap_on_r_rejects_an_otherwise_accepted_repair():
    args = (correct(200, 0), correct(200, 86), correct(700, 700), correct(700, 644), 0.3)
    assert compare(*args, max_remaining_drop=0.1).accepted
    capped = compare(*args, max_remaining_drop=0.05)
    assert not capped.accepted and capped.lower_bound == float("-inf")


def test_estimated_accuracy_weighs_parts_by_their_share():
    assert estimated_accuracy(correct(10, 3), correct(90, 90), 0.1) == pytest.approx(0.1 * 0.3 + 0.9 * 1.0)


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="failure_share"):
        compare(correct(2, 0), correct(2, 1), correct(2, 2), correct(2, 2), 1.5)
    with pytest.raises(ValueError, match="same examples"):
        compare(correct(2, 0), correct(3, 1), correct(2, 2), correct(2, 2), 0.5)
    with pytest.raises(ValueError, match="margin"):
        compare(correct(2, 0), correct(2, 1), correct(2, 2), correct(2, 2), 0.5, margin=-1)


def _bias_model() -> nn.Linear:
    """logit₁ − logit₀ = bias₁: every input is class 1 once the bias is positive."""
    model = nn.Linear(1, 2)
    with torch.no_grad():
        model.weight.zero_()
        model.bias.copy_(torch.tensor([0.0, -1.0]))
    return model


def _loader(labels: list[int]) -> DataLoader:
    return DataLoader(TensorDataset(torch.zeros(len(labels), 1), torch.tensor(labels)), batch_size=4)


def test_judge_rates_against_theta_hat_fixed_at_construction():
    model = _bias_model()
    judge = Judge(model, _loader([1] * 30), _loader([0] * 70), failure_share=0.3)
    with torch.no_grad():
        model.bias[1] = 2.0  # now every failure is fixed and every remaining example broken
    verdict = judge.verdict(model)
    assert verdict.gain == pytest.approx(0.3 - 0.7) and not verdict.accepted


def test_keep_best_keeps_the_best_strictly_above_baseline_and_stops_on_patience():
    model = _bias_model()
    values = {1: 0.5, 2: 2.0, 3: 2.0, 4: 1.0, 5: 1.5, 6: 9.0}
    visited = []

    def candidates():
        for step in values:
            with torch.no_grad():
                model.bias[1] = float(step)
            visited.append(step)
            yield step

    choice = keep_best(model, candidates(), lambda m: values[int(m.bias[1])], baseline=1.0, patience=3)
    assert choice.label == 2 and choice.value == 2.0  # the earliest of the tie
    assert visited == [1, 2, 3, 4, 5]  # three ratings in a row without beating 2.0: step 6 is never tried
    assert model.bias[1].item() == 2.0


def test_keep_best_restores_theta_hat_when_nothing_beats_it():
    model = _bias_model()

    def candidates():
        with torch.no_grad():
            model.bias[1] = 5.0
        yield "moved"

    choice = keep_best(model, candidates(), lambda m: -1.0, baseline=0.0)
    assert choice.label is None and model.bias.tolist() == [0.0, -1.0]
