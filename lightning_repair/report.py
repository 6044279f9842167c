"""What a repair round reports: its record, the suspects CSV and a table a person reads at a glance."""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from lightning_repair.adapter import BatchAdapter
from lightning_repair.examples import Examples
from lightning_repair.round import RoundOutcome, RoundRecord

TABLE_COLUMNS = (
    ("round", "round", "{:d}"),
    ("epoch", "epoch", "{:d}"),
    ("failures", "failures", "{:d}"),
    ("causes", "causes", "{:d}"),
    ("outcome", "outcome", "{}"),
    ("removed", "removed", "{:d}"),
    ("removed_total", "total removed", "{:d}"),
    ("precision", "precision", "{:.2f}"),
    ("acc_fh_after", "F_h acc", "{:.3f}"),
    ("acc_r_after", "R acc", "{:.3f}"),
    ("gain", "acc_V gain", "{:+.3f}"),
    ("control_gain", "vs control", "{:+.3f}"),
    ("seconds_total", "seconds", "{:.1f}"),
)

METRIC_KEYS = (
    "failures", "causes", "threshold", "removed", "removed_total", "precision", "acc_fq_before", "acc_fq_after",
    "acc_fh_before", "acc_fh_after", "acc_r_before", "acc_r_after", "gain", "gain_standard_error", "control_gain",
    "control_gain_standard_error", "seconds_failures", "seconds_fisher", "seconds_scores", "seconds_treatment",
    "seconds_total",
)


def round_metrics(record: RoundRecord) -> dict[str, float]:
    """The round's figures as logger metrics, ``repair/<name>``; unknown figures (None) are left out."""
    return {f"repair/{key}": float(record[key]) for key in METRIC_KEYS if record.get(key) is not None}


def write_suspects(path: Path, order: Tensor, scores: Tensor, given: Tensor, predicted: Tensor,
                   removed: Tensor) -> None:
    """Writes the suspects CSV: dataset index, given label, predicted label, score, removed (highest first).

    Args:
        path: the CSV file to write (its folder is created).
        order: dataset indices of the suspects, highest score first.
        scores, given, predicted: per suspect, aligned with ``order``.
        removed: dataset indices removed in this round.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    removed_set = set(removed.tolist())
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(["index", "given_label", "predicted_label", "score", "removed"])
        for index, label, prediction, score in zip(order.tolist(), given.tolist(), predicted.tolist(),
                                                   scores.tolist()):
            writer.writerow([index, label, prediction, f"{score:.6g}", int(index in removed_set)])


def outcome(record: RoundRecord) -> str:
    """"kept", "rolled back", "rolled back, causes removed" (``removal_margin``) or "skipped: <why>" for a round
    record."""
    if record.get("skipped"):
        return f"skipped: {record['skipped']}"
    if record.get("accepted"):
        return "kept"
    return "rolled back, causes removed" if record.get("removed") else "rolled back"


def format_table(rounds: Sequence[RoundRecord]) -> str:
    """The rounds as a fixed-width text table (one line a round)."""
    header = [title for _, title, _ in TABLE_COLUMNS]
    rows = [[_cell(outcome(record) if key == "outcome" else record.get(key), fmt) for key, _, fmt in TABLE_COLUMNS]
            for record in rounds]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(cell.rjust(width) for cell, width in zip(row, widths)) for row in [header, *rows]]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)


def _cell(value: Any, fmt: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return fmt.format(value)


def write_round_files(directory: Path, outcome: RoundOutcome, train: Examples, adapter: BatchAdapter, *,
                      figures: bool = False, images: int = 32, flipped: Tensor | None = None,
                      class_names: Sequence[str] | None = None) -> Tensor | None:
    """Writes a round's suspects CSV, and with ``figures`` its PNG figures and Markdown page, into ``directory``.

    Returns the suspects' image grid as a (3, H, W) tensor for loggers that take images, or None when no figures
    were asked for or the inputs are not images.
    """
    record, scores, suspects = outcome.record, outcome.scores, outcome.suspects
    if suspects is None or scores is None:
        return None
    csv_path = directory / f"round_{record.round:03d}_suspects.csv"
    write_suspects(csv_path, suspects.order, scores[suspects.order], suspects.given, suspects.predicted,
                   outcome.removed)
    if not figures:
        return None
    from lightning_repair import visual

    drawn = {"scores": visual.score_histogram(scores, outcome.removed, flipped), "accuracy": visual.accuracy_bars(record)}
    if flipped is not None:
        drawn["detection"] = visual.detection_curve(scores, flipped)
    shown = suspects.order[:images]
    inputs = _images(train.subset(shown), adapter)
    if inputs is not None:
        drawn["suspects"] = visual.suspect_grid(inputs, suspects.given[: len(shown)].tolist(),
                                                suspects.predicted[: len(shown)].tolist(), scores[shown].tolist(),
                                                class_names)
    visual.write_round_report(directory, record, drawn, csv_path)
    return visual.suspect_grid_tensor(inputs) if inputs is not None else None


def _images(examples: Examples, adapter: BatchAdapter) -> Tensor | None:
    """The examples' inputs as a (K, C, H, W) image batch, or None when they are not images."""
    inputs = torch.cat([adapter.inputs(batch) for batch in examples.loader()])
    if not isinstance(inputs, Tensor) or not inputs.is_floating_point() or inputs.dim() not in (3, 4):
        return None
    return inputs.unsqueeze(1) if inputs.dim() == 3 else inputs
