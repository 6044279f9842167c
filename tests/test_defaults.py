"""RepairCallback() with its defaults repairs small models the project was not built around.

Each fit must keep at least one round, and what the kept rounds remove must be label flips more often than a
random pick would be (precision above the flip rate).
"""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, Dataset

from lightning_repair import RepairCallback
from lightning_repair.treat import EWCUnlearning


class OverlappingBlobs(pl.LightningDataModule):
    """Three Gaussian blobs in 2-D that overlap; 40 % of class 0's training labels flipped to class 1 (class-pair
    noise, as in the paper: it moves the decision boundary, so the flips cause validation failures)."""

    def __init__(self, dict_batches: bool = False) -> None:
        super().__init__()
        self.train_dataset = _Points(2000, flip=0.4, seed=0, dict_batches=dict_batches)
        self.val_dataset = _Points(2000, flip=0.0, seed=1, dict_batches=dict_batches)
        self.flipped_indices = self.train_dataset.flipped_indices

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_dataset, batch_size=64, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_dataset, batch_size=256)


class _Points(Dataset):
    def __init__(self, n: int, flip: float, seed: int, dict_batches: bool) -> None:
        generator = torch.Generator().manual_seed(seed)
        centres = torch.tensor([[0.0, 0.0], [2.5, 0.0], [1.25, 2.2]])
        self.clean = torch.randint(3, (n,), generator=generator)
        self.x = centres[self.clean] + torch.randn(n, 2, generator=generator)
        flipped = (torch.rand(n, generator=generator) < flip) & (self.clean == 0)
        self.y = torch.where(flipped, torch.ones_like(self.clean), self.clean)
        self.flipped_indices = torch.nonzero(self.y != self.clean).flatten()
        self.dict_batches = dict_batches

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, index: int):
        if self.dict_batches:
            return {"x": self.x[index], "y": int(self.y[index])}
        return self.x[index], int(self.y[index])


class MLP(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(2, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 3))

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        return F.cross_entropy(self(batch[0]), batch[1])

    def validation_step(self, batch, batch_idx):
        pass

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-2)


class ResidualBatchNormNet(pl.LightningModule):
    """Residual blocks with BatchNorm, written with functional calls, trained on dict batches."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Linear(2, 32)
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(32, 32), nn.BatchNorm1d(32)) for _ in range(2))
        self.head = nn.Linear(32, 3)

    def forward(self, x):
        h = F.relu(self.stem(x))
        for block in self.blocks:
            h = F.relu(h + block(h))
        return self.head(h)

    def training_step(self, batch, batch_idx):
        return F.cross_entropy(self(batch["x"]), batch["y"])

    def validation_step(self, batch, batch_idx):
        pass

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-2)


def _fit(build: type[pl.LightningModule], data: OverlappingBlobs, repair: RepairCallback, epochs: int = 5) -> None:
    torch.manual_seed(0)  # before the model is built: its initial weights must not depend on earlier tests
    model = build()
    trainer = pl.Trainer(max_epochs=epochs, callbacks=[repair], accelerator="cpu", logger=False,
                         enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False)
    trainer.fit(model, data)


def _kept_precision(repair: RepairCallback, data: OverlappingBlobs) -> float:
    removed = torch.tensor(repair.removed_indices)
    return torch.isin(removed, data.flipped_indices).float().mean().item()


def test_defaults_repair_an_mlp_on_overlapping_noisy_blobs():
    data = OverlappingBlobs()
    repair = RepairCallback()
    _fit(MLP, data, repair)
    kept = [r for r in repair.rounds if r["accepted"]]
    assert kept, [(r.get("rollback"), r.get("gain")) for r in repair.rounds]
    flip_rate = len(data.flipped_indices) / len(data.train_dataset)
    assert _kept_precision(repair, data) > flip_rate, (_kept_precision(repair, data), flip_rate)


@pytest.mark.parametrize("settings, curvature", [
    ({}, None),  # KNN-Shapley and fine-tuning need no Fisher
    ({"treatment": EWCUnlearning()}, "torch_func"),
    ({"treatment": EWCUnlearning(), "params": ["head"]}, "backpack"),
], ids=["defaults", "EWC deletion, whole network (torch.func)", "EWC deletion, head (BackPACK)"])
def test_defaults_repair_a_residual_batchnorm_network_with_dict_batches(settings, curvature):
    data = OverlappingBlobs(dict_batches=True)
    repair = RepairCallback(**settings)
    _fit(ResidualBatchNormNet, data, repair)
    # BackPACK's Fisher cannot pass the functional residual additions, but follows the head alone.
    assert {r["curvature"] for r in repair.rounds} == {curvature}
    kept = [r for r in repair.rounds if r["accepted"]]
    assert kept, [(r.get("rollback"), r.get("gain")) for r in repair.rounds]
    flip_rate = len(data.flipped_indices) / len(data.train_dataset)
    assert _kept_precision(repair, data) > flip_rate, (_kept_precision(repair, data), flip_rate)
