"""The acceptance rule: a repair is kept only when it raises estimated validation accuracy beyond noise.

One rule serves everywhere a repair is chosen or kept (``METHODS.md``, *Acceptance*): a treatment choosing
among its candidates (rated on F_q and R_q), the callback keeping or rolling back a round (decided on F_h and R,
which no method read), and the benchmark's pick.

Estimated validation accuracy weighs the failures and the rest of V by their true shares,
acc_V = π_F · acc_F + (1 − π_F) · acc_R with π_F = |F| / |V|. The change from θ̂ is paired (the same examples
before and after), so it is tested as such: per part p with n_p examples, b_p of them fixed and c_p broken,

    gain = Σ_p w_p (b_p − c_p) / n_p,    SE = sqrt(Σ_p w_p² (b_p + c_p) / n_p²),

the weighted McNemar test (for one part, gain / SE is McNemar's z = (b − c) / √(b + c)). SE is the standard
error of the gain under "no real change", where each changed example is as likely fixed as broken. A candidate
is accepted when gain > margin · SE, margin 2 by default (about p < 0.025, one-sided). θ̂ itself has gain 0 and is
always a candidate; ties keep θ̂.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from lightning_repair.adapter import BatchAdapter
from lightning_repair.failures import predict
from lightning_repair.params import assign_, detached, trainable

DEFAULT_MARGIN = 2.0


@dataclass(frozen=True)
class Verdict:
    """The acceptance test of one candidate against θ̂.

    Attributes:
        gain: estimated change of validation accuracy, acc_V(candidate) − acc_V(θ̂).
        standard_error: its paired standard error under "no real change".
        lower_bound: gain − margin · SE, the gain beyond noise; −∞ when the optional cap on R's drop rejected it.
        remaining_drop: how much accuracy on the remaining part dropped (θ̂ minus candidate).
        accepted: lower_bound > 0.
    """

    gain: float
    standard_error: float
    lower_bound: float
    remaining_drop: float

    @property
    def accepted(self) -> bool:
        return self.lower_bound > 0


def compare(failures_before: Tensor, failures_after: Tensor, remaining_before: Tensor, remaining_after: Tensor,
            failure_share: float, *, margin: float = DEFAULT_MARGIN, max_remaining_drop: float | None = None
            ) -> Verdict:
    """Tests whether a candidate raises estimated validation accuracy over θ̂ by more than its paired noise.

    Args:
        failures_before: per-example correctness (bool) of θ̂ on a sample of the failures F (all False for
            θ̂, by definition of F; kept as an argument so any reference model can be compared).
        failures_after: the candidate's correctness on the same examples, in the same order.
        remaining_before: θ̂'s correctness on a sample of R = V \\ F.
        remaining_after: the candidate's correctness on the same examples.
        failure_share: π_F = |F| / |V| this round, the weight of the failures' accuracy in acc_V.
        margin: paired standard errors by which the gain must exceed zero.
        max_remaining_drop: optional cap: reject when accuracy on the remaining part drops by more than this.
    """
    if not 0.0 <= failure_share <= 1.0:
        raise ValueError(f"failure_share (π_F = |F| / |V|) must be in [0, 1], got {failure_share}.")
    if margin < 0:
        raise ValueError(f"margin must be ≥ 0 standard errors, got {margin}.")
    gain, variance = 0.0, 0.0
    for weight, before, after in ((failure_share, failures_before, failures_after),
                                  (1.0 - failure_share, remaining_before, remaining_after)):
        if before.shape != after.shape:
            raise ValueError(f"Correctness before and after must cover the same examples, got {tuple(before.shape)} "
                             f"and {tuple(after.shape)}.")
        n = before.numel()
        if n == 0:
            continue
        fixed = int((after.bool() & ~before.bool()).sum())
        broken = int((before.bool() & ~after.bool()).sum())
        gain += weight * (fixed - broken) / n
        variance += weight ** 2 * (fixed + broken) / n ** 2
    standard_error = math.sqrt(variance)
    remaining_drop = _mean(remaining_before) - _mean(remaining_after)
    capped = max_remaining_drop is not None and remaining_drop > max_remaining_drop
    lower_bound = float("-inf") if capped else gain - margin * standard_error
    return Verdict(gain, standard_error, lower_bound, remaining_drop)


def estimated_accuracy(failures_correct: Tensor, remaining_correct: Tensor, failure_share: float) -> float:
    """acc_V = π_F · acc_F + (1 − π_F) · acc_R from per-example correctness on samples of F and R."""
    return failure_share * _mean(failures_correct) + (1.0 - failure_share) * _mean(remaining_correct)


Correctness = Callable[[nn.Module], Tensor]
"""Whether a model classifies each of a fixed set of examples correctly, in a fixed order (bool, on the CPU)."""


class Judge:
    """Rates candidate models against the reference θ̂ by :func:`compare` on a failures part and a remaining part.

    θ̂'s correctness is computed once, at construction: build the judge before the treatment moves the model.

    Args:
        reference: the model at θ̂.
        failures: a loader over failures (F_q in the callback's treatments), or a :data:`Correctness` on them (the
            round's reads cached head inputs where it can).
        remaining: a loader over correctly classified examples (R_q), a :data:`Correctness` on them, or None.
        failure_share: π_F = |F| / |V|. With ``remaining=None`` use 1.0: the rating is plain accuracy on
            ``failures``.
        margin: paired standard errors a candidate must beat θ̂ by.
        max_remaining_drop: optional cap on the remaining part's accuracy drop; None (default) sets none.
        adapter: how to read batches and logits.
    """

    def __init__(self, reference: nn.Module, failures: DataLoader | Correctness,
                 remaining: DataLoader | Correctness | None, failure_share: float, *, margin: float = DEFAULT_MARGIN,
                 max_remaining_drop: float | None = None, adapter: BatchAdapter | None = None) -> None:
        adapter = adapter or BatchAdapter()
        self.failures, self.remaining = _correctness_on(failures, adapter), _correctness_on(remaining, adapter)
        self.failure_share, self.margin, self.max_remaining_drop = failure_share, margin, max_remaining_drop
        self.failures_before, self.remaining_before = self.failures(reference), self.remaining(reference)

    @classmethod
    def accuracy_on(cls, reference: nn.Module, loader: DataLoader, *, margin: float = DEFAULT_MARGIN,
                    adapter: BatchAdapter | None = None) -> "Judge":
        """A judge of plain accuracy on ``loader`` (e.g. F_q), for calling a treatment without a round."""
        return cls(reference, loader, None, 1.0, margin=margin, adapter=adapter)

    def verdict(self, candidate: nn.Module) -> Verdict:
        """The acceptance test of ``candidate`` against θ̂."""
        return compare(self.failures_before, self.failures(candidate), self.remaining_before,
                       self.remaining(candidate), self.failure_share, margin=self.margin,
                       max_remaining_drop=self.max_remaining_drop)


def _correctness_on(examples: DataLoader | Correctness | None, adapter: BatchAdapter) -> Correctness:
    """A loader's examples as a :data:`Correctness` (by forward passes); None as no examples."""
    if examples is None:
        return lambda model: torch.zeros(0, dtype=torch.bool)
    if isinstance(examples, DataLoader):
        return lambda model: correctness(model, examples, adapter)
    return examples


def as_judge(judge: "Judge | DataLoader", reference: nn.Module, adapter: BatchAdapter | None = None) -> Judge:
    """A judge as it is; a loader becomes :meth:`Judge.accuracy_on` it, against ``reference`` as it stands now."""
    return judge if isinstance(judge, Judge) else Judge.accuracy_on(reference, judge, adapter=adapter)


Rating = Callable[[nn.Module], float]
"""Rates the model as it stands, higher is better."""


@dataclass(frozen=True)
class Choice:
    """What :func:`keep_best` kept: the candidate's label (None: θ̂), its rating, and candidates rated."""

    label: object | None
    value: float
    rated: int


def keep_best(model: nn.Module, candidates: Iterable[object], rate: Rating, *, baseline: float,
              patience: int | None = None) -> Choice:
    """Walks ``candidates`` and leaves ``model`` at the one rated best; θ̂ when none beats ``baseline``.

    ``candidates`` is an iterator that moves ``model``'s trainable parameters in place and yields a label for each
    candidate it has placed (a step number, a step size). Each is rated once; the best strictly above
    ``baseline`` (θ̂'s rating) wins, the earliest on ties. With ``patience``, the walk stops after that many ratings
    in a row that do not beat the best rating seen so far.
    """
    parameters = trainable(model)
    start = detached(parameters)
    best, best_parameters = Choice(None, baseline, 0), start
    running, stale, rated = float("-inf"), 0, 0
    for label in candidates:
        value, rated = rate(model), rated + 1
        if value > best.value:
            best, best_parameters = Choice(label, value, rated), detached(parameters)
        if value > running:
            running, stale = value, 0
        else:
            stale += 1
            if patience is not None and stale >= patience:
                break
    assign_(parameters, best_parameters)
    return Choice(best.label, best.value, rated)


def choose(model: nn.Module, candidates: Iterable[object], judge: Judge, patience: int | None = None) -> Choice:
    """Keeps the candidate accepted by ``judge`` with the largest gain beyond noise (gain − margin · SE); θ̂ if none.

    The one place a repair is chosen among candidates: every treatment yields candidates and calls this.
    """
    return keep_best(model, candidates, lambda candidate: judge.verdict(candidate).lower_bound, baseline=0.0,
                     patience=patience)


def correctness(model: nn.Module, loader: DataLoader, adapter: BatchAdapter | None = None) -> Tensor:
    """Whether the model classifies each example of ``loader`` correctly, in order, on the CPU."""
    predictions, labels = predict(model, loader, adapter)
    return predictions == labels


def _mean(correct: Tensor) -> float:
    return correct.double().mean().item() if correct.numel() else float("nan")
