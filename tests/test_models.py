"""Tests of lightning_repair.models: the paper CNN and the Lightning classifier."""

from __future__ import annotations

import lightning as L
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_repair.models import ImageClassifier, paper_cnn


def test_paper_cnn_shape_and_backpack_friendly():
    net = paper_cnn()
    assert type(net) is nn.Sequential
    assert net(torch.randn(3, 1, 28, 28)).shape == (3, 10)
    assert not any(isinstance(m, nn.Sequential) for m in net)
    relus = [m for m in net if isinstance(m, nn.ReLU)]
    assert len(relus) == 4 and not any(m.inplace for m in relus)
    convs = [m.out_channels for m in net if isinstance(m, nn.Conv2d)]
    assert convs == [32, 32, 64, 64]


def test_classifier_forward_shape():
    model = ImageClassifier(num_classes=10)
    assert model(torch.randn(4, 1, 28, 28)).shape == (4, 10)


def test_classifier_fast_dev_run():
    # Two batches of random data through fit, validation and test.
    torch.manual_seed(0)
    dataset = TensorDataset(torch.randn(16, 1, 28, 28), torch.randint(0, 10, (16,)))
    loader = DataLoader(dataset, batch_size=8)
    trainer = L.Trainer(
        fast_dev_run=True,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    model = ImageClassifier()
    trainer.fit(model, loader, loader)
    assert {"train/loss", "val/loss", "val/acc"} <= set(trainer.callback_metrics)
    (results,) = trainer.test(model, loader, verbose=False)
    assert {"test/loss", "test/acc"} <= set(results)
