"""Which of KNN-Shapley's own cause rules takes fewer clean examples: value < −m × the mean value, for m = 0, 1, 2?

Runs ``benchmarks.fit``'s ``50k`` fit of a protocol and seed with ``RepairCallback(rollback=False)`` and the
default cause rule (m = 0), the trajectory of the ``repair_no_rollback`` fit, for ``--epochs``
epochs, so that its rounds come after the default epochs 3 and 7 (0-based). At each round it keeps the scores
and prints, per rule, how many causes it takes, their precision against the recorded flips and the share of
the flips still in training that it takes (recall). The second round sees D without the first round's causes.
One JSON line per round and rule, appended to ``--out``; ``--report`` writes the table of every line there.

    python -m benchmarks.knn_rule_probe pairs 1
    python -m benchmarks.knn_rule_probe --report

One thread; about as long as 8 epochs of the plain fit on this project's CPU (6–7 minutes, two side by side).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from benchmarks import fit
from lightning_repair import RepairCallback
from lightning_repair.identify import KNNShapley
from lightning_repair.identify.base import ScoringInputs
from lightning_repair.selection import select_causes

MARGINS = (0.0, 1.0, 2.0)


@dataclass(kw_only=True)
class RecordingKNNShapley(KNNShapley):
    """KNN-Shapley (trusted, the default rule) that also keeps each round's scores and dataset indices."""

    utility: str = "trusted"
    rounds: list[tuple[Tensor, Tensor]] = field(default_factory=list, repr=False)

    def score(self, inputs: ScoringInputs) -> Tensor:
        scores = super().score(inputs)
        self.rounds.append((scores, torch.as_tensor(inputs.train.dataset.indices)))
        return scores


def rule_figures(scores: Tensor, indices: Tensor, flipped: Tensor, margin: float) -> dict[str, float | int]:
    """Causes, precision and recall of value < −margin × mean value over the scored examples."""
    chosen = indices[select_causes(scores, threshold=KNNShapley(harm_margin=margin).threshold_for(scores))]
    is_flip = torch.isin(indices, flipped)
    hits = int(torch.isin(chosen, flipped).sum())
    return {"causes": len(chosen), "precision": hits / max(len(chosen), 1),
            "recall": hits / max(int(is_flip.sum()), 1), "flips_in_training": int(is_flip.sum())}


def report(lines: list[dict]) -> str:
    """The Markdown table of the probe's lines, one row per protocol, seed, round and rule."""
    rows = ["| protocol | seed | round | flips in training | rule | causes | precision | recall |",
            "|---|---:|---:|---:|---|---:|---:|---:|"]
    for line in sorted(lines, key=lambda l: (l["protocol"], l["seed"], l["round"], l["harm_margin"])):
        rule = "value < 0" if line["harm_margin"] == 0 else f"value < −{line['harm_margin']:g} × mean"
        rows.append(f"| `{line['protocol']}` | {line['seed']} | {line['round']} | {line['flips_in_training']:,} | "
                    f"{rule} | {line['causes']:,} | {line['precision']:.3f} | {line['recall']:.3f} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("protocol", nargs="?", choices=fit.PROTOCOLS)
    parser.add_argument("seed", nargs="?", type=int)
    parser.add_argument("--epochs", type=int, default=8, help="8: rounds after epochs 3 and 7 (0-based)")
    parser.add_argument("--out", type=Path, default=fit.RESULTS / "knn_rule_probe.jsonl")
    parser.add_argument("--report", action="store_true", help="print the table of every line in --out; run nothing")
    arguments = parser.parse_args(argv)
    if arguments.report:
        print(report([json.loads(line) for line in arguments.out.read_text().splitlines() if line.strip()]))
        return
    if arguments.protocol is None or arguments.seed is None:
        parser.error("give a protocol and a seed, or --report")
    torch.set_num_threads(1)
    setting = fit.Setting(arguments.protocol, "50k", arguments.seed, arguments.epochs)
    data = fit._datamodule(setting, setting.protocol)
    scorer = RecordingKNNShapley()
    with tempfile.TemporaryDirectory() as root:
        fit._fit(setting, data, fit._new_classifier(setting.seed), [RepairCallback(scorer=scorer, rollback=False)],
                 Path(root))
    with arguments.out.open("a") as out:
        for number, (scores, indices) in enumerate(scorer.rounds, start=1):
            for margin in MARGINS:
                out.write(json.dumps({"protocol": setting.protocol, "seed": setting.seed, "round": number,
                                      "harm_margin": margin,
                                      **rule_figures(scores, indices, data.flipped_indices, margin)}) + "\n")


if __name__ == "__main__":
    main()
