"""A repair round without a Trainer: RepairRound.run on plain loaders, and the callback as a thin layer over it."""

from __future__ import annotations

import copy

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, Subset, TensorDataset

from helpers import BlobsDataModule, Forced, Scramble, TinyClassifier, Unchanged
from lightning_repair import RepairCallback
from lightning_repair.acceptance import Judge
from lightning_repair.adapter import BatchAdapter
from lightning_repair.failures import predict
from lightning_repair.identify import KNNShapley, TrainingLoss
from lightning_repair import round as round_module
from lightning_repair.report import outcome as round_outcome
from lightning_repair.round import RepairRound, RoundRecord
from lightning_repair.treat import BestOf, EWCUnlearning, Exclude, Finetune, NewtonRemoval, TreatmentInputs
from lightning_repair.treat.finetune import finetune_candidates


def _trained_blobs(epochs: int = 3) -> tuple[TinyClassifier, BlobsDataModule]:
    torch.manual_seed(0)
    model, data = TinyClassifier(), BlobsDataModule()
    pl.Trainer(max_epochs=epochs, accelerator="cpu", logger=False, enable_progress_bar=False,
               enable_model_summary=False, enable_checkpointing=False).fit(model, data)
    return model, data


def test_a_round_runs_from_plain_loaders_and_leaves_the_model_alone():
    model, data = _trained_blobs()
    before = copy.deepcopy(model.state_dict())
    outcome = RepairRound(scorer=TrainingLoss(), treatment=Scramble(), selection={"top_k": 15},
                          rollback=False).run(model, data.train_dataloader(), data.val_dataloader(),
                                              flipped=data.flipped_indices)

    record = outcome.record
    assert isinstance(record, RoundRecord) and record.skipped is None and record.failures > 0
    assert record.accepted and record.causes == record.removed == len(outcome.causes) == 15
    assert record.precision == pytest.approx(float(torch.isin(outcome.causes, data.flipped_indices).float().mean()))
    # The round worked on a copy: the given model is untouched, the copy moved.
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert any(not torch.equal(before[k], v) for k, v in outcome.model.state_dict().items())
    # Its "after" figures are the scrambled copy's: right answers lost, validation accuracy down.
    assert record.acc_r_before == 1.0 > record.acc_r_after and record.gain < 0
    # The record reads like a mapping (tables, loggers) and survives a checkpoint's dict form.
    assert record["gain"] == record.gain and RoundRecord.from_dict(record.to_dict()) == record


def test_removed_examples_are_neither_scored_nor_selected():
    model, data = _trained_blobs()
    removed = set(range(0, 300, 3))
    outcome = RepairRound(scorer=TrainingLoss(), selection={"top_k": 20}).run(
        model, data.train_dataloader(), data.val_dataloader(), removed=removed)
    assert torch.isnan(outcome.scores[sorted(removed)]).all()
    assert torch.isfinite(outcome.scores[sorted(set(range(300)) - removed)]).all()
    assert not set(outcome.causes.tolist()) & removed



def test_the_scorers_own_rule_is_applied_to_each_rounds_remaining_scores_and_its_threshold_recorded():
    model, data = _trained_blobs()
    removed = set(range(0, 300, 5))
    settings = RepairRound(scorer=KNNShapley(utility="trusted", harm_margin=1.0), treatment=Unchanged())
    assert settings.selection == {}  # none given: the scorer's rule, per round
    outcome = settings.run(model, data.train_dataloader(), data.val_dataloader(), removed=removed)
    kept = sorted(set(range(300)) - removed)
    mean_value = -float(outcome.scores[kept].double().mean())  # of the examples still in training only
    assert mean_value > 0 and outcome.record.threshold == pytest.approx(mean_value)
    expected = torch.nonzero(outcome.scores > mean_value).flatten()  # −value > 1 × mean value; NaN never
    assert sorted(outcome.causes.tolist()) == expected.tolist() and outcome.record.causes == len(expected) > 0
    given = RepairRound(treatment=Unchanged(), selection={"top_k": 7}).run(
        model, data.train_dataloader(), data.val_dataloader())
    assert given.record.threshold is None and given.record.causes == 7

