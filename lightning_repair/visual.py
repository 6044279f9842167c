"""Figures of a repair round: the top suspects, the score histogram, the detection curve, the accuracies, and a
Markdown page that shows them.

The figures are ``matplotlib.figure.Figure`` objects drawn on their own Agg canvas, never through pyplot: making
them neither switches the user's matplotlib backend nor registers windows that pyplot would keep alive.
matplotlib is imported only when a figure is made, so the rest of the package does not need it.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from lightning_repair.round import RoundRecord
from lightning_repair.selection import ranked

if TYPE_CHECKING:
    from matplotlib.figure import Figure

INSPECTED_MARK = 0.2  # the detection curve is annotated at 20 % of the data inspected
ACCURACY_PARTS = (("fq", "F_q"), ("fh", "F_h"), ("r", "R"))
ACCURACY_TICKS = ("F_q\nquery failures", "F_h\nheld-out failures", "R\nrest of validation")
SECONDS_KEYS = (("seconds_failures", "failures"), ("seconds_fisher", "Fisher"), ("seconds_scores", "scores"),
                ("seconds_treatment", "treatment"), ("seconds_total", "total"))
FLIPPED_COLOR, CLEAN_COLOR, REMOVED_COLOR = "tab:red", "tab:blue", "black"
_FIGURE_NAME = re.compile(r"[A-Za-z0-9_-]+")


# ---- suspects -------------------------------------------------------------------------------------------------

def suspect_grid(images: Tensor, given: Sequence[int], predicted: Sequence[int], scores: Sequence[float],
                 class_names: Sequence[str] | None = None, columns: int = 8) -> Figure:
    """A grid of the top suspects, each tile titled "given → predicted" and its score.

    Each tile is min-max normalised on its own, so that dark and bright images are both readable; one-channel
    images are shown in grayscale.

    Args:
        images: the K suspects, (K, C, H, W) with C = 1 or 3, in any value range (on any device).
        given: the K labels given in the training data.
        predicted: the K labels the model predicts.
        scores: the K scores (higher: more likely a cause).
        class_names: names of the classes, indexed by label; None shows the label numbers.
        columns: tiles per row (fewer when K is smaller).
    """
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"suspect_grid needs images of shape (K, C, H, W) with C = 1 or 3, got "
                         f"{tuple(images.shape)}. Add a channel dimension with `images.unsqueeze(1)` for (K, H, W).")
    count = len(images)
    if count == 0:
        raise ValueError("suspect_grid needs at least one suspect image.")
    if not len(given) == len(predicted) == len(scores) == count:
        raise ValueError(f"suspect_grid needs one given label, predicted label and score per image: got "
                         f"{count} images, {len(given)} given, {len(predicted)} predicted, {len(scores)} scores.")
    if columns < 1:
        raise ValueError(f"columns must be ≥ 1, got {columns}.")
    columns = min(columns, count)
    rows = math.ceil(count / columns)
    titles = [f"{_class_name(label, class_names)} → {_class_name(prediction, class_names)}\nscore {float(score):.3g}"
              for label, prediction, score in zip(given, predicted, scores)]
    # Wide enough that the longest title (≈ 0.07 in a character at 8 pt) does not run into its neighbour's.
    tile_width = max(1.6, 0.07 * max(len(title.split("\n")[0]) for title in titles) + 0.2)
    figure = _new_figure(tile_width * columns, tile_width * rows + 0.3 * rows)
    axes = figure.subplots(rows, columns, squeeze=False).flatten()
    tiles = _min_max_per_tile(images.detach().float().cpu())
    for ax, tile, title in zip(axes, tiles, titles):
        if tile.shape[0] == 1:
            ax.imshow(tile[0].numpy(), cmap="gray", vmin=0.0, vmax=1.0)
        else:
            ax.imshow(tile.permute(1, 2, 0).numpy())
        ax.set_title(title, fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
    for ax in axes[count:]:
        figure.delaxes(ax)
    return figure


def suspect_grid_tensor(images: Tensor, nrow: int = 8) -> Tensor:
    """The suspects as one (3, H, W) image in [0, 1], each tile scaled on its own, for loggers that take images.

    For TensorBoard: ``logger.experiment.add_image("repair/suspects", suspect_grid_tensor(images), step)``.

    Args:
        images: the K suspects, (K, C, H, W) with C = 1 or 3 (one channel is repeated to three).
        nrow: tiles per row.
    """
    from torchvision.utils import make_grid

    if images.ndim != 4 or images.shape[1] not in (1, 3) or len(images) == 0:
        raise ValueError(f"suspect_grid_tensor needs images of shape (K, C, H, W) with K ≥ 1 and C = 1 or 3, got "
                         f"{tuple(images.shape)}.")
    return make_grid(images.detach().float().cpu(), nrow=nrow, normalize=True, scale_each=True)


# ---- scores ---------------------------------------------------------------------------------------------------

def score_histogram(scores: Tensor, removed: Tensor, flipped: Tensor | None = None, bins: int = 50) -> Figure:
    """A histogram of the scores (log counts), split into flipped and clean examples when the flips are known,
    with the selection threshold — the lowest removed score — as a vertical line.

    Non-finite scores (NaN: removed in an earlier round) are left out.

    Args:
        scores: one score per training example, indexed by dataset index.
        removed: the examples removed in this round, as dataset indices or a boolean mask over ``scores``.
        flipped: the examples whose labels were flipped, as dataset indices or a boolean mask; None if unknown.
        bins: number of bins, shared by the flipped and clean histograms.
    """
    values = scores.detach().double().cpu()
    finite = torch.isfinite(values)
    removed_mask = _as_mask(removed, len(values), "removed")
    edges = np.histogram_bin_edges(values[finite].numpy(), bins=bins) if finite.any() else bins
    figure = _new_figure(6.4, 4.0)
    ax = figure.subplots()
    if flipped is None:
        ax.hist(values[finite].numpy(), bins=edges, log=True, histtype="stepfilled", color=CLEAN_COLOR, alpha=0.6,
                label=f"all (n={int(finite.sum())})")
    else:
        flipped_mask = _as_mask(flipped, len(values), "flipped")
        for mask, name, color in ((~flipped_mask, "clean", CLEAN_COLOR), (flipped_mask, "flipped", FLIPPED_COLOR)):
            part = values[finite & mask].numpy()
            ax.hist(part, bins=edges, log=True, histtype="stepfilled", color=color, alpha=0.5,
                    label=f"{name} (n={len(part)})")
    removed_scores = values[removed_mask & finite]
    if len(removed_scores):
        threshold = float(removed_scores.min())
        ax.axvline(threshold, color=REMOVED_COLOR, linestyle="--", linewidth=1.2,
                   label=f"threshold {threshold:.3g} ({len(removed_scores)} removed)")
    ax.set_xlabel("score (higher: more likely a cause)")
    ax.set_ylabel("training examples (log)")
    ax.set_title("Scores of the training examples")
    ax.legend(fontsize=8)
    return figure


def detection_points(scores: Tensor, flipped: Tensor) -> tuple[Tensor, Tensor]:
    """The detection curve: after inspecting the examples in descending score order, which share of the flips
    has been found.

    Examples with a NaN score (removed in an earlier round) are excluded from the ranking, from the fraction
    inspected and from the flips to find: the curve measures the ranking of what is still in the training set.
    Ties keep dataset order.

    Args:
        scores: one score per training example, indexed by dataset index.
        flipped: the examples whose labels were flipped, as dataset indices or a boolean mask over ``scores``.

    Returns:
        ``(fractions, found)``, both float64 of length n + 1 for n ranked examples and starting at (0, 0):
        ``fractions[i] = i / n`` inspected and ``found[i]`` the share of the ranked flips among the top i
        (all zeros when no ranked example is flipped).
    """
    values = scores.detach().double().cpu()
    flipped_mask = _as_mask(flipped, len(values), "flipped")
    order = ranked(values)
    hits = torch.cat([torch.zeros(1, dtype=torch.float64), flipped_mask[order].double().cumsum(0)])
    fractions = torch.arange(len(order) + 1, dtype=torch.float64) / max(len(order), 1)
    return fractions, hits / max(float(hits[-1]), 1.0)


def detection_curve(scores: Tensor, flipped: Tensor) -> Figure:
    """The share of label flips found against the share of the training data inspected, highest score first,
    beside the random baseline (the diagonal) and the ideal ranking (every flip first); annotated at 20 %
    inspected. NaN scores (removed in an earlier round) are excluded from the ranking: see
    :func:`detection_points`.

    Args:
        scores: one score per training example, indexed by dataset index.
        flipped: the examples whose labels were flipped, as dataset indices or a boolean mask over ``scores``.
    """
    fractions, found = detection_points(scores, flipped)
    scored = ~torch.isnan(scores.detach().cpu())
    flip_share = float(_as_mask(flipped, len(scores), "flipped")[scored].double().mean()) if scored.any() else 0.0
    ideal = (fractions / flip_share).clamp(max=1.0) if flip_share > 0 else torch.zeros_like(fractions)
    figure = _new_figure(5.0, 4.6)
    ax = figure.subplots()
    ax.plot(fractions.numpy(), found.numpy(), color=FLIPPED_COLOR, linewidth=2, label="scores")
    ax.plot([0.0, 1.0], [0.0, 1.0], color="gray", linestyle="--", linewidth=1, label="random")
    ax.plot(fractions.numpy(), ideal.numpy(), color="tab:green", linestyle=":", linewidth=1.5, label="ideal")
    at_mark = float(np.interp(INSPECTED_MARK, fractions.numpy(), found.numpy()))
    ax.scatter([INSPECTED_MARK], [at_mark], color=FLIPPED_COLOR, zorder=3)
    ax.annotate(f"{at_mark:.0%} of flips\nin top {INSPECTED_MARK:.0%}", (INSPECTED_MARK, at_mark),
                xytext=(12, -28), textcoords="offset points", fontsize=9,
                arrowprops={"arrowstyle": "-", "color": "gray"})
    ax.set_xlim(0.0, 1.0)
    ax.set_ylim(0.0, 1.02)
    ax.set_xlabel("fraction of training data inspected")
    ax.set_ylabel("fraction of label flips found")
    ax.set_title(f"Detection of label flips ({flip_share:.1%} flipped)")
    ax.legend(loc="lower right", fontsize=8)
    ax.grid(alpha=0.3)
    return figure


# ---- accuracies -----------------------------------------------------------------------------------------------

def accuracy_bars(record: RoundRecord) -> Figure:
    """Accuracy before and after the round's treatment on the query failures F_q, the held-out failures F_h and
    the rest of the validation data R, as grouped bars; an unknown accuracy (None or NaN) is marked "n/a".

    Args:
        record: the round record, with ``acc_{fq,fh,r}_{before,after}``.
    """
    figure = _new_figure(5.0, 3.6)
    ax = figure.subplots()
    positions = np.arange(len(ACCURACY_PARTS))
    width = 0.38
    for offset, when, color in ((-width / 2, "before", "tab:gray"), (width / 2, "after", "tab:blue")):
        values = [_number(record.get(f"acc_{part}_{when}")) for part, _ in ACCURACY_PARTS]
        heights = [0.0 if value is None else value for value in values]
        bars = ax.bar(positions + offset, heights, width, color=color, label=when)
        ax.bar_label(bars, labels=["n/a" if value is None else f"{value:.2f}" for value in values], fontsize=8,
                     padding=2)
    ax.set_xticks(positions, ACCURACY_TICKS)
    ax.set_ylim(0.0, 1.12)
    ax.set_ylabel("accuracy")
    ax.set_title(f"Accuracy before and after round {record.get('round', '?')}")
    ax.legend(loc="upper left", fontsize=8, ncols=2)
    return figure


# ---- report page ----------------------------------------------------------------------------------------------

def write_round_report(directory: Path, record: RoundRecord, figures: dict[str, Figure],
                       suspects_csv: Path | None = None) -> Path:
    """Saves the round's figures as PNG files and writes a Markdown page that shows them with the round's figures.

    Files: ``round_NNN_<name>.png`` for each figure and ``round_NNN_report.md``, NNN the round number. The figures
    are cleared once saved, to free their memory; do not reuse them.

    Args:
        directory: the folder to write to (created if needed).
        record: the round record (``round``, ``epoch``, failures, removed, accuracies, seconds; see
            :mod:`lightning_repair.report`).
        figures: the figures by name; a name is part of a file name, so letters, digits, ``_`` and ``-`` only.
        suspects_csv: the round's suspects CSV (as written by ``write_suspects``) to link; None for no link.

    Returns:
        The path of the Markdown page.
    """
    for name in figures:
        if not _FIGURE_NAME.fullmatch(name):
            raise ValueError(f"Figure name {name!r} is used in a file name: use letters, digits, '_' and '-' only.")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    stem = f"round_{int(record['round']):03d}"
    images = {}
    for name, figure in figures.items():
        images[name] = f"{stem}_{name}.png"
        figure.savefig(directory / images[name], dpi=110)
        figure.clear()
    lines = [f"# Repair round {record['round']} (epoch {record.get('epoch', '?')})", ""]
    if record.get("skipped"):
        lines += [f"Skipped: {record['skipped']}.", ""]
    lines += _markdown_table(["", "value"], [
        [title, _format(record.get(key), fmt)]
        for key, title, fmt in (("failures", "failures", "{:d}"), ("removed", "removed", "{:d}"),
                                ("removed_total", "removed in all rounds", "{:d}"),
                                ("precision", "precision (removed that were flipped)", "{:.2f}"))
        if key != "precision" or _number(record.get(key)) is not None])
    lines += _markdown_table(["accuracy", "before", "after"], [
        [name, _format(record.get(f"acc_{part}_before"), "{:.3f}"), _format(record.get(f"acc_{part}_after"), "{:.3f}")]
        for part, name in ACCURACY_PARTS])
    lines += _markdown_table(["phase", "seconds"], [
        [title, _format(record.get(key), "{:.1f}")] for key, title in SECONDS_KEYS if key in record])
    for name, file_name in images.items():
        lines += [f"## {name.replace('_', ' ')}", "", f"![{name}]({file_name})", ""]
    if suspects_csv is not None:
        link = Path(os.path.relpath(Path(suspects_csv).resolve(), directory.resolve())).as_posix()
        lines += [f"Suspects: [{Path(suspects_csv).name}]({link})", ""]
    path = directory / f"{stem}_report.md"
    path.write_text("\n".join(lines))
    return path


# ---- helpers --------------------------------------------------------------------------------------------------

def _new_figure(width: float, height: float) -> Figure:
    """A figure on its own Agg canvas, without pyplot and without touching the global backend."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as error:
        raise ImportError("lightning_repair.visual draws its figures with matplotlib: `pip install matplotlib`.") \
            from error
    figure = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _as_mask(selection: Tensor, size: int, name: str) -> Tensor:
    """A boolean mask over ``size`` examples from a boolean mask or dataset indices."""
    selection = torch.as_tensor(selection).detach().cpu()
    if selection.dtype == torch.bool:
        if selection.shape != (size,):
            raise ValueError(f"`{name}` as a boolean mask needs shape ({size},), one entry per score, got "
                             f"{tuple(selection.shape)}.")
        return selection
    indices = selection.long().flatten()
    if len(indices) and (indices.min() < 0 or indices.max() >= size):
        raise ValueError(f"`{name}` holds dataset indices outside [0, {size}); pass indices into the scores.")
    mask = torch.zeros(size, dtype=torch.bool)
    mask[indices] = True
    return mask


def _min_max_per_tile(images: Tensor) -> Tensor:
    low = images.amin(dim=(1, 2, 3), keepdim=True)
    span = images.amax(dim=(1, 2, 3), keepdim=True) - low
    return (images - low) / span.clamp(min=1e-12)


def _class_name(label: int, class_names: Sequence[str] | None, length: int = 12) -> str:
    label = int(label)
    if class_names is None or not 0 <= label < len(class_names):
        return str(label)
    name = str(class_names[label])
    return name if len(name) <= length else name[: length - 1] + "…"


def _number(value: Any) -> float | None:
    """``value`` as a float, or None for None and NaN."""
    if value is None:
        return None
    value = float(value)
    return None if math.isnan(value) else value


def _format(value: Any, fmt: str) -> str:
    number = _number(value)
    if number is None:
        return "–"
    return fmt.format(int(number)) if fmt == "{:d}" else fmt.format(number)


def _markdown_table(header: list[str], rows: list[list[str]]) -> list[str]:
    if not rows:
        return []
    return ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|",
            *("| " + " | ".join(row) + " |" for row in rows), ""]
