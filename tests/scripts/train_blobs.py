"""Trains TinyClassifier on blobs with RepairCallback; can SIGKILL itself. Used by tests/test_resume.py.

    python train_blobs.py ROOT --kill-at-step 25        # dies mid-epoch after two repair rounds
    python train_blobs.py ROOT --kill-in-round 2        # dies while scoring in round 2
    python train_blobs.py ROOT --resume                 # resumes from ROOT/last.ckpt, writes ROOT/resumed.json
"""

import argparse
import json
import os
import signal
import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from helpers import BlobsDataModule, TinyClassifier  # noqa: E402

from lightning_repair import RepairCallback  # noqa: E402
from lightning_repair.identify import TrainingLoss  # noqa: E402

parser = argparse.ArgumentParser()
parser.add_argument("root", type=Path)
parser.add_argument("--kill-at-step", type=int)
parser.add_argument("--kill-in-round", type=int)
parser.add_argument("--resume", action="store_true")
args = parser.parse_args()


def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


class KillAtStep(Callback):
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == args.kill_at_step:
            die()


class KillingScorer(TrainingLoss):
    """Dies in the middle of the scoring pass of round ``--kill-in-round``."""

    def score(self, inputs):
        if len(repair.rounds) + 1 == args.kill_in_round:
            die()
        return super().score(inputs)


class Record(Callback):
    def __init__(self) -> None:
        self.at_start, self.served = None, {}

    def on_train_start(self, trainer, pl_module):
        self.at_start = {"removed": repair.removed_indices, "rounds": len(repair.rounds),
                         "epoch": trainer.current_epoch, "step": trainer.global_step}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.served.setdefault(trainer.current_epoch, []).extend(batch[2].tolist())


repair = RepairCallback(scorer=KillingScorer(), top_k=10, start_epoch=0, every_n_epochs=1, fisher_samples=32,
                        rollback=False)
record = Record()
callbacks = [repair, record, ModelCheckpoint(dirpath=args.root, save_last=True, save_top_k=0, every_n_train_steps=3)]
if args.kill_at_step:
    callbacks.append(KillAtStep())
torch.manual_seed(0)
trainer = pl.Trainer(max_epochs=4, callbacks=callbacks, accelerator="cpu", logger=False, default_root_dir=args.root,
                     enable_progress_bar=False, enable_model_summary=False)
trainer.fit(TinyClassifier(), BlobsDataModule(), ckpt_path="last" if args.resume else None)
(args.root / "resumed.json").write_text(json.dumps({
    "at_start": record.at_start, "served": record.served, "removed": repair.removed_indices,
    "rounds": [r.to_dict() for r in repair.rounds], "epoch": trainer.current_epoch}))
