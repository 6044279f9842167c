"""RepairCallback under DDP: 2 CPU processes (gloo). Each rank writes ROOT/rank_<r>.json. Used by tests/test_ddp.py."""

import json
import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from helpers import BlobsDataModule, TinyClassifier  # noqa: E402

from lightning_repair import RepairCallback  # noqa: E402
from lightning_repair.identify import EWCInfluence  # noqa: E402

root = Path(sys.argv[1])


class CountingScorer(EWCInfluence):
    """EWC influence that records how many training examples this rank scored."""

    scored: list[int] = []

    def score(self, inputs):
        CountingScorer.scored.append(len(inputs.train.dataset))
        return super().score(inputs)


class Record(Callback):
    def __init__(self) -> None:
        self.served: dict[int, list[int]] = {}
        self.excluded: dict[int, list[int]] = {}

    def on_train_epoch_start(self, trainer, pl_module):
        self.excluded[trainer.current_epoch] = repair.removed_indices

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.served.setdefault(trainer.current_epoch, []).extend(batch[2].tolist())


torch.manual_seed(0)
repair = RepairCallback(scorer=CountingScorer(max_steps=10), top_k=12, start_epoch=0, every_n_epochs=1, fisher_samples=64,
                        rollback=False)
record = Record()
trainer = pl.Trainer(max_epochs=3, strategy="ddp", accelerator="cpu", devices=2, callbacks=[repair, record],
                     logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                     default_root_dir=root)
trainer.fit(TinyClassifier(), BlobsDataModule(n_train=400))
sampler = trainer.train_dataloader.batch_sampler.sampler
(root / f"rank_{trainer.global_rank}.json").write_text(json.dumps({
    "removed": repair.removed_indices,
    "rounds": [{k: r[k] for k in ("failures", "query", "holdout", "causes", "removed", "acc_fh_after", "acc_r_after")}
               for r in repair.rounds],
    "scored": CountingScorer.scored,
    "served": record.served,
    "excluded": record.excluded,
    "parameters": [p.detach().flatten().tolist() for p in trainer.lightning_module.parameters()],
    "sampler": [type(sampler).__name__, type(sampler.sampler).__name__],
}))
