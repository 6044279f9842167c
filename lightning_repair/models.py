"""The classifier being repaired: the small CNN of Tanno et al. (2022)."""

from __future__ import annotations

import lightning as L
import torch
from torch import nn
from torchmetrics.classification import MulticlassAccuracy


def paper_cnn(num_classes: int = 10, in_channels: int = 1) -> nn.Sequential:
    """Builds the MNIST CNN of Tanno et al. (2022), "Repairing Neural Networks by
    Leaving the Right Past Behind".

    Four 3x3 convolutions (32, 32, 64, 64 channels) with ReLU, 2x2 max-pooling
    after the first two, global average pooling and one linear layer. It is a
    flat ``nn.Sequential`` of standard, non-in-place modules because BackPACK
    can only extend such modules to compute second-order quantities.

    Args:
        num_classes: Number of output logits.
        in_channels: Channels of the input images (1 for grayscale).

    Returns:
        The network, mapping ``(B, in_channels, H, W)`` to ``(B, num_classes)``.
    """
    return nn.Sequential(
        nn.Conv2d(in_channels, 32, kernel_size=3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(32, 32, kernel_size=3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(32, 64, kernel_size=3, padding=1),
        nn.ReLU(),
        nn.Conv2d(64, 64, kernel_size=3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(64, num_classes),
    )


class ImageClassifier(L.LightningModule):
    """Cross-entropy image classifier around ``paper_cnn``, trained with Adam.

    Batches are ``(x, y)`` pairs. Logs ``{train,val,test}/loss`` and
    ``{train,val,test}/acc``.
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 1, lr: float = 1e-3) -> None:
        """Builds the network and one accuracy metric per stage.

        Args:
            num_classes: Number of classes.
            in_channels: Channels of the input images.
            lr: Adam learning rate.

        Raises:
            ValueError: If ``num_classes`` < 2, ``in_channels`` < 1 or ``lr`` <= 0.
        """
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"num_classes must be at least 2, got {num_classes}.")
        if in_channels < 1:
            raise ValueError(f"in_channels must be at least 1, got {in_channels}.")
        if lr <= 0:
            raise ValueError(f"lr must be positive, got {lr}.")
        self.save_hyperparameters()
        self.net = paper_cnn(num_classes, in_channels)
        # Separate metric objects: sharing one would mix the stages' running counts.
        self.train_acc = MulticlassAccuracy(num_classes)
        self.val_acc = MulticlassAccuracy(num_classes)
        self.test_acc = MulticlassAccuracy(num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Computes logits.

        Args:
            x: Images of shape ``(B, in_channels, H, W)``.

        Returns:
            Logits of shape ``(B, num_classes)``.
        """
        return self.net(x)

    def _step(
        self,
        batch: tuple[torch.Tensor, torch.Tensor],
        stage: str,
        accuracy: MulticlassAccuracy,
        prog_bar: bool,
    ) -> torch.Tensor:
        """Computes and logs the loss and accuracy of one batch.

        Args:
            batch: ``(x, y)`` images and integer labels.
            stage: Prefix of the logged names (``"train"``, ``"val"``, ``"test"``).
            accuracy: The stage's accuracy metric.
            prog_bar: Whether to show the accuracy in the progress bar.

        Returns:
            The mean cross-entropy loss and the logits.
        """
        x, y = batch
        logits = self(x)
        loss = nn.functional.cross_entropy(logits, y)
        accuracy(logits, y)
        self.log(f"{stage}/loss", loss, on_epoch=True)
        self.log(f"{stage}/acc", accuracy, on_epoch=True, prog_bar=prog_bar)
        return loss, logits

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        """Computes the training loss and logs ``train/loss`` and ``train/acc``.

        Args:
            batch: ``(x, y)`` images and labels.
            batch_idx: Index of the batch (unused).

        Returns:
            The loss to minimize.
        """
        return self._step(batch, "train", self.train_acc, prog_bar=False)[0]

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> dict[str, torch.Tensor]:
        """Logs ``val/loss`` and ``val/acc`` (the latter in the progress bar).

        Args:
            batch: ``(x, y)`` images and labels.
            batch_idx: Index of the batch (unused).

        Returns:
            The loss, and the logits: ``RepairCallback`` reads its failures from them instead of predicting the
            validation set again.
        """
        loss, logits = self._step(batch, "val", self.val_acc, prog_bar=True)
        return {"loss": loss, "logits": logits}

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        """Logs ``test/loss`` and ``test/acc``.

        Args:
            batch: ``(x, y)`` images and labels.
            batch_idx: Index of the batch (unused).

        Returns:
            The loss.
        """
        return self._step(batch, "test", self.test_acc, prog_bar=False)[0]

    def configure_optimizers(self) -> torch.optim.Optimizer:
        """Returns Adam over all parameters with the configured learning rate."""
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)
