"""Small synthetic data and models for the tests."""

from __future__ import annotations

import gzip
from pathlib import Path

import lightning.pytorch as pl
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, Dataset

from lightning_repair.acceptance import Choice
from lightning_repair.treat import Treatment


class Blobs(Dataset):
    """Gaussian blobs, one per class, returning ``(x, y, index)``; records every index it serves."""

    def __init__(self, n: int, classes: int = 3, features: int = 8, flip: float = 0.0, seed: int = 0) -> None:
        generator = torch.Generator().manual_seed(seed)
        centers = 1.2 * torch.randn(classes, features, generator=torch.Generator().manual_seed(1234))
        self.clean = torch.randint(classes, (n,), generator=generator)
        self.x = centers[self.clean] + torch.randn(n, features, generator=generator)
        flipped = torch.rand(n, generator=generator) < flip
        shift = torch.randint(1, classes, (n,), generator=generator)
        self.y = torch.where(flipped, (self.clean + shift) % classes, self.clean)
        self.flipped_indices = torch.nonzero(self.y != self.clean).flatten()
        self.served: list[int] = []

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, index: int):
        self.served.append(index)
        return self.x[index], int(self.y[index]), index


class BlobsDataModule(pl.LightningDataModule):
    """Train/validation blobs; exposes ``flipped_indices`` like the Fashion-MNIST data module."""

    def __init__(self, n_train: int = 300, n_val: int = 150, flip: float = 0.2, batch_size: int = 32) -> None:
        super().__init__()
        self.train_dataset = Blobs(n_train, flip=flip, seed=0)
        self.val_dataset = Blobs(n_val, seed=1)
        self.flipped_indices = self.train_dataset.flipped_indices
        self.batch_size = batch_size

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_dataset, batch_size=self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_dataset, batch_size=self.batch_size)


class TinyClassifier(pl.LightningModule):
    """A small MLP classifier over ``(x, y, ...)`` batches."""

    def __init__(self, features: int = 8, classes: int = 3, hidden: int = 16, lr: float = 1e-2) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(features, hidden), nn.ReLU(), nn.Linear(hidden, classes))
        self.lr = lr

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        return F.cross_entropy(self(batch[0]), batch[1])

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", F.cross_entropy(self(batch[0]), batch[1]))

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.lr)


def write_fake_fashion_mnist(folder: Path, train: int = 300, test: int = 50) -> None:
    """Random images and labels as the four gzipped IDX files of Fashion-MNIST."""
    generator = torch.Generator().manual_seed(0)
    for stem, count in (("train", train), ("t10k", test)):
        images = torch.randint(0, 256, (count, 28, 28), dtype=torch.uint8, generator=generator)
        labels = torch.randint(0, 10, (count,), dtype=torch.uint8, generator=generator)
        with gzip.open(folder / f"{stem}-images-idx3-ubyte.gz", "wb") as handle:
            handle.write(bytes([0, 0, 8, 3]) + count.to_bytes(4, "big") + (28).to_bytes(4, "big") * 2
                         + images.numpy().tobytes())
        with gzip.open(folder / f"{stem}-labels-idx1-ubyte.gz", "wb") as handle:
            handle.write(bytes([0, 0, 8, 1]) + count.to_bytes(4, "big") + labels.numpy().tobytes())


class Forced(Treatment):
    """A treatment whose one candidate is kept whatever the judge says, so that the rollback alone decides."""

    def treat(self, inputs):
        return Choice(next(self.candidates(inputs), None), float("nan"), 1)


class Scramble(Forced):
    """Breaks the model: every weight set to noise."""

    def candidates(self, inputs):
        with torch.no_grad():
            for p in inputs.model.parameters():
                p.copy_(torch.randn_like(p) * 10)
        yield "scrambled"


class Unchanged(Forced):
    """Proposes nothing: the model stays at θ̂."""

    def candidates(self, inputs):
        yield from ()
