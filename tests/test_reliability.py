"""A repair never makes things worse, and bad input gets a clear answer."""

from __future__ import annotations

import copy
import hashlib
import logging

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, Dataset

from helpers import Blobs, BlobsDataModule, Forced, Scramble, TinyClassifier, Unchanged, write_fake_fashion_mnist
from lightning_repair import RepairCallback
from lightning_repair.identify import LinearInfluence, Scorer, TrainingLoss
from lightning_repair.treat import EWCUnlearning, Finetune


def run(repair: RepairCallback, model: pl.LightningModule | None = None, data=None, max_epochs: int = 2,
        extra: list[Callback] | None = None) -> pl.Trainer:
    trainer = pl.Trainer(max_epochs=max_epochs, callbacks=[*(extra or []), repair], accelerator="cpu", logger=False,
                         enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False)
    torch.manual_seed(0)
    trainer.fit(model or TinyClassifier(), data or BlobsDataModule())
    return trainer


class Snapshot(Callback):
    """Parameters and buffers of the module just before the repair callback runs (placed before it)."""

    def on_validation_end(self, trainer, pl_module):
        self.state = copy.deepcopy(pl_module.state_dict())


class TrainOnCleanLabels(Forced):
    """An oracle that fits the copy to the clean training labels: failures due to the flips get fixed."""

    def __init__(self, dataset: Blobs) -> None:
        self.dataset = dataset

    def candidates(self, inputs):
        optimizer = torch.optim.Adam(inputs.model.parameters(), lr=1e-2)
        for _ in range(200):
            optimizer.zero_grad()
            F.cross_entropy(inputs.model(self.dataset.x), self.dataset.clean).backward()
            optimizer.step()
        yield "clean labels"