def test_a_round_without_failures_is_skipped_with_its_reason():
    model, data = _trained_blobs()
    predicted, labels = predict(model, data.val_dataloader())
    right = torch.nonzero(predicted == labels).flatten().tolist()
    validation = DataLoader(Subset(data.val_dataset, right), batch_size=32)
    outcome = RepairRound().run(model, data.train_dataloader(), validation)
    assert outcome.record.skipped == "no failures" and outcome.record.failures == 0 and len(outcome.removed) == 0
    assert outcome.record.acc_r_after == outcome.record.acc_r_before == 1.0


def test_the_callback_round_is_the_plain_round_on_the_same_model(tmp_path):
    """The callback only applies what RepairRound decides: same causes, same record, same weights."""

    class Snapshot(Callback):  # runs before RepairCallback's validation-end hook: θ̂ as the round sees it
        def on_validation_end(self, trainer, pl_module):
            if not trainer.sanity_checking:
                self.state = copy.deepcopy(pl_module.state_dict())

    settings = dict(scorer=TrainingLoss(), treatment=Scramble(), top_k=15, start_epoch=1, seed=3, rollback=False)
    snapshot, repair = Snapshot(), RepairCallback(**settings)
    torch.manual_seed(0)
    data, model = BlobsDataModule(), TinyClassifier()
    pl.Trainer(max_epochs=2, callbacks=[snapshot, repair], accelerator="cpu", logger=False,
               enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
               default_root_dir=tmp_path).fit(model, data)
    [in_fit] = repair.rounds

    theta_hat = TinyClassifier()
    theta_hat.load_state_dict(snapshot.state)
    plain = RepairRound(scorer=TrainingLoss(), treatment=Scramble(), selection={"top_k": 15}, rollback=False).run(
        theta_hat, data.train_dataloader(), data.val_dataloader(), number=1, seed=3, epoch=1,
        global_step=in_fit.global_step, flipped=data.flipped_indices)

    timing = {k for k in in_fit if k.startswith("seconds_")}
    assert {k: v for k, v in plain.record.items() if k not in timing} == \
        {k: v for k, v in in_fit.items() if k not in timing}
    assert sorted(plain.removed.tolist()) == repair.removed_indices
    assert in_fit.accepted  # and the callback applied exactly the plain round's weights
    assert all(torch.equal(a, b) for a, b in zip(plain.model.parameters(), model.parameters()))


def test_a_treatment_that_keeps_theta_hat_costs_no_second_pass_over_validation(monkeypatch):
    model, data = _trained_blobs()
    passes = []
    predict_validation = round_module._Round.predict
    monkeypatch.setattr(round_module._Round, "predict", lambda self: passes.append(1) or predict_validation(self))

    kept = RepairRound(scorer=TrainingLoss(), treatment=Unchanged(), selection={"top_k": 15}).run(
        model, data.train_dataloader(), data.val_dataloader())
    assert len(passes) == 1 and kept.record.gain == 0 and not kept.record.accepted
    assert kept.record.acc_fq_after == kept.record.acc_fq_before

    passes.clear()
    moved = RepairRound(scorer=TrainingLoss(), treatment=Scramble(), selection={"top_k": 15}).run(
        model, data.train_dataloader(), data.val_dataloader())
    assert len(passes) == 2 and moved.record.gain < 0


class ReturnsLogits(TinyClassifier):
    def validation_step(self, batch, batch_idx):
        logits = self(batch[0])
        return {"loss": F.cross_entropy(logits, batch[1]), "logits": logits}


