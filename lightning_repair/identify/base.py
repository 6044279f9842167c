"""The interface every identification method implements."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from torch import Tensor, nn
from torch.utils.data import DataLoader

from lightning_repair.adapter import BatchAdapter
from lightning_repair.distributed import SINGLE_PROCESS, Ranks
from lightning_repair.method import Method

Progress = Callable[[DataLoader, str], Iterable]


def no_progress(loader: DataLoader, description: str) -> Iterable:
    """A progress hook that shows nothing."""
    return loader


@dataclass(frozen=True)
class RecordedInputs:
    """The inputs of one layer (the model's head) over the validation examples a scorer may read, recorded at θ̂
    by the round's pass over V, so that a scorer embedding them at that layer needs no pass of its own.

    Attributes:
        module: the layer whose inputs these are.
        query: flattened inputs (|F_q|, d) and labels (|F_q|,) of F_q, in the order of ``ScoringInputs.query``.
        trusted: the same for F_q ∪ R_q, in the order of ``ScoringInputs.trusted``.
    """

    module: nn.Module
    query: tuple[Tensor, Tensor]
    trusted: tuple[Tensor, Tensor]


@dataclass(frozen=True)
class ScoringInputs:
    """What a scorer may read in one repair round.

    Attributes:
        model: a repair copy of the classifier at θ̂ (eval mode, only scoped parameters trainable).
        train: the training examples to score, in a fixed order; scores align with it.
        query: the failures F_q, all of them.
        stop: a small part of F_q held back for early stopping (EWC influence), or None.
        query_fit: F_q without ``stop``, what a method that early-stops on ``stop`` fits to; None: ``query``.
        trusted: F_q ∪ R_q, every validation example a method may read (KNN-Shapley's trusted utility); never
            F_h or R, on which the acceptance rule decides whether the round is kept.
        fisher: diagonal Fisher F̂ per scoped parameter, or None when the scorer does not need it.
        n_train: N, the number of training examples.
        adapter: how to read batches and logits.
        seed: seed for anything random in this round.
        progress: wraps the pass over ``train`` to show progress.
        ranks: the DDP processes a scorer that is not ``shardable`` may split its own work across (KNN-Shapley
            embeds a share of ``train`` and values against a share of the utility points on each rank); every rank
            then gets the same scores. The default is one process.
        recorded: the head's inputs over ``query`` and ``trusted`` at θ̂, where the round recorded them (the same
            on every rank); None otherwise.
    """

    model: nn.Module
    train: DataLoader
    query: DataLoader
    stop: DataLoader | None
    trusted: DataLoader | None
    fisher: list[Tensor] | None
    n_train: int
    adapter: BatchAdapter
    seed: int = 0
    progress: Progress = no_progress
    query_fit: DataLoader | None = None
    ranks: Ranks = SINGLE_PROCESS
    recorded: RecordedInputs | None = None


class Scorer(Method, ABC):
    """Ranks training examples by how likely each caused the failures: higher score, more likely a cause.

    Attributes:
        needs_fisher: whether :meth:`score` reads ``inputs.fisher``.
        natural_threshold: the method's own selection rule ``score > natural_threshold``, when it has one,
            used when the callback is given no explicit selection; a method whose rule depends on the round's
            scores overrides :meth:`threshold_for` (KNN-Shapley: value < −``harm_margin`` × the mean value).
        shardable: whether each example's score depends only on that example, so DDP ranks can score
            shares of D and gather them (False for KNN-Shapley, where a value depends on all of D).
    """

    needs_fisher: bool = False
    natural_threshold: float | None = None
    shardable: bool = True

    @abstractmethod
    def score(self, inputs: ScoringInputs) -> Tensor:
        """One score per example of ``inputs.train``, in its order, as a float tensor on the CPU."""

    def threshold_for(self, scores: Tensor) -> float | None:
        """The threshold of the method's own rule for this round's ``scores`` (of the examples still in
        training): the causes are the examples scoring above it. None: the method has no rule of its own."""
        return self.natural_threshold
