"""Tests for energy-based alignment (treatment 4)."""

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_repair.acceptance import Judge
from lightning_repair.adapter import BatchAdapter
from lightning_repair.treat.base import TreatmentInputs
from lightning_repair.treat.energy import (
    EnergyAlignment,
    align_inputs,
    aligned_causes,
    energy,
    energy_alignment_candidates,
    energy_gradient,
    finetune_parameters,
    soft_labels,
)


def _mlp(activation: type[nn.Module] = nn.ReLU) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), activation(), nn.Linear(8, 8), activation(), nn.Linear(8, 3)).double().eval()


def _cnn() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                         nn.Linear(4 * 4 * 4, 3)).double().eval()


def _inputs(model: nn.Module, n: int = 16) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    shape = (n, 6) if isinstance(model[0], nn.Linear) else (n, 1, 8, 8)
    return torch.randn(shape, generator=generator, dtype=torch.float64)


def _loaders(n_causes: int = 10, n_kept: int = 30, dim: int = 6) -> tuple[DataLoader, DataLoader, DataLoader]:
    generator = torch.Generator().manual_seed(2)

    def loader(n: int) -> DataLoader:
        x = torch.randn(n, dim, generator=generator, dtype=torch.float64)
        y = torch.randint(0, 3, (n,), generator=generator)
        return DataLoader(TensorDataset(x, y), batch_size=8, shuffle=True)

    return loader(n_causes), loader(n_kept), loader(6)


def _inputs_for_treatment(model: nn.Module, seed: int = 0) -> TreatmentInputs:
    causes, kept, query = _loaders()
    fisher = [torch.full_like(p, 0.1) for p in model.parameters() if p.requires_grad]
    return TreatmentInputs(model=model, causes=causes, kept=kept, query=query,
                           judge=Judge.accuracy_on(model, query, margin=0.0), fisher=fisher, n_train=40,
                           adapter=BatchAdapter(), seed=seed)


def _walk(candidates) -> list:
    """Every candidate of a treatment, leaving the model at the last one (no judge involved)."""
    return list(candidates)


@pytest.mark.parametrize("build", [_mlp, _cnn], ids=["mlp", "cnn"])
@pytest.mark.parametrize("steps", [1, 5])
def test_alignment_lowers_energy_of_every_input(build, steps):
    model = build()
    x = _inputs(model)
    before = energy(model, x).detach()
    after = energy(model, align_inputs(model, x, step_size=1e-2, steps=steps)).detach()
    assert (after < before).all()


def test_zero_steps_returns_the_inputs_and_inputs_are_never_modified():
    model = _mlp()
    x = _inputs(model)
    original = x.clone()
    unchanged = align_inputs(model, x, step_size=0.1, steps=0)
    assert torch.equal(unchanged, original) and unchanged.data_ptr() != x.data_ptr()
    moved = align_inputs(model, x, step_size=0.1, steps=3)
    assert torch.equal(x, original) and not torch.equal(moved, original)
    assert not moved.requires_grad


def test_soft_labels_are_distributions():
    model = _cnn()
    labels = soft_labels(model, _inputs(model) * 5)
    assert labels.shape == (16, 3)
    assert (labels >= 0).all()
    assert torch.allclose(labels.sum(dim=1), torch.ones(16, dtype=torch.float64))


def test_energy_gradient_matches_autograd_and_finite_differences():
    model = _mlp(nn.Tanh)  # smooth, so central differences are accurate
    x = _inputs(model, 4)
    gradient = energy_gradient(model, x)

    leaf = x.clone().requires_grad_(True)
    (reference,) = torch.autograd.grad(-torch.logsumexp(model(leaf), dim=1).sum(), leaf)
    assert torch.allclose(gradient, reference, atol=1e-12)

    eps = 1e-6
    direction = torch.randn(x.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    finite = (energy(model, x + eps * direction) - energy(model, x - eps * direction)).detach() / (2 * eps)
    assert torch.allclose((gradient * direction).sum(dim=1), finite, atol=1e-7)
    assert all(p.grad is None for p in model.parameters())


def test_relabel_uses_argmax_of_aligned_soft_labels():
    # logits = W x with w₀ = (1, 0), w₁ = (0, 3); at x = (1, 0.2) the logits are (1, 0.6), argmax 0. One step of
    # η = 0.5 with ∇E = −Wᵀ softmax(Wx) moves x to about (1.30, 0.80), logits (1.30, 2.40): argmax 1.
    model = nn.Linear(2, 2, bias=False).double()
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 3.0]]))
    x = torch.tensor([[1.0, 0.2]], dtype=torch.float64)
    loader = DataLoader(TensorDataset(x, torch.tensor([0])), batch_size=1)
    p = torch.softmax(torch.tensor([1.0, 0.6], dtype=torch.float64), dim=0)
    x_expected = x + 0.5 * torch.stack([p[0], 3 * p[1]])

    soft_x, soft_y = aligned_causes(model, loader, step_size=0.5, steps=1, mode="soft")
    assert torch.allclose(soft_x, x_expected)
    assert torch.allclose(soft_y, torch.softmax(x_expected @ model.weight.detach().T, dim=1))

    hard_x, hard_y = aligned_causes(model, loader, step_size=0.5, steps=1, mode="relabel")
    assert torch.equal(hard_x, x)
    assert hard_y.dtype == torch.long and hard_y.tolist() == [1]
    # Without alignment the argmax, and so the relabelled class, stays 0.
    assert aligned_causes(model, loader, step_size=0.5, steps=0, mode="relabel")[1].tolist() == [0]