class ShuffledValidation(BlobsDataModule):
    def val_dataloader(self):
        # Its own generator: the training batches stay those of the reference fit.
        return DataLoader(self.val_dataset, batch_size=self.batch_size, shuffle=True,
                          generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("module, data, passes", [
    (TinyClassifier, BlobsDataModule, 1),     # validation_step returns no logits: the round predicts V
    (ReturnsLogits, BlobsDataModule, 0),      # the validation loop's logits give the failures
    (ReturnsLogits, ShuffledValidation, 1),   # ... unless they come out of dataset order
])
def test_the_validation_loops_logits_spare_a_pass_and_change_nothing(tmp_path, monkeypatch, module, data, passes):
    """The validation loop's logits give the failures, and the same loop records the head's inputs (KNN-Shapley's
    embeddings of F_q and R_q, EWC deletion's candidates): the round makes no pass over V of its own."""
    calls, records = [], []
    predict_validation, record = round_module._Round.predict, round_module.HeadCache.record
    monkeypatch.setattr(round_module._Round, "predict", lambda self: calls.append(1) or predict_validation(self))
    monkeypatch.setattr(round_module.HeadCache, "record", classmethod(
        lambda cls, *args, **kwargs: records.append(1) or record(*args, **kwargs)))
    # EWC deletion moves the last layer only, so its candidates are judged from the recorded head inputs.
    repair = RepairCallback(treatment=EWCUnlearning(), top_k=10, start_epoch=0, every_n_epochs=1, rollback=False)
    torch.manual_seed(0)
    pl.Trainer(max_epochs=2, callbacks=[repair], accelerator="cpu", logger=False, enable_progress_bar=False,
               enable_model_summary=False, enable_checkpointing=False, default_root_dir=tmp_path).fit(module(), data())
    assert len(calls) == len(records) == 2 * passes and len(repair.rounds) == 2
    assert all(r.candidates_rated for r in repair.rounds)  # candidates judged: from the recorded inputs

    reference = RepairCallback(treatment=EWCUnlearning(), top_k=10, start_epoch=0, every_n_epochs=1, rollback=False)
    torch.manual_seed(0)
    pl.Trainer(max_epochs=2, callbacks=[reference], accelerator="cpu", logger=False, enable_progress_bar=False,
               enable_model_summary=False, enable_checkpointing=False, default_root_dir=tmp_path).fit(
                   TinyClassifier(), BlobsDataModule())
    timing = {k for k in reference.rounds[0] if k.startswith("seconds_")}
    # A shuffled validation loader moves Lightning's RNG use, and so the later epochs: compare its first round only.
    compared = 1 if data is ShuffledValidation else 2
    for ours, theirs in zip(repair.rounds[:compared], reference.rounds[:compared]):
        assert {k: v for k, v in ours.items() if k not in timing} == {k: v for k, v in theirs.items() if k not in timing}


class _Moves(Forced):
    """Trains on D \\ C in name: moves the model to ``weights``, and to ``control_weights`` when nothing was removed.
    Records the sizes of C and of the training part it was given."""

    trains_on_kept = True

    def __init__(self, weights, control_weights):
        self.weights, self.control_weights, self.given = weights, control_weights, []

    def candidates(self, inputs):
        removed, kept = len(inputs.causes.dataset), len(inputs.kept.dataset)
        self.given.append((removed, kept))
        inputs.model.load_state_dict(self.weights if removed else self.control_weights)
        yield "moved"


def _undertrained_and_better():
    """θ̂ after 1 epoch on the blobs (validation accuracy 0.75), and better weights after 10 (0.92)."""
    better, _ = _trained_blobs(epochs=10)
    model, data = _trained_blobs(epochs=1)
    return model, data, copy.deepcopy(better.state_dict())


def test_a_repair_no_better_than_its_control_is_rolled_back_and_kept_without_a_control():
    """Training that any fine-tune would have done is not a repair: with the same gain when nothing is removed, the
    round rolls back although the repair beats θ̂; with control_margin=None the same round is kept."""
    model, data, better = _undertrained_and_better()
    rounds = {}
    for control in (True, False):
        treatment = _Moves(better, better)
        rounds[control] = RepairRound(scorer=TrainingLoss(), treatment=treatment, selection={"top_k": 15},
                                      control_margin=0.0 if control else None).run(
            model, data.train_dataloader(), data.val_dataloader())
        assert treatment.given == ([(15, 285), (0, 300)] if control else [(15, 285)])  # the control trains on D
    with_control, without = rounds[True].record, rounds[False].record
    assert without.accepted and without.gain > 2 * without.gain_standard_error > 0
    assert without.control_candidate is None and without.control_gain is None
    assert (with_control.gain, with_control.gain_standard_error) == (without.gain, without.gain_standard_error)
    assert with_control.control_candidate == "moved" and with_control.control_gain == 0.0
    assert not with_control.accepted and len(rounds[True].removed) == 0 and "control" in with_control.rollback


def test_a_repair_that_beats_its_control_is_kept_with_the_gain_over_it_recorded():
    model, data, better = _undertrained_and_better()
    record = RepairRound(scorer=TrainingLoss(), treatment=_Moves(better, copy.deepcopy(model.state_dict())),
                         selection={"top_k": 15}).run(model, data.train_dataloader(), data.val_dataloader()).record
    # The control moved nowhere (θ̂'s weights): the repair's gain over it is its gain over θ̂.
    assert record.accepted and record.rollback is None and record.control_candidate == "moved"
    assert record.control_gain == pytest.approx(record.gain) and record.control_gain_standard_error > 0


def test_a_repair_that_does_not_beat_theta_hat_is_rolled_back_without_running_its_control():
    """The control costs a second fine-tune; a repair rolled back against θ̂ alone does not pay it."""
    model, data, better = _undertrained_and_better()
    worse = {name: torch.zeros_like(value) for name, value in model.state_dict().items()}  # predicts one class
    treatment = _Moves(worse, better)
    record = RepairRound(scorer=TrainingLoss(), treatment=treatment, selection={"top_k": 15}).run(
        model, data.train_dataloader(), data.val_dataloader()).record
    assert treatment.given == [(15, 285)] and record.candidate == "moved"
    assert not record.accepted and record.gain < 0 and "control" not in record.rollback
    assert record.control_candidate is None and record.control_gain is None


def test_removal_margin_keeps_a_rolled_back_rounds_causes_out_of_training_unless_the_repair_hurt():
    """removal_margin decouples the data from the weights: the weights roll back to θ̂ either way; the causes stay
    out when the repair did no worse than θ̂ and its control beyond the margin, and go back in when it did."""
    model, data, better = _undertrained_and_better()
    worse = {name: torch.zeros_like(value) for name, value in model.state_dict().items()}  # predicts one class

    def run(weights, control_weights, margin):
        return RepairRound(scorer=TrainingLoss(), treatment=_Moves(weights, control_weights), selection={"top_k": 15},
                           removal_margin=margin).run(model, data.train_dataloader(), data.val_dataloader())

    # No better than its control (a tie: gain over the control 0): rolled back, causes out with the margin.
    tie = run(better, better, 2.0)
    assert not tie.record.accepted and "control" in tie.record.rollback and tie.record.control_gain == 0.0
    assert tie.record.removed == 15 == len(tie.removed) and torch.equal(tie.removed, tie.causes)
    assert run(better, better, None).record.removed == 0  # the default puts them back
    # Far worse than θ̂: the causes go back in whatever the margin a user could mean.
    hurt = run(worse, better, 2.0).record
    assert hurt.gain < -2.0 * hurt.gain_standard_error and hurt.removed == 0
    with pytest.raises(ValueError, match="removal_margin"):
        RepairRound(removal_margin=-1.0)


def test_a_callback_with_removal_margin_trains_on_without_a_rolled_back_rounds_causes_at_theta_hat():
    """The module ends where plain training ends (the round rolled back), yet the round's causes left training."""
    def fit(*callbacks):
        torch.manual_seed(0)
        model = TinyClassifier()
        pl.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_progress_bar=False, callbacks=list(callbacks),
                   enable_model_summary=False, enable_checkpointing=False).fit(model, BlobsDataModule())
        return model

    repair = RepairCallback(scorer=TrainingLoss(), treatment=Unchanged(), top_k=15, start_epoch=0, removal_margin=2.0)
    repaired, plain = fit(repair), fit()
    (record,) = repair.rounds
    assert not record.accepted and "kept θ̂" in record.rollback and record.removed == 15
    assert len(repair.removed_indices) == 15 and round_outcome(record) == "rolled back, causes removed"
    assert all(torch.equal(a, b) for a, b in zip(repaired.state_dict().values(), plain.state_dict().values()))


