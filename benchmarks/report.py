"""Turns the runner's records into ``<protocol>.json``, a README of tables and PNG plots beside it.

``python -m benchmarks.report [folder]`` summarises the runs of the JSON files already there again (so that the
summary follows the current code) and redraws the README and plots.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np


PROTOCOLS = ("pairs", "symmetric")
METHOD_LABELS = {
    "ewc_influence": "EWC influence",
    "linear_influence": "linear influence",
    "gradient_dot": "gradient dot (TracIn)",
    "knn_shapley": "KNN-Shapley",
    "knn_shapley_trusted": "KNN-Shapley, utility F_q ∪ R_q",
    "knn_shapley_v_minus_fh": "KNN-Shapley, utility V \\ F_h (not used to repair)",
    "training_loss": "training loss",
    "random": "random",
    "cleanlab": "cleanlab",
    "true_flips": "true flips",
}
TREATMENT_LABELS = {
    "finetune": "fine-tune on D \\ C",
    "ewc_deletion": "EWC deletion",
    "newton": "Newton removal",
    "ewc_deletion_ascent": "EWC deletion, paper's ascent",
    "newton_influence": "Newton removal, paper's step",
    "newton_diagonal": "Newton removal, paper's step, diagonal Fisher",
    "energy_alignment": "energy alignment",
    "retrain": "retrain on D \\ C",
}
IDENTIFICATION_FIGURES = ("auroc", "average_precision", "found_at_20", "causes", "precision", "recall", "seconds",
                          "epochs_of_time")
REPAIR_FIGURES = ("causes", "f_q", "f_h", "r", "untouched", "test", "test_change", "gap_closed", "parameter_change",
                  "accepted", "gain", "seconds", "epochs_of_time")
REFERENCE_FIGURES = ("f_q", "f_h", "r", "untouched", "test")
TRAINING_FIGURES = ("noisy_train_accuracy", "flips_memorised", "clean_examples_fit")
RUN_FIGURES = ("n_flipped", "epoch_seconds", "fisher_seconds", "peak_memory_mb")
FAILURE_FIGURES = ("query", "holdout", "guard", "remaining", "dropped")


# ---- summary over seeds ---------------------------------------------------------------------------------------

def stats(values: Iterable[float | None]) -> dict[str, float | int]:
    """Mean and sample standard deviation of the finite values (std NaN for fewer than two)."""
    finite = [float(v) for v in values if v is not None and math.isfinite(v)]
    if not finite:
        return {"mean": math.nan, "std": math.nan, "n": 0}
    return {"mean": float(np.mean(finite)), "std": float(np.std(finite, ddof=1)) if len(finite) > 1 else math.nan,
            "n": len(finite)}


def with_derived(run: dict[str, Any], row: dict[str, Any]) -> dict[str, Any]:
    """A repair row of ``run`` with the figures derived from it: the validation accuracy estimated from F_h and R
    (``untouched``, as the acceptance rule weighs them) and the change in test accuracy from the noisy model."""
    return row | {"untouched": row["validation_estimate"],
                  "test_change": row["test"] - run["repair"]["references"]["noisy"]["test"]}


def regime_order(runs: Sequence[dict[str, Any]]) -> list[str]:
    """The regimes of ``runs``, smallest training set first."""
    sizes = {run["regime"]: run["n_train"] for run in runs}
    return sorted(sizes, key=sizes.get)


def summarize(runs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Mean ± std over seeds of every figure, per regime; the curves averaged point by point."""
    summary: dict[str, Any] = {}
    for regime in regime_order(runs):
        group = [run for run in runs if run["regime"] == regime]
        first = group[0]
        identification = {
            method: {figure: stats(run["identification"][method][figure] for run in group)
                     for figure in IDENTIFICATION_FIGURES}
            for method in first["identification"]}
        curves = {method: np.array([run["identification"][method]["curve"] for run in group])
                  for method in first["identification"]}
        summary[regime] = {
            "seeds": [run["seed"] for run in group],
            "n_train": first["n_train"],
            "epochs": first["epochs"],
            "run": {figure: stats(run[figure] for run in group) for figure in RUN_FIGURES},
            "training": {figure: stats(run["training"][figure] for run in group) for figure in TRAINING_FIGURES},
            "failures": {figure: stats(run["failures"][figure] for run in group) for figure in FAILURE_FIGURES},
            "identification": identification,
            "curves": {method: {"mean": c.mean(axis=0).tolist(), "std": c.std(axis=0).tolist()}
                       for method, c in curves.items()},
            "references": {name: {figure: stats(with_derived(run, run["repair"]["references"][name])[figure]
                                                for run in group)
                                  for figure in REFERENCE_FIGURES}
                           for name in first["repair"]["references"]},
            "repair": {cause: {treatment: {figure: stats(with_derived(run, run["repair"]["runs"][cause][treatment])
                                                         [figure] for run in group)
                                           for figure in REPAIR_FIGURES}
                               for treatment in treatments}
                       for cause, treatments in first["repair"]["runs"].items()},
            "acceptance": acceptance_summary(group),
        }
    return summary


