"""End to end: what a fit with ``RepairCallback`` buys over the same fit without it, and over the peers.

``../shared/METHODS.md``, *End-to-end protocol*. For each setting (protocol × regime × seed), every run is one
``Trainer.fit`` of the paper's CNN from the same initial weights, with the same data order and epochs:

- ``plain``: training on the noisy labels; ``oracle``: on the clean labels;
- ``repair``: ``RepairCallback()`` with its defaults, and each configuration the README recommends;
- ``cleanlab``: ``find_label_issues`` on K-fold cross-validated probabilities, then a fit on the kept data;
- ``small_loss``: the single-network Co-teaching schedule, which drops each batch's highest-loss fraction
  τ · min(t / 10, 1) at epoch t, given the true noise rate τ (an advantage the callback does not have).

Each run is a child process of its own (so its peak memory is its own), cached as JSON under
``benchmarks/cache/fit/``; a rerun skips what is cached. Results: ``benchmarks/results/fit.json`` and
``fit.md``, with one plot of validation accuracy per epoch for every setting.

    python -m benchmarks.fit --quick                 # pairs, 3k-mem, seed 0: plain and the defaults side by side
    python -m benchmarks.fit --jobs 2                # everything, two runs at a time, one thread each
    python -m benchmarks.fit --collect               # merge what has finished; run nothing
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field, replace
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor, nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, Dataset, Subset

from benchmarks import metrics
from benchmarks.environment import environment, peak_memory_mb
from benchmarks.report import write_json
from benchmarks.repair import complement
from benchmarks.training import epoch_overrides
from lightning_repair.identify.base import Scorer, ScoringInputs

BENCHMARKS = Path(__file__).resolve().parent
CACHE = BENCHMARKS / "cache" / "fit"
OTHER_MACHINES = "other_machines"  # under the cache: plain fits of other machines, each paired with its own runs
RESULTS = BENCHMARKS / "results"
BATCH_SIZE = 64
VAL_SIZE = 10_000
CLEANLAB_FOLDS = 3
WARMUP_EPOCHS = 10  # Co-teaching's schedule: the dropped share reaches τ at epoch 10


@dataclass(frozen=True)
class FitRegime:
    """A training budget: how many training images, and how many epochs."""

    name: str
    train_subset: int | None
    epochs: int


REGIMES = {"3k-mem": FitRegime("3k-mem", 3000, 150), "50k": FitRegime("50k", None, 10)}
PROTOCOLS = ("pairs", "symmetric")  # METHODS.md's settings, run by default
# Clean labels: what the callback costs a user whose labels have no noise. Its plain fit is the oracle's fit, run
# again beside the callback's; run only when asked (`--protocols none`), reported whenever cached.
CLEAN = "none"


def _repair(scorer: str | None = None, treatment: str | None = None, treatment_settings: dict[str, Any] | None = None,
            scorer_settings: dict[str, Any] | None = None, **settings: Any) -> Callable[[Tensor], list]:
    """The callback with a scorer and treatment named as in ``lightning_repair`` (None: its default; scorer
    ``"FlipOracle"``: a perfect detector of the setting's ``flipped`` examples; ``"TrustedVote"``: the candidate of
    ``benchmarks.knn_k_probe``), their settings and the callback's other settings as given."""
    def callbacks(flipped: Tensor) -> list:
        from lightning_repair import RepairCallback, identify, treat

        arguments = dict(settings)
        if scorer == "FlipOracle":
            arguments["scorer"] = FlipOracle(flipped=flipped)
        elif scorer == "TrustedVote":
            from benchmarks.knn_k_probe import TrustedVote
            arguments["scorer"] = TrustedVote(**(scorer_settings or {}))
        elif scorer is not None:
            arguments["scorer"] = getattr(identify, scorer)(**(scorer_settings or {}))
        if treatment is not None:
            arguments["treatment"] = getattr(treat, treatment)(**(treatment_settings or {}))
        return [RepairCallback(**arguments)]
    return callbacks


