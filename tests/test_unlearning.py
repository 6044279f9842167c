"""EWC deletion and Newton removal move a memorised model and raise its accuracy on the failures."""

import copy

import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from helpers import Blobs
from lightning_repair.acceptance import Judge, correctness
from lightning_repair.adapter import BatchAdapter
from lightning_repair.curvature import diagonal_fisher
from lightning_repair.failures import predict, split_failures
from lightning_repair.treat import EWCUnlearning, NewtonRemoval, TreatmentInputs
from lightning_repair.treat.ewc_unlearning import unlikelihood


def test_unlikelihood_is_minus_log_of_one_minus_p_and_bounded():
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.0, 30.0, 0.0], [-30.0, 0.0, 0.0]])
    labels = torch.tensor([0, 1, 0])
    p = F.softmax(logits.double(), dim=1)[torch.arange(3), labels]
    expected = -torch.log1p(-p).mean()  # float64: p of the second row is 1 − 2e-13, not 1
    assert unlikelihood(logits, labels).item() == pytest.approx(expected.item(), rel=1e-4)
    assert torch.isfinite(unlikelihood(logits, labels))  # p ≈ 1 − 1e-13 stays finite: no log(0)
    assert unlikelihood(torch.tensor([[-50.0, 50.0]]), torch.tensor([0])).item() == pytest.approx(0.0, abs=1e-12)


def _loader(x: torch.Tensor, y: torch.Tensor, shuffle: bool = False) -> DataLoader:
    return DataLoader(TensorDataset(x, y), batch_size=32, shuffle=shuffle,
                      generator=torch.Generator().manual_seed(0) if shuffle else None)


@pytest.fixture(scope="module")
def memorised() -> dict:
    """An MLP that has memorised blobs with 20 % flipped labels, and its failures on clean validation blobs."""
    train, validation = Blobs(300, flip=0.2, seed=0), Blobs(3000, seed=1)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 64), nn.ReLU(), nn.Linear(64, 3))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(1500):
        optimizer.zero_grad()
        F.cross_entropy(model(train.x), train.y).backward()
        optimizer.step()
    model.eval()
    assert (model(train.x).argmax(1) == train.y).float().mean() > 0.97  # the flips are memorised
    predictions, labels = predict(model, _loader(validation.x, validation.y))
    failures = split_failures(predictions, labels, seed=0)
    causes = train.flipped_indices
    kept = torch.ones(len(train), dtype=torch.bool)
    kept[causes] = False
    query = _loader(validation.x[failures.query], validation.y[failures.query])
    return {
        "model": model, "query": query, "n_train": len(train),
        "guard": _loader(validation.x[failures.guard], validation.y[failures.guard]),
        "share": failures.size / len(validation),
        "causes": _loader(train.x[causes], train.y[causes], shuffle=True),
        "kept": _loader(train.x[kept], train.y[kept], shuffle=True),
        "fisher": diagonal_fisher(model, _loader(train.x, train.y), "mc"),
    }


@pytest.mark.parametrize("treatment", [EWCUnlearning(), NewtonRemoval()], ids=["ewc_deletion", "newton"])
def test_default_treatment_moves_a_memorised_model_and_fixes_failures(memorised: dict, treatment) -> None:
    model = copy.deepcopy(memorised["model"])
    before = [p.detach().clone() for p in model.parameters()]
    judge = Judge(model, memorised["query"], memorised["guard"], memorised["share"])
    choice = treatment.treat(TreatmentInputs(
        model=model, causes=memorised["causes"], kept=memorised["kept"], query=memorised["query"], judge=judge,
        fisher=memorised["fisher"], n_train=memorised["n_train"], adapter=BatchAdapter()))
    assert choice.label is not None and choice.value > 0  # a candidate beat θ̂ beyond noise on F_q ∪ R_q
    assert any(not torch.equal(p, b) for p, b in zip(model.parameters(), before))
    fixed = correctness(model, memorised["query"]).float().mean().item()
    assert fixed > 0.05, fixed  # θ̂ gets none of F_q right
    assert judge.verdict(model).accepted


def test_paper_ascent_objective_stays_available(memorised: dict) -> None:
    model = copy.deepcopy(memorised["model"])
    steps = list(EWCUnlearning(objective="ascent", modules="all", max_steps=4, eval_every=1).candidates(
        TreatmentInputs(model=model, causes=memorised["causes"], kept=memorised["kept"], query=memorised["query"],
                        judge=Judge.accuracy_on(model, memorised["query"]), fisher=memorised["fisher"],
                        n_train=memorised["n_train"], adapter=BatchAdapter())))
    assert steps == [1, 2, 3, 4]
    # Ascent raises the causes' loss; every layer moved.
    causes_loss = sum(F.cross_entropy(model(x), y, reduction="sum") for x, y in memorised["causes"])
    theta_hat_loss = sum(F.cross_entropy(memorised["model"](x), y, reduction="sum") for x, y in memorised["causes"])
    assert causes_loss > theta_hat_loss
    assert all(not torch.equal(p, q) for p, q in zip(model.parameters(), memorised["model"].parameters()))


def test_default_ewc_deletion_moves_only_the_last_linear_layer(memorised: dict) -> None:
    model = copy.deepcopy(memorised["model"])
    list(EWCUnlearning(max_steps=4).candidates(TreatmentInputs(
        model=model, causes=memorised["causes"], kept=memorised["kept"], query=memorised["query"],
        judge=Judge.accuracy_on(model, memorised["query"]), fisher=memorised["fisher"],
        n_train=memorised["n_train"], adapter=BatchAdapter())))
    moved = [not torch.equal(p, q) for p, q in zip(model.parameters(), memorised["model"].parameters())]
    assert moved == [False, False, True, True]
    assert all(p.grad is None for p in model.parameters())


def test_bad_ewc_deletion_arguments_are_refused() -> None:
    with pytest.raises(ValueError, match="objective"):
        EWCUnlearning(objective="descent")
    with pytest.raises(ValueError, match="gamma > 0"):
        EWCUnlearning(gamma=0)
    with pytest.raises(ValueError, match="list of module names"):
        EWCUnlearning(modules="head")
