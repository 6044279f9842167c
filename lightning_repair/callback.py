"""RepairCallback: repair a classifier between epochs, and train on without the causes of its failures.

The Lightning layer only: when a round is due, which data it reads, sharing it across DDP ranks, applying an
accepted repair, logging, and the state a checkpoint keeps. The round itself is :mod:`lightning_repair.round`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor
from torch.utils.data import DataLoader, SequentialSampler
from tqdm.auto import tqdm

from lightning_repair.adapter import BatchAdapter, to_device
from lightning_repair.curvature import FisherKind, model_device
from lightning_repair.distributed import ranks_of
from lightning_repair.examples import Examples
from lightning_repair.exclusion import exclude_from
from lightning_repair.head_cache import HeadInputs, HeadRecorder
from lightning_repair.identify import Scorer
from lightning_repair.loss_check import check_cross_entropy
from lightning_repair.params import copy_parameters_
from lightning_repair.report import format_table, round_metrics, write_round_files
from lightning_repair.round import RepairRound, RoundRecord
from lightning_repair.treat import Treatment

_DEFAULTS = RepairRound  # each setting's default is written once, on the round


class RepairCallback(Callback):
    r"""Repairs a classifier during ``Trainer.fit``: after a validation, it finds the validation examples the
    model gets wrong (F), ranks the training set by how much each example caused them, and training goes on
    without the top causes C (by default nothing more: the epochs after the round unlearn them; a treatment can
    also unlearn them at once, and is then kept only if the acceptance rule accepts it).

    Each round (a :class:`~lightning_repair.round.RepairRound`, which also runs without a Trainer): failure set
    F = F_q ∪ F_h from the validation data (only F_q is used; F_h and R = V \ F are measured) → diagonal Fisher →
    scores → C → treatment → acceptance → report. Removal is cumulative: an
    example is removed at most once and never drawn again by the training DataLoader.

    Args:
        scorer: identification method; default ``KNNShapley(utility="trusted", harm_margin=1)``, the best-ranking
            scorer in every setting of the benchmark (the paper's EWC influence ranks flips near chance with
            class-pair noise), whose own rule takes the examples that hurt its utility by more than an average
            example adds to it: fewer clean examples than value < 0 (the README's *End to end*).
        treatment: treatment method; default :class:`~lightning_repair.treat.Exclude`: no unlearning step, the
            causes leave training and the epochs after the round unlearn them. It moves no weight, so the acceptance
            rule (``rollback`` and the margins below) has nothing to judge and its rounds are kept. End to end it
            ended level with fine-tuning on D \\ C (:class:`~lightning_repair.treat.Finetune`, the default before)
            in every setting of the benchmark, within the seeds' spread, at a third of the round's cost: in the
            10-epoch fits the gate had rolled most fine-tunes back anyway. Give a weight-moving treatment
            (``Finetune``, ``EWCUnlearning``, …) for a model that is not trained on after its last round, or to
            have each round judged.
        every_n_epochs: repair after every this many epochs; None (default): after ever longer gaps, each twice the
            one before, so rounds follow (start_epoch + 1) · 2^k epochs: 4, 8, 16, … epochs from epoch 3 —
            1 round in a 5-epoch fit, 2 in a 10-epoch one. A round that falls on an epoch without validation runs
            at the next validation.
        start_epoch: the first epoch (0-based, as ``trainer.current_epoch``) after whose validation to repair.
            None (default): a tenth of ``trainer.max_epochs``, at least 3 and at most the last epoch
            (:func:`default_start_epoch`), so a 150-epoch fit repairs after epochs 16, 32, 64 and 128 (1-based) and
            a 10-epoch one after 4 and 8. The scorer finds wrong labels only once the model has learnt the clean
            ones; a large cause set taken out of training earlier is up to half clean examples, and the fit trains
            without them from then on.
            With a treatment that moves no weight (``Exclude``, the default) the default schedule keeps an epoch
            after each round to train without its causes: the first round comes at the latest one epoch before
            the last, and a round after the last epoch is left out. A schedule given is kept as given.
        top_k: remove the k highest-scored examples per round.
        top_fraction: remove this fraction of the training set per round.
        threshold: remove every example scoring above this (the paper's rule: 0).
            Give at most one of ``top_k``, ``top_fraction``, ``threshold``; with none, the scorer's own rule
            for each round's scores (KNN-Shapley: value < −``harm_margin`` × the mean value) or
            ``top_fraction=0.01``.
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
            default all trainable parameters. A treatment that can move nothing inside them fails when training
            starts.
        batch_size: batch size of the repair passes; default the training DataLoader's.
        adapter: how to read inputs, labels and logits; default handles ``(x, y)`` and dict batches.
        suspects_to_report: rows of each round's suspects CSV (the causes are always included).
        rollback: for a treatment that moves weights: keep a round only when the acceptance rule accepts it on the
            parts no method read, F_h and R (estimated validation accuracy rises by more than
            ``acceptance_margin`` paired standard errors); otherwise roll it back: keep θ̂ and put C back into
            training. False keeps every treated round.
        acceptance_margin: paired standard errors by which a repair must raise estimated validation accuracy,
            both when a treatment chooses among its candidates (on F_q and R_q) and for the rollback.
        max_remaining_drop: an optional extra cap: also reject repairs that lower accuracy on R (R_q for the
            treatments' candidates) by more than this. None (default) sets no cap; θ̂ scores 1.0 on R by
            construction, so a tight cap rejects every repair that trades a few right answers for many fixes.
        control_margin: for a treatment that trains on D \\ C (``Finetune``, ``NewtonRemoval``), also run it on
            all of D, removing nothing (the control), and keep the round only when the repair beats the control on
            F_h and R by more than this many paired standard errors, besides beating θ̂ by ``acceptance_margin``:
            a fine-tune raises the accuracy of an undertrained model whatever it leaves out, and that is not the
            removal's doing. 0 (default): the repair must do better than the control, by any amount, but need not
            prove it (a removal also pays off in later epochs, which no round can see). None runs no control. It
            costs a second treatment per round.
        removal_margin: what a rolled-back round does with its causes. None (default): they go back into training
            with θ̂'s weights. A number: the weights still roll back, but the causes stay out of training unless
            the repair lowered estimated validation accuracy on F_h and R by more than this many paired standard
            errors, against θ̂ or against its control (a treatment that kept θ̂ lowered nothing). A removal pays off
            in the epochs after the round, which the round's short fine-tune cannot show; the rollback then proves
            only that the fine-tune's weights are no better yet.
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
        *,
        scorer: Scorer | None = None,
        treatment: Treatment | None = None,
        every_n_epochs: int | None = None,
        start_epoch: int | None = None,
        top_k: int | None = None,
        top_fraction: float | None = None,
        threshold: float | None = None,
        fisher: FisherKind = _DEFAULTS.fisher,
        fisher_samples: int = _DEFAULTS.fisher_samples,
        curvature: Literal["auto", "backpack", "torch_func"] = "auto",
        query_fraction: float = _DEFAULTS.query_fraction,
        max_failures: int | None = _DEFAULTS.max_failures,
        stop_fraction: float = _DEFAULTS.stop_fraction,
        params: list[str] | None = None,
        batch_size: int | None = None,
        adapter: BatchAdapter | None = None,
        suspects_to_report: int = _DEFAULTS.suspects_to_report,
        rollback: bool = _DEFAULTS.rollback,
        acceptance_margin: float = _DEFAULTS.acceptance_margin,
        max_remaining_drop: float | None = None,
        control_margin: float | None = _DEFAULTS.control_margin,
        removal_margin: float | None = _DEFAULTS.removal_margin,
        report: bool = False,
        report_images: int = 32,
        seed: int = 0,
    ) -> None:
        if (every_n_epochs is not None and every_n_epochs < 1) or (start_epoch is not None and start_epoch < 0):
            raise ValueError(f"every_n_epochs must be ≥ 1 and start_epoch ≥ 0, got {every_n_epochs}, {start_epoch}.")
        given = {"scorer": scorer, "treatment": treatment, "adapter": adapter}
        self.settings = RepairRound(
            **{name: value for name, value in given.items() if value is not None},
            selection={"top_k": top_k, "top_fraction": top_fraction, "threshold": threshold},
            fisher=fisher, fisher_samples=fisher_samples, backend=None if curvature == "auto" else curvature,
            query_fraction=query_fraction, max_failures=max_failures, stop_fraction=stop_fraction, params=params,
            batch_size=batch_size, suspects_to_report=suspects_to_report, rollback=rollback,
            acceptance_margin=acceptance_margin, max_remaining_drop=max_remaining_drop,
            control_margin=control_margin, removal_margin=removal_margin)
        self.curvature, self.every_n_epochs, self.start_epoch = curvature, every_n_epochs, start_epoch
        self.report, self.report_images, self.seed = report, report_images, seed
        self.rounds: list[RoundRecord] = []
        self._removed: set[int] = set()
        self._loss_unwarned, self._loss_batch, self._training_loss = True, None, None
        self._validated: list[tuple[Tensor, Tensor]] | None = None
        self._head_recorder: HeadRecorder | None = None

    # ---- public state -------------------------------------------------------------------------------------

    @property
    def scorer(self) -> Scorer:
        return self.settings.scorer

    @property
    def treatment(self) -> Treatment:
        return self.settings.treatment

    @property
    def selection(self) -> dict[str, Any]:
        """The cause selection given (one of ``top_k``, ``top_fraction``, ``threshold``); empty: the scorer's own
        rule, whose threshold each round records (``rounds[i].threshold``)."""
        return self.settings.selection

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
        return {"removed_indices": self.removed_indices, "rounds": [r.to_dict() for r in self.rounds]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._removed.clear()  # in place: the training sampler holds this very set
        self._removed.update(int(i) for i in state_dict["removed_indices"])
        self.rounds = [RoundRecord.from_dict(r) for r in state_dict["rounds"]]
        if self.settings.backend is None and self.curvature == "auto":
            self.settings.backend = next((r.curvature for r in self.rounds if r.curvature), None)

    # ---- Lightning hooks ----------------------------------------------------------------------------------

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        loader = _single_loader(trainer.train_dataloader, "training")
        Examples.from_dataloader(loader, "training")  # fail now, not after an epoch, on an unusable loader
        self.settings.check_scope(pl_module)  # and on a repair scope the treatment cannot move
        exclude_from(loader, self._removed, self.seed)  # before the first batch is drawn, also when resuming

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # A reloaded DataLoader (`reload_dataloaders_every_n_epochs`) needs the filter again.
        exclude_from(_single_loader(trainer.train_dataloader, "training"), self._removed, self.seed)

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
            self._loss_unwarned = check_cross_entropy(pl_module, self._loss_batch, self._training_loss,
                                                      self.settings.adapter)
        self._loss_batch, self._training_loss = None, None

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        stopped_early = trainer.should_stop or 0 <= trainer.max_steps <= trainer.global_step
        owed_since = self._owed_since(trainer)
        validation_gap = trainer.check_val_every_n_epoch or 1
        if owed_since is not None and trainer.current_epoch - owed_since + 1 >= validation_gap and not stopped_early:
            raise RuntimeError(
                f"RepairCallback was due to repair after epoch {owed_since}, but no validation has run since. It "
                "needs a validation DataLoader (failures come from validation data only) and validation runs "
                "during fit: define `val_dataloader()` and `validation_step`, and keep `limit_val_batches` > 0.")

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Before a round, the validation loop's own logits (a `validation_step` that returns {"logits": ...}) give
        # the failures without a second pass over V; any other output, or a loader not in dataset order, predicts.
        loader = trainer.val_dataloaders
        self._validated = [] if (self._round_due(trainer) and trainer.world_size == 1
                                 and isinstance(loader, DataLoader) and isinstance(loader.sampler, SequentialSampler)
                                 ) else None
        self._stop_recording()

    def on_validation_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                                  batch_idx: int, dataloader_idx: int = 0) -> None:
        # The same pass records the head's inputs over V, which the round would otherwise record by a pass of its own.
        if self._validated is not None and batch_idx == 0 and dataloader_idx == 0 and self._head_recorder is None:
            inputs = to_device(self.settings.adapter.inputs(batch), model_device(pl_module))
            self._head_recorder = HeadRecorder(pl_module, inputs)

    def on_validation_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                                batch_idx: int, dataloader_idx: int = 0) -> None:
        if self._validated is None:
            return
        logits = outputs.get("logits") if isinstance(outputs, Mapping) else None
        if isinstance(logits, Tensor) and logits.dim() == 2:  # kept on the device: no host sync per batch
            self._validated.append((logits.detach().argmax(1), self.settings.adapter.labels(batch)))
            if self._head_recorder is not None:
                self._head_recorder.batch_done(logits.detach())
        else:
            self._validated = None
            self._stop_recording()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._stop_recording()  # no hook of ours stays on the user's module

    def _stop_recording(self) -> HeadInputs | None:
        """Ends the recording of the head's inputs; what it recorded, or None (the round then records them, and
        says why a cache cannot serve if it cannot)."""
        recorder, self._head_recorder = self._head_recorder, None
        return recorder.finish(log=False) if recorder is not None else None

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._round_due(trainer):
            return
        validated, self._validated = self._validated, None
        head_inputs = self._stop_recording()
        if validated:
            predictions, labels = (torch.cat([part[i].cpu() for part in validated]) for i in (0, 1))
            validated = (predictions, labels) if len(labels) == len(trainer.val_dataloaders.dataset) else None
        # The round leaves the user's RNG streams as they were: a rolled-back round changes nothing, not even the
        # order of the next epoch's batches.
        train = _single_loader(trainer.train_dataloader, "training")
        datamodule = trainer.datamodule
        flipped = getattr(datamodule, "flipped_indices", None) if datamodule is not None else None
        outcome = self.settings.run(
            pl_module, train, _single_loader(trainer.val_dataloaders, "validation"), removed=self._removed,
            number=len(self.rounds) + 1, seed=self.seed, epoch=trainer.current_epoch, global_step=trainer.global_step,
            flipped=flipped, ranks=ranks_of(trainer.strategy), progress=_progress_bar(trainer),
            validated=validated or None, head_inputs=head_inputs if validated else None)
        self.settings.backend = outcome.backend or self.settings.backend  # chosen once per fit
        if outcome.record.accepted:
            copy_parameters_(pl_module, outcome.model)
        self._removed.update(outcome.removed.tolist())  # accepted: C; rolled back: C under removal_margin
        self.rounds.append(outcome.record)
        directory = self.log_dir(trainer)  # on every rank: `trainer.log_dir` is a collective under DDP
        if trainer.is_global_zero:
            examples = Examples.from_dataloader(train, "training", self.settings.batch_size)
            grid = write_round_files(directory, outcome, examples, self.settings.adapter, figures=self.report,
                                     images=self.report_images, flipped=flipped,
                                     class_names=getattr(datamodule, "class_names", None))
            for logger in trainer.loggers if grid is not None else ():
                if hasattr(getattr(logger, "experiment", None), "add_image"):
                    logger.experiment.add_image("repair/suspects", grid, trainer.global_step)
        for logger in trainer.loggers:
            logger.log_metrics(round_metrics(outcome.record), step=trainer.global_step)
        rank_zero_info(f"RepairCallback round {outcome.record.round}:\n{format_table([outcome.record])}")

    # ---- helpers ------------------------------------------------------------------------------------------

    @staticmethod
    def log_dir(trainer: pl.Trainer) -> Path:
        """Where the suspects CSVs go: ``<trainer.log_dir>/repair``."""
        return Path(trainer.log_dir or trainer.default_root_dir) / "repair"

    def _round_due(self, trainer: pl.Trainer) -> bool:
        """Whether this validation, during fit, ends with a round."""
        fitting = not trainer.sanity_checking and trainer.state.fn == "fit"
        return fitting and self._owed_since(trainer) is not None

    def first_epoch(self, trainer: pl.Trainer) -> int:
        """The epoch (0-based) after whose validation the first round runs: ``start_epoch``, or its default for
        this fit's ``max_epochs``."""
        if self.start_epoch is not None:
            return self.start_epoch
        return default_start_epoch(trainer.max_epochs, epochs_after=self._epochs_after_round())

    def _owed_since(self, trainer: pl.Trainer) -> int | None:
        """The earliest scheduled epoch ≤ the current one after the last round's, or None when no round is owed."""
        last = max((record.epoch for record in self.rounds if record.epoch is not None), default=-1)
        schedule = scheduled_epochs(self.first_epoch(trainer), self.every_n_epochs, trainer.current_epoch)
        if self.start_epoch is None and self.every_n_epochs is None and (trainer.max_epochs or 0) > 0:
            # The default schedule leaves out rounds without the epochs they need after them; a schedule the user
            # gave is kept as given (such a round still reports its suspects).
            schedule = [epoch for epoch in schedule if epoch < trainer.max_epochs - self._epochs_after_round()]
        return next((e for e in schedule if e > last), None)

    def _epochs_after_round(self) -> int:
        """Epochs a default round leaves after it: one for a treatment that moves no weight (``Exclude``), whose
        repair is the training without C that follows; none for any other."""
        return 0 if self.treatment.moves_weights else 1


EARLIEST_START = 3  # the default first round's earliest epoch (0-based): see default_start_epoch


def default_start_epoch(max_epochs: int | None, epochs_after: int = 0) -> int:
    """The first round's epoch (0-based) when ``start_epoch`` is not given: a tenth of the fit, at least epoch 3,
    and never later than ``epochs_after`` epochs before the fit's last (at least epoch 1). A round that moves no
    weight (``Exclude``) needs one epoch after it, which trains without its causes.

    Measured end to end (README, *End to end*): in a 150-epoch fit of 3,000 images, the cause sets of rounds
    after epochs 2–8 had precision about 0.5 and, once accepted, cost the rest of the fit their clean half;
    from epoch 16 on they had 0.65–0.8. In 10-epoch fits of 50,000 images, the first round after epoch 1 (0-based)
    took cause sets of precision 0.64–0.71 and ended 2.5 and 1.2 points below plain training in two seeds of six;
    from epoch 3 no seed ended more than 0.3 below. A fit without a known length (``max_epochs`` None or -1)
    starts at 3.
    """
    if max_epochs is None or max_epochs <= 0:
        return EARLIEST_START
    return max(1, min(max(EARLIEST_START, max_epochs // 10), max_epochs - 1 - epochs_after))


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


def _progress_bar(trainer: pl.Trainer):
    enabled = trainer.progress_bar_callback is not None and trainer.is_global_zero

    def wrap(loader: DataLoader, description: str) -> Iterable:
        return tqdm(loader, desc=description, disable=not enabled, leave=False, dynamic_ncols=True)

    return wrap
