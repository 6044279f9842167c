"""Tests of lightning_repair.visual: the round's figures and its Markdown report."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from lightning_repair.visual import (
    accuracy_bars,
    detection_curve,
    detection_points,
    score_histogram,
    suspect_grid,
    suspect_grid_tensor,
    write_round_report,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def round_record(**changes) -> dict:
    record = {"round": 3, "epoch": 7, "failures": 40, "removed": 12, "removed_total": 30, "precision": 0.75,
              "acc_fq_before": 0.0, "acc_fq_after": 0.5, "acc_fh_before": 0.0, "acc_fh_after": float("nan"),
              "acc_r_before": 0.9, "acc_r_after": 0.88, "seconds_failures": 0.1, "seconds_fisher": 1.0,
              "seconds_scores": 2.5, "seconds_treatment": 0.7, "seconds_total": 4.3}
    record.update(changes)
    return record


# ---- detection_points ------------------------------------------------------------------------------------------

def test_detection_points_perfect_ranking_finds_all_flips_at_their_share():
    scores = torch.tensor([0.1, 5.0, 0.2, 4.0, 0.3])  # flips 1 and 3 score highest
    fractions, found = detection_points(scores, torch.tensor([1, 3]))
    assert torch.allclose(fractions, torch.tensor([0.0, 0.2, 0.4, 0.6, 0.8, 1.0], dtype=torch.float64))
    assert torch.allclose(found, torch.tensor([0.0, 0.5, 1.0, 1.0, 1.0, 1.0], dtype=torch.float64))


def test_detection_points_reversed_ranking_finds_nothing_until_the_end():
    scores = torch.tensor([0.1, 5.0, 0.2, 4.0, 0.3])
    flipped = torch.tensor([True, False, True, False, False])  # the two lowest scores, as a mask
    _, found = detection_points(scores, flipped)
    assert torch.allclose(found, torch.tensor([0.0, 0.0, 0.0, 0.0, 0.5, 1.0], dtype=torch.float64))


def test_detection_points_leave_nan_scores_out_of_the_ranking():
    scores = torch.tensor([float("nan"), 3.0, float("nan"), 1.0, 2.0])
    fractions, found = detection_points(scores, torch.tensor([0, 4]))  # flip 0 was removed earlier
    assert torch.allclose(fractions, torch.tensor([0.0, 1 / 3, 2 / 3, 1.0], dtype=torch.float64))
    assert torch.allclose(found, torch.tensor([0.0, 0.0, 1.0, 1.0], dtype=torch.float64))


def test_detection_points_without_ranked_flips_are_zero():
    _, found = detection_points(torch.tensor([1.0, float("nan")]), torch.tensor([1]))
    assert torch.equal(found, torch.zeros(2, dtype=torch.float64))


def test_indices_outside_the_scores_are_refused():
    with pytest.raises(ValueError, match="outside"):
        detection_points(torch.zeros(3), torch.tensor([3]))


# ---- figures ---------------------------------------------------------------------------------------------------

def test_detection_curve_plots_scores_random_and_ideal():
    scores = torch.tensor([0.1, 5.0, 0.2, 4.0, float("nan")])
    figure = detection_curve(scores, torch.tensor([1, 3]))
    (ax,) = figure.axes
    curve, random, ideal = ax.lines
    fractions, found = detection_points(scores, torch.tensor([1, 3]))
    assert curve.get_xdata().tolist() == fractions.tolist() and curve.get_ydata().tolist() == found.tolist()
    assert list(random.get_ydata()) == [0.0, 1.0]
    assert ideal.get_ydata()[-1] == 1.0 and ideal.get_ydata()[1] == 0.5  # 2 of 4 ranked are flipped
    assert any("in top 20%" in text.get_text() for text in ax.texts)


def test_score_histogram_splits_flipped_and_marks_the_threshold():
    scores = torch.tensor([float("nan"), 1.0, 2.0, 3.0, 4.0, 5.0])
    figure = score_histogram(scores, removed=torch.tensor([5, 4]), flipped=torch.tensor([0, 4, 5]), bins=5)
    (ax,) = figure.axes
    assert len(ax.patches) == 2  # a filled step histogram each for clean and flipped
    (threshold,) = ax.lines
    assert list(threshold.get_xdata()) == [4.0, 4.0]
    labels = [text.get_text() for text in ax.get_legend().get_texts()]
    assert labels[:2] == ["clean (n=3)", "flipped (n=2)"]  # the NaN flip is left out


def test_score_histogram_without_flips_or_removals():
    figure = score_histogram(torch.arange(10.0), removed=torch.zeros(10, dtype=torch.bool))
    (ax,) = figure.axes
    assert len(ax.patches) == 1 and not ax.lines


def test_suspect_grid_titles_each_tile_and_drops_unused_axes():
    images = torch.randn(5, 1, 6, 6)
    images[2] = 3.0  # a constant tile must not divide by zero
    figure = suspect_grid(images, [0, 1, 2, 0, 1], [1, 2, 0, 2, 0], [9.0, 8.0, 7.0, 6.0, 5.0],
                          class_names=["cat", "dog", "bird"], columns=3)
    assert len(figure.axes) == 5
    assert figure.axes[0].get_title() == "cat → dog\nscore 9"
    for ax in figure.axes:
        (image,) = ax.images
        array = image.get_array()
        assert array.shape == (6, 6) and 0.0 <= array.min() and array.max() <= 1.0


def test_suspect_grid_shows_rgb_and_label_numbers():
    figure = suspect_grid(torch.rand(2, 3, 4, 4), [0, 1], [1, 0], [0.5, 0.25])
    assert [ax.images[0].get_array().shape for ax in figure.axes] == [(4, 4, 3)] * 2
    assert figure.axes[1].get_title() == "1 → 0\nscore 0.25"


def test_suspect_grid_refuses_mismatched_inputs():
    with pytest.raises(ValueError, match="C = 1 or 3"):
        suspect_grid(torch.rand(2, 4, 4), [0, 1], [1, 0], [0.5, 0.25])
    with pytest.raises(ValueError, match="one given label"):
        suspect_grid(torch.rand(2, 1, 4, 4), [0], [1, 0], [0.5, 0.25])


def test_suspect_grid_tensor_is_one_rgb_image_in_unit_range():
    grid = suspect_grid_tensor(torch.randn(5, 1, 6, 6) * 10, nrow=4)
    assert grid.shape == (3, 2 * 8 + 2, 4 * 8 + 2)  # make_grid pads each 6×6 tile by 2
    assert grid.min() >= 0.0 and grid.max() <= 1.0


def test_accuracy_bars_mark_unknown_accuracies():
    figure = accuracy_bars(round_record(acc_fh_after=None, acc_r_after=float("nan")))
    (ax,) = figure.axes
    assert len(ax.containers) == 2 and len(ax.patches) == 6
    labels = [text.get_text() for text in ax.texts]
    assert labels.count("n/a") == 2 and "0.50" in labels


# ---- report ----------------------------------------------------------------------------------------------------

def test_write_round_report_saves_pngs_and_links_them(tmp_path: Path):
    record = round_record()
    csv_path = tmp_path / "round_003_suspects.csv"
    csv_path.write_text("index\n")
    figures = {"accuracy": accuracy_bars(record),
               "detection": detection_curve(torch.tensor([3.0, 1.0, float("nan"), 2.0]), torch.tensor([0]))}
    path = write_round_report(tmp_path / "report", record, figures, suspects_csv=csv_path)
    assert path == tmp_path / "report" / "round_003_report.md"
    for name in ("accuracy", "detection"):
        assert (tmp_path / "report" / f"round_003_{name}.png").read_bytes()[:8] == PNG_SIGNATURE
    text = path.read_text()
    assert text.startswith("# Repair round 3 (epoch 7)")
    assert "](round_003_accuracy.png)" in text and "](round_003_detection.png)" in text
    assert "](../round_003_suspects.csv)" in text
    assert re.search(r"\| F_h \| 0\.000 \| – \|", text)  # NaN after is shown as unknown
    assert "| precision (removed that were flipped) | 0.75 |" in text and "| scores | 2.5 |" in text
    assert all(not figure.axes for figure in figures.values())  # cleared once saved


def test_write_round_report_without_precision_or_figures(tmp_path: Path):
    path = write_round_report(tmp_path, round_record(precision=None, round=1), {})
    text = path.read_text()
    assert path.name == "round_001_report.md" and "precision" not in text and ".png" not in text
    assert "Suspects" not in text


def test_write_round_report_refuses_unsafe_names(tmp_path: Path):
    with pytest.raises(ValueError, match="file name"):
        write_round_report(tmp_path, round_record(), {"../x": accuracy_bars(round_record())})