def same_state(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_round_that_breaks_what_works_is_rolled_back(caplog):
    before = Snapshot()
    repair = RepairCallback(scorer=TrainingLoss(), treatment=Scramble(), top_k=10, start_epoch=0)
    with caplog.at_level(logging.INFO):
        trainer = run(repair, max_epochs=1, extra=[before])
    record = repair.rounds[0]
    assert record["accepted"] is False and "not more than" in record["rollback"] and record["gain"] < 0
    assert record["causes"] == 10 and record["removed"] == 0 and repair.removed_indices == []
    assert same_state(before.state, trainer.lightning_module.state_dict())
    assert "rolled back" in caplog.text


def test_round_that_changes_nothing_is_rolled_back():
    # A tie keeps θ̂: removing causes without a repair that shows a gain is not a repair.
    repair = RepairCallback(scorer=TrainingLoss(), treatment=Unchanged(), top_k=10, start_epoch=0)
    run(repair, max_epochs=2)
    assert all(not r["accepted"] and r["gain"] == 0 and r["rollback"].startswith("the treatment kept θ̂")
               for r in repair.rounds)
    assert repair.removed_indices == []


def test_a_fine_tune_none_of_whose_candidates_passes_the_judge_says_so():
    # The judge on F_q and R_q rejects every candidate at this margin: the treatment keeps θ̂, and the record says
    # why in those terms, not as a gain of +0.0000 on F_h and R.
    repair = RepairCallback(scorer=TrainingLoss(), treatment=Finetune(steps=20, eval_every=5), top_k=10,
                            start_epoch=0, acceptance_margin=1e6)
    run(repair, max_epochs=1)
    [record] = repair.rounds
    assert record.candidate is None and record.candidates_rated == 4 and not record.accepted
    assert record.rollback == ("the treatment kept θ̂: it rated 4 candidates and none raised estimated validation "
                               "accuracy on F_q and R_q by more than 1e+06 × its paired standard error")


def test_cap_on_r_is_off_by_default_and_named_when_it_rejects():
    assert RepairCallback().settings.max_remaining_drop is None
    capped = RepairCallback(scorer=TrainingLoss(), treatment=Scramble(), top_k=10, start_epoch=0,
                            max_remaining_drop=0.05)
    run(capped, max_epochs=1)
    record = capped.rounds[0]
    assert record["acc_r_before"] - record["acc_r_after"] > 0.05
    assert record["accepted"] is False and "max_remaining_drop=0.05" in record["rollback"]


def test_round_that_fixes_failures_is_accepted():
    data = BlobsDataModule(flip=0.3)
    before = Snapshot()
    repair = RepairCallback(scorer=TrainingLoss(), treatment=TrainOnCleanLabels(data.train_dataset), top_k=10,
                            start_epoch=0)
    trainer = run(repair, data=data, max_epochs=1, extra=[before])
    record = repair.rounds[0]
    assert record["accepted"] is True and record["rollback"] is None, record
    assert record["gain"] > 2 * record["gain_standard_error"] > 0
    assert len(repair.removed_indices) == 10
    assert not same_state(before.state, trainer.lightning_module.state_dict())


def test_rollback_can_be_disabled():
    repair = RepairCallback(scorer=TrainingLoss(), treatment=Scramble(), top_k=10, start_epoch=0,
                            rollback=False)
    run(repair, max_epochs=1)
    assert repair.rounds[0]["accepted"] is True and len(repair.removed_indices) == 10


# ---- skips that are right, each logged ----------------------------------------------------------------------


class NaNScores(Scorer):
    def score(self, inputs):
        return torch.full((len(inputs.train.dataset),), float("nan"))


def test_non_finite_scores_skip_the_round():
    repair = RepairCallback(scorer=NaNScores(), top_k=5, start_epoch=0)
    with pytest.warns(UserWarning, match="NaN or infinite"):
        run(repair, max_epochs=1)
    assert repair.rounds[0]["skipped"] == "non-finite scores" and repair.removed_indices == []


def test_empty_failure_set_skips_the_round(caplog):
    data = BlobsDataModule(flip=0.0)
    data.val_dataset = Blobs(30, seed=1)
    data.val_dataset.x = data.val_dataset.x * 0 + data.train_dataset.x[:30]  # validate on what it fits
    data.val_dataset.y = data.train_dataset.y[:30]
    model = TinyClassifier()

    class Memorise(Callback):  # make V perfectly classified before the round
        def on_validation_start(self, trainer, pl_module):
            optimizer = torch.optim.Adam(pl_module.parameters(), lr=1e-2)
            with torch.inference_mode(False), torch.enable_grad():
                for _ in range(300):
                    optimizer.zero_grad()
                    F.cross_entropy(pl_module(data.val_dataset.x.clone()), data.val_dataset.y.clone()).backward()
                    optimizer.step()

    repair = RepairCallback(top_k=5, start_epoch=0)
    with caplog.at_level(logging.INFO):
        run(repair, model=model, data=data, max_epochs=1, extra=[Memorise()])
    assert repair.rounds[0]["skipped"] == "no failures" and "no failures" in caplog.text


def test_too_many_failures_are_subsampled(caplog):
    repair = RepairCallback(scorer=TrainingLoss(), treatment=Finetune(steps=1), top_k=5, start_epoch=0,
                            max_failures=4, rollback=False)
    with caplog.at_level(logging.INFO):
        run(repair, max_epochs=1)
    record = repair.rounds[0]
    assert record["failures"] == 4 and record["query"] == 2 and record["dropped_failures"] > 0
    assert "max_failures=4" in caplog.text


def test_a_selection_that_would_remove_everything_is_skipped():
    repair = RepairCallback(scorer=TrainingLoss(), top_k=10_000, start_epoch=0)
    with pytest.warns(UserWarning, match="would remove all"):
        run(repair, max_epochs=1)
    assert repair.rounds[0]["skipped"] == "would remove everything"


# ---- clear errors --------------------------------------------------------------------------------------------


class Wrapped(Dataset):
    """Blobs as dicts with keys the default adapter does not know."""

    def __init__(self, base: Blobs) -> None:
        self.base = base

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        x, y, _ = self.base[i]
        return {"pixels": x, "class_id": y}


class DictModel(TinyClassifier):
    def training_step(self, batch, batch_idx):
        return F.cross_entropy(self(batch["pixels"]), batch["class_id"])

    def validation_step(self, batch, batch_idx):
        pass


def test_unknown_batch_format_names_the_adapter():
    data = BlobsDataModule()
    data.train_dataloader = lambda: DataLoader(Wrapped(data.train_dataset), batch_size=32, shuffle=True)
    data.val_dataloader = lambda: DataLoader(Wrapped(data.val_dataset), batch_size=32)
    with pytest.raises(ValueError, match="Cannot find the (inputs|labels).*BatchAdapter"):
        run(RepairCallback(start_epoch=0), model=DictModel(), data=data, max_epochs=1)


class Head(TinyClassifier):
    def __init__(self, outputs: int, softmax: bool = False) -> None:
        super().__init__()
        self.net[-1] = nn.Linear(16, outputs)
        self.softmax = softmax

    def forward(self, x):
        out = self.net(x)
        return out.softmax(dim=1) if self.softmax else out

    def training_step(self, batch, batch_idx):  # the user's own steps do not care about the output's meaning
        return self(batch[0]).float().mean()

    def validation_step(self, batch, batch_idx):
        pass


@pytest.mark.parametrize("model, message", [
    (Head(1), "not a regression or single-logit head"),
    (Head(2), r"Labels range over \[0, 2\] but the model has 2 classes"),
    (Head(3, softmax=True), "outputs are probabilities"),
])
def test_outputs_that_are_not_class_logits_are_refused(model, message):
    with pytest.raises(ValueError, match=message):
        run(RepairCallback(start_epoch=0), model=model, max_epochs=1)


class Twice(TinyClassifier):
    """Runs the same hidden layer twice."""

    def __init__(self) -> None:
        super().__init__()
        self.hidden = nn.Linear(16, 16)

    def forward(self, x):
        h = self.net[1](self.net[0](x))
        return self.net[2](self.hidden(self.hidden(h).relu()).relu())


def test_a_module_used_twice_in_forward_is_refused_by_backpack_and_repaired_by_torch_func():
    # BackPACK keeps one input per module, so its numbers would be wrong: refused when forced.
    with pytest.raises(ValueError, match=r"\['hidden'\] run more than once"):
        run(RepairCallback(scorer=LinearInfluence(), start_epoch=0, curvature="backpack"), model=Twice(),
            max_epochs=1)
    repair = RepairCallback(scorer=LinearInfluence(), start_epoch=0, top_k=5, rollback=False)
    run(repair, model=Twice(), max_epochs=1)
    assert repair.rounds[0]["curvature"] == "torch_func" and repair.rounds[0]["removed"] == 5


class Unsupported(nn.Module):
    """A parameterised layer BackPACK has no extension for."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(16))

    def forward(self, x):
        return x * self.scale


class WithUnsupported(TinyClassifier):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 16), Unsupported(), nn.ReLU(), nn.Linear(16, 3))


def test_unsupported_layer_points_to_params_with_backpack_and_falls_back_to_torch_func():
    # EWC deletion needs the Fisher (the default treatment does not).
    with pytest.raises(ValueError, match=r"BackPACK does not support \['net.1'\].*params="):
        run(RepairCallback(treatment=EWCUnlearning(), start_epoch=0, curvature="backpack"), model=WithUnsupported(),
            max_epochs=1)
    # Restricted to the head, BackPACK follows the same model; unrestricted, torch.func does.
    for repair in (RepairCallback(treatment=EWCUnlearning(), start_epoch=0, params=["net.3"], rollback=False, top_k=5,
                                  curvature="backpack"),
                   RepairCallback(treatment=EWCUnlearning(), start_epoch=0, rollback=False, top_k=5)):
        run(repair, model=WithUnsupported(), max_epochs=1)
        assert repair.rounds[0]["removed"] == 5
    assert repair.rounds[0]["curvature"] == "torch_func"


class InPlace(TinyClassifier):
    def __init__(self) -> None:
        super().__init__()
        self.net[1] = nn.ReLU(inplace=True)


def test_in_place_activations_give_the_same_scores():
    # The repair copy runs ReLU(inplace=True) out of place: same values, so the same scores as the same network
    # written out of place; the user's module keeps its in-place flag.
    import csv

    scores = []
    in_place = InPlace()
    for model in (in_place, TinyClassifier()):
        torch.manual_seed(0)
        model.load_state_dict(TinyClassifier().state_dict())
        repair = RepairCallback(scorer=LinearInfluence(), top_k=5, start_epoch=0, rollback=False)
        trainer = run(repair, model=model, max_epochs=1)
        with (RepairCallback.log_dir(trainer) / "round_001_suspects.csv").open() as handle:
            scores.append({int(row["index"]): float(row["score"]) for row in csv.DictReader(handle)})
    assert len(scores[0]) == 300 and scores[0].keys() == scores[1].keys()
    assert all(scores[0][i] == pytest.approx(scores[1][i], rel=1e-5, abs=1e-9) for i in scores[0])
    assert in_place.net[1].inplace is True


class WithBatchNorm(TinyClassifier):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3))


def test_batchnorm_model_repairs_without_touching_its_statistics():
    before, after = Snapshot(), Snapshot()
    repair = RepairCallback(scorer=TrainingLoss(), treatment=EWCUnlearning(max_steps=5), top_k=5, start_epoch=0,
                            rollback=False)
    trainer = pl.Trainer(max_epochs=1, callbacks=[before, repair, after], accelerator="cpu", logger=False,
                         enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False)
    trainer.fit(WithBatchNorm(), BlobsDataModule())
    for key in ("net.1.running_mean", "net.1.running_var", "net.1.num_batches_tracked"):
        assert torch.equal(before.state[key], after.state[key])
    assert trainer.lightning_module.training is True  # Lightning's mode, untouched by the repair


# ---- the user's data is never modified ----------------------------------------------------------------------


def test_dataset_and_files_are_byte_identical_after_a_run(tmp_path):
    from lightning_repair.data import FashionMNISTDataModule
    from lightning_repair.models import ImageClassifier

    write_fake_fashion_mnist(tmp_path)
    digest = {path.name: hashlib.sha256(path.read_bytes()).hexdigest() for path in tmp_path.iterdir()}
    data = FashionMNISTDataModule(data_dir=str(tmp_path), val_size=100, batch_size=32)
    data.setup("fit")
    images, labels = data.train_dataset.images.clone(), data.train_dataset.labels.clone()

    repair = RepairCallback(top_k=10, start_epoch=0, fisher_samples=32, rollback=False)
    run(repair, model=ImageClassifier(), data=data, max_epochs=1)

    assert len(repair.removed_indices) == 10
    assert torch.equal(data.train_dataset.images, images) and torch.equal(data.train_dataset.labels, labels)
    assert digest == {path.name: hashlib.sha256(path.read_bytes()).hexdigest() for path in tmp_path.iterdir()
                      if path.suffix == ".gz"}


class SmoothedLoss(TinyClassifier):
    def training_step(self, batch, batch_idx):
        return F.cross_entropy(self(batch[0]), batch[1], label_smoothing=0.5)


class SquaredError(TinyClassifier):
    def training_step(self, batch, batch_idx):
        return F.mse_loss(self(batch[0]).softmax(1), F.one_hot(batch[1], 3).float())


@pytest.mark.parametrize("model", [SmoothedLoss(), SquaredError()], ids=["label_smoothing", "mse"])
def test_a_loss_other_than_cross_entropy_is_warned_about(model):
    with pytest.warns(UserWarning, match="differs from the cross-entropy"):
        run(RepairCallback(start_epoch=5), model=model, max_epochs=3)


def test_plain_cross_entropy_raises_no_loss_warning(recwarn):
    run(RepairCallback(start_epoch=5), max_epochs=2)
    assert not [w for w in recwarn if "differs from the cross-entropy" in str(w.message)]


def test_gradient_accumulation_is_not_mistaken_for_another_loss(recwarn):
    trainer = pl.Trainer(max_epochs=2, callbacks=[RepairCallback(start_epoch=5)], accelerator="cpu", logger=False,
                         enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                         accumulate_grad_batches=4)
    trainer.fit(TinyClassifier(), BlobsDataModule())
    assert not [w for w in recwarn if "differs from the cross-entropy" in str(w.message)]


class NormDropClassifier(TinyClassifier):
    """BatchNorm and Dropout: a forward pass in train mode changes buffers and draws random numbers."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, 3))


class ForcedFinetune(Forced, Finetune):
    """Fine-tunes on D \\ C and proposes its last step whatever the judge says; a control runs (trains_on_kept)."""


def _final_state(callbacks: list[Callback], max_epochs: int = 3) -> dict:
    trainer = pl.Trainer(max_epochs=max_epochs, callbacks=callbacks, accelerator="cpu", logger=False,
                         enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False)
    torch.manual_seed(0)
    model = NormDropClassifier()
    trainer.fit(model, BlobsDataModule())
    return copy.deepcopy(model.state_dict())


@pytest.mark.parametrize("repair", [
    RepairCallback(start_epoch=50),  # idle: only its per-epoch loss check runs
    RepairCallback(scorer=TrainingLoss(), treatment=Unchanged(), top_k=10, start_epoch=0, every_n_epochs=1),
    # Fine-tunes that move the repair copies and are all rolled back by an unreachable margin (no control runs then).
    RepairCallback(scorer=TrainingLoss(), treatment=ForcedFinetune(steps=5, eval_every=5), top_k=10, start_epoch=0,
                   every_n_epochs=1, acceptance_margin=1e6),
    # Fine-tunes that beat θ̂, and their controls, all rolled back by an unreachable control margin.
    RepairCallback(scorer=TrainingLoss(), treatment=ForcedFinetune(steps=5, eval_every=5), top_k=10, start_epoch=0,
                   every_n_epochs=1, acceptance_margin=0.0, control_margin=1e6),
], ids=["idle", "rolled_back", "fine_tuned_and_rolled_back", "fine_tuned_and_its_control_rolled_back"])
def test_a_fit_whose_rounds_change_nothing_ends_exactly_as_a_plain_fit(repair):
    # Parameters, BatchNorm statistics and the RNG streams (dropout masks, batch order) all stay the user's own.
    plain = _final_state([])
    repaired = _final_state([repair])
    assert all(not r["accepted"] for r in repair.rounds)
    if isinstance(repair.treatment, ForcedFinetune):
        assert all(r["candidate"] == 5 for r in repair.rounds)
        # A control runs exactly for the repairs that beat θ̂ (margin 0: gain > 0); it moved like the repair.
        beat_theta_hat = [repair.settings.acceptance_margin == 0 and r["gain"] > 0 for r in repair.rounds]
        assert [r["control_candidate"] for r in repair.rounds] == [5 if beat else None for beat in beat_theta_hat]
        assert any(beat_theta_hat) == (repair.settings.acceptance_margin == 0)
    assert same_state(plain, repaired)
