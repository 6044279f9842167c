"""A map-style dataset, a subset of its indices, and how to batch them.

The callback refers to every example by its index in the user's dataset; this is how it reads any subset
(the failures, the causes, D without them) with the user's own collate function, without copying data.
"""

from __future__ import annotations

from collections.abc import Callable, Sized
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, IterableDataset, Subset


@dataclass(frozen=True)
class Examples:
    """Examples ``dataset[i]`` for ``i`` in ``indices`` (all of the dataset when ``indices`` is None)."""

    dataset: Dataset
    indices: Tensor | None = None
    batch_size: int = 256
    collate_fn: Callable[[list], Any] | None = None
    num_workers: int = 0

    @classmethod
    def from_dataloader(cls, loader: DataLoader, role: str, batch_size: int | None = None) -> "Examples":
        """Reads the dataset and batching of a user's DataLoader.

        Args:
            loader: the user's training or validation DataLoader.
            role: ``"training"`` or ``"validation"``, for error messages.
            batch_size: batch size for the repair passes; defaults to the loader's.
        """
        if not isinstance(loader, DataLoader):
            raise TypeError(
                f"RepairCallback needs the {role} data as a torch DataLoader over a map-style dataset, got "
                f"{type(loader).__name__}. Return a DataLoader from `{role}_dataloader()`."
            )
        dataset = loader.dataset
        if isinstance(dataset, IterableDataset) or not isinstance(dataset, Sized):
            raise TypeError(
                f"RepairCallback needs a map-style {role} dataset (with __len__ and __getitem__) so it can refer to "
                f"examples by index; got {type(dataset).__name__}. Wrap your data in a map-style Dataset."
            )
        return cls(
            dataset=dataset,
            batch_size=batch_size or loader.batch_size or 256,
            collate_fn=loader.collate_fn,
            num_workers=loader.num_workers,
        )

    def __len__(self) -> int:
        return len(self.dataset) if self.indices is None else len(self.indices)

    @property
    def positions(self) -> Tensor:
        """The dataset indices of these examples, in order."""
        return torch.arange(len(self.dataset)) if self.indices is None else self.indices

    def subset(self, indices: Tensor) -> "Examples":
        """These examples restricted to dataset ``indices``."""
        return replace(self, indices=torch.as_tensor(indices, dtype=torch.long))

    def loader(self, shuffle: bool = False, generator: torch.Generator | None = None,
               batch_size: int | None = None) -> DataLoader:
        """A DataLoader over these examples; in order unless ``shuffle``.

        It never draws from the global RNG: without ``generator`` it gets its own (each pass over a DataLoader
        draws a seed for its workers), so how many passes a round makes does not change its random draws.
        """
        dataset = self.dataset if self.indices is None else Subset(self.dataset, self.indices.tolist())
        return DataLoader(
            dataset,
            batch_size=batch_size or self.batch_size,
            shuffle=shuffle,
            generator=generator if generator is not None else torch.Generator().manual_seed(0),
            collate_fn=self.collate_fn,
            num_workers=self.num_workers,
        )


class Rows:
    """Per-batch results of a pass (one row per example) written into one tensor, allocated at the first batch.

    A list of small per-batch tensors, each allocated between one batch's large activations and the next's, keeps
    the C allocator from returning the activations' memory: 50,000 embeddings of 64 floats (13 MB) held 330 MB of
    resident memory that way, and 30 MB in one buffer (`benchmarks/results/speed.md`). The buffer holds ``rows``
    rows (the loader's dataset size) and doubles if a loader yields more.
    """

    def __init__(self, rows: int) -> None:
        self.rows, self.filled = rows, 0
        self.buffer: Tensor | None = None

    @classmethod
    def of(cls, loader: Any) -> "Rows":
        """Rows for a pass over ``loader``: its dataset's size where it has one (a DataLoader over a sized
        dataset); any other iterable of batches starts from its first batch's size."""
        dataset = getattr(loader, "dataset", None)
        return cls(len(dataset) if isinstance(dataset, Sized) else 0)

    def append(self, part: Tensor) -> None:
        part = part.detach()
        if self.buffer is None:
            self.buffer = part.new_empty((max(self.rows, len(part)), *part.shape[1:]))
        elif self.filled + len(part) > len(self.buffer):
            grown = self.buffer.new_empty((max(2 * len(self.buffer), self.filled + len(part)), *part.shape[1:]))
            grown[: self.filled] = self.buffer[: self.filled]
            self.buffer = grown
        self.buffer[self.filled: self.filled + len(part)] = part
        self.filled += len(part)

    def tensor(self, empty: Tensor) -> Tensor:
        """The rows written, in order; ``empty`` when there were none."""
        return empty if self.buffer is None else self.buffer[: self.filled]