@dataclass(kw_only=True)
class FlipOracle(Scorer):
    """Benchmark only: a perfect detector, which scores the recorded flips 1 and every other example 0, so that the
    callback's own rule (score > 0.5) takes exactly the flips still in training. With the callback's default
    schedule, treatment and acceptance rule it shows what they make of a perfect cause set."""

    flipped: Tensor = field(repr=False)
    natural_threshold = 0.5

    def score(self, inputs: ScoringInputs) -> Tensor:
        indices = torch.as_tensor(inputs.train.dataset.indices)  # the round scores a Subset of the training set
        return torch.isin(indices, self.flipped).float()


# The callback's defaults when `removal_margin` and KNN-Shapley's `harm_margin` were added, and until `Exclude`
# became the default treatment: every run named before then pins them, so that it keeps its meaning, and its cached
# fits, when a default changes.
EARLIER_DEFAULTS: dict[str, Any] = {"scorer": "KNNShapley", "scorer_settings": {"utility": "trusted"},
                                    "treatment": "Finetune", "removal_margin": None}
HARM_MARGIN_1 = {"utility": "trusted", "harm_margin": 1.0}  # KNN-Shapley's stricter rule: value < −1 × mean value


def _earlier(**settings: Any) -> Callable[[Tensor], list]:
    """:func:`_repair` with the earlier defaults wherever ``settings`` do not say otherwise."""
    pinned = {**EARLIER_DEFAULTS, **settings}
    if "scorer" in settings:  # a scorer of its own brings its own settings
        pinned["scorer_settings"] = settings.get("scorer_settings")
    return _repair(**pinned)


# The callback's runs: its defaults, each configuration the README recommends, the other treatments, and the
# variants the defaults were chosen against (each names its treatment and start, so it keeps its meaning when a
# default changes).
REPAIR_RUNS: dict[str, Callable[[Tensor], list]] = {
    "repair": _repair(),
    "repair_finetune": _earlier(),  # the defaults before Exclude: fine-tuning on D \ C, value < 0
    "repair_no_control": _earlier(control_margin=None),  # the defaults before the control fine-tune
    "repair_start_1": _earlier(start_epoch=1),  # the defaults before the earliest start became epoch 3 (`50k`)
    "repair_control_margin_2": _earlier(control_margin=2.0),
    "repair_ewc": _earlier(treatment="EWCUnlearning"),
    "repair_ewc_start_1": _earlier(treatment="EWCUnlearning", start_epoch=1),  # the defaults before Finetune
    "repair_newton": _earlier(treatment="NewtonRemoval"),
    "repair_trusted_vote": _repair(scorer="TrustedVote", treatment="Exclude"),  # a candidate scorer, benchmark only
    "repair_energy_alignment": _earlier(treatment="EnergyAlignment"),
    "repair_best_of": _earlier(treatment="BestOf"),
    "repair_training_loss_finetune": _earlier(scorer="TrainingLoss", treatment="Finetune"),
    "repair_training_loss_finetune_no_control": _earlier(scorer="TrainingLoss", treatment="Finetune",
                                                        control_margin=None),
    "repair_margin_1": _earlier(treatment="EWCUnlearning", start_epoch=1, acceptance_margin=1.0),
    "repair_start_15": _earlier(treatment="EWCUnlearning", start_epoch=15),
    "repair_start_31": _earlier(treatment="EWCUnlearning", start_epoch=31),
    # Bounds, not methods: the defaults given a perfect detector, without their gate, and with a gentler fine-tune
    # (fresh Adam's first steps move every weight by about lr).
    "repair_flip_oracle": _earlier(scorer="FlipOracle"),
    "repair_flip_oracle_no_rollback": _earlier(scorer="FlipOracle", rollback=False),  # what the gate costs
    "repair_flip_oracle_finetune_lr_1e-4": _earlier(scorer="FlipOracle", treatment="Finetune",
                                                    treatment_settings={"lr": 1e-4}),
    "repair_no_rollback": _earlier(rollback=False),  # the defaults' own causes, kept whatever the gate would say
    "repair_finetune_head": _earlier(treatment="Finetune", treatment_settings={"modules": None}),  # a cheaper round
    # KNN-Shapley's causes: value < −1 × the mean value instead of value < 0 (fewer clean examples near failures)
    "repair_harm_margin_1": _earlier(scorer="KNNShapley", scorer_settings=HARM_MARGIN_1),
    "repair_harm_margin_1_no_rollback": _earlier(scorer="KNNShapley", scorer_settings=HARM_MARGIN_1, rollback=False),
    # A rolled-back round's weights return to θ̂, but its causes stay out unless the repair hurt beyond 2 SE.
    "repair_removal_margin_2": _earlier(removal_margin=2.0),
    "repair_harm_margin_1_removal_margin_2": _earlier(scorer="KNNShapley", scorer_settings=HARM_MARGIN_1,
                                                      removal_margin=2.0),
}

