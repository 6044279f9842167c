"""The benchmark runner: every identification method × every treatment, on Fashion-MNIST with flipped labels.

    python -m benchmarks.repair --protocol pairs --seeds 0 1 2        # full mode, run by hand (hours)
    python -m benchmarks.repair --protocol symmetric --seeds 0 1 2
    python -m benchmarks.repair --protocol pairs --quick              # seed 0 of the 3k regime, 9–13 min

Each (regime, seed) of a protocol trains the noisy and the oracle reference once and caches them in
``benchmarks/cache/``, as it does cleanlab's cross-validated probabilities. Then, on the noisy model:
the failure set F is split into F_q (used) and F_h (only measured); the Fisher is estimated once; every
identification method scores D and picks a cause set C; every treatment repairs a copy of the model with
every C; every repaired model is evaluated once on F_q, F_h, R and the test set. Results go to
``<out>/<protocol>.json`` (every figure, the versions and the machine) and, for every protocol found there,
``<out>/README.md`` with tables and PNG plots beside it. ``benchmarks/README.md`` describes the protocol.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import math
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from benchmarks import metrics
from benchmarks.environment import environment, peak_memory_mb
from benchmarks.peers import cleanlab_issues, cross_validated_probabilities
from benchmarks.report import write_results
from benchmarks.training import (BATCH_SIZE, Split, cached, epoch_overrides, new_model, predictions, split_tensors,
                                 train, trained_model)
from lightning_repair.adapter import BatchAdapter
from lightning_repair.curvature import diagonal_fisher
from lightning_repair.data import FashionMNISTDataModule
from lightning_repair.examples import Examples
from lightning_repair.failures import FailureSet, accuracy, hold_back, split_failures
from lightning_repair.identify import (EWCInfluence, GradientDot, KNNShapley, LinearInfluence, RandomScores, Scorer,
                                       ScoringInputs, TrainingLoss)
from lightning_repair.acceptance import Judge, compare, estimated_accuracy
from lightning_repair.params import repair_copy
from lightning_repair.selection import select_causes
from lightning_repair.treat import EnergyAlignment, EWCUnlearning, Finetune, NewtonRemoval, Treatment, TreatmentInputs

BENCHMARKS = Path(__file__).resolve().parent
CACHE = BENCHMARKS / "cache"
RESULTS = BENCHMARKS / "results"


@dataclass(frozen=True)
class Regime:
    """How much data the model sees and for how long (see ``benchmarks/README.md``)."""

    name: str
    train_subset: int | None
    epochs: int
    retrain_for: tuple[str, ...] | None = None  # the cause sets retrained without; None: as the options say


# Retraining from scratch costs a whole training per cause set (150 epochs in 3k-mem), so the 3k regimes retrain
# only without the peer's cause set (cleanlab: the "cleanlab and retrain" users would pick) and the true flips.
RETRAINED = ("cleanlab", "true_flips")
REGIMES = {"3k-mem": Regime("3k-mem", 3000, 150, retrain_for=RETRAINED),
           "3k": Regime("3k", 3000, 30, retrain_for=RETRAINED), "50k": Regime("50k", None, 5)}

# The identification methods, in table order. C is each scorer's own rule where it has one (KNN-Shapley: value
# < 0), else the top TOP_FRACTION of D; cleanlab's C is its own issue set.
SCORERS: dict[str, Callable[[], Scorer]] = {
    "ewc_influence": EWCInfluence,
    "linear_influence": LinearInfluence,
    "gradient_dot": GradientDot,
    "knn_shapley": KNNShapley,
    # The same values with the validation data methods may read, F_q ∪ R_q, as the utility instead of F_q alone.
    "knn_shapley_trusted": lambda: KNNShapley(utility="trusted"),
    "knn_shapley_v_minus_fh": lambda: KNNShapley(utility="trusted"),  # given V \ F_h: identification only
    "training_loss": TrainingLoss,
    "random": RandomScores,
}
# Scored for their identification figures only, never used to repair: reading F_h or R would bias the acceptance
# rule, which judges on them. V \ F_h was the trusted utility before the acceptance rule; kept to measure what
# leaving R out of the utility costs in average precision.
IDENTIFICATION_ONLY = {"knn_shapley_v_minus_fh"}
CLEANLAB = "cleanlab"
TRUE_FLIPS = "true_flips"  # the label oracle's cause set: fine-tuned with it, the semi-oracle reference
IDENTIFIERS = (*SCORERS, CLEANLAB)
CAUSE_SETS = (*IDENTIFIERS, TRUE_FLIPS)
REPAIRED = tuple(name for name in CAUSE_SETS if name not in IDENTIFICATION_ONLY)
# The paper's own treatment forms only run with the true flips: they show what the defaults changed.
PAPER_FORMS = ("ewc_deletion_ascent", "newton_influence", "newton_diagonal")

# The treatments, in table order; each takes |D \ C|. "retrain" trains from scratch on D \ C.
TREATMENTS: dict[str, Callable[[int], Treatment]] = {
    # One epoch of D \ C: the paper fine-tunes to convergence; one epoch is a budget the other treatments beat
    # on cost by far, so it is a fair upper reference.
    "finetune": lambda n_kept: Finetune(steps=math.ceil(n_kept / BATCH_SIZE),
                                        eval_every=max(1, math.ceil(n_kept / BATCH_SIZE) // 10)),
    "ewc_deletion": lambda n_kept: EWCUnlearning(),
    "newton": lambda n_kept: NewtonRemoval(),
    # The paper's own forms, to show what the defaults changed: ascent on −Σ_C ℓ over every layer, and the
    # diagonal-Fisher inverse.
    "ewc_deletion_ascent": lambda n_kept: EWCUnlearning(objective="ascent", modules="all", gamma=0.02, lr=3e-5,
                                                        max_steps=50, eval_every=5, patience=3),
    # The paper's Newton step H⁻¹ Σ_C ∇ℓ (it assumes θ̂ minimises the loss on D), with LiSSA, then with the diagonal.
    "newton_influence": lambda n_kept: NewtonRemoval(step="influence"),
    "newton_diagonal": lambda n_kept: NewtonRemoval(inverse="diagonal", step="influence",
                                                    gamma_multipliers=(0.001, 0.01, 0.1, 0.25, 0.5, 1.0, 2.0, 4.0)),
    "energy_alignment": lambda n_kept: EnergyAlignment(),
}
RETRAIN = "retrain"
ALL_TREATMENTS = (*TREATMENTS, RETRAIN)

# The callback's defaults, so that the benchmark measures what a user gets.
TOP_FRACTION = 0.1
QUERY_FRACTION = 0.5
MAX_FAILURES = 2000
STOP_FRACTION = 0.1
FISHER_SAMPLES = 1000
FOUND_AT = 0.2
CURVE_POINTS = 101
HISTOGRAM_BINS = 40


@dataclass(frozen=True)
class Options:
    """What a run may vary; everything else is fixed by the protocol. Part of the cache key of a run."""

    folds: int = 5
    fisher: str = "mc"
    retrain_for: tuple[str, ...] = CAUSE_SETS
    # The cause sets repaired; every scorer is still scored. Without cleanlab its cross-validation is skipped.
    cause_sets: tuple[str, ...] = REPAIRED

    def as_json(self) -> dict[str, Any]:
        """The options as they read back from JSON (tuples become lists)."""
        return json.loads(json.dumps(asdict(self)))

    def key(self) -> str:
        """A short hash of the options, to tell cached runs apart."""
        return hashlib.sha1(json.dumps(self.as_json(), sort_keys=True).encode()).hexdigest()[:8]


@dataclass
class Clock:
    """Wall seconds per named phase."""

    phases: dict[str, float] = field(default_factory=dict)

    def time(self, name: str, work: Callable[[], Any]) -> Any:
        start = time.perf_counter()
        result = work()
        self.phases[name] = time.perf_counter() - start
        return result


def evaluate(model: nn.Module, validation: Split, test: Split, failures: FailureSet, failure_share: float
             ) -> dict[str, Any]:
    """Accuracy on F_q, F_h, R and the test set, and the acceptance rule's verdict on F_h and R against the noisy
    model (as the callback's rollback decides); the only place the test set is read."""
    predicted = predictions(model, validation.x)
    right, right_before = predicted == validation.y, failures.predictions == validation.y
    holdout, remaining = failures.holdout, failures.remaining
    verdict = compare(right_before[holdout], right[holdout], right_before[remaining], right[remaining], failure_share)
    return {
        "f_q": accuracy(predicted, validation.y, failures.query),
        "f_h": accuracy(predicted, validation.y, holdout),
        "r": accuracy(predicted, validation.y, remaining),
        "validation_estimate": estimated_accuracy(right[holdout], right[remaining], failure_share),
        "gain": verdict.gain, "gain_standard_error": verdict.standard_error, "accepted": verdict.accepted,
        "test": (predictions(model, test.x) == test.y).double().mean().item(),
    }


def identification_record(scores: Tensor, causes: Tensor, is_flipped: Tensor, seconds: float,
                          epoch_seconds: float, phases: dict[str, float]) -> dict[str, Any]:
    """Every identification figure of one method in one run, the curve and histogram for the plots included."""
    scores_np, flipped_np = scores.double().numpy(), is_flipped.numpy()
    _, found = metrics.detection_curve(scores_np, flipped_np)
    grid = np.floor(np.linspace(0, 1, CURVE_POINTS) * len(scores_np) + 1e-9).astype(int)
    precision, recall = metrics.precision_recall(causes.numpy(), flipped_np)
    # Bins over the central 99 % so that a few extreme scores do not squash the rest into one bin.
    low, high = np.quantile(scores_np, [0.005, 0.995])
    edges = np.linspace(low, high if high > low else low + 1.0, HISTOGRAM_BINS + 1)
    clipped = np.clip(scores_np, edges[0], edges[-1])
    return {
        "auroc": metrics.auroc(scores_np, flipped_np),
        "average_precision": metrics.average_precision(scores_np, flipped_np),
        "found_at_20": metrics.found_at_fraction(scores_np, flipped_np, FOUND_AT),
        "causes": len(causes),
        "precision": precision,
        "recall": recall,
        "seconds": seconds,
        "epochs_of_time": seconds / epoch_seconds,
        "phases": phases,
        "curve": found[grid].tolist(),
        "histogram": {"edges": edges.tolist(),
                      "flipped": np.histogram(clipped[flipped_np], edges)[0].tolist(),
                      "clean": np.histogram(clipped[~flipped_np], edges)[0].tolist()},
    }


def query_loaders(validation: Examples, query: Tensor, seed: int) -> tuple[Any, Any, Any]:
    """F_q, F_q without a held-back STOP_FRACTION, and that part (EWC influence's early stopping), as the callback
    splits them."""
    fit_part, stop_part = hold_back(query, STOP_FRACTION, seed)
    return (validation.subset(query).loader(), validation.subset(fit_part).loader(),
            validation.subset(stop_part).loader() if stop_part is not None else None)


def relative_change(model: nn.Module, reference: nn.Module) -> float:
    """‖θ⁻ − θ̂‖ / ‖θ̂‖ over all parameters: 0 when a treatment kept θ̂ (e.g. no Newton step beat it)."""
    with torch.no_grad():
        change = sum(((p - q) ** 2).sum() for p, q in zip(model.parameters(), reference.parameters()))
        size = sum((q ** 2).sum() for q in reference.parameters())
    return math.sqrt(change / size)


def complement(n: int, indices: Tensor) -> Tensor:
    """The indices of range(n) not in ``indices``, sorted."""
    keep = torch.ones(n, dtype=torch.bool)
    keep[indices] = False
    return torch.nonzero(keep).flatten()


def run_setting(protocol: str, regime: Regime, seed: int, options: Options, log: Callable[[str], None],
                rerun: dict[str, Any] | None = None, treatments: tuple[str, ...] = ALL_TREATMENTS) -> dict[str, Any]:
    """One (protocol, regime, seed): references, identification and repair; returns every figure.

    With ``rerun`` (an earlier record of the same run), only ``treatments`` run again, and their rows replace
    those of ``rerun``; everything else is kept from it.
    """
    started = time.perf_counter()
    data = FashionMNISTDataModule(noise=protocol, train_subset=regime.train_subset, seed=seed)
    data.setup("fit")
    train_split, validation, test = (split_tensors(d) for d in (data.train_dataset, data.val_dataset,
                                                                  data.test_dataset))
    n_train = len(train_split)
    is_flipped = torch.zeros(n_train, dtype=torch.bool)
    is_flipped[data.flipped_indices] = True
    tag = f"{protocol}_{regime.name}_seed{seed}_epochs{regime.epochs}"

    log(f"[{tag}] references: noisy and oracle, {regime.epochs} epochs on {n_train:,} images")
    noisy, noisy_info = trained_model(CACHE / f"{tag}_noisy.pt", train_split, regime.epochs, seed)
    oracle, oracle_info = trained_model(CACHE / f"{tag}_oracle.pt", train_split.relabel(data.clean_train_labels),
                                        regime.epochs, seed)
    # The cost unit: one epoch of the same training, timed in this process on a throwaway copy.
    epoch_seconds = train(copy.deepcopy(noisy), train_split, 1, seed)[0]
    fit = predictions(noisy, train_split.x) == train_split.y
    val_predictions = predictions(noisy, validation.x)
    failures = split_failures(val_predictions, validation.y, QUERY_FRACTION, MAX_FAILURES, seed)
    failure_share = (failures.size + failures.dropped) / len(validation)
    record: dict[str, Any] = {
        "protocol": protocol, "regime": regime.name, "seed": seed, "options": options.as_json(),
        "environment": environment(), "epochs": regime.epochs, "n_train": n_train,
        "n_flipped": int(is_flipped.sum()), "epoch_seconds": epoch_seconds,
        "training": {
            "noisy_train_accuracy": fit.double().mean().item(),  # on the noisy labels it was trained on
            "flips_memorised": fit[is_flipped].double().mean().item(),
            "clean_examples_fit": fit[~is_flipped].double().mean().item(),
            "noisy_epoch_seconds": noisy_info["epoch_seconds"], "oracle_epoch_seconds": oracle_info["epoch_seconds"],
            "cached": noisy_info["cached"] and oracle_info["cached"],
        },
        "failures": {"query": len(failures.query), "holdout": len(failures.holdout), "guard": len(failures.guard),
                     "remaining": len(failures.remaining), "dropped": failures.dropped, "share": failure_share},
    }

    adapter = BatchAdapter()
    train_examples = Examples(train_split.dataset(), batch_size=BATCH_SIZE)
    val_examples = Examples(validation.dataset(), batch_size=BATCH_SIZE)
    model = repair_copy(noisy)
    sample = torch.randperm(n_train, generator=torch.Generator().manual_seed(seed))[:FISHER_SAMPLES].sort().values
    with torch.random.fork_rng():  # MC labels of the Fisher, as the callback samples them
        torch.manual_seed(seed)
        clock = Clock()
        fisher = clock.time("fisher", lambda: diagonal_fisher(model, train_examples.subset(sample).loader(),
                                                              options.fisher, adapter))
    fisher_seconds = clock.phases["fisher"]
    record["fisher_seconds"] = fisher_seconds

    query, query_fit, stop = query_loaders(val_examples, failures.query, seed)
    trusted = torch.cat([failures.query, failures.guard]).sort().values  # F_q ∪ R_q, as the callback gives
    identification: dict[str, Any] = {}
    cause_sets: dict[str, Tensor] = {}
    for name, make in SCORERS.items():
        scorer = make()
        log(f"[{tag}] identification: {name}")
        utility = torch.cat([trusted, failures.remaining]).sort().values if name in IDENTIFICATION_ONLY else trusted
        inputs = ScoringInputs(model=repair_copy(noisy), train=train_examples.loader(), query=query, stop=stop,
                               query_fit=query_fit,
                               trusted=val_examples.subset(utility).loader(),
                               fisher=fisher if scorer.needs_fisher else None, n_train=n_train, adapter=adapter,
                               seed=seed)
        clock = Clock({"fisher": fisher_seconds} if scorer.needs_fisher else {})
        scores = clock.time("scoring", lambda: scorer.score(inputs)).double()
        threshold = scorer.threshold_for(scores)
        rule = {"threshold": threshold} if threshold is not None else {"top_fraction": TOP_FRACTION}
        cause_sets[name] = select_causes(scores, **rule)
        identification[name] = identification_record(scores, cause_sets[name], is_flipped,
                                                      sum(clock.phases.values()), epoch_seconds, clock.phases)

    if CLEANLAB in options.cause_sets:
        log(f"[{tag}] identification: cleanlab, {options.folds}-fold cross-validated probabilities")
        folds, cv_cached = cached(CACHE / f"{tag}_cv{options.folds}.pt", lambda: dict(zip(
            ("probabilities", "seconds"),
            cross_validated_probabilities(train_split, options.folds, regime.epochs, seed))))
        clock = Clock({"cross_validation": folds["seconds"]})
        scores, cause_sets[CLEANLAB] = clock.time("find_label_issues",
                                                  lambda: cleanlab_issues(train_split.y, folds["probabilities"]))
        identification[CLEANLAB] = identification_record(scores.double(), cause_sets[CLEANLAB], is_flipped,
                                                          sum(clock.phases.values()), epoch_seconds, clock.phases)
        identification[CLEANLAB]["cross_validation_cached"] = cv_cached
    cause_sets[TRUE_FLIPS] = data.flipped_indices
    record["identification"] = identification
    cause_sets = {name: causes for name, causes in cause_sets.items() if name in options.cause_sets}

    references = {"noisy": evaluate(noisy, validation, test, failures, failure_share),
                  "oracle": evaluate(oracle, validation, test, failures, failure_share)}
    gap = lambda test_accuracy: metrics.gap_closed(test_accuracy, references["noisy"]["test"],  # noqa: E731
                                                   references["oracle"]["test"])
    repairs: dict[str, dict[str, Any]] = {} if rerun is None else rerun["repair"]["runs"]
    query_loader = val_examples.subset(failures.query).loader()
    # The callback's judge: the acceptance rule on F_q and R_q.
    judge = Judge(repair_copy(noisy), query_loader, val_examples.subset(failures.guard).loader(), failure_share,
                  adapter=adapter)
    retrain_for = [name for name in options.retrain_for if regime.retrain_for is None or name in regime.retrain_for]
    for cause_name, causes in cause_sets.items():
        kept = complement(n_train, causes)
        repairs.setdefault(cause_name, {})
        for treatment_name in treatments:
            if ((treatment_name == RETRAIN and cause_name not in retrain_for)
                    or (treatment_name in PAPER_FORMS and cause_name != TRUE_FLIPS)):
                continue
            log(f"[{tag}] repair: {cause_name} × {treatment_name} (|C| = {len(causes):,})")
            start = time.perf_counter()
            moved, chosen = None, None
            if treatment_name == RETRAIN:
                repaired = new_model(seed)
                train(repaired, train_split.subset(kept), regime.epochs, seed)
            else:
                treatment = TREATMENTS[treatment_name](len(kept))
                repaired = repair_copy(noisy)
                generator = torch.Generator().manual_seed(seed)
                choice = treatment.treat(TreatmentInputs(
                    model=repaired, causes=train_examples.subset(causes).loader(shuffle=True, generator=generator),
                    kept=train_examples.subset(kept).loader(shuffle=True, generator=generator),
                    query=query_loader, judge=judge,
                    fisher=fisher if treatment.needs_fisher else None, n_train=n_train, adapter=adapter, seed=seed))
                moved = relative_change(repaired, noisy)
                chosen = None if choice.label is None else float(choice.label)
            seconds = time.perf_counter() - start
            row = evaluate(repaired, validation, test, failures, failure_share)
            repairs[cause_name][treatment_name] = row | {
                "gap_closed": gap(row["test"]), "causes": len(causes), "seconds": seconds,
                "epochs_of_time": seconds / epoch_seconds, "parameter_change": moved, "candidate": chosen}
    record["repair"] = {"references": references, "runs": repairs}
    if rerun is not None:  # keep the earlier identification, timings and memory; only the repairs changed
        rerun["repair"] = record["repair"]
        rerun.setdefault("reruns", []).append({"treatments": list(treatments), "environment": environment()})
        return rerun
    record["peak_memory_mb"] = peak_memory_mb()
    record["wall_seconds"] = time.perf_counter() - started
    return record


def parse_arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.repair", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--protocol", choices=("pairs", "symmetric"), default="pairs", help="label noise")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--regimes", nargs="+", choices=tuple(REGIMES), default=list(REGIMES))
    parser.add_argument("--folds", type=int, default=5, help="cleanlab's cross-validation folds")
    parser.add_argument("--fisher", choices=("mc", "exact", "empirical"), default="mc",
                        help="diagonal Fisher kind (the callback's default: mc; the paper's: empirical)")
    parser.add_argument("--cause-sets", nargs="+", choices=REPAIRED, default=None,
                        help="cause sets to repair (default: all); without cleanlab, no cross-validation runs")
    parser.add_argument("--retrain-for", nargs="*", choices=CAUSE_SETS, default=None,
                        help="cause sets to retrain from scratch without (default: all; the flag alone: none). The 3k "
                             "regimes retrain at most without cleanlab and the true flips")
    parser.add_argument("--epochs", nargs="+", default=[], metavar="REGIME=EPOCHS",
                        help="override a regime's training epochs, e.g. 3k=150 (cached models are per epochs)")
    parser.add_argument("--quick", action="store_true",
                        help="seed 0 of the 3k regime with 3 folds for cleanlab; writes to benchmarks/results/quick")
    parser.add_argument("--out", type=Path, default=None, help="results folder (default: benchmarks/results)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--resume", action="store_true",
                        help="reuse the finished (regime, seed) runs of an earlier, interrupted call")
    parser.add_argument("--rerun", nargs="+", choices=ALL_TREATMENTS, default=None, metavar="TREATMENT",
                        help="in the finished runs of these options, run only these treatments again and replace "
                             "their rows (after a change to them); unfinished runs are left out")
    parser.add_argument("--collect", action="store_true",
                        help="run nothing: write the results from the finished runs of these options only (e.g. "
                             "after several calls ran side by side)")
    args = parser.parse_args(argv)
    if args.quick:
        args.seeds, args.regimes, args.folds = [0], ["3k"], 3
        args.out = args.out or RESULTS / "quick"
    args.out = args.out or RESULTS
    if args.folds < 2:
        parser.error("--folds must be at least 2")
    args.regime_epochs = epoch_overrides(parser, args.epochs, REGIMES)
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_arguments(argv)
    torch.set_num_threads(args.threads)
    options = Options(folds=args.folds, fisher=args.fisher,
                      retrain_for=tuple(CAUSE_SETS if args.retrain_for is None else args.retrain_for),
                      cause_sets=tuple(args.cause_sets or REPAIRED))
    started = time.perf_counter()

    def log(message: str) -> None:
        print(f"{time.perf_counter() - started:7.0f} s  {message}", flush=True)

    regimes = {name: replace(REGIMES[name], epochs=args.regime_epochs.get(name, REGIMES[name].epochs))
               for name in args.regimes}
    config = {"regimes": {name: asdict(regime) for name, regime in regimes.items()}, "seeds": args.seeds,
              "options": options.as_json(), "quick": args.quick, "top_fraction": TOP_FRACTION,
              "query_fraction": QUERY_FRACTION, "max_failures": MAX_FAILURES, "stop_fraction": STOP_FRACTION,
              "fisher_samples": FISHER_SAMPLES, "batch_size": BATCH_SIZE,
              "command": " ".join(["python -m benchmarks.repair", *(argv if argv is not None else sys.argv[1:])])}
    runs = []
    for regime in regimes.values():
        for seed in args.seeds:
            name = f"{args.protocol}_{regime.name}_epochs{regime.epochs}_seed{seed}_{options.key()}.json"
            saved = CACHE / "runs" / name
            if args.rerun and saved.is_file():
                log(f"rerunning {', '.join(args.rerun)} in {saved}")
                runs.append(run_setting(args.protocol, regime, seed, options, log,
                                        rerun=json.loads(saved.read_text()), treatments=tuple(args.rerun)))
                saved.write_text(json.dumps(runs[-1]))
            elif args.rerun:
                log(f"not run yet, left out: {saved}")
                continue
            elif (args.resume or args.collect) and saved.is_file():
                log(f"reusing {saved}")
                runs.append(json.loads(saved.read_text()))
            elif args.collect:
                log(f"not run yet, left out: {saved}")
                continue
            else:
                runs.append(run_setting(args.protocol, regime, seed, options, log))
                saved.parent.mkdir(parents=True, exist_ok=True)
                saved.write_text(json.dumps(runs[-1]))
            try:
                write_results(args.out, args.protocol, config, environment(), runs,
                              wall_seconds=time.perf_counter() - started)
            except Exception as error:  # noqa: BLE001 - the runs are saved; a report bug must not stop them
                log(f"writing the report failed ({error!r}); the runs are in {CACHE / 'runs'}: rerun with --resume")
    log(f"done: {args.out / (args.protocol + '.json')} and {args.out / 'README.md'}")


if __name__ == "__main__":
    main()
