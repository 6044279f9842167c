"""What a repair round reports: its record, the suspects CSV and a table a person reads at a glance."""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import Tensor

RoundRecord = dict[str, Any]

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
    ("seconds_total", "seconds", "{:.1f}"),
)

METRIC_KEYS = (
    "failures", "removed", "removed_total", "precision", "acc_fq_before", "acc_fq_after", "acc_fh_before",
    "acc_fh_after", "acc_r_before", "acc_r_after", "gain", "gain_standard_error", "seconds_failures", "seconds_fisher", "seconds_scores",
    "seconds_treatment", "seconds_total",
)


def round_metrics(record: RoundRecord) -> dict[str, float]:
    """The round's figures as logger metrics, ``repair/<name>``; unknown figures (None) are left out."""
    return {f"repair/{key}": float(record[key]) for key in METRIC_KEYS if record.get(key) is not None}


def precision(removed: Tensor, flipped: Tensor) -> float | None:
    """Share of ``removed`` that are in ``flipped`` (the injected label flips); None if nothing was removed."""
    if len(removed) == 0:
        return None
    flipped_set = set(flipped.tolist())
    return sum(index in flipped_set for index in removed.tolist()) / len(removed)


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
    """"kept", "rolled back" or "skipped: <why>" for a round record."""
    if record.get("skipped"):
        return f"skipped: {record['skipped']}"
    return "kept" if record.get("accepted") else "rolled back"


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
