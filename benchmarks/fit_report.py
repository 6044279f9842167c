"""Tables and plots of the end-to-end benchmark (``benchmarks.fit``): ``fit.json``, ``fit.md``, ``fit_*.png``."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks import metrics
from benchmarks.report import _pyplot, _table, cell, points, stats, write_json

REFERENCE_RUNS = ("plain", "oracle")
LATE_EPOCHS = 3    # the late-epochs view: mean validation accuracy over the last 3 epochs
WOBBLE_EPOCHS = 5  # and its standard deviation over the last 5


def late_accuracy(record: dict[str, Any]) -> float:
    """Mean validation accuracy over the fit's last ``LATE_EPOCHS`` epochs."""
    return float(np.mean(record["validation_accuracy"][-LATE_EPOCHS:]))


def wobble(record: dict[str, Any]) -> float:
    """Standard deviation of the validation accuracy over the fit's last ``WOBBLE_EPOCHS`` epochs."""
    return float(np.std(record["validation_accuracy"][-WOBBLE_EPOCHS:]))


def group(records: Sequence[dict[str, Any]]) -> dict[tuple[str, str], dict[str, dict[int, dict[str, Any]]]]:
    """records → {(protocol, regime): {run: {seed: record}}}."""
    grouped: dict[tuple[str, str], dict[str, dict[int, dict[str, Any]]]] = defaultdict(lambda: defaultdict(dict))
    for record in records:
        setting = record["setting"]
        grouped[setting["protocol"], setting["regime"]][record["run"]][setting["seed"]] = record
    return grouped


