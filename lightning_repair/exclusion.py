"""Training goes on without the causes: a sampler wrapper that skips removed dataset indices.

Contract: the training DataLoader iterates a map-style dataset through a batch sampler that has a ``sampler``
attribute (every DataLoader built with ``batch_size``, with ``shuffle`` or a ``sampler``). The callback
wraps that inner sampler in place; the dataset is never touched.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import DataLoader, Sampler


class ExcludingSampler(Sampler[int]):
    """Yields the wrapped sampler's indices, with every excluded index replaced by a random kept one.

    Epochs keep their length, so Lightning's batch count, ``val_check_interval`` and progress bars stay right
    and DDP ranks stay in step; the excluded set is read afresh at the start of each epoch.

    Args:
        sampler: the DataLoader's own sampler.
        excluded: the callback's live set of removed indices (shared, updated in place).
        dataset_size: N, the length of the dataset the indices refer to.
        seed: seed of the replacement draws (combined with the epoch).
    """

    def __init__(self, sampler: Sampler[int], excluded: set[int], dataset_size: int, seed: int = 0) -> None:
        self.sampler = sampler
        self.excluded = excluded
        self.dataset_size = dataset_size
        self.seed = seed
        self.epoch = 0

    def __iter__(self) -> Iterator[int]:
        excluded = frozenset(self.excluded)
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        self.epoch += 1
        if not excluded:
            yield from self.sampler
            return
        is_kept = torch.ones(self.dataset_size, dtype=torch.bool)
        is_kept[list(excluded)] = False
        kept = torch.nonzero(is_kept).flatten()
        for index in self.sampler:
            if index in excluded:
                index = int(kept[torch.randint(len(kept), (1,), generator=generator)])
            yield index

    def __len__(self) -> int:
        return len(self.sampler)

    def set_epoch(self, epoch: int) -> None:
        """Sets the epoch of the replacement draws and of a wrapped sampler that shuffles by epoch."""
        self.epoch = epoch
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)


def exclude_from(loader: DataLoader, excluded: set[int], seed: int = 0) -> None:
    """Makes ``loader`` skip ``excluded`` indices from its next iteration on (idempotent).

    Raises:
        TypeError: when the loader cannot be filtered by index (iterable dataset, no batch sampler).
    """
    batch_sampler = loader.batch_sampler
    if batch_sampler is None or not hasattr(batch_sampler, "sampler"):
        raise TypeError(
            "RepairCallback removes causes by filtering the training DataLoader's sampler, but this loader has "
            f"{'no batch sampler (batch_size=None)' if batch_sampler is None else type(batch_sampler).__name__} "
            "without a `.sampler`. Build the training DataLoader with `batch_size=` and `shuffle=` or `sampler=`."
        )
    if isinstance(batch_sampler.sampler, ExcludingSampler):
        batch_sampler.sampler.excluded = excluded
        return
    batch_sampler.sampler = ExcludingSampler(batch_sampler.sampler, excluded, len(loader.dataset), seed)
