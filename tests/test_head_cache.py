"""The head cache predicts exactly what a forward pass would, and declines wherever it could not; passes over
many batches make no host sync per batch."""

from __future__ import annotations

import copy

import lightning.pytorch as pl
import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset
from torch.utils._python_dispatch import TorchDispatchMode

from helpers import BlobsDataModule, TinyClassifier
from lightning_repair import RepairCallback, RepairRound
from lightning_repair import round as round_module
from lightning_repair.failures import predict
from lightning_repair.head_cache import HeadCache
from lightning_repair.curvature import diagonal_fisher
from lightning_repair.identify import TrainingLoss
from lightning_repair.identify.baselines import training_loss
from lightning_repair.identify.ewc import loss_change
from lightning_repair.identify.influence import directional_derivatives, gradient_alignment
from lightning_repair.identify import KNNShapley
from lightning_repair.identify import knn_shapley as knn_module
from lightning_repair.identify.knn_shapley import embeddings
from lightning_repair.treat import EWCUnlearning, Finetune


def _loader(n: int = 100, features: int = 6, classes: int = 4) -> DataLoader:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(n, features, generator=generator)
    return DataLoader(TensorDataset(x, torch.randint(classes, (n,), generator=generator)), batch_size=16)


def _mlp(features: int = 6, classes: int = 4) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(features, 12), nn.ReLU(), nn.Dropout(0.5), nn.Linear(12, classes)).eval()


def _nudge_(module: nn.Module, scale: float = 0.5) -> None:
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn_like(p))


def test_a_moved_head_is_predicted_from_its_inputs_exactly_as_by_a_forward_pass():
    model, loader = _mlp(), _loader()
    cache, predicted = HeadCache.record(model, loader)
    assert cache is not None and cache.head is model[3]
    assert torch.equal(predicted, predict(model, loader)[0]) and torch.equal(cache.predictions(model), predicted)

    passes = []
    model[0].register_forward_hook(lambda *_: passes.append(1))
    _nudge_(model[3], 2.0)
    from_cache = cache.predictions(model)
    passes.clear()
    assert torch.equal(from_cache, predict(model, loader)[0]) and passes  # the reference ran the body ...
    passes.clear()
    cache.predictions(model)
    assert not passes  # ... the cache did not (after its one check of the first moved head)
    assert not torch.equal(from_cache, predicted)  # the nudge changed predictions, so the test compares something


@pytest.mark.parametrize("change", ["body moved", "buffer changed", "train mode", "another model"])
def test_the_cache_declines_whenever_more_than_the_head_changed(change):
    model = nn.Sequential(nn.Linear(6, 12), nn.BatchNorm1d(12), nn.ReLU(), nn.Linear(12, 4)).eval()
    cache, _ = HeadCache.record(model, _loader())
    assert cache is not None
    _nudge_(model[3])
    other = model
    if change == "body moved":
        _nudge_(model[0])
    elif change == "buffer changed":
        model[1].running_mean += 1
    elif change == "train mode":
        model.train()
    else:
        other = copy.deepcopy(model)
    assert cache.predictions(other) is None