SHARED_RUNS = ("oracle",)  # runs on the clean labels: one per regime and seed serves both protocols
# Most informative first: when a budget runs out, the comparisons that matter most are done.
RUNS = ("plain", "repair", "oracle", "small_loss", "cleanlab", *[r for r in REPAIR_RUNS if r != "repair"],
        "oracle_removal")
LABELS = {"plain": "plain training", "oracle": "oracle (clean labels)", "repair": "RepairCallback() defaults",
          "oracle_removal": "oracle removal (D without its flips, from the start)",
          "repair_flip_oracle": "RepairCallback(scorer=a perfect detector), defaults otherwise",
          "repair_flip_oracle_no_rollback": "RepairCallback(scorer=a perfect detector, rollback=False)",
          "repair_no_rollback": "RepairCallback(rollback=False)",
          "repair_harm_margin_1": "RepairCallback(scorer=KNNShapley(utility='trusted', harm_margin=1))",
          "repair_harm_margin_1_no_rollback": "RepairCallback(scorer=KNNShapley(utility='trusted', harm_margin=1), "
                                              "rollback=False)",
          "repair_removal_margin_2": "RepairCallback(removal_margin=2)",
          "repair_harm_margin_1_removal_margin_2": "RepairCallback(scorer=KNNShapley(utility='trusted', "
                                                   "harm_margin=1), removal_margin=2)",
          "repair_finetune": "RepairCallback(scorer=KNNShapley(utility='trusted'), treatment=Finetune()), the defaults "
                             "before Exclude",
          "repair_finetune_head": "RepairCallback(treatment=Finetune(modules=None)), the head alone",
          "repair_flip_oracle_finetune_lr_1e-4": "RepairCallback(scorer=a perfect detector, "
                                                 "treatment=Finetune(lr=1e-4))",
          "repair_no_control": "RepairCallback(control_margin=None), the defaults before the control",
          "repair_control_margin_2": "RepairCallback(control_margin=2)",
          "repair_ewc": "RepairCallback(treatment=EWCUnlearning())",
          "repair_ewc_start_1": "RepairCallback(treatment=EWCUnlearning(), start_epoch=1), the earlier defaults",
          "repair_newton": "RepairCallback(treatment=NewtonRemoval())",
          "repair_trusted_vote": "RepairCallback(scorer=the trusted points' vote (k=50, more than 90 % disagree), "
                                 "treatment=Exclude()), benchmark only",
          "repair_energy_alignment": "RepairCallback(treatment=EnergyAlignment())",
          "repair_best_of": "RepairCallback(treatment=BestOf())",
          "repair_training_loss_finetune": "RepairCallback(scorer=TrainingLoss(), treatment=Finetune())",
          "repair_training_loss_finetune_no_control": "RepairCallback(scorer=TrainingLoss(), treatment=Finetune(), "
                                                      "control_margin=None)",
          "repair_margin_1": "RepairCallback(treatment=EWCUnlearning(), start_epoch=1, acceptance_margin=1)",
          "repair_start_15": "RepairCallback(treatment=EWCUnlearning(), start_epoch=15)",
          "repair_start_31": "RepairCallback(treatment=EWCUnlearning(), start_epoch=31)",
          "repair_start_1": "RepairCallback(start_epoch=1), the defaults before the later start",
          "cleanlab": f"cleanlab ({CLEANLAB_FOLDS}-fold) + retrain", "small_loss": "small-loss selection (true τ)"}


