"""RepairCallback: repair a classifier between epochs, and train on without the causes of its failures."""

from __future__ import annotations

import math
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor
from torch.nn import functional as F
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from lightning_repair.acceptance import DEFAULT_MARGIN, Judge, Verdict, compare
from lightning_repair.adapter import BatchAdapter
from lightning_repair.curvature import (BACKENDS, FISHER_KINDS, FisherKind, choose_backend, diagonal_fisher,
                                       forked_rng)
from lightning_repair.distributed import broadcast_parameters, gather_sharded, sum_across_ranks
from lightning_repair.examples import Examples
from lightning_repair.exclusion import exclude_from
from lightning_repair.failures import FailureSet, accuracy, hold_back, predict, split_failures
from lightning_repair.identify import KNNShapley, Scorer, ScoringInputs
from lightning_repair.params import copy_parameters_, repair_copy
from lightning_repair.report import RoundRecord, format_table, precision, round_metrics, write_suspects
from lightning_repair.selection import check_selection, select_causes
from lightning_repair.treat import EWCUnlearning, Treatment, TreatmentInputs

DEFAULT_TOP_FRACTION = 0.01


class RepairCallback(Callback):
    r"""Repairs a classifier during ``Trainer.fit``: after a validation, it finds the validation examples the
    model gets wrong (F), ranks the training set by how much each example caused them, unlearns the top causes
    C, and training goes on without C.

    Each round: failure set F = F_q ∪ F_h from the validation data (only F_q is used; F_h and R = V \ F are
    measured) → diagonal Fisher (BackPACK) → scores → C → treatment → report. Removal is cumulative: an
    example is removed at most once and never drawn again by the training DataLoader.

    Args:
        scorer: identification method; default ``KNNShapley(utility="trusted")``, the best-ranking scorer in every
            setting of the benchmark (the paper's EWC influence ranks flips near chance with class-pair noise).
        treatment: treatment method; default :class:`~lightning_repair.treat.EWCUnlearning`.
        every_n_epochs: repair after every this many epochs; None (default): after ever longer gaps, each twice the
            one before, so rounds follow (start_epoch + 1) · 2^k epochs: 2, 4, 8, 16, … epochs with the default
            start — 2 rounds in a 5-epoch fit, 7 in a 150-epoch one. A round that falls on an epoch without
            validation runs at the next validation.
        start_epoch: the first epoch (0-based, as ``trainer.current_epoch``) after whose validation to repair.
        top_k: remove the k highest-scored examples per round.
        top_fraction: remove this fraction of the training set per round.
        threshold: remove every example scoring above this (the paper's rule: 0).
            Give at most one of ``top_k``, ``top_fraction``, ``threshold``; with none, the scorer's own rule
            (KNN-Shapley: value < 0) or ``top_fraction=0.01``.
        fisher: diagonal Fisher kind: ``"mc"`` (sampled labels, default), ``"exact"`` or ``"empirical"``.
        fisher_samples: training examples the Fisher averages over.
        curvature: how per-example gradients and the Fisher are computed: ``"auto"`` (default) tries BackPACK on
            one batch in the first round and falls back to ``torch.func`` where BackPACK cannot follow the model
            (residual additions, functional calls, ``x.view``, attention), logging which and why;
            ``"backpack"`` or ``"torch_func"`` force one.
        query_fraction: share of the failures in F_q; the rest, F_h, is only measured.
        max_failures: keep at most this many failures per round (a seeded random subset).
        stop_fraction: share of F_q that EWC influence holds back to early-stop its fit to the failures; every
            other method reads all of F_q.
        params: names of submodules the Fisher, scores and treatment are restricted to (e.g. ``["net.9"]``);
            default all trainable parameters.
        batch_size: batch size of the repair passes; default the training DataLoader's.
        adapter: how to read inputs, labels and logits; default handles ``(x, y)`` and dict batches.
        suspects_to_report: rows of each round's suspects CSV (the causes are always included).
        rollback: keep a round only when the acceptance rule accepts it on the parts no method read, F_h and R
            (estimated validation accuracy rises by more than ``acceptance_margin`` paired standard errors);
            otherwise roll it back: keep θ̂ and put C back into training. False keeps every treated round.
        acceptance_margin: paired standard errors by which a repair must raise estimated validation accuracy,
            both when a treatment chooses among its candidates (on F_q and R_q) and for the rollback.
        max_remaining_drop: an optional extra cap: also reject repairs that lower accuracy on R (R_q for the
            treatments' candidates) by more than this. None (default) sets no cap; θ̂ scores 1.0 on R by
            construction, so a tight cap rejects every repair that trades a few right answers for many fixes.
        report: also write, per round, PNG figures (top suspects with given → predicted labels, score histogram,
            accuracy before/after, and the detection curve when the data module has ``flipped_indices``) and a
            Markdown page beside the CSV; the suspects grid also goes to loggers that take images (TensorBoard).
        report_images: suspects shown in the report's image grid.
        seed: seed of the failure split, Fisher sampling and random scores; each round adds its number.

    Example::

        trainer = Trainer(max_epochs=10, callbacks=[RepairCallback()])
        trainer.fit(model, datamodule)
        callback.removed_indices, callback.rounds
    """

    def __init__(
        self,
        scorer: Scorer | None = None,
        treatment: Treatment | None = None,
        every_n_epochs: int | None = None,
        start_epoch: int = 1,
        top_k: int | None = None,
        top_fraction: float | None = None,
        threshold: float | None = None,
        fisher: FisherKind = "mc",
        fisher_samples: int = 1000,
        curvature: Literal["auto", "backpack", "torch_func"] = "auto",
        query_fraction: float = 0.5,
        max_failures: int | None = 2000,
        stop_fraction: float = 0.1,
        params: list[str] | None = None,
        batch_size: int | None = None,
        adapter: BatchAdapter | None = None,
        suspects_to_report: int = 500,
        rollback: bool = True,
        acceptance_margin: float = DEFAULT_MARGIN,
        max_remaining_drop: float | None = None,
        report: bool = False,
        report_images: int = 32,
        seed: int = 0,
    ) -> None:
        check_selection(top_k, top_fraction, threshold)
        if (every_n_epochs is not None and every_n_epochs < 1) or start_epoch < 0:
            raise ValueError(f"every_n_epochs must be ≥ 1 and start_epoch ≥ 0, got {every_n_epochs}, {start_epoch}.")
        if fisher not in FISHER_KINDS:
            raise ValueError(f"fisher must be one of {FISHER_KINDS}, got {fisher!r}.")
        if curvature not in ("auto", *BACKENDS):
            raise ValueError(f"curvature must be 'auto' or one of {BACKENDS}, got {curvature!r}.")
        if fisher_samples < 1 or (max_failures is not None and max_failures < 1):
            raise ValueError("fisher_samples and max_failures must be ≥ 1.")
        if not 0.0 <= stop_fraction < 1.0:
            raise ValueError(f"stop_fraction must be in [0, 1), got {stop_fraction}.")
        if not 0.0 < query_fraction <= 1.0:
            raise ValueError(f"query_fraction must be in (0, 1], got {query_fraction}.")
        self.scorer = scorer or KNNShapley(utility="trusted")
        self.treatment = treatment or EWCUnlearning()
        self.every_n_epochs, self.start_epoch = every_n_epochs, start_epoch
        self.selection = self._selection(top_k, top_fraction, threshold)
        self.fisher, self.fisher_samples, self.curvature = fisher, fisher_samples, curvature
        self._backend: str | None = None if curvature == "auto" else curvature
        self.query_fraction, self.max_failures, self.stop_fraction = query_fraction, max_failures, stop_fraction
        self.params, self.batch_size = params, batch_size
        self.adapter = adapter or BatchAdapter()
        if max_remaining_drop is not None and not 0.0 <= max_remaining_drop <= 1.0:
            raise ValueError(f"max_remaining_drop must be in [0, 1] or None, got {max_remaining_drop}.")
        if acceptance_margin < 0:
            raise ValueError(f"acceptance_margin must be ≥ 0 standard errors, got {acceptance_margin}.")
        if rollback and query_fraction == 1.0:
            raise ValueError("query_fraction=1.0 leaves no held-out failures F_h, and without them no repair can be "
                             "shown to raise validation accuracy, so every round would roll back. Use "
                             "query_fraction < 1 (default 0.5), or rollback=False to keep every treated round.")
        self.rollback, self.acceptance_margin = rollback, acceptance_margin
        self.suspects_to_report, self.max_remaining_drop, self.seed = suspects_to_report, max_remaining_drop, seed
        self.report, self.report_images = report, report_images
        self.rounds: list[RoundRecord] = []
        self._removed: set[int] = set()
        self._loss_unwarned, self._loss_batch, self._training_loss = True, None, None

    # ---- public state -------------------------------------------------------------------------------------

    @property
    def removed_indices(self) -> list[int]:
        """Sorted training-dataset indices removed so far."""
        return sorted(self._removed)

    @property
    def state_key(self) -> str:
        """Built from the arguments, as Lightning's own callbacks do: two repair callbacks keep two states."""
        return self._generate_state_key(scorer=repr(self.scorer), treatment=repr(self.treatment), seed=self.seed,
                                        start_epoch=self.start_epoch, every_n_epochs=self.every_n_epochs)

    @property
    def _legacy_state_key(self) -> str:
        return type(self).__qualname__  # checkpoints written before the state key had arguments

    def state_dict(self) -> dict[str, Any]:
        return {"removed_indices": self.removed_indices, "rounds": [dict(r) for r in self.rounds]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._removed.clear()  # in place: the training sampler holds this very set
        self._removed.update(int(i) for i in state_dict["removed_indices"])
        self.rounds = [dict(r) for r in state_dict["rounds"]]

    # ---- Lightning hooks ----------------------------------------------------------------------------------

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        loader = self._train_loader(trainer)
        Examples.from_dataloader(loader, "training")  # fail now, not after an epoch, on an unusable loader
        exclude_from(loader, self._removed, self.seed)  # before the first batch is drawn, also when resuming

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # A reloaded DataLoader (`reload_dataloaders_every_n_epochs`) needs the filter again.
        exclude_from(self._train_loader(trainer), self._removed, self.seed)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        # Each epoch's first batch checks the loss against cross-entropy, until one warning has been given.
        self._loss_batch = batch if batch_idx == 0 and self._loss_unwarned else None

    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: Tensor) -> None:
        if self._loss_batch is not None and loss.numel() == 1:
            # Lightning divides the loss by `accumulate_grad_batches` before the backward pass.
            self._training_loss = float(loss.detach()) * trainer.accumulate_grad_batches

    def on_after_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # After the backward pass: the check's forward pass must not touch tensors the user's graph saved.
        if self._loss_batch is not None and self._training_loss is not None:
            self._loss_unwarned = check_cross_entropy(pl_module, self._loss_batch, self._training_loss, self.adapter)
        self._loss_batch, self._training_loss = None, None

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        stopped_early = trainer.should_stop or 0 <= trainer.max_steps <= trainer.global_step
        owed_since = self._owed_since(trainer.current_epoch)
        validation_gap = trainer.check_val_every_n_epoch or 1
        if owed_since is not None and trainer.current_epoch - owed_since + 1 >= validation_gap and not stopped_early:
            raise RuntimeError(
                f"RepairCallback was due to repair after epoch {owed_since}, but no validation has run since. It "
                "needs a validation DataLoader (failures come from validation data only) and validation runs "
                "during fit: define `val_dataloader()` and `validation_step`, and keep `limit_val_batches` > 0.")

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or trainer.state.fn != "fit" or not self._due(trainer.current_epoch):
            return
        # Validation runs under inference mode; the repair needs gradients. The round draws random numbers (loader
        # seeds, MC labels); the user's RNG streams go on as if it had not run, so a rolled-back round changes
        # nothing, not even the order of the next epoch's batches.
        with forked_rng(pl_module), torch.inference_mode(False), torch.enable_grad():
            record = self._repair(trainer, pl_module)
        self.rounds.append(record)
        for logger in trainer.loggers:
            logger.log_metrics(round_metrics(record), step=trainer.global_step)
        rank_zero_info(f"RepairCallback round {record['round']}:\n{format_table([record])}")

    # ---- one round ----------------------------------------------------------------------------------------

    def _repair(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> RoundRecord:
        round_number = len(self.rounds) + 1
        seed = self.seed + round_number
        train = Examples.from_dataloader(self._train_loader(trainer), "training", self.batch_size)
        validation = Examples.from_dataloader(self._val_loader(trainer), "validation", self.batch_size)
        record: RoundRecord = {"round": round_number, "epoch": trainer.current_epoch,
                               "global_step": trainer.global_step, "scorer": repr(self.scorer),
                               "treatment": repr(self.treatment)}
        clock = _Clock()
        model = repair_copy(pl_module, self.params)

        predictions, labels = self._predict(trainer, model, validation)
        failures = split_failures(predictions, labels, self.query_fraction, self.max_failures, seed)
        record.update(failures=failures.size, query=len(failures.query), holdout=len(failures.holdout),
                      remaining=len(failures.remaining), dropped_failures=failures.dropped,
                      seconds_failures=clock.lap())
        record.update(_accuracies(failures, predictions, labels, "before"))
        if failures.dropped:
            rank_zero_info(f"RepairCallback: {failures.size + failures.dropped} failures; using a random "
                           f"{failures.size} of them (max_failures={self.max_failures}).")
        kept = torch.tensor(sorted(set(range(len(train.dataset))) - self._removed), dtype=torch.long)
        if len(failures.query) == 0:
            rank_zero_info("RepairCallback: no failures on the validation data; nothing to repair this round.")
            return _skipped(record, "no failures", len(self._removed), clock)

        fisher = None
        if self.scorer.needs_fisher or self.treatment.needs_fisher:
            try:
                fisher = self._fisher(trainer, model, train, kept, seed)
            except FloatingPointError as error:
                rank_zero_warn(f"RepairCallback: skipping this round: {error}")
                return _skipped(record, "non-finite Fisher", len(self._removed), clock)
        record.update(seconds_fisher=clock.lap(), curvature=self._backend)

        fit_part, stop_part = hold_back(failures.query, self.stop_fraction, seed)  # early stopping (EWC influence)
        query_loader = validation.subset(failures.query).loader()
        query_fit_loader = validation.subset(fit_part).loader()
        stop_loader = validation.subset(stop_part).loader() if stop_part is not None else None
        trusted = torch.cat([failures.query, failures.guard]).sort().values  # never F_h or R: the rollback's
        failure_share = (failures.size + failures.dropped) / len(validation)  # π_F = |F| / |V|

        def score(share: Tensor) -> Tensor:
            return self.scorer.score(ScoringInputs(
                model=model, train=train.subset(share).loader(), query=query_loader, stop=stop_loader,
                query_fit=query_fit_loader, trusted=validation.subset(trusted).loader(), fisher=fisher,
                n_train=len(kept), adapter=self.adapter, seed=seed, progress=_progress_bar(trainer))).float().cpu()

        scores_kept = gather_sharded(trainer.strategy, kept, score) if self.scorer.shardable else score(kept)
        scores = torch.full((len(train.dataset),), float("nan"))
        scores[kept] = scores_kept
        record["seconds_scores"] = clock.lap()
        if not torch.isfinite(scores_kept).all():
            rank_zero_warn("RepairCallback: some scores are NaN or infinite (non-finite losses?); skipping this "
                           "round. Check the model's losses or lower the learning rate.")
            return _skipped(record, "non-finite scores", len(self._removed), clock)

        causes = select_causes(scores, **self.selection)
        if len(causes) >= len(kept):
            rank_zero_warn(f"RepairCallback: the selection would remove all {len(kept)} remaining training "
                           "examples; skipping this round. Use a smaller top_k/top_fraction or a higher threshold.")
            return _skipped(record, "would remove everything", len(self._removed), clock)
        suspects = self._suspects(model, train, scores, causes)
        if len(causes):
            generator = torch.Generator().manual_seed(seed)
            without_causes = kept[~torch.isin(kept, causes)]
            judge = Judge(model, query_loader, validation.subset(failures.guard).loader(), failure_share,
                          margin=self.acceptance_margin, max_remaining_drop=self.max_remaining_drop,
                          adapter=self.adapter)
            choice = self.treatment.treat(TreatmentInputs(
                model=model, causes=train.subset(causes).loader(shuffle=True, generator=generator),
                kept=train.subset(without_causes).loader(shuffle=True, generator=generator),
                query=query_loader, judge=judge, fisher=fisher, n_train=len(kept), adapter=self.adapter, seed=seed))
            record.update(candidate=choice.label, candidates_rated=choice.rated)
            broadcast_parameters(trainer.strategy, model)  # every rank treats alike; rank 0's result is the one
        record["seconds_treatment"] = clock.lap()

        predictions_after, _ = self._predict(trainer, model, validation)
        record.update(_accuracies(failures, predictions_after, labels, "after"))
        holdout, remaining = failures.holdout, failures.remaining  # what no method read
        verdict = compare(predictions[holdout] == labels[holdout], predictions_after[holdout] == labels[holdout],
                          predictions[remaining] == labels[remaining],
                          predictions_after[remaining] == labels[remaining], failure_share,
                          margin=self.acceptance_margin, max_remaining_drop=self.max_remaining_drop)
        record.update(failure_share=failure_share, gain=verdict.gain, gain_standard_error=verdict.standard_error)
        rollback = self._rollback_reason(verdict) if len(causes) else None
        if rollback is None:
            copy_parameters_(pl_module, model)
            self._removed.update(causes.tolist())
        else:  # keep θ̂, and C stays in training
            rank_zero_info(f"RepairCallback: round {round_number} rolled back: {rollback}.")
        removed = causes if rollback is None else causes[:0]
        flipped = getattr(trainer.datamodule, "flipped_indices", None) if trainer.datamodule is not None else None
        record.update(causes=len(causes), removed=len(removed), removed_total=len(self._removed),
                      accepted=rollback is None, rollback=rollback,
                      precision=precision(causes, flipped) if flipped is not None else None,
                      seconds_total=clock.total())
        self._report(trainer, record, scores, train, suspects, removed)
        return record

    def _rollback_reason(self, verdict: Verdict) -> str | None:
        """Why the treated weights must not be kept, or None to keep them (the acceptance rule on F_h and R)."""
        if not self.rollback or verdict.accepted:
            return None
        if self.max_remaining_drop is not None and verdict.remaining_drop > self.max_remaining_drop:
            return (f"accuracy on R dropped by {verdict.remaining_drop:.4f} > "
                    f"max_remaining_drop={self.max_remaining_drop}")
        return (f"estimated validation accuracy changed by {verdict.gain:+.4f}, not more than "
                f"{self.acceptance_margin:g} × its paired standard error {verdict.standard_error:.4f}")

    def _predict(self, trainer: pl.Trainer, model: torch.nn.Module, validation: Examples) -> tuple[Tensor, Tensor]:
        """Predictions and labels of all of V; under DDP each rank predicts a share."""
        def share_predictions(share: Tensor) -> Tensor:
            return torch.stack(predict(model, validation.subset(share).loader(), self.adapter), dim=1)

        both = gather_sharded(trainer.strategy, validation.positions, share_predictions)
        return both[:, 0], both[:, 1]

    def _fisher(self, trainer: pl.Trainer, model: torch.nn.Module, train: Examples, kept: Tensor,
                seed: int) -> list[Tensor]:
        generator = torch.Generator().manual_seed(seed)
        sample = kept[torch.randperm(len(kept), generator=generator)[: self.fisher_samples]].sort().values
        share = math.ceil(len(sample) / trainer.world_size)
        mine = sample[trainer.global_rank * share:(trainer.global_rank + 1) * share]
        loader = train.subset(mine).loader()
        if self._backend is None:  # chosen once per fit, on the first round's model
            self._backend, reason = choose_backend(model, loader, self.fisher, self.adapter)
            rank_zero_info(f"RepairCallback: per-example gradients and the Fisher by {self._backend}"
                           + (f" (BackPACK cannot follow this model: {reason})." if reason else "."))
        with forked_rng(model):  # MC labels are sampled without touching the user's RNG
            torch.manual_seed(seed + trainer.global_rank)
            fisher = diagonal_fisher(model, loader, self.fisher, self.adapter, backend=self._backend)
        # Per-example means of equal-sized shares (the last may be smaller): weight each by its size.
        weighted = sum_across_ranks(trainer.strategy, [f * len(mine) for f in fisher])
        return [f / len(sample) for f in weighted]

    def _suspects(self, model: torch.nn.Module, train: Examples, scores: Tensor, causes: Tensor) -> "_Suspects":
        """The top-scored examples and every cause, with given labels and θ̂'s predictions, highest score first."""
        eligible = torch.nonzero(~torch.isnan(scores)).flatten()
        top = eligible[torch.argsort(scores[eligible], descending=True, stable=True)][: self.suspects_to_report]
        order = torch.cat([top, causes[~torch.isin(causes, top)]])
        predicted, given = predict(model, train.subset(order).loader(), self.adapter)
        return _Suspects(order, given, predicted)

    def _report(self, trainer: pl.Trainer, record: RoundRecord, scores: Tensor, train: Examples,
                suspects: "_Suspects", removed: Tensor) -> None:
        """The suspects CSV, and with ``report=True`` the figures, a Markdown page and the logger's image."""
        directory = self.log_dir(trainer)  # on every rank: `trainer.log_dir` is a collective under DDP
        if not trainer.is_global_zero:
            return
        csv_path = directory / f"round_{record['round']:03d}_suspects.csv"
        write_suspects(csv_path, suspects.order, scores[suspects.order], suspects.given, suspects.predicted, removed)
        if not self.report:
            return
        from lightning_repair import visual

        datamodule = trainer.datamodule
        flipped = getattr(datamodule, "flipped_indices", None)
        figures = {"scores": visual.score_histogram(scores, suspects.order[:0] if not len(removed) else removed,
                                                    flipped),
                   "accuracy": visual.accuracy_bars(record)}
        if flipped is not None:
            figures["detection"] = visual.detection_curve(scores, flipped)
        shown = suspects.order[: self.report_images]
        images = self._images(train.subset(shown))
        if images is not None:
            figures["suspects"] = visual.suspect_grid(images, suspects.given[: len(shown)].tolist(),
                                                      suspects.predicted[: len(shown)].tolist(),
                                                      scores[shown].tolist(), getattr(datamodule, "class_names", None))
            for logger in trainer.loggers:
                if hasattr(getattr(logger, "experiment", None), "add_image"):
                    logger.experiment.add_image("repair/suspects", visual.suspect_grid_tensor(images),
                                                trainer.global_step)
        visual.write_round_report(directory, record, figures, csv_path)

    def _images(self, examples: Examples) -> Tensor | None:
        """The examples' inputs as a (K, C, H, W) image batch, or None when they are not images."""
        inputs = torch.cat([self.adapter.inputs(batch) for batch in examples.loader()])
        if not isinstance(inputs, Tensor) or not inputs.is_floating_point() or inputs.dim() not in (3, 4):
            return None
        return inputs.unsqueeze(1) if inputs.dim() == 3 else inputs

    # ---- helpers ------------------------------------------------------------------------------------------

    @staticmethod
    def log_dir(trainer: pl.Trainer) -> Path:
        """Where the suspects CSVs go: ``<trainer.log_dir>/repair``."""
        return Path(trainer.log_dir or trainer.default_root_dir) / "repair"

    def _due(self, epoch: int) -> bool:
        """Whether a validation at ``epoch`` runs a round: one is scheduled at or before it, and none ran since."""
        return self._owed_since(epoch) is not None

    def _owed_since(self, epoch: int) -> int | None:
        """The earliest scheduled epoch ≤ ``epoch`` after the last round's, or None when no round is owed."""
        last = max((record["epoch"] for record in self.rounds), default=-1)
        return next((e for e in scheduled_epochs(self.start_epoch, self.every_n_epochs, epoch) if e > last), None)

    def _selection(self, top_k: int | None, top_fraction: float | None, threshold: float | None) -> dict:
        if top_k is None and top_fraction is None and threshold is None:
            if self.scorer.natural_threshold is not None:
                return {"threshold": self.scorer.natural_threshold}
            return {"top_fraction": DEFAULT_TOP_FRACTION}
        return {"top_k": top_k, "top_fraction": top_fraction, "threshold": threshold}

    @staticmethod
    def _train_loader(trainer: pl.Trainer) -> DataLoader:
        return _single_loader(trainer.train_dataloader, "training")

    @staticmethod
    def _val_loader(trainer: pl.Trainer) -> DataLoader:
        return _single_loader(trainer.val_dataloaders, "validation")


def scheduled_epochs(start_epoch: int, every_n_epochs: int | None, up_to: int) -> list[int]:
    """The epochs (0-based) ≤ ``up_to`` after whose validation a round is scheduled.

    Every ``every_n_epochs`` from ``start_epoch``; with None, gaps that double: after (start_epoch + 1) · 2^k
    completed epochs, so a long fit pays for about log₂(epochs) rounds and a short one still gets some.
    """
    if every_n_epochs is not None:
        return list(range(start_epoch, up_to + 1, every_n_epochs))
    epochs, completed = [], start_epoch + 1
    while completed - 1 <= up_to:
        epochs.append(completed - 1)
        completed *= 2
    return epochs


def _single_loader(loaders: Any, role: str) -> DataLoader:
    flat = list(loaders.values()) if isinstance(loaders, dict) else (
        list(loaders) if isinstance(loaders, (list, tuple)) else [loaders])
    flat = [loader for loader in flat if loader is not None]
    if not flat:
        raise RuntimeError(f"RepairCallback needs a {role} DataLoader: define `{role}_dataloader()` in your "
                           "LightningModule or DataModule, or pass it to `trainer.fit`. Failures are taken from "
                           "validation data only." if role == "validation" else
                           f"RepairCallback needs a {role} DataLoader.")
    if role == "training" and len(flat) > 1:
        raise ValueError(f"RepairCallback supports one training DataLoader, got {len(flat)}; training-set indices "
                         "would be ambiguous.")
    return flat[0]


LOSS_TOLERANCE = 0.15


@torch.no_grad()
def check_cross_entropy(model: torch.nn.Module, batch: Any, training_loss: float, adapter: BatchAdapter) -> bool:
    """Warns when the user's training loss on ``batch`` is far from the mean cross-entropy of the model's logits.

    Scores and treatments assume the model is trained with cross-entropy on its logits; label smoothing, an MSE
    loss or large added terms break that assumption. The extra forward pass leaves the module as it was: its
    buffers (BatchNorm statistics) are restored and its random draws (dropout) come from a forked RNG. Dropout
    makes the two differ a little, hence the tolerance; an untrained model's near-uniform outputs hide label
    smoothing, hence a check at every epoch's start.
    Returns False when it warned.
    """
    labels = adapter.labels(batch).to(model.device)
    buffers = [(buffer, buffer.clone()) for buffer in model.buffers()]
    with forked_rng(model):  # a train-mode forward pass draws dropout masks and updates BatchNorm statistics
        logits = adapter.logits(model, adapter.inputs(batch))
    for buffer, before in buffers:
        buffer.copy_(before)
    if not isinstance(logits, Tensor) or logits.dim() != 2 or not ((0 <= labels) & (labels < logits.shape[1])).all():
        return True  # not class logits: the round's own checks explain what is wrong
    cross_entropy = F.cross_entropy(logits, labels).item()
    if abs(training_loss - cross_entropy) <= LOSS_TOLERANCE * max(abs(cross_entropy), 1e-3):
        return True
    rank_zero_warn(
        f"RepairCallback: the training loss of the first batch ({training_loss:.4g}) differs from the cross-entropy "
        f"of the model's logits ({cross_entropy:.4g}). lightning-repair's scores and treatments assume a classifier "
        "trained with plain cross-entropy on its logits; with another loss (label smoothing, MSE, large regularisers) "
        "the causes it finds and the repairs it makes follow cross-entropy, not your objective.")
    return False


def _accuracies(failures: FailureSet, predictions: Tensor, labels: Tensor, when: str) -> dict[str, float]:
    return {f"acc_fq_{when}": accuracy(predictions, labels, failures.query),
            f"acc_fh_{when}": accuracy(predictions, labels, failures.holdout),
            f"acc_r_{when}": accuracy(predictions, labels, failures.remaining)}


def _skipped(record: RoundRecord, reason: str, removed_total: int, clock: "_Clock") -> RoundRecord:
    record.update(skipped=reason, causes=0, removed=0, removed_total=removed_total, accepted=False, rollback=None,
                  precision=None, seconds_total=clock.total())
    for part in ("fq", "fh", "r"):
        record[f"acc_{part}_after"] = record.get(f"acc_{part}_before")
    return record


def _progress_bar(trainer: pl.Trainer):
    enabled = trainer.progress_bar_callback is not None and trainer.is_global_zero

    def wrap(loader: DataLoader, description: str) -> Iterable:
        return tqdm(loader, desc=description, disable=not enabled, leave=False, dynamic_ncols=True)

    return wrap


@dataclass(frozen=True)
class _Suspects:
    """Dataset indices of a round's suspects, highest score first, with given labels and θ̂'s predictions."""

    order: Tensor
    given: Tensor
    predicted: Tensor


class _Clock:
    """Wall seconds per phase."""

    def __init__(self) -> None:
        self.start = self.last = time.perf_counter()

    def lap(self) -> float:
        """Seconds since the previous lap (or the start)."""
        now = time.perf_counter()
        seconds, self.last = now - self.last, now
        return seconds

    def total(self) -> float:
        """Seconds since the start."""
        return time.perf_counter() - self.start
