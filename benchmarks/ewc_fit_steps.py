"""What bounding EWC influence's fit to F_q costs in average precision, and what it saves in time.

    python -m benchmarks.ewc_fit_steps                        # the grid below, seeds 0-2 (about 20 min)
    python -m benchmarks.ewc_fit_steps --seeds 0 --steps 100 25 12 6 --lrs 1e-3 --batch-sizes 64 \
        --variants "whole network"                            # step caps alone

EWC influence fits θ₊F to F_q with up to ``max_steps`` Adam steps (early-stopped on a held-back 10 % of F_q),
then scores D by two forward passes. The fit's cost does not shrink with D: at N = 3,000 its 100 steps cost about
two training epochs (``speed_3k.md``). This runs every combination of step cap (``--steps``), Adam learning rate
(``--lrs``), fit batch size (``--batch-sizes``) and variant (the whole network as shipped, or the last layer
alone on the body's outputs) on the cached noisy references of ``benchmarks.repair`` (3,000 images, trained for
150 and for 30 epochs), with the failure split, Fisher and F_q the benchmark uses. It reports the average
precision of the flipped labels and the scoring time ÷ one training epoch of the same model, timed in this
process. Needs the references in ``benchmarks/cache/`` (``python -m benchmarks.repair`` trains and caches them).
Writes ``benchmarks/results/ewc_fit_steps.md``.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.utils.data import TensorDataset

from benchmarks import metrics
from benchmarks.environment import environment
from benchmarks.repair import (BATCH_SIZE, CACHE, FISHER_SAMPLES, MAX_FAILURES, QUERY_FRACTION, REGIMES, RESULTS,
                               STOP_FRACTION)
from benchmarks.training import predictions, split_tensors, train, trained_model
from lightning_repair.adapter import BatchAdapter
from lightning_repair.curvature import diagonal_fisher
from lightning_repair.data import FashionMNISTDataModule
from lightning_repair.examples import Examples
from lightning_repair.failures import hold_back, split_failures
from lightning_repair.identify import EWCInfluence, ScoringInputs
from lightning_repair.optimize import FIT_DEFAULTS
from lightning_repair.params import repair_copy


VARIANTS = ("whole network", "last layer")


def measure(protocol: str, regime_name: str, seed: int, caps: list[int], rates: list[float], batch_sizes: list[int],
            variants: list[str]) -> list[dict]:
    """AP and time of EWC influence at each step cap, learning rate, fit batch size and variant, on one cached
    reference."""
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
    model = repair_copy(noisy)
    sample = torch.randperm(len(train_split), generator=torch.Generator().manual_seed(seed))[:FISHER_SAMPLES]
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        fisher = diagonal_fisher(model, Examples(train_split.dataset(), batch_size=BATCH_SIZE)
                                 .subset(sample.sort().values).loader(), "mc")
    fit_part, stop_part = hold_back(failures.query, STOP_FRACTION, seed)
    rows = []
    for variant, lr, cap, batch_size in itertools.product(variants, rates, caps, batch_sizes):
        start = time.perf_counter()
        if variant == "last layer":  # the paper CNN is flat: its last module is the head, the rest its body
            body, scored, scored_fisher = model[:-1], model[-1], fisher[-2:]
            with torch.no_grad():
                train_x = torch.cat([body(x) for x in train_split.x.split(BATCH_SIZE)])
                validation_x = torch.full((len(validation), train_x.shape[1]), float("nan"))
                validation_x[failures.query] = body(validation.x[failures.query])
        else:
            scored, scored_fisher, train_x, validation_x = model, fisher, train_split.x, validation.x
        train_examples = Examples(TensorDataset(train_x, train_split.y), batch_size=BATCH_SIZE)
        val_examples = Examples(TensorDataset(validation_x, validation.y), batch_size=BATCH_SIZE)
        inputs = ScoringInputs(model=scored, train=train_examples.loader(),
                               query=val_examples.subset(failures.query).loader(),
                               query_fit=val_examples.subset(fit_part).loader(batch_size=batch_size),
                               stop=val_examples.subset(stop_part).loader(), trusted=None, fisher=scored_fisher,
                               n_train=len(train_split), adapter=BatchAdapter(), seed=seed)
        scores = EWCInfluence(lr=lr, max_steps=cap).score(inputs)
        seconds = time.perf_counter() - start
        rows.append({"protocol": protocol, "regime": regime_name, "seed": seed, "variant": variant, "lr": lr,
                     "max_steps": cap, "fit_batch_size": batch_size,
                     "average_precision": metrics.average_precision(scores.double().numpy(), flipped.numpy()),
                     "seconds": seconds, "epoch_seconds": epoch_seconds})
        print(rows[-1], flush=True)
    return rows


def config(row: dict) -> tuple:
    return row["variant"], row["lr"], row["max_steps"], row["fit_batch_size"]


def summarize(rows: list[dict]) -> dict[tuple, dict]:
    """Per configuration: mean AP and mean score() ÷ epoch over every protocol, regime and seed."""
    summary: dict[tuple, dict] = {}
    for key in dict.fromkeys(config(row) for row in rows):
        mine = [row for row in rows if config(row) == key]
        summary[key] = {"average_precision": statistics.mean(row["average_precision"] for row in mine),
                        "epochs": statistics.mean(row["seconds"] / row["epoch_seconds"] for row in mine)}
    return summary


def write(rows: list[dict], out: Path, command: str) -> None:
    env = environment()
    seeds = sorted({row["seed"] for row in rows})
    lines = [
        "# EWC influence: what bounding its fit to F_q costs in average precision", "",
        f"`{command}` on the cached noisy references of `benchmarks.repair` (N = 3,000; seeds "
        f"{', '.join(map(str, seeds))}), with the benchmark's failure split, Fisher (1,000 MC samples) and F_q. "
        "AP: average precision of the flipped labels among all of D (random: the flip rate). Time: the whole "
        "`score()` (the fit to F_q and the two passes over D) ÷ one training epoch of the same model in this "
        "process. The fit is early-stopped on 10 % of F_q as always, so a step cap only bites when the fit would "
        "run longer. *whole network* is `EWCInfluence` as shipped; *last layer* fits only the head "
        "(`Linear(64, 10)`) on the body's outputs, its time including the body's pass over D and F_q. The default "
        f"is lr {FIT_DEFAULTS.lr:g}, {FIT_DEFAULTS.max_steps} steps, the repair batch ({BATCH_SIZE}).", "",
        f"- date: {env['date']}; CPU: {env.get('cpu')}, torch threads {env.get('torch_threads')}; "
        f"torch {env['packages'].get('torch')}", "",
        "## Over every protocol, regime and seed", "",
        "| variant | lr | max_steps | fit batch | mean AP | mean score() ÷ epoch |", "|---|---:|---:|---:|---:|---:|"]
    for (variant, lr, cap, batch_size), value in summarize(rows).items():
        lines.append(f"| {variant} | {lr:g} | {cap} | {batch_size} | {value['average_precision']:.3f} "
                     f"| {value['epochs']:.2f} |")
    lines += ["", "## Every run", "",
              "| protocol | regime | seed | variant | lr | max_steps | fit batch | AP | score() ÷ epoch |",
              "|---|---|---:|---|---:|---:|---:|---:|---:|"]
    for row in rows:
        lines.append(f"| {row['protocol']} | {row['regime']} | {row['seed']} | {row['variant']} | {row['lr']:g} "
                     f"| {row['max_steps']} | {row['fit_batch_size']} | {row['average_precision']:.3f} "
                     f"| {row['seconds'] / row['epoch_seconds']:.2f} |")
    out.mkdir(parents=True, exist_ok=True)
    (out / "ewc_fit_steps.md").write_text("\n".join(lines) + "\n")
    (out / "ewc_fit_steps.json").write_text(json.dumps({"environment": env, "rows": rows}, indent=1) + "\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--protocols", nargs="+", default=["pairs", "symmetric"])
    parser.add_argument("--regimes", nargs="+", default=["3k-mem", "3k"], choices=["3k-mem", "3k"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, nargs="+", default=[100, 12], help="caps on the fit's steps")
    parser.add_argument("--lrs", type=float, nargs="+", default=[FIT_DEFAULTS.lr, 1e-2], help="Adam's learning rates")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[BATCH_SIZE, 16], help="the fit's batches")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=RESULTS)
    arguments = parser.parse_args(argv)
    torch.set_num_threads(arguments.threads)
    rows = [row for seed in arguments.seeds for protocol in arguments.protocols for regime in arguments.regimes
            for row in measure(protocol, regime, seed, arguments.steps, arguments.lrs, arguments.batch_sizes,
                               arguments.variants)]
    write(rows, arguments.out, " ".join(["python -m benchmarks.ewc_fit_steps", *sys.argv[1:]]))


if __name__ == "__main__":
    main()