@dataclass(frozen=True)
class Setting:
    protocol: str
    regime: str
    seed: int
    epochs: int

    @property
    def tag(self) -> str:
        return f"{self.protocol}_{self.regime}_epochs{self.epochs}_seed{self.seed}"


# ---- the runs, each in its own process ----------------------------------------------------------------------


class EpochHistory(Callback):
    """Validation accuracy after every epoch's validation (before that epoch's repair round, if any)."""

    def __init__(self) -> None:
        self.validation_accuracy: list[float] = []

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.sanity_checking:
            self.validation_accuracy.append(float(trainer.callback_metrics["val/acc"]))


class Indexed(Dataset):
    """(x, y, index) from a dataset of (x, y): lets small-loss selection record what it dropped."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> tuple[Tensor, int, int]:
        x, y = self.dataset[index]
        return x, y, index


def small_loss_keep(losses: Tensor, forget_rate: float, epoch: int, warmup_epochs: int = WARMUP_EPOCHS) -> Tensor:
    """Positions of the batch's examples small-loss selection trains on at ``epoch`` (0-based).

    Co-teaching's schedule for one network: drop the highest-loss share τ · min(t / warmup, 1), t = epoch + 1
    epochs seen, of every batch (Han et al. 2018, with the single-network form of their ablation).
    """
    dropped_share = forget_rate * min((epoch + 1) / warmup_epochs, 1.0)
    keep = len(losses) - int(round(dropped_share * len(losses)))
    return torch.argsort(losses, stable=True)[:max(keep, 1)]


def _small_loss_module(forget_rate: float):
    from lightning_repair.models import ImageClassifier

    class SmallLossClassifier(ImageClassifier):
        """The paper CNN trained on each batch's small-loss share; records what the last epoch dropped."""

        def __init__(self) -> None:
            super().__init__()
            self.dropped: set[int] = set()

        def on_train_epoch_start(self) -> None:
            self.dropped = set()

        def training_step(self, batch, batch_idx):
            x, y, index = batch
            losses = F.cross_entropy(self(x), y, reduction="none")
            keep = small_loss_keep(losses.detach(), forget_rate, self.current_epoch)
            kept = torch.zeros_like(y, dtype=torch.bool)
            kept[keep] = True
            self.dropped.update(index[~kept].tolist())
            loss = losses[keep].mean()
            self.log("train/loss", loss, on_epoch=True)
            return loss

    return SmallLossClassifier()


def _datamodule(setting: Setting, noise: str, kept: Tensor | None = None, indexed: bool = False):
    from lightning_repair.data import FashionMNISTDataModule

    class BenchmarkData(FashionMNISTDataModule):
        """Fashion-MNIST as the callback sees it, optionally restricted to kept training examples."""

        def train_dataloader(self) -> DataLoader:
            dataset: Dataset = self.train_dataset
            if kept is not None:
                dataset = Subset(dataset, kept.tolist())
            if indexed:
                dataset = Indexed(dataset)
            return DataLoader(dataset, batch_size=self.batch_size, shuffle=True)

    regime = REGIMES[setting.regime]
    data = BenchmarkData(noise=noise, train_subset=regime.train_subset, seed=setting.seed, batch_size=BATCH_SIZE,
                         val_size=VAL_SIZE)
    data.setup("fit")
    return data


def _fit(setting: Setting, data, model, callbacks: list, root: Path, validate: bool = True
         ) -> tuple[list[float], float]:
    """``Trainer.fit`` from the setting's seed; returns validation accuracy per epoch and wall seconds."""
    history = EpochHistory()
    trainer = pl.Trainer(max_epochs=setting.epochs, accelerator="auto", devices=1, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[*callbacks, history], default_root_dir=root,
                         limit_val_batches=1.0 if validate else 0, num_sanity_val_steps=0)
    start = time.perf_counter()
    trainer.fit(model, datamodule=data)
    return history.validation_accuracy, time.perf_counter() - start


