"""BackPACK per-example gradients and diagonal Fishers against brute-force autograd loops."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import MODELS, tiny_inputs
from torch import Tensor, nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from lightning_repair import curvature
from lightning_repair.curvature import diagonal_fisher, loss_gradient, per_example_gradients
from lightning_repair.params import trainable


@pytest.fixture(params=curvature.BACKENDS)
def backend(request) -> str:
    """Each backend computes the same quantities; every reference test runs on both."""
    return request.param


def prepared(kind: str, dtype: torch.dtype = torch.float64, freeze_first: bool = False) -> tuple[nn.Module, nn.Module]:
    """(model for the BackPACK functions, plain deep copy for autograd references) with identical weights.

    Sets the default dtype to ``dtype`` (conftest restores it after each test): BackPACK 1.7.1 builds the
    transposed convolution behind its AdaptiveAvgPool2d second-order derivatives in the default dtype, so a float64
    CNN otherwise fails in ``DiagGGNExact``/``DiagGGNMC`` with "expected scalar type Double but found Float".
    """
    torch.set_default_dtype(dtype)
    model = MODELS[kind](dtype)
    if freeze_first:
        model[0].requires_grad_(False)
    reference = copy.deepcopy(model)
    return ready(model), reference


def ready(model: nn.Module) -> nn.Module:
    """The model as the BackPACK functions take it: older versions of ``curvature`` needed ``extended(model)``
    first, the current one adds BackPACK's hooks itself for the duration of each call."""
    return getattr(curvature, "extended", lambda m: m)(model)


def example_gradient(model: nn.Module, x: Tensor, y: int) -> list[Tensor]:
    """∇ℓ((x, y)) for one example, over the model's trainable parameters, by plain autograd."""
    loss = F.cross_entropy(model(x.unsqueeze(0)), torch.tensor([y]), reduction="sum")
    return [g.detach() for g in torch.autograd.grad(loss, trainable(model))]


def autograd_per_example(model: nn.Module, x: Tensor, y: Tensor) -> list[Tensor]:
    """Per-example gradients stacked to (N, *parameter.shape), from an autograd loop."""
    grads = [example_gradient(model, x[i], int(y[i])) for i in range(len(y))]
    return [torch.stack(per_param) for per_param in zip(*grads)]


def autograd_empirical_fisher(model: nn.Module, x: Tensor, y: Tensor) -> list[Tensor]:
    """Mean over examples of (∇ℓ(x_i, y_i))²."""
    return [(g**2).mean(0) for g in autograd_per_example(model, x, y)]


def autograd_exact_fisher(model: nn.Module, x: Tensor) -> list[Tensor]:
    """Mean over examples of Σ_y p(y | x_i) (∇ℓ(x_i, y))², the true Fisher diagonal (= GGN for cross-entropy)."""
    total = [torch.zeros_like(p) for p in trainable(model)]
    with torch.no_grad():
        probs = F.softmax(model(x), dim=1)
    for i in range(x.shape[0]):
        for label in range(probs.shape[1]):
            for acc, g in zip(total, example_gradient(model, x[i], label)):
                acc += probs[i, label] * g**2
    return [t / x.shape[0] for t in total]


def loader(x: Tensor, y: Tensor, batch_size: int) -> DataLoader:
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=False)


def assert_lists_close(actual: list[Tensor], expected: list[Tensor], **tolerances) -> None:
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected):
        assert a.shape == e.shape
        torch.testing.assert_close(a, e, **tolerances)


def flat(tensors: list[Tensor]) -> Tensor:
    return torch.cat([t.flatten() for t in tensors])


# ---------------------------------------------------------------------------------------------------------------
# Per-example gradients


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("freeze_first", [False, True])
def test_per_example_gradients_match_autograd_loop(model_kind, dtype, freeze_first, backend):
    model, reference = prepared(model_kind, dtype, freeze_first)
    x, y = tiny_inputs(model_kind, 7, dtype)
    grads, losses = per_example_gradients(model, x, y, backend=backend)

    expected = autograd_per_example(reference, x, y)
    n_trainable = len(trainable(reference))
    assert n_trainable == len(list(reference.parameters())) - (2 if freeze_first else 0)
    assert len(grads) == n_trainable
    for got, want in zip(grads, expected):
        assert got.shape == want.shape == (7, *want.shape[1:])
        assert (got - want).abs().max().item() < 1e-5
    assert losses.shape == (7,)
    torch.testing.assert_close(losses, F.cross_entropy(reference(x), y, reduction="none").detach())
    # The per-example quantities are of ℓ(z) itself: their sum is the gradient of the summed loss.
    summed = torch.autograd.grad(F.cross_entropy(reference(x), y, reduction="sum"), trainable(reference))
    for got, want in zip(grads, summed):
        assert (got.sum(0) - want).abs().max().item() < 1e-5
    # No gradients are left behind on the model.
    assert all(p.grad is None for p in model.parameters())