@pytest.mark.parametrize(("modules", "moving"), [(None, {"4"}), (["0", "2"], {"0", "2"}), ("all", {"0", "2", "4"})])
def test_only_chosen_modules_change_and_flags_are_restored(modules, moving):
    model = _mlp()
    model[2].bias.requires_grad_(False)  # outside the repair scope: never moves, even with "all"
    flags = [p.requires_grad for p in model.parameters()]
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    inputs = _inputs_for_treatment(model)
    causes_before = inputs.causes.dataset.tensors[0].clone()

    _walk(EnergyAlignment(finetune_modules=modules, finetune_steps=5, fit_steps=3).candidates(inputs))

    for name, p in model.named_parameters():
        module = name.split(".")[0]
        if module in moving and name != "2.bias":
            assert not torch.equal(p, before[name]), name
        else:
            assert torch.equal(p, before[name]), name
        assert p.grad is None
    assert [p.requires_grad for p in model.parameters()] == flags
    assert torch.equal(inputs.causes.dataset.tensors[0], causes_before)


@pytest.mark.parametrize("mode", ["soft", "relabel"])
def test_treat_runs_end_to_end(mode):
    model = _mlp()
    inputs = _inputs_for_treatment(model)
    treatment = EnergyAlignment(mode=mode, finetune_modules="all", finetune_steps=10, fit_steps=5)
    assert treatment.needs_fisher
    before = [p.detach().clone() for p in model.parameters()]
    assert _walk(treatment.candidates(inputs)) == [10]  # every eval_every = 10 steps, and the last
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert any(not torch.equal(p, b) for p, b in zip(model.parameters(), before))
    assert not model.training


def test_treat_keeps_the_judged_best_candidate_or_theta_hat():
    model = _mlp()
    inputs = _inputs_for_treatment(model)
    before = [p.detach().clone() for p in model.parameters()]
    choice = EnergyAlignment(finetune_modules="all", finetune_steps=20, fit_steps=5, eval_every=5).treat(inputs)
    after = [p.detach().clone() for p in model.parameters()]
    if choice.label is None:
        assert all(torch.equal(p, b) for p, b in zip(after, before))
    else:
        assert choice.label in (5, 10, 15, 20) and choice.value > 0
        assert inputs.judge.verdict(model).lower_bound == choice.value


def test_function_runs_without_fisher_and_is_repeatable():
    results = []
    for _ in range(2):
        model = _mlp()
        causes, kept, query = _loaders()
        torch.manual_seed(5)  # the loaders' shuffling
        _walk(energy_alignment_candidates(model, causes, kept, query, None, 40, steps=2, finetune_steps=5,
                                          fit_steps=3, seed=7))
        results.append(model[4].weight.detach().clone())
    assert torch.equal(*results)


def test_bad_arguments_raise_clear_errors():
    model = _mlp()
    with pytest.raises(ValueError, match="floating-point"):
        align_inputs(model, torch.ones(2, 6, dtype=torch.long), steps=1)
    with pytest.raises(ValueError, match="step_size > 0"):
        align_inputs(model, _inputs(model), step_size=0.0)
    with pytest.raises(ValueError, match="step_size > 0"):
        EnergyAlignment(step_size=-0.1)
    with pytest.raises(ValueError, match="Unknown alignment mode"):
        EnergyAlignment(mode="hard")
    with pytest.raises(ValueError, match="list of module names"):
        EnergyAlignment(finetune_modules="4")
    with pytest.raises(ValueError, match="does not have"):
        finetune_parameters(model, ["head"])
    with pytest.raises(ValueError, match="no nn.Linear"):
        finetune_parameters(nn.Sequential(nn.Conv2d(1, 1, 3)))
    frozen = _mlp()
    frozen[4].requires_grad_(False)
    with pytest.raises(ValueError, match="No trainable parameters in scope"):
        finetune_parameters(frozen)

    integer_causes = DataLoader(TensorDataset(torch.ones(4, 6, dtype=torch.long), torch.zeros(4, dtype=torch.long)))
    _, kept, query = _loaders()
    inputs = TreatmentInputs(model=model, causes=integer_causes, kept=kept, query=query,
                             judge=Judge.accuracy_on(model, query), fisher=None, n_train=40, adapter=BatchAdapter())
    with pytest.raises(ValueError, match="dtype torch.int64"):
        EnergyAlignment(fit_steps=1).treat(inputs)