def _cross_validated_probabilities(setting: Setting, noisy, root: Path) -> Tensor:
    """Out-of-fold softmax probabilities of every training example: K fits like the plain one, on K − 1 folds."""
    from sklearn.model_selection import StratifiedKFold

    labels = noisy.train_dataset.labels
    splitter = StratifiedKFold(n_splits=CLEANLAB_FOLDS, shuffle=True, random_state=setting.seed)
    result = torch.zeros(len(labels), 10)
    for fit_part, held in splitter.split(torch.zeros(len(labels)).numpy(), labels.numpy()):
        model = _new_classifier(setting.seed)
        _fit(setting, _datamodule(setting, setting.protocol, kept=torch.from_numpy(fit_part)), model, [], root,
             validate=False)
        model.eval()
        device = next(model.parameters()).device
        with torch.no_grad():
            for chunk in torch.from_numpy(held).split(1000):
                x = torch.stack([noisy.train_dataset[int(i)][0] for i in chunk]).to(device)
                result[chunk] = model(x).softmax(dim=1).cpu()
    return result


@torch.no_grad()
def _test_accuracy(model: nn.Module, data) -> float:
    model.eval()
    device = next(model.parameters()).device
    right = total = 0
    for x, y in DataLoader(data.test_dataset, batch_size=1000):
        right += int((model(x.to(device)).argmax(1).cpu() == y).sum())
        total += len(y)
    return right / total


def _new_classifier(seed: int):
    """The paper CNN with the setting's initial weights (the same for every run of a setting)."""
    from lightning_repair.models import ImageClassifier

    pl.seed_everything(seed, workers=True, verbose=False)
    return ImageClassifier()


def _retrain_without(setting: Setting, removed: Tensor, n_train: int, root: Path) -> tuple[nn.Module, list[float],
                                                                                       float]:
    """A fresh classifier (the setting's initial weights) fit on the noisy D without ``removed``."""
    model = _new_classifier(setting.seed)
    kept = complement(n_train, removed)
    history, seconds = _fit(setting, _datamodule(setting, setting.protocol, kept=kept), model, [], root)
    return model, history, seconds


def run_one(setting: Setting, run: str, threads: int) -> dict[str, Any]:
    """One run of one setting, in this process; returns its figures."""
    torch.set_num_threads(threads)
    noisy = _datamodule(setting, setting.protocol)
    flipped = noisy.flipped_indices
    removed: Tensor | None = None
    extra_seconds = 0.0
    details: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as root:
        if run == "small_loss":
            forget_rate = len(flipped) / len(noisy.train_dataset)
            pl.seed_everything(setting.seed, workers=True, verbose=False)
            model = _small_loss_module(forget_rate)
            data = _datamodule(setting, setting.protocol, indexed=True)
            history, seconds = _fit(setting, data, model, [], Path(root))
            removed = torch.tensor(sorted(model.dropped), dtype=torch.long)
            details["forget_rate"] = forget_rate
        elif run == "cleanlab":
            from benchmarks.peers import cleanlab_issues

            start = time.perf_counter()
            probabilities = _cross_validated_probabilities(setting, noisy, Path(root))
            labels = noisy.train_dataset.labels
            _, removed = cleanlab_issues(labels, probabilities)
            extra_seconds = time.perf_counter() - start
            model, history, seconds = _retrain_without(setting, removed, len(labels), Path(root))
            details["cross_validation_seconds"] = extra_seconds
        elif run == "oracle_removal":  # what removing data can buy at best: exactly the flips, before epoch 0
            removed = flipped
            model, history, seconds = _retrain_without(setting, removed, len(noisy.train_dataset), Path(root))
        else:
            data = _datamodule(setting, "none") if run == "oracle" else noisy
            model = _new_classifier(setting.seed)
            callbacks = REPAIR_RUNS[run](flipped) if run in REPAIR_RUNS else []
            history, seconds = _fit(setting, data, model, callbacks, Path(root))
            if callbacks:
                callback = callbacks[0]
                removed = torch.tensor(callback.removed_indices, dtype=torch.long)
                details["rounds"] = [_round_summary(r) for r in callback.rounds]
        test = _test_accuracy(model, noisy)
    record: dict[str, Any] = {
        "setting": asdict(setting), "run": run, "epochs": setting.epochs,
        "n_train": len(noisy.train_dataset), "n_flipped": len(flipped), "test": test,
        "validation_accuracy": history, "seconds": seconds + extra_seconds, "peak_memory_mb": _peak_memory_mb(),
        "environment": environment(), **details}
    if removed is not None:
        is_flipped = torch.zeros(len(noisy.train_dataset), dtype=torch.bool)
        is_flipped[flipped] = True
        precision, recall = metrics.precision_recall(removed.numpy(), is_flipped.numpy())
        record.update(removed=len(removed), precision=precision, recall=recall)  # NaN (null) when none removed
    return record


