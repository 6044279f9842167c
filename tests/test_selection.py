"""Tests of lightning_repair.selection: the ranking of scores and the cause set it selects from."""

from __future__ import annotations

import torch

from lightning_repair.selection import ranked, select_causes

NAN = float("nan")


def test_ranked_orders_highest_first_leaves_nan_out_and_keeps_ties_in_index_order() -> None:
    scores = torch.tensor([0.5, NAN, 2.0, 0.5, -1.0, NAN, 2.0])
    assert ranked(scores).tolist() == [2, 6, 0, 3, 4]
    assert ranked(torch.full((3,), NAN)).tolist() == []


def test_select_causes_picks_from_the_ranking() -> None:
    scores = torch.tensor([0.5, NAN, 2.0, 0.5, -1.0, NAN, 2.0])
    assert select_causes(scores, top_k=3).tolist() == [2, 6, 0]
    assert select_causes(scores, threshold=0.0).tolist() == [2, 6, 0, 3]
    assert select_causes(scores, top_fraction=0.3).tolist() == [2, 6]  # round(0.3 × 7) of all examples
