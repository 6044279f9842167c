"""RepairCallback inside a real Trainer.fit on small synthetic data with injected label flips."""

from __future__ import annotations

import csv

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from torch.utils.data import DataLoader, IterableDataset

from helpers import BlobsDataModule, TinyClassifier, write_fake_fashion_mnist
from lightning_repair import RepairCallback
from lightning_repair.callback import default_start_epoch, scheduled_epochs
from lightning_repair.identify import (EWCInfluence, GradientDot, KNNShapley, LinearInfluence, RandomScores,
                                       TrainingLoss)
from lightning_repair.treat import EnergyAlignment, EWCUnlearning, Finetune, NewtonRemoval


class ServedIndices(Callback):
    """Records the dataset indices of every training batch, by epoch."""

    def __init__(self) -> None:
        self.by_epoch: dict[int, set[int]] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.by_epoch.setdefault(trainer.current_epoch, set()).update(batch[2].tolist())


def fit(tmp_path, repair: RepairCallback, max_epochs: int = 4, ckpt_path=None, datamodule=None, **trainer_args):
    served = ServedIndices()
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "checkpoints", save_last=True, save_top_k=0)
    trainer = pl.Trainer(max_epochs=max_epochs, callbacks=[repair, served, checkpoint], accelerator="cpu",
                         logger=CSVLogger(tmp_path), enable_progress_bar=False, enable_model_summary=False,
                         **trainer_args)
    torch.manual_seed(0)
    datamodule = datamodule or BlobsDataModule()
    trainer.fit(TinyClassifier(), datamodule, ckpt_path=ckpt_path)
    return trainer, served, datamodule


def test_removed_examples_are_never_served_after_their_round(tmp_path):
    repair = RepairCallback(top_k=12, start_epoch=1, every_n_epochs=1, fisher_samples=64, rollback=False)
    _, served, data = fit(tmp_path, repair, max_epochs=5)

    assert [r["epoch"] for r in repair.rounds] == [1, 2, 3, 4]
    assert len(repair.removed_indices) == 48 and repair.removed_indices == sorted(set(repair.removed_indices))
    removed_so_far: set[int] = set()
    for record in repair.rounds:
        suspects = tmp_path / "lightning_logs" / "version_0" / "repair" / f"round_{record['round']:03d}_suspects.csv"
        with suspects.open() as handle:
            removed_now = {int(row["index"]) for row in csv.DictReader(handle) if row["removed"] == "1"}
        assert len(removed_now) == record["removed"] == 12
        assert not removed_now & removed_so_far, "an example was removed twice"
        removed_so_far |= removed_now
        for epoch in range(record["epoch"] + 1, 5):
            assert not served.by_epoch[epoch] & removed_so_far
    assert removed_so_far == set(repair.removed_indices)
    # Training still sees every kept example: removal filters, it does not drop whole batches.
    assert served.by_epoch[4] | removed_so_far == set(range(len(data.train_dataset)))
    # The flips are over-represented among the removed examples (20 % of the data is flipped).
    assert repair.rounds[-1]["precision"] is not None
    flipped = set(data.flipped_indices.tolist())
    assert len(removed_so_far & flipped) / len(removed_so_far) > 0.3


