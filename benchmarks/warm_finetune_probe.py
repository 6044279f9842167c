"""Does a fine-tune that continues the trainer's Adam (its moments) pass the gate where a fresh Adam does not?

Trains ``benchmarks.fit``'s plain ``50k`` fit of a protocol and seed, snapshots the weights and the optimizer's
state after the validation of the given epochs (0-based), and runs one ``RepairRound`` per snapshot and variant: a
perfect detector (``FlipOracle``) or KNN-Shapley (trusted), with ``Finetune()`` (a fresh Adam) or the same
fine-tune continuing the snapshot's Adam state (100 or 300 steps). One JSON line per round.

    python -m benchmarks.warm_finetune_probe pairs 1 3 7 >> benchmarks/results/warm_finetune_probe.jsonl

One thread; the plain fit, then about a minute per round on this project's CPU.
"""

from __future__ import annotations

import argparse
import copy
import json
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import lightning.pytorch as pl
import torch
from torch.nn import functional as F

from benchmarks import fit
from lightning_repair.curvature import batches, checked_logits, endless
from lightning_repair.identify import KNNShapley
from lightning_repair.params import trainable
from lightning_repair.round import RepairRound
from lightning_repair.treat import Finetune, TreatmentInputs


class Snapshots(pl.Callback):
    """The module's weights and its optimizer's state after the validation of each given epoch."""

    def __init__(self, epochs: list[int]) -> None:
        self.epochs, self.taken = set(epochs), {}

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.current_epoch in self.epochs:
            self.taken[trainer.current_epoch] = (copy.deepcopy(pl_module.state_dict()),
                                                 copy.deepcopy(trainer.optimizers[0].state_dict()))


@dataclass(kw_only=True)
class WarmFinetune(Finetune):
    """Finetune on D \\ C with Adam continued from ``state`` (the trainer's), at ``lr``."""

    state: dict = field(default_factory=dict, repr=False)

    def candidates(self, inputs: TreatmentInputs) -> Iterator[int]:
        parameters = trainable(inputs.model)
        optimizer = torch.optim.Adam(parameters, lr=self.lr)
        optimizer.load_state_dict(copy.deepcopy(self.state))
        for group in optimizer.param_groups:
            group["lr"] = self.lr
        stream = endless(inputs.kept)
        for step, (x, y) in zip(range(1, self.steps + 1), batches(stream, inputs.model, inputs.adapter)):
            with torch.enable_grad():
                optimizer.zero_grad(set_to_none=True)
                F.cross_entropy(checked_logits(inputs.model, x, y, inputs.adapter), y).backward(inputs=parameters)
            optimizer.step()
            if step % self.eval_every == 0 or step == self.steps:
                yield step
        for p in parameters:
            p.grad = None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("protocol", choices=fit.PROTOCOLS)
    parser.add_argument("seed", type=int)
    parser.add_argument("epochs", type=int, nargs="+")
    arguments = parser.parse_args()
    torch.set_num_threads(1)
    setting = fit.Setting(protocol=arguments.protocol, regime="50k", seed=arguments.seed,
                          epochs=max(arguments.epochs) + 1)
    data, model = fit._datamodule(setting, arguments.protocol), fit._new_classifier(arguments.seed)
    snapshots = Snapshots(arguments.epochs)
    with tempfile.TemporaryDirectory() as root:
        fit._fit(setting, data, model, [snapshots], Path(root))
    flipped = data.flipped_indices
    for number, epoch in enumerate(sorted(arguments.epochs), start=1):  # the callback's round numbers
        weights, state = snapshots.taken[epoch]
        variants = {
            "oracle/fresh": (fit.FlipOracle(flipped=flipped), Finetune()),
            "oracle/warm": (fit.FlipOracle(flipped=flipped), WarmFinetune(state=state)),
            "oracle/warm300": (fit.FlipOracle(flipped=flipped), WarmFinetune(state=state, steps=300, eval_every=30)),
            "knn/warm": (KNNShapley(utility="trusted"), WarmFinetune(state=state)),
            "knn/warm300": (KNNShapley(utility="trusted"), WarmFinetune(state=state, steps=300, eval_every=30)),
        }
        for name, (scorer, treatment) in variants.items():
            model.load_state_dict(weights)
            start = time.perf_counter()
            record = RepairRound(scorer=scorer, treatment=treatment).run(
                model, data.train_dataloader(), data.val_dataloader(), number=number, seed=0, epoch=epoch,
                flipped=flipped).record
            print(json.dumps({"protocol": arguments.protocol, "seed": arguments.seed, "epoch": epoch,
                              "variant": name, "causes": record.causes, "precision": record.precision,
                              "accepted": record.accepted, "gain": record.gain, "se": record.gain_standard_error,
                              "candidate": record.candidate, "control_gain": record.control_gain,
                              "control_se": record.control_gain_standard_error,
                              "control_candidate": record.control_candidate, "rollback": record.rollback,
                              "seconds": round(time.perf_counter() - start, 1)}), flush=True)


if __name__ == "__main__":
    main()
