"""torchvision's ResNet-18, as torchvision writes it, repaired on Fashion-MNIST with flipped labels.

    python examples/resnet_repair.py                   # 3,000 training images, 4 epochs, plain and repaired
    python examples/resnet_repair.py --epochs 3 --train-subset 500 --val-size 500   # a quick look

The network is torchvision's as written: in-place ReLUs, residual additions, its 7×7 stride-2 stem and max-pool.
Only the first convolution takes 1 channel instead of 3. (The usual small-image stem, a 3×3 convolution without
the max-pool, keeps 28×28 feature maps into the first stage and trains about 5× slower on a CPU.) The defaults,
KNN-Shapley and training on without the causes (no unlearning step), need no per-example gradients; a method that
does (EWC influence, EWC deletion's Fisher) gets them from torch.func, since BackPACK cannot follow the residual
additions, and the callback says so in its log.
"""

import argparse

import lightning.pytorch as pl
import torch
import torchvision
from torch import nn
from torch.nn import functional as F

from lightning_repair import RepairCallback
from lightning_repair.data import FashionMNISTDataModule
from lightning_repair.report import format_table

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--epochs", type=int, default=4)
parser.add_argument("--train-subset", type=int, default=3000)
parser.add_argument("--val-size", type=int, default=2000)
parser.add_argument("--noise", default="pairs", choices=["none", "pairs", "symmetric"])
args = parser.parse_args()


class ResNetClassifier(pl.LightningModule):
    """torchvision's resnet18 for 1-channel images, trained with cross-entropy."""

    def __init__(self) -> None:
        super().__init__()
        self.net = torchvision.models.resnet18(num_classes=10)
        self.net.conv1 = nn.Conv2d(1, 64, kernel_size=7, stride=2, padding=3, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        return F.cross_entropy(self(batch[0]), batch[1])

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val/acc", (self(x).argmax(1) == y).float().mean(), prog_bar=True)

    def test_step(self, batch, batch_idx):
        x, y = batch
        self.log("test/acc", (self(x).argmax(1) == y).float().mean())

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-3)


def fit(callbacks: list) -> tuple[float, FashionMNISTDataModule]:
    """One fit from seed 0; returns its test accuracy and the data."""
    pl.seed_everything(0)
    data = FashionMNISTDataModule(noise=args.noise, train_subset=args.train_subset, val_size=args.val_size,
                                  batch_size=64)
    trainer = pl.Trainer(max_epochs=args.epochs, callbacks=callbacks, accelerator="auto", devices=1,
                         default_root_dir="repair_logs", enable_model_summary=False)
    model = ResNetClassifier()
    trainer.fit(model, data)
    return trainer.test(model, data, verbose=False)[0]["test/acc"], data


plain, _ = fit([])
repair = RepairCallback()
repaired, data = fit([repair])

flipped, removed = set(data.flipped_indices.tolist()), set(repair.removed_indices)
print(f"\nResNet-18, {args.noise} label noise: {len(flipped):,} of {len(data.train_dataset):,} labels flipped.")
print(format_table(repair.rounds))
backend = repair.rounds[0].get("curvature") if repair.rounds else "no round ran"
print(f"Curvature backend: {backend or 'none needed (the default round uses no per-example gradients)'}")
print(f"\nTest accuracy, plain training:        {plain:.4f}")
print(f"Test accuracy, with RepairCallback(): {repaired:.4f} ({100 * (repaired - plain):+.1f} points)")
hits = len(removed & flipped)
print(f"Removed {len(removed):,} training examples" + (f", precision {hits / len(removed):.2f}" if removed else ""))