def test_only_treatments_that_train_on_the_kept_data_run_a_control():
    model, data, better = _undertrained_and_better()
    treatment = _Moves(better, better)
    treatment.trains_on_kept = False  # e.g. EWC deletion: nothing removed, nothing to do
    record = RepairRound(scorer=TrainingLoss(), treatment=treatment, selection={"top_k": 15}).run(
        model, data.train_dataloader(), data.val_dataloader()).record
    assert treatment.given == [(15, 285)] and record.accepted and record.control_gain is None
    assert Finetune().trains_on_kept and NewtonRemoval().trains_on_kept  # both step down the loss of D \\ C
    assert not EWCUnlearning().trains_on_kept and not NewtonRemoval(step="influence").trains_on_kept
    # BestOf trains on D \\ C when any of its treatments does (its default list holds Finetune).
    assert BestOf().trains_on_kept and not BestOf(treatments=[EWCUnlearning()]).trains_on_kept


def test_newton_removal_with_nothing_removed_steps_on_the_loss_of_all_of_d():
    """Newton removal's control: with an empty cause set its default step reads D's loss alone and moves θ̂."""
    model, data = _trained_blobs(epochs=1)
    moved = copy.deepcopy(model).eval()
    empty = DataLoader(Subset(data.train_dataset, []), batch_size=32)
    inputs = TreatmentInputs(model=moved, causes=empty, kept=data.train_dataloader(), query=data.val_dataloader(),
                             judge=Judge.accuracy_on(moved, data.val_dataloader()), fisher=None, n_train=300,
                             adapter=BatchAdapter())
    assert list(NewtonRemoval(gamma_multipliers=(1.0,)).candidates(inputs)) == [1.0 / 300]
    changes = [(a - b).abs().max() for a, b in zip(moved.parameters(), model.parameters())]
    assert all(torch.isfinite(c) for c in changes) and max(changes) > 0


