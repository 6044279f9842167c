"""One repair round from plain inputs: a model, its training and validation loaders, and the settings.

The phases read as the pipeline does: failures → curvature → scores → causes → treatment → acceptance. A round
works on a repair copy of the model and returns what it found and decided; it changes nothing it was given.
Whoever runs it (the callback, a script) applies an accepted repair: the treated weights and the removal of C.

    outcome = RepairRound().run(model, train_loader, val_loader)
    if outcome.record.accepted:
        copy_parameters_(model, outcome.model)   # and train on without outcome.causes

With the default treatment (``Exclude``) the round moves no weight: the training without C that follows is the
repair. ``RepairRound(treatment=Finetune())`` also moves the weights, judged by the acceptance rule.
"""

from __future__ import annotations

import time
from collections.abc import Collection, Iterator, Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor, nn
from torch.utils.data import DataLoader

from lightning_repair.acceptance import DEFAULT_MARGIN, Choice, Correctness, Judge, Verdict, compare, correctness
from lightning_repair.adapter import BatchAdapter
from lightning_repair.curvature import BACKENDS, FISHER_KINDS, FisherKind, choose_backend, diagonal_fisher, forked_rng
from lightning_repair.distributed import SINGLE_PROCESS, Ranks
from lightning_repair.examples import Examples
from lightning_repair.failures import FailureSet, accuracy, hold_back, predict, split_failures
from lightning_repair.head_cache import HeadCache, HeadInputs
from lightning_repair.identify import KNNShapley, Scorer, ScoringInputs
from lightning_repair.identify.base import Progress, no_progress
from lightning_repair.params import repair_copy
from lightning_repair.selection import check_selection, ranked, select_causes
from lightning_repair.treat import Exclude, Treatment, TreatmentInputs

DEFAULT_TOP_FRACTION = 0.01


@dataclass
class RoundRecord(Mapping):
    """What one round found and decided. Also a read-only mapping (``record["gain"]``), for tables and loggers.

    Accuracies are on F_q (read by the methods), F_h and R (read by no method: the acceptance rule's evidence),
    before (θ̂) and after the treatment; ``gain`` is the estimated change of validation accuracy on F_h and R, with
    its paired standard error. ``skipped`` says why a round stopped early; ``rollback`` why a treated one was not
    kept. ``threshold``: the scores above which the causes were taken (None: a top_k or top_fraction rule).
    ``control_*``: the same treatment run with nothing removed (the control, for treatments that train on
    D \\ C; run only for a repair that beat θ̂), and the repair's gain over it on F_h and R. ``seconds_*`` time the
    phases; ``seconds_treatment`` includes the control's.
    """

    round: int
    epoch: int | None = None
    global_step: int | None = None
    scorer: str = ""
    treatment: str = ""
    failures: int = 0
    query: int = 0
    holdout: int = 0
    remaining: int = 0
    dropped_failures: int = 0
    acc_fq_before: float | None = None
    acc_fh_before: float | None = None
    acc_r_before: float | None = None
    acc_fq_after: float | None = None
    acc_fh_after: float | None = None
    acc_r_after: float | None = None
    curvature: str | None = None
    causes: int = 0
    threshold: float | None = None
    candidate: str | None = None
    candidates_rated: int | None = None
    control_candidate: str | None = None
    control_gain: float | None = None
    control_gain_standard_error: float | None = None
    failure_share: float | None = None
    gain: float | None = None
    gain_standard_error: float | None = None
    accepted: bool = False
    rollback: str | None = None
    skipped: str | None = None
    removed: int = 0
    removed_total: int = 0
    precision: float | None = None
    seconds_failures: float | None = None
    seconds_fisher: float | None = None
    seconds_scores: float | None = None
    seconds_treatment: float | None = None
    seconds_total: float | None = None

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "RoundRecord":
        """A record from :meth:`to_dict`'s output (a checkpoint); keys it does not know are ignored."""
        known = {f.name for f in fields(cls)}
        return cls(**{key: value for key, value in values.items() if key in known})

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def __getitem__(self, key: str) -> Any:
        if key not in self.__dataclass_fields__:
            raise KeyError(key)
        return getattr(self, key)

    def __iter__(self) -> Iterator[str]:
        return iter(self.__dataclass_fields__)

    def __len__(self) -> int:
        return len(self.__dataclass_fields__)