def test_per_example_gradients_of_frozen_layer_are_not_returned(backend):
    model, _ = prepared("mlp", freeze_first=True)
    x, y = tiny_inputs("mlp", 5)
    grads, _ = per_example_gradients(model, x, y, backend=backend)
    assert [tuple(g.shape[1:]) for g in grads] == [(3, 5), (3,)]


# ---------------------------------------------------------------------------------------------------------------
# Diagonal Fisher


@pytest.mark.parametrize("freeze_first", [False, True])
def test_empirical_fisher_matches_definition(model_kind, freeze_first, backend):
    model, reference = prepared(model_kind, freeze_first=freeze_first)
    x, y = tiny_inputs(model_kind, 10)
    fisher = diagonal_fisher(model, loader(x, y, 4), kind="empirical", backend=backend)
    assert_lists_close(fisher, autograd_empirical_fisher(reference, x, y), rtol=1e-4, atol=1e-12)


@pytest.mark.parametrize("freeze_first", [False, True])
def test_exact_fisher_matches_definition(model_kind, freeze_first, backend):
    model, reference = prepared(model_kind, freeze_first=freeze_first)
    x, y = tiny_inputs(model_kind, 10)
    fisher = diagonal_fisher(model, loader(x, y, 4), kind="exact", backend=backend)
    expected = autograd_exact_fisher(reference, x)
    assert_lists_close(fisher, expected, rtol=1e-4, atol=1e-12)
    # The true Fisher is not the empirical Fisher (the test would otherwise not tell them apart).
    assert not torch.allclose(flat(expected), flat(autograd_empirical_fisher(reference, x, y)), rtol=1e-2)


def test_exact_fisher_float32(backend):
    model, reference = prepared("cnn", torch.float32)
    x, y = tiny_inputs("cnn", 8, torch.float32)
    fisher = diagonal_fisher(model, loader(x, y, 3), kind="exact", backend=backend)
    assert_lists_close(fisher, autograd_exact_fisher(reference, x), rtol=1e-3, atol=1e-7)


@pytest.mark.parametrize("kind", ["exact", "empirical"])
def test_fisher_does_not_depend_on_batch_size(model_kind, kind, backend):
    model, _ = prepared(model_kind)
    x, y = tiny_inputs(model_kind, 10)
    fishers = [diagonal_fisher(model, loader(x, y, b), kind=kind, backend=backend) for b in (1, 3, 10)]
    for other in fishers[1:]:
        assert_lists_close(other, fishers[0], rtol=1e-10, atol=1e-14)


def test_mc_fisher_single_example_is_a_squared_gradient_at_a_label(backend):
    """One example, one sample: F̂ = (∇ℓ(x, ŷ))² for the sampled label ŷ, one of the K candidates."""
    model, reference = prepared("mlp")
    x, y = tiny_inputs("mlp", 1)
    candidates = [flat([g**2 for g in example_gradient(reference, x[0], label)]) for label in range(3)]
    for seed in range(5):
        torch.manual_seed(seed)
        fisher = flat(diagonal_fisher(model, loader(x, y, 1), kind="mc", mc_samples=1, backend=backend))
        assert any(torch.allclose(fisher, c, rtol=1e-8, atol=1e-14) for c in candidates)


def test_mc_fisher_is_reproducible_with_a_seed(model_kind, backend):
    model, _ = prepared(model_kind)
    x, y = tiny_inputs(model_kind, 10)
    data = loader(x, y, 4)
    torch.manual_seed(123)
    first = diagonal_fisher(model, data, kind="mc", backend=backend)
    torch.manual_seed(123)
    second = diagonal_fisher(model, data, kind="mc", backend=backend)
    torch.manual_seed(124)
    third = diagonal_fisher(model, data, kind="mc", backend=backend)
    assert_lists_close(second, first, rtol=0, atol=0)
    assert not torch.equal(flat(third), flat(first))