@pytest.mark.parametrize("modules, moved", [(None, {"2.weight", "2.bias"}), ("all", {"0.weight", "0.bias", "2.weight",
                                                                                      "2.bias"})])
def test_a_finetune_moves_the_modules_it_is_given_and_no_others(modules, moved):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    kept = DataLoader(TensorDataset(torch.randn(32, 4), torch.randint(0, 3, (32,))), batch_size=8)
    assert list(finetune_candidates(model, kept, steps=4, eval_every=2, modules=modules)) == [2, 4]
    changed = {name for name, p in model.named_parameters() if not torch.equal(p, before[name])}
    assert changed == moved
    with pytest.raises(ValueError, match=r"for one module write \['2'\]"):
        Finetune(modules="2")


@pytest.mark.parametrize("treatment", [Finetune(modules=None), EWCUnlearning(), BestOf()])
def test_a_treatment_that_can_move_nothing_in_the_repair_scope_fails_before_training(treatment, tmp_path):
    model, data = TinyClassifier(), BlobsDataModule()
    before = copy.deepcopy(model.state_dict())
    repair = RepairCallback(treatment=treatment, params=["net.0"], start_epoch=0)
    trainer = pl.Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=tmp_path, callbacks=[repair])
    with pytest.raises(ValueError, match=r"can move no parameter of the repair scope \(params=\['net.0'\]\)"):
        trainer.fit(model, data)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # not one step was trained
    RepairRound(treatment=Finetune(), params=["net.0"]).check_scope(model)  # every layer: net.0 is enough
    with pytest.raises(ValueError, match=r"^`params` names modules \['nope'\] that the model does not have"):
        RepairRound(params=["nope"]).check_scope(model)  # a typo keeps its own message


def test_exclude_moves_no_weight_and_its_round_takes_the_causes_out_of_training():
    """Exclude's round keeps θ̂'s weights (nothing to judge or roll back) and removes C, with the gate on."""
    model, data = _trained_blobs(epochs=1)
    before = copy.deepcopy(model.state_dict())
    outcome = RepairRound(scorer=TrainingLoss(), treatment=Exclude(), selection={"top_k": 15}).run(
        model, data.train_dataloader(), data.val_dataloader())
    record = outcome.record
    assert record.accepted and record.rollback is None and record.removed == 15 and len(outcome.removed) == 15
    assert record.candidates_rated == 0 and record.control_gain is None and record.gain == 0.0
    assert all(torch.equal(a, b) for a, b in zip(outcome.model.state_dict().values(), before.values()))
    assert not Exclude().moves_weights and Finetune().moves_weights
    assert BestOf(treatments=[Exclude(), Finetune()]).moves_weights and not BestOf(treatments=[Exclude()]).moves_weights
