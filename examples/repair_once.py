"""Repair a model once, after training, with no Lightning Trainer: a plain PyTorch loop, then one RepairRound.

    python examples/repair_once.py                            # 3 epochs on 20,000 images with pair noise
    python examples/repair_once.py --epochs 1 --train-subset 2000   # a quick look

The model is the paper's CNN as a plain ``nn.Sequential``, trained with Adam in an ordinary loop. One round then
finds the validation failures, scores the training set (KNN-Shapley, trusted utility), treats the model without
the causes (fine-tuning on the rest: no training follows this round, so it needs a treatment that moves the
weights, not the default, which only takes the causes out of training) and judges the result on held-out
validation examples that no method read. The repair is applied only when that judgement accepts it. Prints the
round, the test accuracy before and after, and how many of the examples it blamed really had a flipped label.
"""

import argparse

import torch
from torch.nn import functional as F

from lightning_repair import RepairRound
from lightning_repair.data import FashionMNISTDataModule
from lightning_repair.models import paper_cnn
from lightning_repair.params import copy_parameters_
from lightning_repair.report import format_table
from lightning_repair.treat import Finetune

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--epochs", type=int, default=3)
parser.add_argument("--train-subset", type=int, default=20_000)
parser.add_argument("--val-size", type=int, default=10_000)
args = parser.parse_args()

torch.manual_seed(0)
data = FashionMNISTDataModule(noise="pairs", train_subset=args.train_subset, val_size=args.val_size, batch_size=64)
data.setup("fit")
train_loader, val_loader, test_loader = data.train_dataloader(), data.val_dataloader(), data.test_dataloader()


def batches(loader):
    for batch in loader:
        yield batch[0], batch[1]


@torch.no_grad()
def test_accuracy(model: torch.nn.Module) -> float:
    model.eval()
    right = sum(int((model(x).argmax(1) == y).sum()) for x, y in batches(test_loader))
    return right / len(test_loader.dataset)


model = paper_cnn()
optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
for epoch in range(args.epochs):
    model.train()
    for x, y in batches(train_loader):
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
before = test_accuracy(model)

# No training follows, so the round must move the weights itself: fine-tuning on D \ C, judged by the rule.
outcome = RepairRound(treatment=Finetune()).run(model, train_loader, val_loader, flipped=data.flipped_indices)
print(format_table([outcome.record]))
if outcome.record.accepted:
    copy_parameters_(model, outcome.model)  # what RepairCallback does with an accepted round
after = test_accuracy(model)

causes = outcome.causes
flipped = torch.isin(causes, data.flipped_indices)
print(f"\nTest accuracy after {args.epochs} epochs of plain training: {before:.4f}")
print(f"Test accuracy after one RepairRound:                {after:.4f} ({100 * (after - before):+.1f} points, "
      f"{'accepted' if outcome.record.accepted else 'rolled back: ' + str(outcome.record.rollback)})")
print(f"Blamed {len(causes):,} training examples; {int(flipped.sum()):,} of them "
      f"({float(flipped.float().mean()) if len(causes) else 0:.2f}) had a flipped label.")
