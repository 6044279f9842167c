"""Which treatment moves a model that is learning its flipped labels? One round on snapshots of a plain fit.

Trains the paper CNN as ``benchmarks.fit``'s plain run does (same data, initial weights and order), snapshots it
after the validation of the given epochs (0-based), and runs one ``RepairRound`` (KNN-Shapley (trusted) scores,
the default selection) on each snapshot with each treatment, printing one JSON line per round: the cause set's
size and precision, whether the acceptance rule kept it, and its gain in estimated validation accuracy.

    python -m benchmarks.treatment_probe symmetric 0 --epochs 15 31 63 > benchmarks/results/treatment_probe.jsonl

One thread; about 15 minutes for three snapshots of ``3k-mem`` on this project's CPU.
"""

from __future__ import annotations

import argparse
import copy
import json
import tempfile
import time
from pathlib import Path

import lightning.pytorch as pl
import torch

from benchmarks import fit
from lightning_repair.round import RepairRound
from lightning_repair.treat import EWCUnlearning, Finetune, NewtonRemoval

TREATMENTS = {"EWCUnlearning()": EWCUnlearning(), "EWCUnlearning(modules='all')": EWCUnlearning(modules="all"),
              "EWCUnlearning(lr=1e-2)": EWCUnlearning(lr=1e-2),
              "EWCUnlearning(modules='all', lr=1e-2)": EWCUnlearning(modules="all", lr=1e-2),
              "Finetune()": Finetune(), "NewtonRemoval()": NewtonRemoval()}


class Snapshots(pl.Callback):
    """The module's weights after the validation of each given epoch."""

    def __init__(self, epochs: list[int]) -> None:
        self.epochs, self.weights = set(epochs), {}

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.current_epoch in self.epochs:
            self.weights[trainer.current_epoch] = copy.deepcopy(pl_module.state_dict())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("protocol", choices=fit.PROTOCOLS)
    parser.add_argument("seed", type=int)
    parser.add_argument("--regime", choices=tuple(fit.REGIMES), default="3k-mem")
    parser.add_argument("--epochs", type=int, nargs="+", default=[15, 31, 63])
    arguments = parser.parse_args()
    torch.set_num_threads(1)
    setting = fit.Setting(protocol=arguments.protocol, regime=arguments.regime, seed=arguments.seed,
                          epochs=max(arguments.epochs) + 1)
    data = fit._datamodule(setting, arguments.protocol)
    model = fit._new_classifier(arguments.seed)
    snapshots = Snapshots(arguments.epochs)
    with tempfile.TemporaryDirectory() as root:
        fit._fit(setting, data, model, [snapshots], Path(root))
    for epoch in arguments.epochs:
        for name, treatment in TREATMENTS.items():
            model.load_state_dict(snapshots.weights[epoch])
            start = time.perf_counter()
            record = RepairRound(treatment=treatment).run(
                model, data.train_dataloader(), data.val_dataloader(), number=2, seed=0, epoch=epoch,
                flipped=data.flipped_indices).record
            print(json.dumps({"protocol": arguments.protocol, "regime": arguments.regime, "seed": arguments.seed,
                              "epoch": epoch, "treatment": name, "causes": record.causes,
                              "precision": record.precision, "accepted": record.accepted, "gain": record.gain,
                              "gain_standard_error": record.gain_standard_error,
                              "seconds": round(time.perf_counter() - start, 1)}), flush=True)


if __name__ == "__main__":
    main()