def _round_summary(record: dict[str, Any]) -> dict[str, Any]:
    keys = ("round", "epoch", "failures", "causes", "removed", "accepted", "gain", "gain_standard_error",
            "control_gain", "control_gain_standard_error", "rollback", "precision", "seconds_total", "skipped")
    return {key: record.get(key) for key in keys}


def _peak_memory_mb() -> float:
    """The GPU's peak allocation on CUDA, the process's peak resident memory on the CPU."""
    return torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else peak_memory_mb()


def _run_and_cache(setting: Setting, run: str, threads: int, path: Path) -> str:
    record = run_one(setting, run, threads)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, record)
    return f"{setting.tag} {run}: test {record['test']:.4f}, {record['seconds']:.0f} s"


# ---- orchestration ------------------------------------------------------------------------------------------


def cache_path(setting: Setting, run: str, cache: Path = CACHE) -> Path:
    return cache / f"{setting.tag}_{run}.json"


def cached(setting: Setting, run: str, cache: Path = CACHE) -> Path | None:
    """The cached result of ``run`` in ``setting``, or None. The oracle trains on the clean labels, so the protocol
    does not enter it (same initial weights and data order per seed): either protocol's oracle serves both."""
    shared = [replace(setting, protocol=p) for p in PROTOCOLS if p != setting.protocol] if run in SHARED_RUNS else []
    return next((path for path in (cache_path(s, run, cache) for s in [setting, *shared]) if path.exists()), None)


def settings_of(arguments: argparse.Namespace) -> list[Setting]:
    return [Setting(p, r, s, arguments.regime_epochs.get(r, REGIMES[r].epochs))
            for p in arguments.protocols for r in arguments.regimes for s in arguments.seeds]


def run_all(settings: list[Setting], runs: list[str], jobs: int, threads: int, log: Callable[[str], None],
            cache: Path = CACHE) -> None:
    """Runs what is not cached yet, ``jobs`` at a time, each in a fresh process."""
    # Seed by seed, and within a seed run by run: what finishes first is a complete comparison.
    todo = [(s, r) for seed in sorted({s.seed for s in settings}) for r in runs for s in settings
            if s.seed == seed and cached(s, r, cache) is None]
    log(f"{len(todo)} runs to do, {jobs} at a time")
    context = get_context("spawn")
    with ProcessPoolExecutor(max_workers=jobs, mp_context=context, max_tasks_per_child=1) as pool:
        futures = {pool.submit(_run_and_cache, s, r, threads, cache_path(s, r, cache)): (s, r) for s, r in todo}
        for future in as_completed(futures):
            setting, run = futures[future]
            try:
                log(future.result())
            except Exception as error:  # noqa: BLE001 - report, and let the other runs finish
                log(f"{setting.tag} {run} FAILED: {type(error).__name__}: {error}")


