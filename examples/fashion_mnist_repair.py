"""Train the paper's CNN on Fashion-MNIST with flipped labels and repair it during training.

    python examples/fashion_mnist_repair.py            # 5 epochs of 50,000 images, a repair round after each
    python examples/fashion_mnist_repair.py --epochs 2 --train-subset 5000   # a quick look

Prints, per repair round: failures found, causes selected, whether the round was kept or rolled back,
examples removed, the share of the causes whose label really was flipped (precision), and accuracy on the
held-out failures F_h and on the rest of the validation set R; then the test accuracy.
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

pl.seed_everything(0)
data = FashionMNISTDataModule(noise=args.noise, train_subset=args.train_subset, batch_size=64)
repair = RepairCallback(top_fraction=0.02, start_epoch=0)
trainer = pl.Trainer(max_epochs=args.epochs, callbacks=[repair], accelerator="auto", devices=1,
                     default_root_dir="repair_logs", enable_model_summary=False)
model = ImageClassifier()
trainer.fit(model, data)
test = trainer.test(model, data, verbose=False)[0]

print(f"\nInjected {args.noise} label noise: {len(data.flipped_indices):,} of {len(data.train_dataset):,} "
      "training labels flipped.")
print(format_table(repair.rounds))
print(f"\nTest accuracy after repair: {test['test/acc']:.4f}")
print(f"Suspects of each round: {repair.log_dir(trainer)}/round_*_suspects.csv")