def acceptance_summary(runs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """How the acceptance rule (judged on F_h and R, as the callback's rollback) did against the test set.

    ``agreement``: share of repairs whose verdict agrees with the sign of their test-accuracy change (accepted and
    test up, or rejected and test not up); ``worst_accepted``: the lowest test change of an accepted repair.
    ``picks``: per treatment and seed, the cause set (never the true flips) that the rule accepts with the
    largest gain beyond noise, and the test change of the model kept (0 when it accepts none: θ̂ is kept).
    """
    rows = [with_derived(run, row) for run in runs for cause, treatments in run["repair"]["runs"].items()
            for treatment, row in treatments.items() if treatment != "retrain"]
    accepted = [row for row in rows if row["accepted"]]
    treatments = list(dict.fromkeys(t for run in runs for ts in run["repair"]["runs"].values() for t in ts
                                    if t != "retrain"))
    picks: dict[str, Any] = {}
    for treatment in treatments:
        chosen, changes = [], []
        for run in runs:
            candidates = {cause: row for cause, ts in run["repair"]["runs"].items() if cause != "true_flips"
                          and treatment in ts and (row := ts[treatment])["accepted"]}
            best = max(candidates, default=None,
                       key=lambda c: candidates[c]["gain"] - 2 * candidates[c]["gain_standard_error"])
            chosen.append(best)
            changes.append(with_derived(run, candidates[best])["test_change"] if best else 0.0)
        picks[treatment] = {"causes": chosen, "test_change": stats(changes)}
    return {
        "repairs": len(rows), "accepted": len(accepted),
        "agreement": (sum(row["accepted"] == (row["test_change"] > 0) for row in rows) / len(rows)
                      if rows else math.nan),
        "worst_accepted": min((row["test_change"] for row in accepted), default=math.nan),
        "accepted_test_down": sum(row["test_change"] < 0 for row in accepted),
        "picks": picks,
    }


# ---- files ----------------------------------------------------------------------------------------------------

def write_results(out: Path, protocol: str, settings: dict[str, Any], environment: dict[str, Any],
                  runs: Sequence[dict[str, Any]], wall_seconds: float) -> None:
    """Writes ``out/<protocol>.json`` and redraws ``out/README.md`` and the plots.

    Runs of earlier calls already in the JSON are kept when they were made with the same options (and epochs,
    for a regime this call also runs) and are not redone by this call, so the regimes can be run one at a time.
    """
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{protocol}.json"
    options = settings["options"]
    done = {(run["regime"], run["seed"]) for run in runs}
    earlier = json.loads(path.read_text())["runs"] if path.is_file() else []
    epochs = {run["regime"]: run["epochs"] for run in runs}
    kept = [run for run in earlier if (run["regime"], run["seed"]) not in done and run.get("options") == options
            and epochs.get(run["regime"], run["epochs"]) == run["epochs"]]
    merged = sorted([*kept, *runs], key=lambda run: (run["n_train"], run["seed"]))
    payload = {"protocol": protocol, "settings": settings, "environment": environment,
               "wall_seconds_of_last_call": wall_seconds, "summary": summarize(merged), "runs": merged}
    write_json(path, payload)
    write_report(out)


def write_json(path: Path, payload: dict[str, Any]) -> None:
    """Writes ``payload`` as standard JSON (NaN as null), replacing ``path`` only once it is complete."""
    partial = path.with_suffix(".partial")
    partial.write_text(json.dumps(_without_nan(payload), indent=1, allow_nan=False))
    partial.replace(path)


def failure(error: BaseException, width: int) -> str:
    """What stopped a measured path, for a table cell: the error's type and the first ``width`` characters of its
    first line."""
    first = str(error).splitlines()[0] if str(error) else ""
    return f"{type(error).__name__}: {first[:width]}"


def _without_nan(value: Any) -> Any:
    """``value`` with every NaN or infinity replaced by None, so that the file is standard JSON."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: _without_nan(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_without_nan(item) for item in value]
    return value


def write_report(out: Path) -> None:
    """Redraws ``out/README.md`` and every plot from the ``<protocol>.json`` files in ``out``."""
    results = [json.loads((out / f"{protocol}.json").read_text()) for protocol in PROTOCOLS
               if (out / f"{protocol}.json").is_file()]
    sections = [_header(out, results)]
    for result in results:
        for regime, summary in result["summary"].items():
            stem = f"{result['protocol']}_{regime}"
            plot_detection(out / f"{stem}_detection.png", summary, f"{result['protocol']}, {regime}")
            plot_repair(out / f"{stem}_repair.png", summary, f"{result['protocol']}, {regime}")
            first = next(run for run in result["runs"] if run["regime"] == regime)
            plot_histograms(out / f"{stem}_scores.png", first, f"{result['protocol']}, {regime}, seed {first['seed']}")
        sections.append(_protocol_section(result))
    if results:
        sections.insert(1, _glance_section(results))
    (out / "README.md").write_text("\n\n".join(sections) + "\n")


# ---- tables ---------------------------------------------------------------------------------------------------

def cell(figure: dict[str, float | int], digits: int = 3, percent: bool = False) -> str:
    """``mean ± std`` (just the mean for one seed), or — when nothing was measured."""
    if figure["n"] == 0:
        return "—"
    scale, suffix = (100.0, " %") if percent else (1.0, "")
    mean = f"{figure['mean'] * scale:.{digits}f}"
    if figure["n"] > 1:
        mean += f" ± {figure['std'] * scale:.{digits}f}"
    return mean + suffix


def points(figure: dict[str, float | int]) -> str:
    """A change in accuracy as signed percentage points, ``+1.2 ± 0.3 pp``."""
    if figure["n"] == 0:
        return "—"
    text = f"{figure['mean'] * 100:+.1f}"
    return text + (f" ± {figure['std'] * 100:.1f}" if figure["n"] > 1 else "") + " pp"


def _table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _header(out: Path, results: Sequence[dict[str, Any]]) -> str:
    quick = any(r["settings"].get("quick") for r in results)
    lines = [
        "# Benchmark results" + (" (quick mode)" if quick else ""),
        "",
        "Written by `python -m benchmarks.repair`; `benchmarks/README.md` describes the protocol, the cause-set "
        "rules and how hyperparameters are chosen. Every number is the mean ± sample standard deviation over "
        "the seeds listed (one seed: the value alone). Rows are in a fixed order, not sorted by rank: the "
        "methods of the paper appear where they lose, too.",
    ]
    if quick:
        lines += ["", "**Quick mode**: seed 0 of the 3k regime only, cleanlab with 3 folds. It checks that the "
                      "benchmark runs end to end; the full-mode results in `benchmarks/results/` are the ones to "
                      "quote."]
    for result in results:
        env = result["environment"]
        packages = ", ".join(f"{k} {v}" for k, v in env["packages"].items() if v)
        lines += ["", f"- `{result['protocol']}.json`: {env['cpu']}, {env['cpus_available']} CPUs available, "
                      f"{env['torch_threads']} torch thread(s); Python {env['python']}; {packages}; git "
                      f"{(env['git_commit'] or 'unknown')[:10]}"
                      f"{' with uncommitted changes' if env['git_uncommitted_changes'] else ''}; {env['date']}; "
                      f"the last call took {result['wall_seconds_of_last_call'] / 60:.1f} min."]
    return "\n".join(lines)


def _glance_section(results: Sequence[dict[str, Any]]) -> str:
    """One table per question across every setting: which method finds the flips, what each treatment buys."""
    settings = [(result["protocol"], regime, summary) for result in results
                for regime, summary in result["summary"].items()]
    header = ["", *(f"`{protocol}`, {regime}" for protocol, regime, _ in settings)]
    methods = list(dict.fromkeys(m for _, _, s in settings for m in s["identification"]))
    best_ap = [max(s["identification"], key=lambda m: s["identification"][m]["average_precision"]["mean"])
               for _, _, s in settings]

    def finding(method: str, column: int) -> str:
        f = settings[column][2]["identification"].get(method)
        if f is None:
            return "—"
        text = f"{cell(f['average_precision'], 2)} ({f['found_at_20']['mean']:.2f})"
        return f"**{text}**" if method == best_ap[column] else text

    identification = _table(header, ([METHOD_LABELS.get(m, m), *(finding(m, i) for i in range(len(settings)))]
                                     for m in methods))
    treatments = list(dict.fromkeys(t for _, _, s in settings for t in s["acceptance"]["picks"]))

    def repairing(treatment: str, column: int) -> str:
        pick = settings[column][2]["acceptance"]["picks"].get(treatment)
        if pick is None:
            return "—"
        names = sorted({METHOD_LABELS.get(c, c) if c else "θ̂ kept" for c in pick["causes"]})
        return f"{points(pick['test_change'])} ({'; '.join(names)})"

    rows = [[TREATMENT_LABELS.get(t, t), *(repairing(t, i) for i in range(len(settings)))] for t in treatments]
    rows.append(["*semi-oracle*: fine-tune without the true flips",
                 *(f"{points(s['repair']['true_flips']['finetune']['test_change'])}, gap "
                   f"{s['repair']['true_flips']['finetune']['gap_closed']['mean']:.2f}" if "true_flips" in s["repair"]
                   else "—" for _, _, s in settings)])
    rows.append(["*noisy → oracle* test accuracy",
                 *(f"{s['references']['noisy']['test']['mean']:.3f} → {s['references']['oracle']['test']['mean']:.3f}"
                   for _, _, s in settings)])

    def flips_row(treatment: str) -> list[str]:
        cells = []
        for _, _, s in settings:
            f = s["repair"].get("true_flips", {}).get(treatment)
            cells.append("—" if f is None else
                         f"{points(f['test_change'])} (accepted {f['accepted']['mean'] * f['accepted']['n']:.0f}"
                         f" of {f['accepted']['n']})")
        return [TREATMENT_LABELS.get(treatment, treatment), *cells]

    flip_treatments = list(dict.fromkeys(t for _, _, s in settings for t in s["repair"].get("true_flips", {})))
    rule_rows = [[f"`{protocol}`, {regime}", str(a["repairs"]), str(a["accepted"]),
                  f"{a['agreement']:.2f}" if a["agreement"] is not None and math.isfinite(a["agreement"]) else "—",
                  str(a["accepted_test_down"]),
                  (f"{a['worst_accepted'] * 100:+.1f} pp"
                   if a["worst_accepted"] is not None and math.isfinite(a["worst_accepted"]) else "—")]
                 for protocol, regime, s in settings for a in [s["acceptance"]]]
    return (
        "## At a glance\n\n"
        "**Finding the flips**: average precision (mean ± std over seeds) and, in brackets, the share of flips "
        "found after inspecting 20 % of D. Bold: the best average precision of the setting.\n\n"
        + identification
        + "\n\n**Repairing as the callback would**: per seed, the cause set whose repair the acceptance rule "
          "accepts on F_h and R with the largest gain beyond noise (never the true flips, never the test set); "
          "when it accepts none, the noisy model is kept (+0.0). The change in test accuracy from the noisy model, "
          "in percentage points, mean ± std over seeds, and the cause sets picked.\n\n"
        + _table(header, rows)
        + "\n\n**Unlearning the true flips** (C = the flipped examples, the label oracle's cause set): change in "
          "test accuracy of the treated model, and how many seeds' repairs the rule accepted on F_h and R.\n\n"
        + _table(header, [flips_row(t) for t in flip_treatments])
        + "\n\n**The acceptance rule against the test set**, over every cause set × treatment (retraining "
          "excluded): how many repairs it accepted, how often its verdict agrees with the sign of the test-"
          "accuracy change (accepted and test up, or rejected and test not up), how many accepted repairs lowered "
          "test accuracy, and the worst of them.\n\n"
        + _table(["setting", "repairs judged", "accepted", "verdict agrees with test sign",
                  "accepted, test down", "worst accepted test change"], rule_rows))


def _protocol_section(result: dict[str, Any]) -> str:
    protocol, summaries = result["protocol"], result["summary"]
    parts = [f"## Label noise `{protocol}`"]
    rows = []
    for regime, s in summaries.items():
        failures = s["failures"]
        rows.append([
            regime, f"{s['n_train']:,}", str(s["epochs"]), ", ".join(map(str, s["seeds"])),
            cell({k: v / s["n_train"] if isinstance(v, float) else v for k, v in s["run"]["n_flipped"].items()},
                 1, percent=True),
            cell(s["training"]["noisy_train_accuracy"], 1, True), cell(s["training"]["flips_memorised"], 1, True),
            cell(s["training"]["clean_examples_fit"], 1, True),
            cell(s["references"]["noisy"]["test"], 3), cell(s["references"]["oracle"]["test"], 3),
            f"{cell(failures['query'], 0)} / {cell(failures['holdout'], 0)} / {cell(failures['remaining'], 0)}",
            cell(s["run"]["epoch_seconds"], 1), cell(s["run"]["peak_memory_mb"], 0),
        ])
    parts.append("### Regimes\n\n" + _table(
        ["regime", "N", "epochs", "seeds", "labels flipped", "train acc. (noisy labels)", "flips memorised",
         "clean examples fit", "test acc. noisy", "test acc. oracle", r"\|F_q\| / \|F_h\| / \|R\|", "1 epoch (s)",
         "peak memory (MiB)"], rows)
        + "\n\n*flips memorised*: share of the flipped training examples the noisy model predicts with their "
          "flipped label. The test accuracy of the noisy and oracle references anchors *gap closed* below.")
    for regime, s in summaries.items():
        stem = f"{protocol}_{regime}"
        rows = [[METHOD_LABELS.get(method, method),
                 *(cell(f[name]) for name in ("auroc", "average_precision", "found_at_20")),
                 cell(f["causes"], 0), cell(f["precision"]), cell(f["recall"]), cell(f["seconds"], 1),
                 cell(f["epochs_of_time"], 2)]
                for method, f in s["identification"].items()]
        flip_rate = s["run"]["n_flipped"]["mean"] / s["n_train"]
        parts.append(
            f"### Identification — `{protocol}`, {regime}\n\n" + _table(
                ["method", "AUROC", "AP", "flips found at 20 % inspected", r"\|C\|", "precision of C", "recall of C",
                 "seconds", "÷ one epoch"], rows)
            + f"\n\nChance: AUROC 0.5, AP {flip_rate:.3f} (the share flipped), found at 20 % 0.200. Seconds "
              "include the Fisher for the methods that use it, and cleanlab's cross-validated training.\n\n"
              f"![flips found vs data inspected]({stem}_detection.png)\n\n"
              f"![score histograms, flipped vs clean]({stem}_scores.png)")
        references = s["references"]
        rows = [[f"*{name} model*", "—", "—", *(cell(references[name][k]) for k in REFERENCE_FIGURES),
                 "0.000" if name == "noisy" else "1.000", "—", "—", "—"]
                for name in ("noisy", "oracle")]
        for cause, treatments in s["repair"].items():
            for treatment, f in treatments.items():
                label = METHOD_LABELS.get(cause, cause)
                if (cause, treatment) == ("true_flips", "finetune"):
                    label += " (*semi-oracle*)"
                rows.append([label, TREATMENT_LABELS.get(treatment, treatment), cell(f["causes"], 0),
                             *(cell(f[k]) for k in ("f_q", "f_h", "r", "untouched", "test", "gap_closed",
                                                    "parameter_change")),
                             cell(f["accepted"], 2), cell(f["seconds"], 1), cell(f["epochs_of_time"], 2)])
        parts.append(
            f"### Repair — `{protocol}`, {regime}\n\n" + _table(
                ["causes C", "treatment", r"\|C\|", "acc. F_q", "acc. F_h", "acc. R", "acc. V (from F_h, R)",
                 "acc. test", "gap closed",
                 "‖θ⁻ − θ̂‖ / ‖θ̂‖", "accepted (share of seeds)", "seconds", "÷ one epoch"], rows)
            + "\n\nThe noisy model has accuracy 0 on F and 1 on R by definition. *acc. V (from F_h, R)*: the "
              "validation accuracy estimated from the parts no repair reads (F_h for all failures, R for all "
              "correct examples). *accepted*: the share of seeds whose repair the acceptance rule accepted on F_h "
              "and R, as the callback's rollback would. *gap closed* = (test − noisy "
              "test) / (oracle test − noisy test). *random* removes as many random examples as the score "
              "methods do. ‖θ⁻ − θ̂‖ / ‖θ̂‖ = 0 means the treatment kept the noisy weights (the acceptance "
              "rule on F_q ∪ R_q accepted none of its candidates).\n\n"
              f"![failure vs remaining accuracy per treatment]({stem}_repair.png)")
    return "\n\n".join(parts)


# ---- plots ----------------------------------------------------------------------------------------------------

def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _spread(figure: dict[str, Any]) -> float:
    """The std of a summarised figure for an error bar; 0 for one seed (NaN in memory, null in JSON)."""
    std = figure["std"]
    return std if std is not None and math.isfinite(std) else 0.0


def plot_detection(path: Path, summary: dict[str, Any], title: str) -> None:
    """Share of flips found against share of D inspected, one line per method (the paper's Fig. 2c)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for method, curve in summary["curves"].items():
        mean, std = np.array(curve["mean"]), np.array(curve["std"])
        x = np.linspace(0, 1, len(mean))
        line, = ax.plot(x, mean, label=METHOD_LABELS.get(method, method))
        if len(summary["seeds"]) > 1:
            ax.fill_between(x, mean - std, mean + std, color=line.get_color(), alpha=0.15)
    flip_rate = summary["run"]["n_flipped"]["mean"] / summary["n_train"]
    x = np.linspace(0, 1, 101)
    ax.plot(x, np.minimum(1, x / flip_rate), "k:", lw=1, label="perfect")
    ax.axvline(0.2, color="grey", lw=0.8, ls="--")
    ax.set(xlabel="fraction of training data inspected", ylabel="fraction of flipped labels found",
           xlim=(0, 1), ylim=(0, 1.01), title=f"Flips found ({title})")
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_repair(path: Path, summary: dict[str, Any], title: str) -> None:
    """Held-out failure accuracy against remaining accuracy, one panel per treatment (the paper's Fig. 5)."""
    plt = _pyplot()
    treatments = list(dict.fromkeys(t for runs in summary["repair"].values() for t in runs))
    fig, axes = plt.subplots(1, len(treatments), figsize=(3.2 * len(treatments), 3.6), sharex=True, sharey=True,
                             squeeze=False)
    markers = "osD^v<>PX*"
    oracle = summary["references"]["oracle"]
    for ax, treatment in zip(axes[0], treatments):
        ax.scatter([1.0], [0.0], c="black", marker="x", label="noisy model")
        ax.scatter([oracle["r"]["mean"]], [oracle["f_h"]["mean"]], c="black", marker="*", s=90, label="oracle model")
        for i, (cause, runs) in enumerate(summary["repair"].items()):
            if treatment in runs:
                f = runs[treatment]
                ax.errorbar(f["r"]["mean"], f["f_h"]["mean"], xerr=_spread(f["r"]), yerr=_spread(f["f_h"]),
                            fmt=markers[i % len(markers)], ms=6, color=f"C{i % 10}",  # one colour a cause set
                            label=METHOD_LABELS.get(cause, cause))
        ax.set(title=TREATMENT_LABELS.get(treatment, treatment), xlabel="accuracy on R (remaining)")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("accuracy on F_h (held-out failures)")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=5, fontsize=8)
    fig.suptitle(f"Repair: failure vs remaining accuracy ({title})")
    fig.tight_layout(rect=(0, 0.12, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_histograms(path: Path, run: dict[str, Any], title: str) -> None:
    """Each method's score histogram, flipped and clean examples apart (each normalised to unit area)."""
    plt = _pyplot()
    methods = list(run["identification"])
    columns = 4
    rows = math.ceil(len(methods) / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(3.3 * columns, 2.6 * rows), squeeze=False)
    for ax, method in zip(axes.flat, methods):
        histogram = run["identification"][method]["histogram"]
        edges = np.array(histogram["edges"])
        for group, color in (("clean", "tab:blue"), ("flipped", "tab:red")):
            counts = np.array(histogram[group], dtype=float)
            density = counts / max(counts.sum(), 1) / np.diff(edges)
            ax.stairs(density, edges, fill=True, alpha=0.45, color=color, label=group)
        ax.set_title(METHOD_LABELS.get(method, method), fontsize=9)
        ax.set_yticks([])
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(methods):]:
        ax.axis("off")
    axes[0][0].legend(fontsize=8)
    fig.suptitle(f"Scores (higher = more likely flipped; central 99 %) — {title}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def redraw(out: Path) -> None:
    """Summarises every ``<protocol>.json`` in ``out`` again from its runs, rewrites it, and redraws the report."""
    for protocol in PROTOCOLS:
        path = out / f"{protocol}.json"
        if path.is_file():
            result = json.loads(path.read_text())
            write_json(path, result | {"summary": summarize(result["runs"])})
    write_report(out)


if __name__ == "__main__":
    redraw(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parent / "results")