@dataclass(frozen=True)
class Suspects:
    """Dataset indices of a round's suspects, highest score first, with given labels and θ̂'s predictions."""

    order: Tensor
    given: Tensor
    predicted: Tensor


@dataclass(frozen=True)
class RoundOutcome:
    """A finished round.

    Attributes:
        record: its figures and decision.
        model: the repair copy after the treatment (θ⁻; θ̂ when no cause was selected).
        causes: dataset indices of the cause set C.
        scores: one score per training-dataset index; NaN where an example was already removed.
        suspects: the top-scored examples and every cause, for the report; None for a skipped round.
        backend: how per-example gradients and the Fisher were computed (None when no Fisher was needed).
    """

    record: RoundRecord
    model: nn.Module
    causes: Tensor
    scores: Tensor | None = None
    suspects: Suspects | None = None
    backend: str | None = None

    @property
    def removed(self) -> Tensor:
        """C when it leaves training (an accepted round; a rolled-back one under ``removal_margin``), else nothing."""
        return self.causes if self.record.removed else self.causes[:0]


@dataclass(kw_only=True)
class RepairRound:
    """The settings of a repair round, and :meth:`run` to run one. See :class:`~lightning_repair.RepairCallback`
    for what each setting means; the callback passes its arguments on unchanged.

    ``selection`` holds at most one of ``top_k``, ``top_fraction``, ``threshold``; empty: the scorer's own rule
    for each round's scores (:meth:`Scorer.threshold_for`; KNN-Shapley: value < −harm_margin × mean value), or
    ``top_fraction=0.01`` for a scorer without one (:meth:`selection_for`). ``backend`` None chooses one on the
    first batch (BackPACK where it can follow the model, else ``torch.func``).
    """

    scorer: Scorer = field(default_factory=lambda: KNNShapley(utility="trusted", harm_margin=1.0))
    treatment: Treatment = field(default_factory=Exclude)
    selection: dict[str, Any] = field(default_factory=dict)
    fisher: FisherKind = "mc"
    fisher_samples: int = 1000
    backend: str | None = None
    query_fraction: float = 0.5
    max_failures: int | None = 2000
    stop_fraction: float = 0.1
    params: list[str] | None = None
    batch_size: int | None = None
    adapter: BatchAdapter = field(default_factory=BatchAdapter)
    suspects_to_report: int = 500
    rollback: bool = True
    acceptance_margin: float = DEFAULT_MARGIN
    max_remaining_drop: float | None = None
    control_margin: float | None = 0.0
    removal_margin: float | None = None

    def __post_init__(self) -> None:
        check_selection(**{"top_k": None, "top_fraction": None, "threshold": None, **self.selection})
        self.selection = {rule: value for rule, value in self.selection.items() if value is not None}
        if self.fisher not in FISHER_KINDS:
            raise ValueError(f"fisher must be one of {FISHER_KINDS}, got {self.fisher!r}.")
        if self.backend is not None and self.backend not in BACKENDS:
            raise ValueError(f"curvature must be 'auto' or one of {BACKENDS}, got {self.backend!r}.")
        if self.fisher_samples < 1 or (self.max_failures is not None and self.max_failures < 1):
            raise ValueError("fisher_samples and max_failures must be ≥ 1.")
        if not 0.0 <= self.stop_fraction < 1.0:
            raise ValueError(f"stop_fraction must be in [0, 1), got {self.stop_fraction}.")
        if not 0.0 < self.query_fraction <= 1.0:
            raise ValueError(f"query_fraction must be in (0, 1], got {self.query_fraction}.")
        if self.max_remaining_drop is not None and not 0.0 <= self.max_remaining_drop <= 1.0:
            raise ValueError(f"max_remaining_drop must be in [0, 1] or None, got {self.max_remaining_drop}.")
        if self.acceptance_margin < 0:
            raise ValueError(f"acceptance_margin must be ≥ 0 standard errors, got {self.acceptance_margin}.")
        if self.control_margin is not None and self.control_margin < 0:
            raise ValueError(f"control_margin must be ≥ 0 standard errors, or None to run no control; got "
                             f"{self.control_margin}.")
        if self.removal_margin is not None and self.removal_margin < 0:
            raise ValueError(f"removal_margin must be ≥ 0 standard errors, or None to put a rolled-back round's "
                             f"causes back into training; got {self.removal_margin}.")
        if self.rollback and self.query_fraction == 1.0:
            raise ValueError("query_fraction=1.0 leaves no held-out failures F_h, and without them no repair can be "
                             "shown to raise validation accuracy, so every round would roll back. Use "
                             "query_fraction < 1 (default 0.5), or rollback=False to keep every treated round.")

    def selection_for(self, scores: Tensor) -> dict[str, Any]:
        """The rule that selects a round's causes from ``scores`` (of the examples still in training): the one
        given, else the scorer's own rule for these scores, else ``top_fraction=0.01``."""
        if self.selection:
            return self.selection
        threshold = self.scorer.threshold_for(scores)
        return {"threshold": threshold} if threshold is not None else {"top_fraction": DEFAULT_TOP_FRACTION}

    def check_scope(self, module: nn.Module) -> None:
        """Raises ValueError now where ``params`` names modules ``module`` lacks, or the treatment would move no
        parameter inside them (e.g. ``params`` without the last layer and a treatment that trains only that layer),
        which a round would otherwise find only after the epochs before it."""
        scope = repair_copy(module, self.params)  # a name `module` lacks raises its own error here
        try:
            self.treatment.check_scope(scope)
        except ValueError as error:
            raise ValueError(f"RepairCallback: {self.treatment!r} can move no parameter of the repair scope "
                             f"(params={self.params!r}): {error} Widen `params`, or give the treatment layers "
                             "inside it.") from error

    def run(self, module: nn.Module, train: DataLoader, validation: DataLoader, *, removed: Collection[int] = (),
            number: int = 1, seed: int = 0, epoch: int | None = None, global_step: int | None = None,
            flipped: Tensor | None = None, ranks: Ranks = SINGLE_PROCESS, progress: Progress = no_progress,
            validated: tuple[Tensor, Tensor] | None = None, head_inputs: HeadInputs | None = None) -> RoundOutcome:
        """Runs one round on a repair copy of ``module``; ``module`` and the global RNG streams are left as they are.

        Args:
            module: the classifier at θ̂.
            train: the training DataLoader over D (map-style; its dataset, batch size and collate function are
                read, not its sampler).
            validation: the validation DataLoader over V; the failures come from it.
            removed: training-dataset indices already removed; they are neither scored nor selected.
            number: the round's number (1-based); the round's seed is ``seed + number``.
            seed: the base seed of the failure split, Fisher sampling and random scores.
            epoch, global_step: where in training the round runs, for the record.
            flipped: the injected label flips, when known, for the record's precision.
            ranks: the DDP processes to share the passes across (:func:`~lightning_repair.distributed.ranks_of`
                a Trainer's strategy); every rank runs the round and ends with the same outcome.
            progress: wraps the long passes over D to show progress.
            validated: ``module``'s predicted classes and the labels of every validation example, in dataset
                order, when they are already known (the callback takes them from Lightning's validation loop);
                None predicts them.
            head_inputs: the inputs of ``module``'s head over V in dataset order at θ̂, when a pass already recorded
                them (:class:`~lightning_repair.head_cache.HeadRecorder` in the validation loop); None records them.
        """
        # Gradients even inside Lightning's validation (inference mode); random draws (loader shuffles, MC labels, a
        # treatment's noise) seeded by the round, on forked streams: the caller's RNG goes on as if it had not run.
        with forked_rng(module), torch.inference_mode(False), torch.enable_grad():
            torch.manual_seed(seed + number)
            return _Round(self, module, train, validation, set(removed), number, seed + number, ranks,
                          progress).run(epoch, global_step, flipped, validated, head_inputs)