class Tempered(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body, self.head = nn.Linear(6, 12), nn.Linear(12, 4)

    def forward(self, x):
        return self.head(torch.relu(self.body(x))) / 2.0  # the head's output is not the logits


class Tied(nn.Module):
    """The head's weight also feeds the features: moving the head moves its own inputs."""

    def __init__(self) -> None:
        super().__init__()
        self.body, self.head = nn.Linear(6, 4), nn.Linear(4, 4)

    def forward(self, x):
        return self.head(torch.relu(self.body(x) + F.linear(x[:, :4], self.head.weight)))


class SharedHead(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.first, self.head = nn.Linear(4, 4), nn.Linear(4, 4)
        self.head.weight = self.first.weight

    def forward(self, x):
        return self.head(torch.relu(self.first(x[:, :4])))


@pytest.mark.parametrize("module", [Tempered, SharedHead])
def test_a_head_whose_output_is_not_the_logits_or_that_shares_weights_is_not_cached(module):
    torch.manual_seed(0)
    cache, predicted = HeadCache.record(module().eval(), _loader())
    assert cache is None and len(predicted) == 100


def test_weight_tying_through_a_functional_call_is_caught_when_the_head_first_moves():
    torch.manual_seed(0)
    model, loader = Tied().eval(), _loader()
    cache, _ = HeadCache.record(model, loader)
    assert cache is not None and cache.predictions(model) is not None  # at θ̂ the recorded inputs are right
    _nudge_(model.head, 2.0)
    assert cache.predictions(model) is None and cache.predictions(model) is None


def test_inputs_beyond_the_budget_are_not_kept():
    cache, predicted = HeadCache.record(_mlp(), _loader(), max_elements=12 * 50)
    assert cache is None and len(predicted) == 100


@pytest.mark.parametrize("treatment, served", [(EWCUnlearning(), True), (EWCUnlearning(modules="all"), False),
                                                (Finetune(), False), (Finetune(modules=None), True)])
def test_a_round_decides_the_same_with_and_without_the_cache(monkeypatch, treatment, served):
    torch.manual_seed(0)
    model, data = TinyClassifier(), BlobsDataModule()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(3):
        for x, y, _ in data.train_dataloader():
            optimizer.zero_grad()
            F.cross_entropy(model(x), y).backward()
            optimizer.step()
    settings = RepairRound(scorer=TrainingLoss(), treatment=treatment, selection={"top_k": 30})
    answers = []
    predictions = HeadCache.predictions
    monkeypatch.setattr(HeadCache, "predictions", lambda self, model: answers.append(predictions(self, model)) or
                        answers[-1])
    cached = settings.run(model, data.train_dataloader(), data.val_dataloader())
    # θ̂ (the first two) and, when only the head moves, every candidate come from the cache; nothing else does.
    assert len(answers) > 2 and all((answer is not None) == served for answer in answers[2:])
    monkeypatch.setattr(round_module.HeadCache, "record", classmethod(
        lambda cls, model, loader, adapter=None: (None, predict(model, loader, adapter)[0])))
    uncached = settings.run(model, data.train_dataloader(), data.val_dataloader())
    assert cached.record.candidates_rated and cached.record.candidates_rated > 1
    timing = {key for key in cached.record.to_dict() if key.startswith("seconds_")}
    assert {k: v for k, v in cached.record.items() if k not in timing} == \
        {k: v for k, v in uncached.record.items() if k not in timing}
    assert all(torch.equal(a, b) for a, b in zip(cached.model.parameters(), uncached.model.parameters()))


@pytest.mark.parametrize("utility, module, reads_recorded", [
    ("trusted", None, True), ("query", None, True), ("trusted", "net.0", False)])
def test_knn_shapley_reads_the_utility_points_from_the_rounds_pass_over_v(monkeypatch, utility, module,
                                                                          reads_recorded):
    """F_q's and R_q's embeddings are the head's inputs the round recorded: no second pass over them, same scores.
    An embedding at another layer than the head still gets its own pass."""
    torch.manual_seed(0)
    model, data = TinyClassifier(), BlobsDataModule()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for x, y, _ in data.train_dataloader():
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
    settings = RepairRound(scorer=KNNShapley(utility=utility, module=module), selection={"top_k": 10})
    embedded = []
    shared_embeddings = knn_module._shared_embeddings
    monkeypatch.setattr(knn_module, "_shared_embeddings", lambda model, loader, role, *args, **kwargs:
                        embedded.append(role) or shared_embeddings(model, loader, role, *args, **kwargs))
    cached = settings.run(model, data.train_dataloader(), data.val_dataloader())
    assert embedded == (["training"] if reads_recorded else ["training", "validation"])
    monkeypatch.setattr(round_module.HeadCache, "record", classmethod(
        lambda cls, model, loader, adapter=None: (None, predict(model, loader, adapter)[0])))
    embedded.clear()
    uncached = settings.run(model, data.train_dataloader(), data.val_dataloader())
    assert embedded == ["training", "validation"]
    assert torch.isfinite(cached.scores).sum() > 100 and cached.scores.nan_to_num().abs().max() > 0
    torch.testing.assert_close(cached.scores, uncached.scores, rtol=1e-5, atol=1e-7, equal_nan=True)
    assert torch.equal(cached.causes, uncached.causes)


class TemperedValidation(TinyClassifier):
    """Its validation logits rank as the model's but are not the head's output."""

    def validation_step(self, batch, batch_idx):
        logits = self(batch[0]) / 2
        return {"loss": F.cross_entropy(logits, batch[1]), "logits": logits}


class ValidationLogits(TinyClassifier):
    def validation_step(self, batch, batch_idx):
        logits = self(batch[0])
        return {"loss": F.cross_entropy(logits, batch[1]), "logits": logits}


@pytest.mark.parametrize("module, precision, recorded_by_the_round", [
    (ValidationLogits, "32-true", 0), (TemperedValidation, "32-true", 1),
    (ValidationLogits, "bf16-mixed", 1),  # autocast: the recorded inputs are not in the head's float32
])
def test_the_validation_loop_records_the_heads_inputs_only_where_they_are_the_logits(
        tmp_path, monkeypatch, module, precision, recorded_by_the_round):
    records = []
    record = round_module.HeadCache.record
    monkeypatch.setattr(round_module.HeadCache, "record", classmethod(
        lambda cls, *args, **kwargs: records.append(1) or record(*args, **kwargs)))
    repair = RepairCallback(top_k=10, start_epoch=0, every_n_epochs=1)
    torch.manual_seed(0)
    model = module()
    pl.Trainer(max_epochs=1, callbacks=[repair], accelerator="cpu", logger=False, enable_progress_bar=False,
               enable_model_summary=False, enable_checkpointing=False, default_root_dir=tmp_path,
               precision=precision).fit(model, BlobsDataModule())
    assert len(repair.rounds) == 1 and len(records) == recorded_by_the_round
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in model.modules())  # no hook of ours is left


class CountedValidation(ValidationLogits):
    """Counts the forward calls of the user's own module in eval mode (a round's passes run on copies)."""

    eval_calls = 0

    def forward(self, x):
        if not self.training:
            self.eval_calls += 1
        return super().forward(x)


def test_recording_the_heads_inputs_adds_no_forward_call_to_the_users_module(tmp_path):
    def eval_calls(callbacks: list) -> int:
        torch.manual_seed(0)
        model = CountedValidation()
        pl.Trainer(max_epochs=2, callbacks=callbacks, accelerator="cpu", logger=False, enable_progress_bar=False,
                   enable_model_summary=False, enable_checkpointing=False, default_root_dir=tmp_path,
                   num_sanity_val_steps=0).fit(model, BlobsDataModule())
        return model.eval_calls

    repair = RepairCallback(top_k=10, start_epoch=0, every_n_epochs=1)
    with_rounds = eval_calls([repair])
    assert len(repair.rounds) == 2 and all(r.skipped is None for r in repair.rounds)
    assert with_rounds == eval_calls([]) > 0  # the validation loop's calls, nothing more


class _HostReads(TorchDispatchMode):
    """Counts the reads of a tensor's value back to the host (``bool(t)``, ``t.item()``): each is a sync on a GPU."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += func is torch.ops.aten._local_scalar_dense.default
        return func(*args, **(kwargs or {}))


def _direction(model: nn.Module) -> list[torch.Tensor]:
    return [torch.ones_like(p) for p in model.parameters()]


@pytest.mark.parametrize("passes", [
    predict,
    HeadCache.record,
    training_loss,
    lambda model, loader: loss_change(model, copy.deepcopy(model), loader),
    lambda model, loader: directional_derivatives(model, loader, _direction(model)),
    lambda model, loader: gradient_alignment(model, loader, _direction(model)),
    embeddings,
    # BackPACK's own extensions read values back per batch (its argument checks); ours do not.
    lambda model, loader: diagonal_fisher(model, loader, "mc", backend="torch_func"),
], ids=["predict", "head cache", "training loss", "EWC influence", "JVP", "per-example gradients", "embeddings",
        "Fisher"])
def test_a_pass_over_many_batches_reads_values_back_as_often_as_over_one(passes):
    def reads(n: int) -> int:
        model = _mlp()
        with _HostReads() as counter:
            passes(model, _loader(n))
        return counter.count

    # The value checks run on the first batch only; results come back to the CPU once, at the end.
    assert reads(160) == reads(16)