@pytest.mark.parametrize("batch_size", [3, 10])
def test_mc_fisher_converges_to_exact_fisher(model_kind, batch_size, backend):
    model, _ = prepared(model_kind)
    x, y = tiny_inputs(model_kind, 10)
    exact = flat(diagonal_fisher(model, loader(x, y, batch_size), kind="exact", backend=backend))
    torch.manual_seed(0)
    mc = flat(diagonal_fisher(model, loader(x, y, batch_size), kind="mc", mc_samples=2000, backend=backend))
    relative_error_of_total = abs(mc.sum() - exact.sum()) / exact.sum()
    correlation = torch.corrcoef(torch.stack([mc, exact]))[0, 1]
    assert relative_error_of_total < 0.05
    assert correlation > 0.95


def test_repeated_single_sample_mc_fishers_average_to_exact_fisher(backend):
    """mc_samples=1 is a noisy but unbiased estimate: the mean of independent calls approaches the exact Fisher."""
    model, _ = prepared("mlp")
    x, y = tiny_inputs("mlp", 10)
    data = loader(x, y, 4)
    exact = flat(diagonal_fisher(model, data, kind="exact", backend=backend))
    torch.manual_seed(1)
    estimates = torch.stack([flat(diagonal_fisher(model, data, kind="mc", backend=backend)) for _ in range(40)])
    averaged = estimates.mean(0)
    assert abs(averaged.sum() - exact.sum()) / exact.sum() < 0.1
    assert torch.corrcoef(torch.stack([averaged, exact]))[0, 1] > 0.9
    # Single estimates really are random: they differ between calls.
    assert estimates.std(0).max() > 0


def test_unknown_fisher_kind_raises(backend):
    model, _ = prepared("mlp")
    x, y = tiny_inputs("mlp", 4)
    with pytest.raises(ValueError, match="Unknown Fisher kind"):
        diagonal_fisher(model, loader(x, y, 2), kind="kfac", backend=backend)


def test_empty_loader_raises(backend):
    model, _ = prepared("mlp")
    x, y = tiny_inputs("mlp", 0)
    with pytest.raises(ValueError, match="empty"):
        diagonal_fisher(model, loader(x, y, 2), kind="exact", backend=backend)


# ---------------------------------------------------------------------------------------------------------------
# Loss gradient


@pytest.mark.parametrize("freeze_first", [False, True])
def test_loss_gradient_equals_autograd_of_summed_loss(model_kind, freeze_first):
    model, reference = prepared(model_kind, freeze_first=freeze_first)
    x, y = tiny_inputs(model_kind, 10)
    got = loss_gradient(model, loader(x, y, 3))
    loss = F.cross_entropy(reference(x), y, reduction="sum")
    expected = list(torch.autograd.grad(loss, trainable(reference)))
    assert_lists_close(got, expected, rtol=1e-10, atol=1e-12)
    assert all(p.grad is None for p in model.parameters())


def test_torch_func_mc_fisher_equals_backpacks_diag_ggn_mc_in_expectation(model_kind):
    # Squared gradients at labels sampled from the model (torch.func) and BackPACK's DiagGGNMC estimate the same
    # quantity: with many samples each, they agree.
    model, _ = prepared(model_kind)
    x, y = tiny_inputs(model_kind, 10)
    torch.manual_seed(0)
    by_func = flat(diagonal_fisher(model, loader(x, y, 5), kind="mc", mc_samples=2000, backend="torch_func"))
    torch.manual_seed(1)
    by_backpack = flat(diagonal_fisher(model, loader(x, y, 5), kind="mc", mc_samples=2000, backend="backpack"))
    assert abs(by_func.sum() - by_backpack.sum()) / by_backpack.sum() < 0.05
    assert torch.corrcoef(torch.stack([by_func, by_backpack]))[0, 1] > 0.95


def test_choose_backend_keeps_backpack_where_it_works_and_says_why_it_falls_back():
    model, _ = prepared("mlp")
    x, y = tiny_inputs("mlp", 6)
    assert curvature.choose_backend(model, loader(x, y, 3), "mc") == ("backpack", None)

    class Reused(nn.Module):  # one module run twice per forward pass: BackPACK keeps one input per module
        def __init__(self) -> None:
            super().__init__()
            self.layer = nn.Linear(x.shape[1], x.shape[1]).double()

        def forward(self, inputs):
            return self.layer(torch.tanh(self.layer(inputs)))[:, :3]

    backend, reason = curvature.choose_backend(Reused(), loader(x, y, 3), "mc")
    assert backend == "torch_func" and "more than once" in reason