class _Round:
    """The state of one running round; :meth:`run` is the pipeline, the other methods its phases."""

    def __init__(self, settings: RepairRound, module: nn.Module, train: DataLoader, validation: DataLoader,
                 removed: set[int], number: int, seed: int, ranks: Ranks, progress: Progress) -> None:
        self.settings, self.adapter, self.seed, self.ranks, self.progress = (
            settings, settings.adapter, seed, ranks, progress)
        self.train = Examples.from_dataloader(train, "training", settings.batch_size)
        self.validation = Examples.from_dataloader(validation, "validation", settings.batch_size)
        self.kept = torch.tensor(sorted(set(range(len(self.train.dataset))) - removed), dtype=torch.long)
        self.module, self.model = module, repair_copy(module, settings.params)
        self.record = RoundRecord(round=number, scorer=repr(settings.scorer), treatment=repr(settings.treatment),
                                  removed_total=len(removed))
        self.backend = settings.backend
        self.head_cache: HeadCache | None = None
        self.judge: Judge | None = None  # the treatment's judge on F_q and R_q, once it runs
        self.fisher: list[Tensor] | None = None
        self.causes_leave = False  # whether C leaves training: decided by the acceptance rule
        self.clock = _Clock()

    def run(self, epoch: int | None, global_step: int | None, flipped: Tensor | None,
            validated: tuple[Tensor, Tensor] | None, head_inputs: HeadInputs | None) -> RoundOutcome:
        record = self.record
        record.epoch, record.global_step = epoch, global_step
        predictions, labels = validated if validated is not None else self.predict()
        failures = self.failures(predictions, labels)
        if len(failures.query) == 0:
            rank_zero_info("RepairCallback: no failures on the validation data; nothing to repair this round.")
            return self.skipped("no failures")
        # The head's inputs over V at θ̂: the scorer's embeddings of F_q and R_q (KNN-Shapley), and every candidate
        # that moved only the head is then predicted without a forward pass. Recorded by the validation loop, or here.
        self.head_cache = (HeadCache.from_inputs(self.model, head_inputs, self.adapter) if head_inputs is not None
                           else HeadCache.record(self.model, self.validation.loader(), self.adapter)[0])
        record.seconds_failures += self.clock.lap()
        fisher = None
        if self.settings.scorer.needs_fisher or self.settings.treatment.needs_fisher:
            try:
                fisher = self.curvature()
            except FloatingPointError as error:
                rank_zero_warn(f"RepairCallback: skipping this round: {error}")
                return self.skipped("non-finite Fisher")
        record.seconds_fisher, record.curvature = self.clock.lap(), self.backend
        scores = self.scores(failures, labels, fisher)
        if not torch.isfinite(scores[self.kept]).all():
            rank_zero_warn("RepairCallback: some scores are NaN or infinite (non-finite losses?); skipping this "
                           "round. Check the model's losses or lower the learning rate.")
            return self.skipped("non-finite scores")
        rule = self.settings.selection_for(scores[self.kept])
        causes = select_causes(scores, **rule)
        record.threshold = rule.get("threshold")
        if len(causes) >= len(self.kept):
            rank_zero_warn(f"RepairCallback: the selection would remove all {len(self.kept)} remaining training "
                           "examples; skipping this round. Use a smaller top_k/top_fraction or a higher threshold.")
            return self.skipped("would remove everything")
        suspects = self.suspects(scores, causes)
        if len(causes):
            self.treat(failures, labels, fisher, causes)
        record.seconds_treatment = self.clock.lap()
        self.accept(failures, predictions, labels, bool(len(causes)))
        record.causes = len(causes)
        record.removed = len(causes) if self.causes_leave else 0
        record.removed_total += record.removed
        record.precision = precision(causes, flipped) if flipped is not None else None
        record.seconds_total = self.clock.total()
        return RoundOutcome(record, self.model, causes, scores, suspects, self.backend)

    # ---- the phases, in order -----------------------------------------------------------------------------

    def predict(self, model: nn.Module | None = None) -> tuple[Tensor, Tensor]:
        """Predictions of ``model`` (default the repair copy) and labels of all of V; under DDP each rank predicts a
        share."""
        model = model if model is not None else self.model

        def share_predictions(share: Tensor) -> Tensor:
            return torch.stack(predict(model, self.validation.subset(share).loader(), self.adapter), dim=1)

        both = self.ranks.gather(self.validation.positions, share_predictions)
        return both[:, 0], both[:, 1]

    def failures(self, predictions: Tensor, labels: Tensor) -> FailureSet:
        settings, record = self.settings, self.record
        failures = split_failures(predictions, labels, settings.query_fraction, settings.max_failures, self.seed)
        record.failures, record.query, record.holdout = failures.size, len(failures.query), len(failures.holdout)
        record.remaining, record.dropped_failures = len(failures.remaining), failures.dropped
        record.seconds_failures = self.clock.lap()
        if failures.dropped:
            rank_zero_info(f"RepairCallback: {failures.size + failures.dropped} failures; using a random "
                           f"{failures.size} of them (max_failures={settings.max_failures}).")
        self.set_accuracies(failures, predictions, labels, "before")
        self.failure_share = (failures.size + failures.dropped) / len(self.validation)  # π_F = |F| / |V|
        self.query = self.validation.subset(failures.query).loader()
        return failures

    def curvature(self) -> list[Tensor]:
        """The diagonal Fisher at θ̂ from a seeded sample of the kept examples, shared across ranks."""
        settings, ranks = self.settings, self.ranks
        generator = torch.Generator().manual_seed(self.seed)
        sample = self.kept[torch.randperm(len(self.kept), generator=generator)[: settings.fisher_samples]]
        mine = sample.sort().values[ranks.share(len(sample))]
        loader = self.train.subset(mine).loader()
        if self.backend is None:  # chosen on the first round's model; the callback keeps it for the fit
            self.backend, reason = choose_backend(self.model, loader, settings.fisher, self.adapter)
            rank_zero_info(f"RepairCallback: per-example gradients and the Fisher by {self.backend}"
                           + (f" (BackPACK cannot follow this model: {reason})." if reason else "."))
        with forked_rng(self.model):  # MC labels are sampled without touching the user's RNG
            torch.manual_seed(self.seed + ranks.rank)
            fisher = diagonal_fisher(self.model, loader, settings.fisher, self.adapter, backend=self.backend)
        # Per-example means of equal-sized shares (the last may be smaller): weight each by its size.
        weighted = ranks.sum_each([f * len(mine) for f in fisher])
        return [f / len(sample) for f in weighted]

    def scores(self, failures: FailureSet, labels: Tensor, fisher: list[Tensor] | None) -> Tensor:
        """One score per training-dataset index (NaN for removed examples); higher = more likely a cause."""
        settings, validation = self.settings, self.validation
        fit_part, stop_part = hold_back(failures.query, settings.stop_fraction, self.seed)  # EWC influence only
        trusted = torch.cat([failures.query, failures.guard]).sort().values  # never F_h or R: the rollback's
        cache = self.head_cache
        recorded = cache.scorer_inputs(failures.query, trusted, labels) if cache is not None else None

        def score(share: Tensor) -> Tensor:
            return settings.scorer.score(ScoringInputs(
                model=self.model, train=self.train.subset(share).loader(), query=self.query,
                stop=validation.subset(stop_part).loader() if stop_part is not None else None,
                query_fit=validation.subset(fit_part).loader(), trusted=validation.subset(trusted).loader(),
                fisher=fisher, n_train=len(self.kept), adapter=self.adapter, seed=self.seed,
                progress=self.progress, ranks=self.ranks, recorded=recorded)).float().cpu()

        # A shardable scorer scores a share of D on each rank; any other shares its own work through `ranks`.
        scored = self.ranks.gather(self.kept, score) if settings.scorer.shardable else score(self.kept)
        scores = torch.full((len(self.train.dataset),), float("nan"))
        scores[self.kept] = scored
        self.record.seconds_scores = self.clock.lap()
        return scores

    def suspects(self, scores: Tensor, causes: Tensor) -> Suspects:
        """The top-scored examples and every cause, with given labels and θ̂'s predictions, highest score first."""
        top = ranked(scores)[: self.settings.suspects_to_report]
        order = torch.cat([top, causes[~torch.isin(causes, top)]])
        predicted, given = predict(self.model, self.train.subset(order).loader(), self.adapter)
        return Suspects(order, given, predicted)

    def treat(self, failures: FailureSet, labels: Tensor, fisher: list[Tensor] | None, causes: Tensor) -> None:
        """Moves the repair copy from θ̂ to the treatment's choice among its candidates (judged on F_q and R_q)."""
        settings = self.settings
        if not settings.treatment.moves_weights:  # nothing to judge: θ̂ stays, C leaves training
            self.record.candidates_rated = 0
            return
        self.judge = Judge(self.model, self.correctness_on(failures.query, labels),
                           self.correctness_on(failures.guard, labels), self.failure_share,
                           margin=settings.acceptance_margin, max_remaining_drop=settings.max_remaining_drop)
        self.fisher = fisher
        choice = self.treated(self.model, causes, self.kept[~torch.isin(self.kept, causes)])
        self.record.candidate, self.record.candidates_rated = choice.label, choice.rated

    def treated(self, model: nn.Module, removed: Tensor, kept: Tensor) -> Choice:
        """``model``, a repair copy at θ̂, moved in place by the treatment with C = ``removed`` and D \\ C = ``kept``;
        the repair and its control draw the same batches and are chosen by the same judge."""
        generator = torch.Generator().manual_seed(self.seed)
        choice = self.settings.treatment.treat(TreatmentInputs(
            model=model, causes=self.train.subset(removed).loader(shuffle=len(removed) > 0, generator=generator),
            kept=self.train.subset(kept).loader(shuffle=True, generator=generator), query=self.query,
            judge=self.judge, fisher=self.fisher, n_train=len(self.kept), adapter=self.adapter, seed=self.seed))
        self.ranks.broadcast(model)  # every rank treats alike; rank 0's result is the one
        return choice

    def needs_control(self) -> bool:
        """Whether the repair must also beat its control: the treatment trains on D \\ C (a fine-tune on D gains
        too), a control margin is set, and the treatment moved the weights."""
        settings = self.settings
        return (settings.rollback and settings.control_margin is not None and settings.treatment.trains_on_kept
                and self.record.candidate is not None)

    def control(self) -> nn.Module | None:
        """The control: the same treatment from θ̂ with nothing removed; None when it kept θ̂ (nothing to beat)."""
        start = time.perf_counter()
        control = repair_copy(self.module, self.settings.params)
        self.record.control_candidate = self.treated(control, self.kept[:0], self.kept).label
        self.record.seconds_treatment += time.perf_counter() - start
        return control if self.record.control_candidate is not None else None

    def accept(self, failures: FailureSet, before: Tensor, labels: Tensor, treated: bool) -> None:
        """The acceptance rule on F_h and R, the parts no method read: keep the repair, or roll it back. The repair
        must beat θ̂ and, for a treatment that trains on D \\ C, its control too: training it would have had anyway
        is not a repair. The control runs only for a repair that beat θ̂ (any other is rolled back anyway)."""
        settings, record = self.settings, self.record
        after = self.predictions_after() if self.moved() else before  # θ̂ kept: no prediction changed
        self.set_accuracies(failures, after, labels, "after")
        holdout, remaining = failures.holdout, failures.remaining

        def versus(reference: Tensor, margin: float) -> Verdict:
            return compare(reference[holdout] == labels[holdout], after[holdout] == labels[holdout],
                           reference[remaining] == labels[remaining], after[remaining] == labels[remaining],
                           self.failure_share, margin=margin, max_remaining_drop=settings.max_remaining_drop)

        verdict = versus(before, settings.acceptance_margin)
        record.failure_share, record.gain, record.gain_standard_error = (
            self.failure_share, verdict.gain, verdict.standard_error)
        rated = (record.candidates_rated or 0) if record.candidate is None else None  # None: the treatment moved
        # A treatment that moves no weight (Exclude) leaves nothing to roll back: its round only takes C out.
        judged = treated and settings.treatment.moves_weights
        record.rollback = _rollback_reason(settings, verdict, rated=rated) if judged else None
        if record.rollback is None and treated and self.needs_control():
            control = self.control()
            if control is not None:
                versus_control = versus(self.predict(control)[0], settings.control_margin)
                record.control_gain, record.control_gain_standard_error = (
                    versus_control.gain, versus_control.standard_error)
                record.rollback = _rollback_reason(settings, verdict, versus_control)
        record.accepted = treated and record.rollback is None
        self.causes_leave = record.accepted or _removal_kept(settings, record)
        if record.rollback is not None:
            kept_out = (f" Its weights are θ̂ again; its causes stay out of training (removal_margin="
                        f"{settings.removal_margin:g}: the repair lowered no estimate beyond that margin)."
                        if self.causes_leave else "")
            rank_zero_info(f"RepairCallback: round {record.round} rolled back: {record.rollback}.{kept_out}")

    # ---- bookkeeping --------------------------------------------------------------------------------------

    def correctness_on(self, positions: Tensor, labels: Tensor) -> Correctness:
        """Whether a model classifies the validation examples at ``positions`` correctly: from the head cache where
        it serves, else by a forward pass."""
        loader = self.validation.subset(positions).loader()

        def correct(model: nn.Module) -> Tensor:
            predicted = self.cached_predictions(model)
            if predicted is None:
                return correctness(model, loader, self.adapter)
            return predicted[positions] == labels[positions]

        return correct

    def predictions_after(self) -> Tensor:
        """The treated copy's predictions on V: from the head cache where it serves, else predicted."""
        cached = self.cached_predictions(self.model)
        return cached if cached is not None else self.predict()[0]

    def cached_predictions(self, model: nn.Module) -> Tensor | None:
        """``model``'s predictions on V from the head cache; None where it has none or cannot serve."""
        return self.head_cache.predictions(model) if self.head_cache is not None else None

    def moved(self) -> bool:
        """Whether the repair copy's weights differ from the module's, θ̂."""
        return any(not torch.equal(a, b) for a, b in zip(self.module.parameters(), self.model.parameters()))

    def set_accuracies(self, failures: FailureSet, predictions: Tensor, labels: Tensor, when: str) -> None:
        for part, indices in (("fq", failures.query), ("fh", failures.holdout), ("r", failures.remaining)):
            setattr(self.record, f"acc_{part}_{when}", accuracy(predictions, labels, indices))

    def skipped(self, reason: str) -> RoundOutcome:
        record = self.record
        record.skipped, record.seconds_total = reason, self.clock.total()
        record.acc_fq_after, record.acc_fh_after, record.acc_r_after = (
            record.acc_fq_before, record.acc_fh_before, record.acc_r_before)
        return RoundOutcome(record, self.model, torch.empty(0, dtype=torch.long), backend=self.backend)


