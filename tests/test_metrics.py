"""The benchmark's metrics on small inputs whose values were worked out by hand."""

import math

import numpy as np
import pytest
import torch

from benchmarks.metrics import (auroc, average_precision, average_ranks, detection_curve, found_at_fraction,
                                gap_closed, precision_recall)

# Four examples, two flipped: the flips are ranked 1st and 3rd.
SCORES = [0.9, 0.8, 0.7, 0.6]
FLIPPED = [True, False, True, False]


def test_average_ranks_share_ties():
    assert average_ranks([3.0, 1.0, 3.0, 2.0]).tolist() == [3.5, 1.0, 3.5, 2.0]


def test_auroc_counts_pairs_and_half_ties():
    # Flips {0.9, 0.7} against clean {0.8, 0.6}: 3 of the 4 pairs ordered right.
    assert auroc(SCORES, FLIPPED) == pytest.approx(0.75)
    assert auroc([4, 3, 2, 1], [1, 1, 0, 0]) == 1.0
    assert auroc([1, 2, 3, 4], [1, 1, 0, 0]) == 0.0
    # Flips {1, 0} against clean {1, 0}: pairs (1,1) tie ½, (1,0) 1, (0,1) 0, (0,0) tie ½ → 2 / 4.
    assert auroc([1, 1, 0, 0], [1, 0, 1, 0]) == pytest.approx(0.5)
    assert auroc(torch.tensor(SCORES), torch.tensor(FLIPPED)) == pytest.approx(0.75)


def test_average_precision_steps_over_thresholds():
    # Thresholds 0.9: P 1, R ½; 0.8: P ½, R ½; 0.7: P ⅔, R 1; 0.6: no new recall → ½·1 + ½·⅔.
    assert average_precision(SCORES, FLIPPED) == pytest.approx(0.5 + 1 / 3)
    # A tie at 1 holding one flip and one clean: P ½ at R ½, then P ½ at R 1.
    assert average_precision([1, 1, 0, 0], [1, 0, 0, 1]) == pytest.approx(0.5)
    # Threshold 2 finds nothing; 1 (three examples) finds one flip: ⅓ at R ½; 0 finds the other: ½ at R 1.
    assert average_precision([2, 1, 1, 0], [0, 1, 0, 1]) == pytest.approx(0.5 / 3 + 0.5 / 2)
    assert average_precision([5, 4, 3], [1, 1, 0]) == 1.0


def test_detection_curve_is_linear_across_ties():
    inspected, found = detection_curve(SCORES, FLIPPED)
    assert inspected.tolist() == [0, 0.25, 0.5, 0.75, 1]
    assert found.tolist() == [0, 0.5, 0.5, 1, 1]
    # The top three tie and hold one of the two flips: on average ⅓ of a flip per example inspected.
    _, found = detection_curve([1, 1, 1, 0], [1, 0, 0, 1])
    assert found == pytest.approx([0, 1 / 6, 1 / 3, 1 / 2, 1])


def test_found_at_fraction():
    scores = np.arange(10, 0, -1)  # 10 … 1, best first
    flipped = np.isin(scores, [10, 7, 3])
    assert found_at_fraction(scores, flipped) == pytest.approx(1 / 3)  # top 2 of 10: the 10
    assert found_at_fraction(scores, flipped, 0.5) == pytest.approx(2 / 3)  # top 5: the 10 and the 7
    assert found_at_fraction(scores, flipped, 0.0) == 0.0
    assert found_at_fraction(scores, flipped, 1.0) == 1.0
    # 0.29 × 100 is 28.999… in floating point; the top 29 are meant, which hold every flip here.
    assert found_at_fraction(np.arange(100, 0, -1), np.arange(100) < 29, 0.29) == 1.0
    # Ties at the cut count at their expected value: top 2 of four tied scores, one flip → ½.
    assert found_at_fraction([1, 1, 1, 1], [1, 0, 0, 0], 0.5) == pytest.approx(0.5)


def test_precision_recall_of_indices_and_masks():
    flipped = [True, False, True, False, True]
    assert precision_recall([0, 1, 2], flipped) == pytest.approx((2 / 3, 2 / 3))
    assert precision_recall(np.array([True, True, True, False, False]), flipped) == pytest.approx((2 / 3, 2 / 3))
    assert precision_recall(torch.tensor([4]), flipped) == pytest.approx((1.0, 1 / 3))
    precision, recall = precision_recall([], flipped)
    assert math.isnan(precision) and recall == 0.0
    with pytest.raises(ValueError, match="distinct"):
        precision_recall([1, 1], flipped)


def test_gap_closed():
    assert gap_closed(0.85, noisy=0.80, oracle=0.90) == pytest.approx(0.5)
    assert gap_closed(0.90, noisy=0.80, oracle=0.90) == pytest.approx(1.0)
    assert gap_closed(0.78, noisy=0.80, oracle=0.90) == pytest.approx(-0.2)
    assert math.isnan(gap_closed(0.9, noisy=0.8, oracle=0.8))


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match="one flipped and one clean"):
        auroc([1, 2], [True, True])
    with pytest.raises(ValueError, match="one flipped"):
        average_precision([1, 2], [False, False])
    with pytest.raises(ValueError, match="equal length"):
        auroc([1, 2, 3], [True, False])
    with pytest.raises(ValueError, match="finite"):
        auroc([1, float("nan")], [True, False])


def test_agrees_with_scikit_learn_on_ties():
    from sklearn import metrics  # a [dev] dependency

    rng = np.random.default_rng(0)
    scores = rng.integers(0, 6, size=200).astype(float)  # few distinct values: many ties
    flipped = rng.random(200) < 0.3
    assert auroc(scores, flipped) == pytest.approx(metrics.roc_auc_score(flipped, scores))
    assert average_precision(scores, flipped) == pytest.approx(metrics.average_precision_score(flipped, scores))