def summarize_setting(runs: dict[str, dict[int, dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """Per run: test accuracy, its paired change from plain, gap closed, precision, recall, cost, memory."""
    plain, oracle = runs.get("plain", {}), runs.get("oracle", {})
    summary = {}
    for run, by_seed in runs.items():
        seeds = sorted(by_seed)
        base = {s: plain_of(by_seed[s], s, plain) for s in seeds}
        paired = [s for s in seeds if base[s] is not None]
        summary[run] = {
            "seeds": seeds,
            "test": stats(by_seed[s]["test"] for s in seeds),
            "change_from_plain": stats(by_seed[s]["test"] - base[s]["test"] for s in paired),
            "gap_closed": stats(metrics.gap_closed(by_seed[s]["test"], base[s]["test"], oracle[s]["test"])
                                for s in paired if s in oracle),
            "precision": stats(by_seed[s].get("precision") for s in seeds),
            "recall": stats(by_seed[s].get("recall") for s in seeds),
            "removed": stats(by_seed[s].get("removed") for s in seeds),
            "time_over_plain": stats(by_seed[s]["seconds"] / base[s]["seconds"] for s in paired),
            "peak_memory_mb": stats(by_seed[s]["peak_memory_mb"] for s in seeds),
            "better_than_plain": sum(by_seed[s]["test"] > base[s]["test"] for s in paired),
            "late_validation": stats(late_accuracy(by_seed[s]) for s in seeds),
            "late_change_from_plain": stats(late_accuracy(by_seed[s]) - late_accuracy(base[s]) for s in paired
                                            if base[s].get("validation_accuracy")),
            "late_wobble": stats(wobble(by_seed[s]) for s in seeds),
            "paired": len(paired),
        }
    return summary


def machine(record: dict[str, Any]) -> str | None:
    """The device a run computed on: the GPU's name, else the CPU's with the platform where the record has it (two
    machines with CPUs of one name, on different platforms, gave different fits from the first epoch on); None
    where the record does not say."""
    environment = record.get("environment") or {}
    if environment.get("cuda") or not environment.get("cpu"):
        return environment.get("cuda")
    return ", ".join(str(environment[key]) for key in ("cpu", "platform") if environment.get(key))


def plain_of(record: dict[str, Any], seed: int, plain: dict[int, dict[str, Any]]) -> dict[str, Any] | None:
    """The plain fit ``record`` pairs with: its own machine's (``paired_plain``, set by ``benchmarks.fit.collect``
    where the table's plain fit ran elsewhere), else the table's plain fit of its seed."""
    return record.get("paired_plain") or plain.get(seed)


def computed_alike(record: dict[str, Any], plain: dict[str, Any]) -> bool:
    """Whether a callback run and plain training agree exactly on every validation up to the run's first round,
    where the two fits are still the same fit: then they computed alike, whatever their machines' names say (a
    kernel's build tag changes the platform string, not the arithmetic). A run without rounds departs from plain
    training at epoch 0, so only its machine can tell."""
    rounds = record.get("rounds") or []
    if not rounds:
        return False
    shared = min(r["epoch"] for r in rounds) + 1
    mine, theirs = record["validation_accuracy"][:shared], plain["validation_accuracy"][:shared]
    return len(mine) == shared and mine == theirs


def cross_machine_pairs(runs: dict[str, dict[int, dict[str, Any]]]) -> dict[str, list[int]]:
    """Per run, the seeds whose plain training ran on another machine (where both records say which), unless the
    two fits show they computed alike (:func:`computed_alike`)."""
    plain = runs.get("plain", {})

    def across_machines(record: dict[str, Any], seed: int) -> bool:
        base = plain_of(record, seed, plain)
        return (base is not None and None not in (machine(record), machine(base))
                and machine(record) != machine(base) and not computed_alike(record, base))

    across = {run: [seed for seed, record in sorted(by_seed.items()) if across_machines(record, seed)]
              for run, by_seed in runs.items() if run != "plain"}
    return {run: seeds for run, seeds in across.items() if seeds}


def write_fit_results(records: Sequence[dict[str, Any]], out: Path) -> None:
    """``fit.json`` (every run and the summaries), ``fit.md`` and one validation-curve plot per setting."""
    from benchmarks.fit import CLEAN, LABELS, RUNS

    out.mkdir(parents=True, exist_ok=True)
    grouped = group(records)
    in_order = sorted(grouped.items(), key=lambda item: (item[0][0] == CLEAN, item[0]))  # clean labels last
    summaries = {f"{p}_{r}": summarize_setting(runs) for (p, r), runs in in_order}
    write_json(out / "fit.json", {"summaries": summaries, "runs": list(records)})
    sections = ["# End to end: a fit with RepairCallback against the same fit without it",
                "Made by `python -m benchmarks.fit` (see `benchmarks/fit.py` and `../shared/METHODS.md`, "
                "*End-to-end protocol*). Every run is `Trainer.fit` of the paper CNN from the same initial weights; "
                "test accuracy is read once, at the end. *Change* is paired: the run's test accuracy minus plain "
                "training's, same seed and machine: where the table's plain fit ran on another machine than the run, "
                "the run is paired with a plain fit of its own machine (`paired_plain` in `fit.json`) where one ran. "
                "Two machines count as one where a callback run and plain training agree exactly on every "
                "validation up to the run's first round (they computed the same fit), whatever their platform "
                "strings say. "
                "*Gap closed* = (run − plain) / (oracle − plain). Precision and recall are "
                "of everything the run removed (the callback: accepted rounds; cleanlab: its label issues; "
                "small-loss: what its last epoch dropped) against the recorded flips. *Time* is wall time ÷ the "
                "plain fit's, same seed: it compares like with like only when both ran under the same load (the "
                "same `--jobs`, side by side); each run's machine is in `fit.json`. *Peak MB*: the GPU's peak "
                "allocation on CUDA, the process's peak resident memory on the CPU. That CPU peak varies between "
                "runs of one fit by more than a repair round adds (the README gives a measured case); `speed.md` "
                "measures a round's memory under control. The runs that read the recorded flips are bounds, not "
                "methods a user could run: *oracle removal* trains on D without its flips from the start (the most "
                "a repair that removes data could buy), and *a perfect detector* is the callback given exactly the "
                "flips as causes each round, with its default schedule, treatment and acceptance rule unless the "
                "row says otherwise (what those make of a perfect cause set). *RepairCallback() defaults* are "
                "today's: `KNNShapley(utility='trusted', harm_margin=1)` and `Exclude()`. Every other callback row "
                "changes the defaults it was run under, which it keeps whatever today's are: "
                "`KNNShapley(utility='trusted')` (value < 0), `Finetune()` and `removal_margin=None`; a scorer or "
                "treatment the row names replaces theirs. The row marked *benchmark only* is a candidate scorer "
                "defined in `benchmarks/knn_k_probe.py`, not in the library."]
    for (protocol, regime), runs in in_order:
        summary = summaries[f"{protocol}_{regime}"]
        order = [run for run in RUNS if run in summary]
        rows = []
        for run in order:
            figures = summary[run]
            rows.append([LABELS[run], cell(figures["test"]), points(figures["change_from_plain"])
                         if run != "plain" else "—",
                         f"{figures['better_than_plain']} of {figures['paired']}"
                         if run != "plain" and figures["paired"] else "—",
                         cell(figures["gap_closed"], 2) if run not in REFERENCE_RUNS else "—",
                         cell(figures["precision"], 2), cell(figures["recall"], 2), cell(figures["removed"], 0),
                         cell(figures["time_over_plain"], 2), cell(figures["peak_memory_mb"], 0)])
        seeds = sorted({s for run in runs.values() for s in run})
        sections += [f"## `{protocol}`, `{regime}` (seeds {', '.join(map(str, seeds))})"]
        if protocol == CLEAN:
            sections.append("Clean labels: no flips, so plain training is the oracle's fit (run again beside the "
                            "callback's) and every example the callback removed was correctly labelled (precision 0).")
        sections += [_table(["run", "test accuracy", "change", "beats plain", "gap closed", "precision", "recall",
                             "removed", "time ÷ plain", "peak MB"], rows)]
        shared = {seed: record["shared_from"] for run in runs.values() for seed, record in run.items()
                  if "shared_from" in record}
        if shared:
            seeds_shared = ", ".join(map(str, sorted(shared)))
            sections.append("The oracle trains on the clean labels, so the protocol does not enter it: its "
                            f"{'seeds' if len(shared) > 1 else 'seed'} {seeds_shared} here "
                            f"{'are' if len(shared) > 1 else 'is'} the `{next(iter(shared.values()))}` "
                            f"run{'s' if len(shared) > 1 else ''} (one fit per regime and seed serves both "
                            "protocols; run twice on one machine, seed 1 gave identical fits).")
        across = cross_machine_pairs(runs)
        if across:
            sections.append("Paired across machines (the run and plain training of its seed ran on different "
                            "machines, which do not compute the same fit, so the change mixes repair with machine): "
                            + "; ".join(f"{LABELS[run]} seed{'s' if len(seeds) > 1 else ''} "
                                        f"{', '.join(map(str, seeds))}" for run, seeds in across.items()) + ".")
        sections.append(f"![validation accuracy per epoch](fit_{protocol}_{regime}.png)")
        sections.append(_late_section(summary, order))
        rounds = _rounds_section(runs)
        if rounds:
            sections.append(rounds)
        plot_curves(out / f"fit_{protocol}_{regime}.png", runs, f"{protocol}, {regime}")
    (out / "fit.md").write_text("\n\n".join(sections) + "\n")


def _late_section(summary: dict[str, dict[str, Any]], order: list[str]) -> str:
    """The late epochs on validation data: how much of a change in final test accuracy is the last epoch's luck."""
    from benchmarks.fit import LABELS

    rows = [[LABELS[run], cell(summary[run]["late_validation"]),
             points(summary[run]["late_change_from_plain"]) if run != "plain" else "—",
             cell(summary[run]["late_wobble"], 3)] for run in order]
    return (f"Late epochs, on validation data: its mean accuracy over the last {LATE_EPOCHS} epochs, the paired "
            f"change of that mean from plain training, and its standard deviation over the last {WOBBLE_EPOCHS} "
            "epochs (how much one epoch's accuracy moves; the final test accuracy above is one such draw). The "
            "callback's acceptance rule reads the validation failures, so for its runs this view is not a clean "
            "estimate; the test accuracy above is.\n\n"
            + _table(["run", f"validation, last {LATE_EPOCHS} epochs", "change", f"std, last {WOBBLE_EPOCHS} epochs"],
                     rows))


def _rounds_section(runs: dict[str, dict[int, dict[str, Any]]]) -> str:
    """What the callback's rounds did, per run and seed: kept, rolled back, removed, precision."""
    from benchmarks.fit import LABELS

    rows = []
    for run, by_seed in runs.items():
        for seed, record in sorted(by_seed.items()):
            rounds = record.get("rounds")
            if not rounds:
                continue
            kept = [r for r in rounds if r.get("accepted")]
            out = [r for r in rounds if r.get("removed")]  # also a rolled-back round's, under removal_margin
            rows.append([LABELS[run], str(seed), str(rounds[0]["epoch"]), str(len(rounds)), str(len(kept)),
                         ", ".join(str(r["epoch"]) for r in kept) or "—",
                         ", ".join(str(r["epoch"]) for r in out) or "—",
                         str(sum(r.get("removed") or 0 for r in rounds)),
                         f"{record['precision']:.2f}" if record.get("precision") is not None else "—"])
    if not rows:
        return ""
    return ("Rounds of the callback (epochs 0-based; the first round's epoch tells which default start a run "
            "had; a round's causes leave training when it is kept, and under `removal_margin` also when its "
            "weights roll back):\n\n"
            + _table(["run", "seed", "first round", "rounds", "kept", "kept after epochs", "causes out after epochs",
                      "removed", "precision"], rows))


def plot_curves(path: Path, runs: dict[str, dict[int, dict[str, Any]]], title: str) -> None:
    """Validation accuracy per epoch, mean over seeds, one line per run."""
    from benchmarks.fit import LABELS, RUNS

    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(8, 4.5))
    for run in [r for r in RUNS if r in runs]:
        curves = [record["validation_accuracy"] for record in runs[run].values() if record["validation_accuracy"]]
        if not curves:
            continue
        length = min(len(c) for c in curves)
        mean = np.mean([c[:length] for c in curves], axis=0)
        style = {"plain": dict(color="black", linewidth=2), "oracle": dict(color="grey", linestyle="--")}.get(run, {})
        axis.plot(np.arange(1, length + 1), mean, label=LABELS[run], **style)
    axis.set_xlabel("epoch")
    axis.set_ylabel("validation accuracy")
    axis.set_title(f"{title} (mean over seeds; measured before each repair round)")
    axis.legend(fontsize=7)
    axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