def precision(removed: Tensor, flipped: Tensor) -> float | None:
    """Share of ``removed`` that are in ``flipped`` (the injected label flips); None if nothing was removed."""
    if len(removed) == 0:
        return None
    return float(torch.isin(removed, torch.as_tensor(flipped)).float().mean())


def _rollback_reason(settings: RepairRound, verdict: Verdict, control: Verdict | None = None, *,
                     rated: int | None = None) -> str | None:
    """Why the treated weights must not be kept, or None to keep them. ``control``: the repair against the control;
    ``rated``: the candidates rated, given when the treatment kept θ̂ itself."""
    if not settings.rollback:
        return None
    if rated is not None:
        return (f"the treatment kept θ̂: it rated {rated} candidate{'s' * (rated != 1)} and none raised estimated "
                f"validation accuracy on F_q and R_q by more than {settings.acceptance_margin:g} × its paired "
                "standard error")
    if settings.max_remaining_drop is not None and verdict.remaining_drop > settings.max_remaining_drop:
        return (f"accuracy on R dropped by {verdict.remaining_drop:.4f} > "
                f"max_remaining_drop={settings.max_remaining_drop}")
    if not verdict.accepted:
        return (f"estimated validation accuracy changed by {verdict.gain:+.4f}, not more than "
                f"{settings.acceptance_margin:g} × its paired standard error {verdict.standard_error:.4f}")
    if control is not None and not control.accepted:
        return (f"the same treatment with nothing removed (the control) did as well or better: the repair beat it by "
                f"{control.gain:+.4f}, not more than {settings.control_margin:g} × its paired standard error "
                f"{control.standard_error:.4f}")
    return None


def _removal_kept(settings: RepairRound, record: RoundRecord) -> bool:
    """Whether a treated, rolled-back round's causes still leave training (``removal_margin``): its repair lowered
    estimated validation accuracy on F_h and R by no more than that many paired standard errors, against θ̂ and
    against its control where one ran. A treatment that kept θ̂ changed nothing (gain 0), so its causes leave."""
    margin = settings.removal_margin
    if margin is None or not record.rollback:
        return False
    verdicts = ((record.gain, record.gain_standard_error),
                (record.control_gain, record.control_gain_standard_error))
    return all(gain >= -margin * standard_error for gain, standard_error in verdicts if gain is not None)


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
