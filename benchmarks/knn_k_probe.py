"""Which ranking of D finds the flips best at a default round: KNN-Shapley per k, or the trusted points' own vote?

Runs ``benchmarks.fit``'s fit of a protocol, regime and seed with the defaults (``RepairCallback()``) up to their
first round (after epoch 3 in ``50k``, 15 in ``3k-mem``, 0-based; ``--after`` moves it) and there, on the same
embeddings (the head's inputs at θ̂), ranks D by:

- KNN-Shapley (trusted utility F_q ∪ R_q) with k neighbours, k in ``SHAPLEY_K`` (the default is 5);
- the trusted points' vote: the share of the k nearest points of F_q ∪ R_q to each training example whose label
  differs from its own, k in ``VOTE_K`` (every training example has neighbours among the utility points, where
  KNN-Shapley values only the training examples near some utility point);
- the training loss at θ̂ (the head applied to the embeddings).

Per ranking: average precision of the flips, and the causes, precision and recall of its natural rules
(KNN-Shapley: value < −m × mean value, m = 0, 1, 2, and for m = 0, 1 also only where θ̂ misclassifies the example;
the vote: more than 50, 70 or 90 % disagree; the loss: argmax ≠ label). One JSON line per ranking and rule,
appended to ``--out``; ``--report`` prints the mean AP per setting and every line.

    python -m benchmarks.knn_k_probe pairs 50k 1
    python -m benchmarks.knn_k_probe --report

One thread; as long as the fit up to its first round plus a few seconds (about 3 minutes in ``50k``, 2 in
``3k-mem``, on this project's CPU beside another run).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor
from torch.nn import functional as F

from benchmarks import fit
from benchmarks.metrics import average_precision
from lightning_repair import RepairCallback
from lightning_repair.identify import KNNShapley
from lightning_repair.identify.base import Scorer, ScoringInputs
from lightning_repair.identify.knn_shapley import (_embedding_layer, _shared_embeddings, knn_shapley_scores,
                                                   truncation_for)

SHAPLEY_K = (5, 10, 25, 50)
VOTE_K = (5, 10, 25, 50)
FIRST_ROUND = {"50k": 3, "3k-mem": 15}


def trusted_vote(train_x: Tensor, train_y: Tensor, utility_x: Tensor, utility_y: Tensor, k: int,
                 chunk: int = 2048) -> Tensor:
    """Share of the k nearest utility points (Euclidean) of each training example whose label differs from its own."""
    shares = []
    for start in range(0, len(train_x), chunk):
        distances = torch.cdist(train_x[start:start + chunk], utility_x)
        nearest = distances.topk(k, dim=1, largest=False).indices
        shares.append((utility_y[nearest] != train_y[start:start + chunk, None]).float().mean(dim=1))
    return torch.cat(shares)


@dataclass(kw_only=True)
class TrustedVote(Scorer):
    """Benchmark only, a candidate scorer: the share of the ``k`` nearest points of F_q ∪ R_q (on the round's
    embeddings, the head's inputs) whose label differs from the training example's; its own rule takes the examples
    where more than ``disagreement`` of them do. Not in the library: it ranks better than KNN-Shapley in
    ``symmetric`` and halves the recall of its rule in ``pairs`` (``results/knn_k_probe.md``)."""

    k: int = 50
    disagreement: float = 0.9

    def threshold_for(self, scores: Tensor) -> float:
        return self.disagreement

    def score(self, inputs: ScoringInputs) -> Tensor:
        model, ranks, adapter, recorded = inputs.model, inputs.ranks, inputs.adapter, inputs.recorded
        train_x, train_y = _shared_embeddings(model, inputs.train, "training", ranks, None, adapter, inputs.progress)
        if recorded is not None and recorded.module is _embedding_layer(model, None):
            utility_x, utility_y = recorded.trusted
        else:
            utility_x, utility_y = _shared_embeddings(model, inputs.trusted, "validation", ranks, None, adapter)
        return trusted_vote(train_x, train_y, utility_x, utility_y, self.k).cpu()


@dataclass(kw_only=True)
class ProbingKNNShapley(KNNShapley):
    """The default scorer; at its first round it also ranks D every other way and keeps the rankings."""

    utility: str = "trusted"
    harm_margin: float = 1.0
    rankings: dict[str, Tensor] = field(default_factory=dict, repr=False)
    indices: Tensor | None = field(default=None, repr=False)

    def score(self, inputs: ScoringInputs) -> Tensor:
        scores = super().score(inputs)
        if self.indices is not None:
            return scores
        self.indices = torch.as_tensor(inputs.train.dataset.indices)
        train_x, train_y = _shared_embeddings(inputs.model, inputs.train, "training", inputs.ranks, None,
                                              inputs.adapter)
        utility_x, utility_y = inputs.recorded.trusted
        for k in SHAPLEY_K:
            self.rankings[f"shapley_k{k}"] = knn_shapley_scores(
                train_x, train_y, utility_x, utility_y, k=k, truncation=truncation_for(1e-4, len(train_y), k)).float()
        for k in VOTE_K:
            self.rankings[f"vote_k{k}"] = trusted_vote(train_x, train_y, utility_x, utility_y, k)
        head = _embedding_layer(inputs.model, None)
        with torch.no_grad():
            logits = head(train_x)
        self.rankings["loss"] = F.cross_entropy(logits, train_y, reduction="none")
        self.rankings["_wrong"] = (logits.argmax(1) != train_y).float()
        return scores


def rule_lines(name: str, scores: Tensor, is_flip: Tensor, wrong: Tensor) -> list[dict]:
    """Average precision of ``scores``, and causes, precision and recall of each natural rule of its kind."""
    if name.startswith("shapley"):
        mean_value = max(-float(scores.double().mean()), 0.0)
        rules = {f"value < −{m:g} × mean": scores > m * mean_value for m in (0.0, 1.0, 2.0)}
        rules |= {f"value < −{m:g} × mean, argmax ≠ label": (scores > m * mean_value) & wrong for m in (0.0, 1.0)}
    elif name.startswith("vote"):
        rules = {f"more than {share:.0%} disagree": scores > share for share in (0.5, 0.7, 0.9)}
    else:
        rules = {"argmax ≠ label": wrong > 0}
    ap = average_precision(scores.numpy(), is_flip.numpy())
    lines = []
    for rule, chosen in rules.items():
        hits = int((chosen & is_flip).sum())
        lines.append({"ranking": name, "rule": rule, "ap": ap, "causes": int(chosen.sum()),
                      "precision": hits / max(int(chosen.sum()), 1), "recall": hits / max(int(is_flip.sum()), 1)})
    return lines


def ap_summary(lines: list[dict]) -> str:
    """Mean AP over seeds per setting, round epoch and ranking: one row per setting and epoch."""
    rankings = list(dict.fromkeys(l["ranking"] for l in lines))
    groups: dict[tuple, dict[str, dict[int, float]]] = {}
    for l in lines:
        key = (l["protocol"], l["regime"], l["round_after_epoch"])
        groups.setdefault(key, {}).setdefault(l["ranking"], {})[l["seed"]] = l["ap"]
    rows = ["| protocol | regime | after epoch | seeds | " + " | ".join(rankings) + " |",
            "|---|---|---:|---|" + "---:|" * len(rankings)]
    for (protocol, regime, epoch), by_ranking in sorted(groups.items()):
        seeds = sorted(next(iter(by_ranking.values())))
        means = {name: sum(aps.values()) / len(aps) for name, aps in by_ranking.items()}
        best = max(means.values())
        cells = [f"**{means[name]:.3f}**" if means[name] == best else f"{means[name]:.3f}" for name in rankings]
        rows.append(f"| `{protocol}` | `{regime}` | {epoch} | {', '.join(map(str, seeds))} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def report(lines: list[dict]) -> str:
    """The Markdown tables of the probe's lines: mean AP per setting, then every ranking and rule."""
    rows = ["| protocol | regime | seed | after epoch | ranking | AP | rule | causes | precision | recall |",
            "|---|---|---:|---:|---|---:|---|---:|---:|---:|"]
    for l in sorted(lines, key=lambda l: (l["protocol"], l["regime"], l["round_after_epoch"], l["seed"])):
        rows.append(f"| `{l['protocol']}` | `{l['regime']}` | {l['seed']} | {l['round_after_epoch']} | "
                    f"{l['ranking']} | {l['ap']:.3f} | {l['rule']} | {l['causes']:,} | {l['precision']:.3f} | "
                    f"{l['recall']:.3f} |")
    return ap_summary(lines) + "\n\n" + "\n".join(rows)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("protocol", nargs="?", choices=fit.PROTOCOLS)
    parser.add_argument("regime", nargs="?", choices=tuple(FIRST_ROUND))
    parser.add_argument("seed", nargs="?", type=int)
    parser.add_argument("--after", type=int, default=None,
                        help="the round after this epoch (0-based); default the defaults' first round")
    parser.add_argument("--out", type=Path, default=fit.RESULTS / "knn_k_probe.jsonl")
    parser.add_argument("--report", action="store_true", help="print the table of every line in --out; run nothing")
    arguments = parser.parse_args(argv)
    if arguments.report:
        print(report([json.loads(line) for line in arguments.out.read_text().splitlines() if line.strip()]))
        return
    torch.set_num_threads(1)
    first = FIRST_ROUND[arguments.regime] if arguments.after is None else arguments.after
    setting = fit.Setting(arguments.protocol, arguments.regime, arguments.seed, first + 1)
    data = fit._datamodule(setting, setting.protocol)
    scorer = ProbingKNNShapley()
    with tempfile.TemporaryDirectory() as root:
        fit._fit(setting, data, fit._new_classifier(setting.seed), [RepairCallback(scorer=scorer, start_epoch=first)],
                 Path(root))
    is_flip = torch.isin(scorer.indices, torch.as_tensor(data.flipped_indices))
    wrong = scorer.rankings.pop("_wrong").bool()
    with arguments.out.open("a") as out:
        for name, scores in scorer.rankings.items():
            for line in rule_lines(name, scores.cpu(), is_flip, wrong):
                out.write(json.dumps({"protocol": setting.protocol, "regime": setting.regime, "seed": setting.seed,
                                      "round_after_epoch": first, **line}) + "\n")


if __name__ == "__main__":
    main()