def test_round_records_and_logged_metrics(tmp_path):
    repair = RepairCallback(top_k=10, start_epoch=0, every_n_epochs=2, fisher_samples=64, rollback=False)
    trainer, _, _ = fit(tmp_path, repair, max_epochs=3)

    assert [r["epoch"] for r in repair.rounds] == [0, 2]
    record = repair.rounds[0]
    assert record["failures"] == record["query"] + record["holdout"] > 0
    assert record["acc_fq_before"] == 0.0 and record["acc_fh_before"] == 0.0 and record["acc_r_before"] == 1.0
    for key in ("acc_fq_after", "acc_fh_after", "acc_r_after"):
        assert 0.0 <= record[key] <= 1.0
    for phase in ("failures", "fisher", "scores", "treatment", "total"):
        assert record[f"seconds_{phase}"] >= 0.0
    with (tmp_path / "lightning_logs" / "version_0" / "metrics.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    logged = {key for row in rows for key, value in row.items() if value}
    assert {"repair/failures", "repair/causes", "repair/removed", "repair/acc_fh_after", "repair/acc_r_after",
            "repair/seconds_scores", "repair/precision"} <= logged
    suspects = RepairCallback.log_dir(trainer) / "round_001_suspects.csv"
    with suspects.open() as handle:
        rows = list(csv.DictReader(handle))
    assert list(rows[0]) == ["index", "given_label", "predicted_label", "score", "removed"]
    scores = [float(row["score"]) for row in rows]
    assert scores == sorted(scores, reverse=True)
    assert sum(row["removed"] == "1" for row in rows) == 10


@pytest.mark.parametrize("start, every, up_to, expected", [
    (1, None, 149, [1, 3, 7, 15, 31, 63, 127]),  # gaps double: 7 rounds in 150 epochs from epoch 1
    (15, None, 149, [15, 31, 63, 127]),  # the default start of a 150-epoch fit
    (1, None, 4, [1, 3]),
    (0, None, 9, [0, 1, 3, 7]),
    (2, None, 20, [2, 5, 11]),
    (0, 3, 9, [0, 3, 6, 9]),
    (5, 1, 3, []),
])
def test_scheduled_epochs(start, every, up_to, expected):
    assert scheduled_epochs(start, every, up_to) == expected


@pytest.mark.parametrize("max_epochs, start", [
    (150, 15),  # 3k-mem: rounds after epochs 15, 31, 63 and 127
    (10, 3),    # 50k: rounds after epochs 3 and 7
    (5, 3), (30, 3), (50, 5),
    (4, 3), (3, 2), (2, 1),  # short fits: at the latest after the last epoch
    (1, 1),     # a one-epoch fit gets no round (as before: none after epoch 0 by default)
    (None, 3),  # a fit bounded by max_steps alone
    (-1, 3),    # an endless fit
])
def test_the_default_start_is_a_tenth_of_the_fit_at_least_epoch_3(max_epochs, start):
    assert default_start_epoch(max_epochs) == start


@pytest.mark.parametrize("max_epochs, start", [(150, 15), (10, 3), (5, 3), (4, 2), (3, 1), (2, 1), (None, 3)])
def test_a_round_that_moves_no_weight_starts_with_an_epoch_left_after_it(max_epochs, start):
    assert default_start_epoch(max_epochs, epochs_after=1) == start


@pytest.mark.parametrize("max_epochs, every, expected", [
    (4, None, [2]),        # the default start leaves the last epoch to train without the causes
    (8, None, [3]),        # the doubling schedule's round after epoch 7, the last, would change nothing
    (2, None, []),         # no epoch to spare before the last: no round
    (4, 1, [0, 1, 2, 3]),  # a schedule the user gave is kept as given: the last round only reports
])
def test_exclude_skips_rounds_with_no_epoch_left_to_train_without_their_causes(tmp_path, max_epochs, every,
                                                                                expected):
    from lightning_repair.treat import Exclude

    repair = RepairCallback(treatment=Exclude(), top_k=5, every_n_epochs=every,
                            start_epoch=0 if every else None)
    fit(tmp_path, repair, max_epochs=max_epochs)
    assert [r["epoch"] for r in repair.rounds] == expected


def test_the_default_start_follows_the_trainers_max_epochs(tmp_path):
    repair = RepairCallback(top_k=5, fisher_samples=32, rollback=False)
    fit(tmp_path, repair, max_epochs=20)
    assert [r["epoch"] for r in repair.rounds] == [3, 7, 15]  # a tenth is 2: at least epoch 3


def test_default_schedule_doubles_the_gaps_in_a_fit(tmp_path):
    repair = RepairCallback(top_k=5, start_epoch=0, fisher_samples=32, rollback=False)
    fit(tmp_path, repair, max_epochs=5)
    assert [r["epoch"] for r in repair.rounds] == [0, 1, 3]


def test_a_round_without_validation_waits_for_the_next_validation(tmp_path):
    repair = RepairCallback(top_k=5, start_epoch=0, every_n_epochs=1, fisher_samples=32, rollback=False)
    fit(tmp_path, repair, max_epochs=4, check_val_every_n_epoch=2)
    assert [r["epoch"] for r in repair.rounds] == [1, 3]


def test_a_fit_whose_validation_never_runs_stops_with_the_fix(tmp_path):
    repair = RepairCallback(top_k=5, start_epoch=0, every_n_epochs=1, fisher_samples=32)
    with pytest.raises(RuntimeError, match="no validation has run since.*limit_val_batches"):
        fit(tmp_path, repair, max_epochs=2, limit_val_batches=0)
    assert repair.rounds == []


def test_reloaded_training_loaders_are_filtered_again(tmp_path):
    """`reload_dataloaders_every_n_epochs` builds a new DataLoader each epoch; the removed stay out of each."""
    repair = RepairCallback(top_k=12, start_epoch=0, every_n_epochs=1, fisher_samples=32, rollback=False)

    class Excluded(Callback):  # what had been removed when each epoch started, and the loader it started with
        def __init__(self) -> None:
            self.by_epoch, self.loaders = {}, []

        def on_train_epoch_start(self, trainer, pl_module):
            self.by_epoch[trainer.current_epoch] = set(repair.removed_indices)
            self.loaders.append(trainer.train_dataloader)  # held, so no two can share an id()

    excluded, served = Excluded(), ServedIndices()
    trainer = pl.Trainer(max_epochs=4, callbacks=[repair, excluded, served], accelerator="cpu", logger=False,
                         enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                         reload_dataloaders_every_n_epochs=1, default_root_dir=tmp_path)
    torch.manual_seed(0)
    trainer.fit(TinyClassifier(), BlobsDataModule())

    assert len({id(loader) for loader in excluded.loaders}) == 4  # a new DataLoader every epoch
    for epoch in (1, 2, 3):
        assert len(excluded.by_epoch[epoch]) == 12 * epoch
        assert served.by_epoch[epoch] and not served.by_epoch[epoch] & excluded.by_epoch[epoch]


@pytest.mark.parametrize("stop", ["epoch_end", "mid_epoch"])
def test_state_survives_checkpoint_and_resume(tmp_path, stop):
    repair = RepairCallback(top_k=10, start_epoch=0, every_n_epochs=1, fisher_samples=64, rollback=False)
    checkpoint = ModelCheckpoint(dirpath=tmp_path, save_last=True, save_top_k=0,
                                 every_n_train_steps=5 if stop == "mid_epoch" else None)
    limits = {"max_epochs": 2} if stop == "epoch_end" else {"max_epochs": 3, "max_steps": 25}  # 10 steps an epoch
    trainer = pl.Trainer(callbacks=[repair, checkpoint], accelerator="cpu", logger=False, enable_progress_bar=False,
                         enable_model_summary=False, **limits)
    torch.manual_seed(0)
    trainer.fit(TinyClassifier(), BlobsDataModule())
    saved = torch.load(tmp_path / "last.ckpt", weights_only=False)
    state = next(v for k, v in saved["callbacks"].items() if k.startswith("RepairCallback"))
    assert state["removed_indices"] == repair.removed_indices and len(state["rounds"]) == 2

    class CheckOnStart(Callback):
        def on_train_start(self, trainer, pl_module):
            self.removed, self.rounds = list(resumed.removed_indices), list(resumed.rounds)

    resumed = RepairCallback(top_k=10, start_epoch=0, every_n_epochs=1, fisher_samples=64, rollback=False)
    check, served = CheckOnStart(), ServedIndices()
    trainer = pl.Trainer(max_epochs=4, callbacks=[resumed, check, served, ModelCheckpoint(dirpath=tmp_path)],
                         accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(TinyClassifier(), BlobsDataModule(), ckpt_path=tmp_path / "last.ckpt")

    assert check.removed == repair.removed_indices
    assert check.rounds == repair.rounds
    # The first epoch after resuming already skips what was removed before the checkpoint.
    assert served.by_epoch[2] and not served.by_epoch[2] & set(repair.removed_indices)
    assert [r["epoch"] for r in resumed.rounds] == [0, 1, 2, 3]


def test_user_module_and_dataset_are_left_as_they_were(tmp_path):
    data = BlobsDataModule()
    x, y = data.train_dataset.x.clone(), data.train_dataset.y.clone()
    seen = {}

    class Probe(Callback):
        def on_validation_end(self, trainer, pl_module):
            seen["flags"] = [p.requires_grad for p in pl_module.parameters()]
            seen["hooks"] = sum(len(m._forward_hooks) + len(m._backward_hooks) for m in pl_module.modules())

    repair = RepairCallback(top_k=10, start_epoch=0, fisher_samples=64)
    trainer = pl.Trainer(max_epochs=1, callbacks=[repair, Probe()], accelerator="cpu", logger=False,
                         enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False)
    model = TinyClassifier()
    trainer.fit(model, data)
    assert len(repair.rounds) == 1
    assert seen == {"flags": [True] * 4, "hooks": 0}
    assert torch.equal(data.train_dataset.x, x) and torch.equal(data.train_dataset.y, y)


SCORERS = [EWCInfluence(max_steps=10), LinearInfluence(), GradientDot(), KNNShapley(k=3), TrainingLoss(),
           RandomScores()]
TREATMENTS = [EWCUnlearning(max_steps=10), Finetune(steps=10), NewtonRemoval(), EnergyAlignment(fit_steps=5,
                                                                                                  finetune_steps=5)]


@pytest.mark.parametrize("scorer", SCORERS, ids=lambda s: type(s).__name__)
def test_every_scorer_runs_inside_fit(tmp_path, scorer):
    repair = RepairCallback(scorer=scorer, treatment=Finetune(steps=2), start_epoch=0, fisher_samples=64,
                            rollback=False, **({} if isinstance(scorer, KNNShapley) else {"top_k": 5}))
    trainer, _, _ = fit(tmp_path, repair, max_epochs=2)
    assert len(repair.rounds) == 2 and repair.rounds[0].skipped is None
    with (RepairCallback.log_dir(trainer) / "round_001_suspects.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    removed = [row["removed"] == "1" for row in rows]
    if isinstance(scorer, KNNShapley):  # its own rule, value < 0 (score > 0), picks the causes
        assert len(rows) == 300 and repair.rounds[0]["removed"] > 0
        assert removed == [float(row["score"]) > 0 for row in rows]
    else:
        assert repair.rounds[0]["removed"] == 5 and removed == [True] * 5 + [False] * (len(rows) - 5)


@pytest.mark.parametrize("treatment", TREATMENTS, ids=lambda t: type(t).__name__)
def test_every_treatment_runs_inside_fit(tmp_path, treatment):
    repair = RepairCallback(scorer=TrainingLoss(), treatment=treatment, top_k=8, start_epoch=0, fisher_samples=64,
                            rollback=False)
    trainer, _, _ = fit(tmp_path, repair, max_epochs=2)
    assert len(repair.rounds) == 2 and repair.rounds[-1]["removed_total"] == 16
    assert all(torch.isfinite(p).all() for p in trainer.lightning_module.parameters())
    # The treatment proposed candidates and the judge rated them (that they move θ̂ and fix failures on a
    # memorised problem is tested per treatment in test_unlearning, test_newton and test_energy).
    assert all(r["candidates_rated"] >= 1 for r in repair.rounds)


class Stream(IterableDataset):
    def __iter__(self):
        for _ in range(32):
            yield torch.randn(8), 0, 0


def test_iterable_training_data_is_refused_before_training(tmp_path):
    data = BlobsDataModule()
    data.train_dataloader = lambda: DataLoader(Stream(), batch_size=8)
    with pytest.raises(TypeError, match="map-style training dataset"):
        fit(tmp_path, RepairCallback(), max_epochs=1, datamodule=data)


def test_missing_validation_data_is_refused(tmp_path):
    data = BlobsDataModule()
    data.val_dataloader = lambda: []
    with pytest.raises(RuntimeError, match="needs a validation DataLoader"):
        fit(tmp_path, RepairCallback(start_epoch=0), max_epochs=1, datamodule=data, limit_val_batches=1)


@pytest.mark.parametrize("arguments, message", [
    ({"top_k": 3, "top_fraction": 0.1}, "only one of"),
    ({"top_fraction": 1.5}, "top_fraction must be in"),
    ({"fisher": "diagonal"}, "fisher must be one of"),
    ({"every_n_epochs": 0}, "every_n_epochs"),
])
def test_bad_arguments_fail_at_construction(arguments, message):
    with pytest.raises(ValueError, match=message):
        RepairCallback(**arguments)


def test_report_writes_figures_a_page_and_a_logged_image(tmp_path):
    from lightning_repair.data import FashionMNISTDataModule
    from lightning_repair.models import ImageClassifier

    (tmp_path / "data").mkdir()
    write_fake_fashion_mnist(tmp_path / "data")
    data = FashionMNISTDataModule(data_dir=str(tmp_path / "data"), val_size=100, batch_size=32)
    repair = RepairCallback(top_k=10, start_epoch=0, fisher_samples=32, rollback=False, report=True,
                            report_images=8)
    trainer = pl.Trainer(max_epochs=1, callbacks=[repair], accelerator="cpu", enable_progress_bar=False,
                         logger=TensorBoardLogger(tmp_path / "logs"), enable_model_summary=False,
                         enable_checkpointing=False)
    trainer.fit(ImageClassifier(), data)

    folder = RepairCallback.log_dir(trainer)
    for name in ("suspects", "scores", "accuracy", "detection"):
        assert (folder / f"round_001_{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    page = (folder / "round_001_report.md").read_text()
    assert "round_001_suspects.png" in page and "round_001_suspects.csv" in page
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(trainer.log_dir))
    events.Reload()
    assert "repair/suspects" in events.Tags()["images"]


def test_what_chooses_a_repair_never_reads_the_held_out_failures_or_r(tmp_path):
    # The scorer and the treatment (BestOf, which picks among treatments) may read F_q and R_q only: F_h and R
    # decide the rollback, and any method that read them would bias that decision.
    from lightning_repair.failures import split_failures
    from lightning_repair.treat import BestOf

    data = BlobsDataModule()
    validation = data.val_dataset
    reads: dict[str, set[int]] = {}

    given = {}

    def recording(method, name):
        def wrapped(inputs):
            start = len(validation.served)
            given[name] = inputs
            try:
                return method(inputs)
            finally:
                reads[name] = set(validation.served[start:])
        return wrapped

    scorer = KNNShapley(utility="trusted")
    treatment = BestOf(treatments=[EWCUnlearning(max_steps=10), Finetune(steps=10)])
    scorer.score, treatment.treat = recording(scorer.score, "scorer"), recording(treatment.treat, "treatment")
    seen = {}

    class Predictions(Callback):  # θ̂'s predictions on V, as the round splits them
        def on_validation_end(self, trainer, pl_module):
            with torch.no_grad():
                seen["predictions"] = pl_module(validation.x).argmax(1)
                seen["features"] = pl_module.net[:2](validation.x)  # the head's inputs

    repair = RepairCallback(scorer=scorer, treatment=treatment, start_epoch=0, fisher_samples=32, top_k=10)
    pl.Trainer(max_epochs=1, callbacks=[Predictions(), repair], accelerator="cpu", logger=False,
               enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False).fit(
        TinyClassifier(), data)
    failures = split_failures(seen["predictions"], validation.y, 0.5, 2000, seed=repair.seed + 1)
    measured_only = set(failures.holdout.tolist()) | set(failures.remaining.tolist())
    assert len(failures.holdout) > 0 and len(failures.remaining) > 0
    readable = torch.cat([failures.query, failures.guard]).sort().values
    assert reads["treatment"] and not reads["treatment"] & measured_only
    assert reads["treatment"] <= set(readable.tolist())
    # KNN-Shapley reads V only as the head's inputs the validation loop recorded, and gets those of F_q ∪ R_q only.
    recorded = given["scorer"].recorded
    assert not reads["scorer"] and recorded is not None
    torch.testing.assert_close(recorded.trusted[0], seen["features"][readable])
    torch.testing.assert_close(recorded.query[0], seen["features"][failures.query])
    assert torch.equal(recorded.trusted[1], validation.y[readable])


def test_two_repair_callbacks_keep_two_states_in_a_checkpoint(tmp_path):
    first = RepairCallback(top_k=5, start_epoch=0, every_n_epochs=1, fisher_samples=32, rollback=False)
    second = RepairCallback(scorer=TrainingLoss(), top_k=7, start_epoch=0, every_n_epochs=1, fisher_samples=32,
                            rollback=False, seed=3)
    assert first.state_key != second.state_key and first.state_key.startswith("RepairCallback{")
    checkpoint = ModelCheckpoint(dirpath=tmp_path, save_last=True, save_top_k=0)
    pl.Trainer(max_epochs=1, callbacks=[first, second, checkpoint], accelerator="cpu", logger=False,
               enable_progress_bar=False, enable_model_summary=False).fit(TinyClassifier(), BlobsDataModule())
    states = torch.load(tmp_path / "last.ckpt", weights_only=False)["callbacks"]
    assert states[first.state_key]["removed_indices"] == first.removed_indices
    assert states[second.state_key]["removed_indices"] == second.removed_indices
    assert first.removed_indices != second.removed_indices


def test_a_checkpoint_from_before_keyed_states_still_resumes(tmp_path):
    repair = RepairCallback(top_k=5, start_epoch=0, every_n_epochs=1, fisher_samples=32, rollback=False)
    checkpoint = ModelCheckpoint(dirpath=tmp_path, save_last=True, save_top_k=0)
    pl.Trainer(max_epochs=1, callbacks=[repair, checkpoint], accelerator="cpu", logger=False,
               enable_progress_bar=False, enable_model_summary=False).fit(TinyClassifier(), BlobsDataModule())
    saved = torch.load(tmp_path / "last.ckpt", weights_only=False)
    saved["callbacks"] = {"RepairCallback": saved["callbacks"].pop(repair.state_key)}  # the old key
    torch.save(saved, tmp_path / "old.ckpt")
    resumed = RepairCallback(top_k=5, start_epoch=0, every_n_epochs=1, fisher_samples=32, rollback=False)
    pl.Trainer(max_epochs=1, callbacks=[resumed], accelerator="cpu", logger=False, enable_progress_bar=False,
               enable_model_summary=False).fit(TinyClassifier(), BlobsDataModule(), ckpt_path=tmp_path / "old.ckpt")
    assert resumed.removed_indices == repair.removed_indices and len(resumed.rounds) == 1


def test_scorers_read_all_of_the_query_failures(tmp_path):
    # stop_fraction holds part of F_q back for EWC influence's early stopping only; other scorers get all of F_q.
    from lightning_repair.failures import split_failures

    data = BlobsDataModule()
    validation = data.val_dataset
    scorer, reads, seen = LinearInfluence(), {}, {}
    score = scorer.score

    def recording(inputs):
        start = len(validation.served)
        result = score(inputs)
        reads["scorer"] = set(validation.served[start:])
        return result

    scorer.score = recording

    class Predictions(Callback):
        def on_validation_end(self, trainer, pl_module):
            with torch.no_grad():
                seen["predictions"] = pl_module(validation.x).argmax(1)
                seen["features"] = pl_module.net[:2](validation.x)  # the head's inputs

    repair = RepairCallback(scorer=scorer, start_epoch=0, fisher_samples=32, top_k=10, stop_fraction=0.5)
    pl.Trainer(max_epochs=1, callbacks=[Predictions(), repair], accelerator="cpu", logger=False,
               enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False).fit(
        TinyClassifier(), data)
    failures = split_failures(seen["predictions"], validation.y, 0.5, 2000, seed=repair.seed + 1)
    assert len(failures.query) > 2 and reads["scorer"] == set(failures.query.tolist())
