"""Training and evaluating the benchmark's models with a plain PyTorch loop over in-memory tensors.

Lightning's loop and a per-item ``Dataset`` would add nothing here but overhead: the splits are normalised once
into float tensors and batches are slices of a seeded permutation. The optimiser is the protocol's (Adam,
lr 1e-3, batch 64), as in :class:`lightning_repair.models.ImageClassifier`.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.utils.data import TensorDataset

from lightning_repair.data import FASHION_MNIST_MEAN, FASHION_MNIST_STD, NoisyLabelDataset
from lightning_repair.models import paper_cnn

BATCH_SIZE = 64
LEARNING_RATE = 1e-3
EVAL_BATCH_SIZE = 128  # on one CPU thread, faster than larger batches


@dataclass(frozen=True)
class Split:
    """Normalised images ``x`` of shape (N, 1, 28, 28) and integer labels ``y`` of one split."""

    x: Tensor
    y: Tensor

    def __len__(self) -> int:
        return len(self.y)

    def subset(self, indices: Tensor) -> "Split":
        """The examples at ``indices``."""
        return Split(self.x[indices], self.y[indices])

    def relabel(self, labels: Tensor) -> "Split":
        """The same images with other labels (e.g. the clean ones)."""
        return Split(self.x, labels.long())

    def dataset(self) -> TensorDataset:
        """A map-style dataset of ``(x, y)`` pairs, indexed like the split, for the library's loaders."""
        return TensorDataset(self.x, self.y)


def split_tensors(dataset: NoisyLabelDataset) -> Split:
    """The whole dataset normalised at once, exactly as ``NoisyLabelDataset.__getitem__`` does per item."""
    x = (dataset.images.float().div(255.0) - FASHION_MNIST_MEAN) / FASHION_MNIST_STD
    return Split(x.unsqueeze(1), dataset.labels.clone())


def new_model(seed: int) -> nn.Sequential:
    """The paper's CNN with weights drawn from ``seed``."""
    torch.manual_seed(seed)
    return paper_cnn()


def train(model: nn.Module, data: Split, epochs: int, seed: int) -> list[float]:
    """Trains ``model`` in place for ``epochs`` passes over ``data``; returns the wall seconds of each epoch."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=LEARNING_RATE)
    model.train()
    seconds = []
    for _ in range(epochs):
        start = time.perf_counter()
        order = torch.randperm(len(data), generator=generator)
        for batch in order.split(BATCH_SIZE):
            loss = F.cross_entropy(model(data.x[batch]), data.y[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        seconds.append(time.perf_counter() - start)
    model.eval()
    return seconds


@torch.no_grad()
def probabilities(model: nn.Module, x: Tensor) -> Tensor:
    """softmax f(x) for every image of ``x``, in eval mode."""
    model.eval()
    return torch.cat([F.softmax(model(chunk), dim=1) for chunk in x.split(EVAL_BATCH_SIZE)])


def predictions(model: nn.Module, x: Tensor) -> Tensor:
    """The predicted class of every image of ``x``."""
    return probabilities(model, x).argmax(dim=1)


def accuracy(model: nn.Module, data: Split) -> float:
    """Accuracy of ``model`` on ``data``'s labels."""
    return (predictions(model, data.x) == data.y).double().mean().item()


def cached(path: Path, build: Callable[[], dict[str, Any]]) -> tuple[dict[str, Any], bool]:
    """``build()``'s result, saved at ``path`` on the first call and loaded from there afterwards.

    Returns:
        The result and whether it came from the cache.
    """
    if path.is_file():
        return torch.load(path, weights_only=False), True
    result = build()
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial")
    torch.save(result, partial)
    partial.replace(path)  # never leave a truncated file where a later run would trust it
    return result, False


def trained_model(path: Path, data: Split, epochs: int, seed: int) -> tuple[nn.Module, dict[str, Any]]:
    """The paper's CNN trained from ``seed`` on ``data`` for ``epochs``, from the cache when it is there.

    Returns:
        The model in eval mode and ``{"epoch_seconds": [...], "cached": bool}``.
    """
    def build() -> dict[str, Any]:
        model = new_model(seed)
        seconds = train(model, data, epochs, seed)
        return {"state_dict": model.state_dict(), "epoch_seconds": seconds}

    saved, was_cached = cached(path, build)
    model = new_model(seed)
    model.load_state_dict(saved["state_dict"])
    return model.eval(), {"epoch_seconds": saved["epoch_seconds"], "cached": was_cached}


def epoch_overrides(parser: argparse.ArgumentParser, overrides: list[str], regimes: Iterable[str]) -> dict[str, int]:
    """``--epochs REGIME=EPOCHS ...`` as {regime: epochs}; a malformed one stops the parser with a message."""
    regimes, epochs_of = list(regimes), {}
    for override in overrides:
        name, _, epochs = override.partition("=")
        if name not in regimes or not epochs.isdigit() or int(epochs) < 1:
            parser.error(f"--epochs takes REGIME=EPOCHS with REGIME in {regimes}, got {override!r}")
        epochs_of[name] = int(epochs)
    return epochs_of
