"""What capping EWC influence's fit to F_q costs in average precision, and what it saves in time.

    python -m benchmarks.ewc_fit_steps                  # pairs and symmetric, 3k-mem and 3k, seed 0
    python -m benchmarks.ewc_fit_steps --steps 100 12   # fewer caps

EWC influence fits θ₊F to F_q with up to ``max_steps`` Adam steps (early-stopped on a held-back 10 % of F_q),
then scores D by two forward passes. The fit's cost does not shrink with D: at N = 3,000 its 100 steps cost about
two training epochs (``speed_3k.md``). This runs the fit at each cap in ``--steps`` on the cached noisy
references of ``benchmarks.repair`` (3,000 images, trained for 150 and for 30 epochs), with the failure split,
Fisher and F_q the benchmark uses, and reports the average precision of the flipped labels and the scoring time
÷ one training epoch of the same model, timed in this process. Needs the references in ``benchmarks/cache/``
(``python -m benchmarks.repair`` trains and caches them). Writes ``benchmarks/results/ewc_fit_steps.md``.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch

from benchmarks import metrics
from benchmarks.environment import environment
from benchmarks.repair import (BATCH_SIZE, CACHE, FISHER_SAMPLES, MAX_FAILURES, QUERY_FRACTION, REGIMES, RESULTS,
                               query_loaders)
from benchmarks.training import predictions, split_tensors, train, trained_model
from lightning_repair.adapter import BatchAdapter
from lightning_repair.curvature import diagonal_fisher
from lightning_repair.data import FashionMNISTDataModule
from lightning_repair.examples import Examples
from lightning_repair.failures import split_failures
from lightning_repair.identify import EWCInfluence, ScoringInputs
from lightning_repair.params import repair_copy


def measure(protocol: str, regime_name: str, seed: int, caps: list[int]) -> list[dict]:
    """AP and time of EWC influence at each step cap, on one cached reference."""
    regime = REGIMES[regime_name]
    data = FashionMNISTDataModule(noise=protocol, train_subset=regime.train_subset, seed=seed)
    data.setup("fit")
    train_split, validation = split_tensors(data.train_dataset), split_tensors(data.val_dataset)
    path = CACHE / f"{protocol}_{regime.name}_seed{seed}_epochs{regime.epochs}_noisy.pt"
    if not path.exists():
        raise SystemExit(f"{path} is missing: run `python -m benchmarks.repair --protocol {protocol}` first.")
    noisy, _ = trained_model(path, train_split, regime.epochs, seed)
    epoch_seconds = train(copy.deepcopy(noisy), train_split, 1, seed)[0]
    flipped = torch.zeros(len(train_split), dtype=torch.bool)
    flipped[data.flipped_indices] = True
    failures = split_failures(predictions(noisy, validation.x), validation.y, QUERY_FRACTION, MAX_FAILURES, seed)
    train_examples = Examples(train_split.dataset(), batch_size=BATCH_SIZE)
    val_examples = Examples(validation.dataset(), batch_size=BATCH_SIZE)
    model = repair_copy(noisy)
    sample = torch.randperm(len(train_split), generator=torch.Generator().manual_seed(seed))[:FISHER_SAMPLES]
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        fisher = diagonal_fisher(model, train_examples.subset(sample.sort().values).loader(), "mc")
    query, query_fit, stop = query_loaders(val_examples, failures.query, seed)
    rows = []
    for cap in caps:
        inputs = ScoringInputs(model=model, train=train_examples.loader(), query=query, query_fit=query_fit,
                               stop=stop, trusted=None, fisher=fisher, n_train=len(train_split), adapter=BatchAdapter(),
                               seed=seed)
        start = time.perf_counter()
        scores = EWCInfluence(max_steps=cap).score(inputs)
        seconds = time.perf_counter() - start
        rows.append({"protocol": protocol, "regime": regime_name, "seed": seed, "max_steps": cap,
                     "average_precision": metrics.average_precision(scores.double().numpy(), flipped.numpy()),
                     "seconds": seconds, "epoch_seconds": epoch_seconds})
        print(rows[-1], flush=True)
    return rows


def write(rows: list[dict], out: Path, command: str) -> None:
    env = environment()
    lines = [
        "# EWC influence: its fit's step cap against average precision and time", "",
        f"`{command}` on the cached noisy references of `benchmarks.repair` (N = 3,000), with the benchmark's "
        "failure split, Fisher (1,000 MC samples) and F_q. AP: average precision of the flipped labels among all "
        "of D (random: the flip rate). Time: the whole `score()` (the fit to F_q and the two passes over D) ÷ one "
        "training epoch of the same model in this process. One run each; the fit is early-stopped on 10 % of F_q "
        "as always, so a cap only bites when the fit would run longer.", "",
        f"- date: {env['date']}; CPU: {env.get('cpu')}, torch threads {env.get('torch_threads')}; "
        f"torch {env['packages'].get('torch')}", "",
        "| protocol | regime | max_steps | AP | score() ÷ epoch |", "|---|---|---:|---:|---:|"]
    for row in rows:
        lines.append(f"| {row['protocol']} | {row['regime']} | {row['max_steps']} | {row['average_precision']:.3f} "
                     f"| {row['seconds'] / row['epoch_seconds']:.2f} |")
    out.mkdir(parents=True, exist_ok=True)
    (out / "ewc_fit_steps.md").write_text("\n".join(lines) + "\n")
    (out / "ewc_fit_steps.json").write_text(json.dumps({"environment": env, "rows": rows}, indent=1) + "\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--protocols", nargs="+", default=["pairs", "symmetric"])
    parser.add_argument("--regimes", nargs="+", default=["3k-mem", "3k"], choices=["3k-mem", "3k"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, nargs="+", default=[100, 50, 25, 12, 6])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=RESULTS)
    arguments = parser.parse_args(argv)
    torch.set_num_threads(arguments.threads)
    rows = [row for protocol in arguments.protocols for regime in arguments.regimes
            for row in measure(protocol, regime, arguments.seed, arguments.steps)]
    command = "python -m benchmarks.ewc_fit_steps" + (f" --threads {arguments.threads}" if arguments.threads != 1
                                                     else "")
    write(rows, arguments.out, command)


if __name__ == "__main__":
    main()
