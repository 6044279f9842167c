"""Train the paper's CNN on Fashion-MNIST with flipped labels twice, plain and with RepairCallback(), and compare.

    python examples/fashion_mnist_repair.py            # 5 epochs of 50,000 images, each way
    python examples/fashion_mnist_repair.py --epochs 3 --train-subset 5000   # a quick look

Both fits start from the same weights and see the same batches until a repair round is kept (a rolled-back
round changes nothing, not even the batch order). Prints the callback's rounds (failures found, causes
selected, kept or rolled back, examples removed, the share of the causes whose label really was flipped, and
accuracy on the held-out failures F_h and on the rest of the validation set R), then both test accuracies, the
difference, and the precision and recall of everything the callback removed.
"""

import argparse

import lightning.pytorch as pl

from lightning_repair import RepairCallback
from lightning_repair.data import FashionMNISTDataModule
from lightning_repair.models import ImageClassifier
from lightning_repair.report import format_table

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--epochs", type=int, default=5)
parser.add_argument("--train-subset", type=int, default=None, help="train on this many images (default: 50,000)")
parser.add_argument("--noise", default="pairs", choices=["none", "pairs", "symmetric"])
args = parser.parse_args()


def fit(callbacks: list) -> tuple[float, FashionMNISTDataModule, pl.Trainer]:
    """One fit from seed 0; returns its test accuracy, the data and the trainer."""
    pl.seed_everything(0)
    data = FashionMNISTDataModule(noise=args.noise, train_subset=args.train_subset, batch_size=64)
    trainer = pl.Trainer(max_epochs=args.epochs, callbacks=callbacks, accelerator="auto", devices=1,
                         default_root_dir="repair_logs", enable_model_summary=False)
    model = ImageClassifier()
    trainer.fit(model, data)
    return trainer.test(model, data, verbose=False)[0]["test/acc"], data, trainer


plain, _, _ = fit([])
repair = RepairCallback()
repaired, data, trainer = fit([repair])

flipped = set(data.flipped_indices.tolist())
removed = set(repair.removed_indices)
print(f"\nInjected {args.noise} label noise: {len(flipped):,} of {len(data.train_dataset):,} training labels flipped.")
print(format_table(repair.rounds))
print(f"\nTest accuracy, plain training:        {plain:.4f}")
print(f"Test accuracy, with RepairCallback(): {repaired:.4f} ({100 * (repaired - plain):+.1f} points)")
if removed:
    hits = len(removed & flipped)
    print(f"Removed {len(removed):,} training examples: precision {hits / len(removed):.2f} "
          f"(flipped share {len(flipped) / len(data.train_dataset):.2f}), recall {hits / max(len(flipped), 1):.2f}")
else:
    print("Removed no training examples: every round was rolled back.")
print(f"Suspects of each round: {repair.log_dir(trainer)}/round_*_suspects.csv")