def collect(settings: list[Setting], runs: list[str], cache: Path = CACHE) -> list[dict[str, Any]]:
    """Every cached run of ``settings``; an oracle run shared from the other protocol is filed under this one, and
    says so in ``shared_from``. A run whose machine is not the plain fit's gets ``paired_plain``: the plain fit of
    its own machine, from ``<cache>/other_machines/``, where one ran."""
    records = []
    for setting in settings:
        found = []
        for run in runs:
            if setting.protocol == CLEAN and run in SHARED_RUNS:
                continue  # with clean labels plain training is the oracle's fit: no gap to close
            path = cached(setting, run, cache)
            if path is None:
                continue
            record = json.loads(path.read_text())
            if record["setting"]["protocol"] != setting.protocol:
                record["shared_from"] = record["setting"]["protocol"]
                record["setting"] = {**record["setting"], "protocol": setting.protocol}
            found.append(record)
        _pair_with_own_machine(found, cache / OTHER_MACHINES, setting)
        records += found
    return records


def _pair_with_own_machine(records: list[dict[str, Any]], others: Path, setting: Setting) -> None:
    """Gives each run of one setting and seed whose machine is not its plain fit's the plain fit of its own machine
    (``paired_plain``), from ``others``, where one ran."""
    from benchmarks.fit_report import machine

    plain = next((record for record in records if record["run"] == "plain"), None)
    own = {machine(other): other
           for other in (json.loads(path.read_text()) for path in sorted(others.glob(f"{setting.tag}_plain*.json")))}
    for record in records:
        if plain is not None and record is not plain and machine(record) in own and machine(record) != machine(plain):
            record["paired_plain"] = {key: own[machine(record)][key] for key in ("test", "seconds", "environment",
                                                                               "validation_accuracy")
                                      if key in own[machine(record)]}


def parse_arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--protocols", nargs="+", choices=(*PROTOCOLS, CLEAN), default=None,
                        help=f"default {' '.join(PROTOCOLS)}; with --collect also {CLEAN} (clean labels)")
    parser.add_argument("--regimes", nargs="+", choices=tuple(REGIMES), default=list(REGIMES))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--runs", nargs="+", choices=RUNS, default=list(RUNS), help="in this order")
    parser.add_argument("--quick", action="store_true",
                        help="pairs, 3k-mem, seed 0: plain training and the callback's defaults only")
    parser.add_argument("--jobs", type=int, default=None,
                        help="runs at a time, each in its own process (default 1; 2 with --quick)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run")
    parser.add_argument("--epochs", nargs="+", default=[], metavar="REGIME=EPOCHS",
                        help="override a regime's epochs, e.g. 3k-mem=4 for a smoke run (cached apart)")
    parser.add_argument("--collect", action="store_true", help="merge the cached runs; run nothing")
    parser.add_argument("--out", type=Path, default=RESULTS, help="where fit.md, fit.json and the plots go")
    parser.add_argument("--cache", type=Path, default=CACHE, help="one JSON file per finished run")
    arguments = parser.parse_args(argv)
    arguments.regime_epochs = epoch_overrides(parser, arguments.epochs, REGIMES)
    if arguments.protocols is None:
        arguments.protocols = [*PROTOCOLS, CLEAN] if arguments.collect else list(PROTOCOLS)
    if arguments.quick:
        arguments.protocols, arguments.regimes, arguments.seeds = ["pairs"], ["3k-mem"], [0]
        arguments.runs = ["plain", "repair"]
    if arguments.jobs is None:  # --quick's two fits side by side, one thread each: about 20 minutes on 2 cores
        arguments.jobs = 2 if arguments.quick else 1
    return arguments


def main(argv: list[str] | None = None) -> None:
    from benchmarks.fit_report import write_fit_results

    arguments = parse_arguments(argv)
    settings = settings_of(arguments)
    log = lambda message: print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)  # noqa
    if not arguments.collect:
        run_all(settings, arguments.runs, arguments.jobs, arguments.threads, log, arguments.cache)
    records = collect(settings, arguments.runs if arguments.quick else list(RUNS), arguments.cache)
    if not records:
        log("no finished runs to report")
        return
    write_fit_results(records, arguments.out)
    log(f"wrote {arguments.out / 'fit.md'} from {len(records)} runs")


if __name__ == "__main__":
    main()
