"""The forward-mode (JVP) scoring path against the BackPACK reference and against finite differences.

``directional_derivatives`` gives ∇ℓ(z)ᵀv from one JVP per batch; ``gradient_alignment`` gives the same numbers
from BackPACK per-example gradients. ``method="jvp"`` is the default of ``linear_influence``, ``LinearInfluence``
and ``GradientDot``.
"""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import MODELS, tiny_inputs
from torch import Tensor, nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from lightning_repair.adapter import BatchAdapter
from lightning_repair.curvature import diagonal_fisher
from lightning_repair.identify import influence
from lightning_repair.identify.base import ScoringInputs
from lightning_repair.identify.influence import (GradientDot, LinearInfluence, directional_derivatives,
                                                 gradient_alignment, linear_influence)
from lightning_repair.params import trainable

DOUBLE = torch.float64


def loader(x: Tensor, y: Tensor, batch_size: int = 4) -> DataLoader:
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=False)


def random_direction(model: nn.Module, seed: int = 3) -> list[Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(p.shape, generator=generator, dtype=p.dtype) for p in trainable(model)]


def frozen(model: nn.Sequential, freeze: str) -> nn.Sequential:
    """``model`` in eval mode with its first layer (``"first"``), the last bias (``"bias"``) or nothing frozen."""
    if freeze == "first":
        model[0].requires_grad_(False)
    elif freeze == "bias":
        model[-1].bias.requires_grad_(False)
    return model.eval()


@pytest.mark.parametrize("freeze", ["none", "first", "bias"])
def test_jvp_matches_backpack_per_example_gradients(model_kind, freeze):
    model = frozen(MODELS[model_kind](DOUBLE), freeze)
    x, y = tiny_inputs(model_kind, 11)
    direction = random_direction(model)
    jvp = directional_derivatives(model, loader(x, y, 4), direction)
    reference = gradient_alignment(model, loader(x, y, 4), direction)
    assert jvp.shape == (11,) and jvp.dtype == DOUBLE and jvp.device.type == "cpu"
    torch.testing.assert_close(jvp, reference, rtol=1e-4, atol=1e-10)
    assert all(p.grad is None for p in model.parameters())  # no parameter gradients are left behind


def test_jvp_matches_backpack_in_float32(model_kind):
    model = frozen(MODELS[model_kind](torch.float32), "first")
    x, y = tiny_inputs(model_kind, 10, dtype=torch.float32)
    direction = random_direction(model)
    jvp = directional_derivatives(model, loader(x, y, 3), direction)
    reference = gradient_alignment(model, loader(x, y, 3), direction)
    assert jvp.dtype == torch.float32
    scale = float(reference.abs().max())
    torch.testing.assert_close(jvp, reference, rtol=1e-4, atol=1e-5 * scale)


def test_jvp_is_directional_derivative_of_per_example_losses(model_kind):
    """(ℓ(z; θ̂ + εv) − ℓ(z; θ̂ − εv)) / 2ε for the trainable parameters only (the first layer is frozen)."""
    model = frozen(MODELS[model_kind](DOUBLE), "first")
    x, y = tiny_inputs(model_kind, 9)
    direction = random_direction(model)
    eps = 1e-6

    def losses(step: float) -> Tensor:
        moved = copy.deepcopy(model)
        with torch.no_grad():
            for p, d in zip(trainable(moved), direction):
                p.add_(step * d)
            return F.cross_entropy(moved(x), y, reduction="none")

    finite_difference = (losses(eps) - losses(-eps)) / (2 * eps)
    got = directional_derivatives(model, loader(x, y, 5), direction)
    torch.testing.assert_close(got, finite_difference, rtol=1e-4, atol=1e-8)


@pytest.mark.parametrize("with_fisher", [True, False])
def test_linear_influence_methods_agree(model_kind, with_fisher):
    torch.set_default_dtype(DOUBLE)  # BackPACK builds its AdaptiveAvgPool2d Fisher in the default dtype
    model = frozen(MODELS[model_kind](DOUBLE), "first")
    x, y = tiny_inputs(model_kind, 12)
    xf, yf = tiny_inputs(model_kind, 4, seed=7)
    train, failures = loader(x, y, 5), loader(xf, yf, 3)
    fisher = diagonal_fisher(model, train, kind="exact") if with_fisher else None
    default = linear_influence(model, train, failures, fisher, damping=0.05)
    jvp = linear_influence(model, train, failures, fisher, damping=0.05, method="jvp")
    backpack = linear_influence(model, train, failures, fisher, damping=0.05, method="backpack")
    torch.testing.assert_close(default, jvp, rtol=0, atol=0)
    torch.testing.assert_close(jvp, backpack, rtol=1e-4, atol=1e-10)
    with pytest.raises(ValueError, match="scoring method"):
        linear_influence(model, train, failures, fisher, method="vjp")


def counting(monkeypatch) -> dict[str, int]:
    """Counts calls of the two scoring paths inside ``influence``."""
    calls = {"jvp": 0, "backpack": 0}
    for name, key in (("directional_derivatives", "jvp"), ("gradient_alignment", "backpack")):
        original = getattr(influence, name)

        def wrapped(*args, _original=original, _key=key, **kwargs):
            calls[_key] += 1
            return _original(*args, **kwargs)

        monkeypatch.setattr(influence, name, wrapped)
    return calls


def test_scorers_pass_method_through(monkeypatch):
    model = frozen(MODELS["cnn"](DOUBLE), "none")
    x, y = tiny_inputs("cnn", 10)
    xf, yf = tiny_inputs("cnn", 3, seed=5)
    train, failures = loader(x, y, 4), loader(xf, yf, 3)
    fisher = [torch.rand_like(p) + 0.1 for p in trainable(model)]
    inputs = ScoringInputs(model=model, train=train, query=failures, stop=None, trusted=None, fisher=fisher,
                           n_train=10, adapter=BatchAdapter())
    calls = counting(monkeypatch)
    scores = {}
    for method in ("jvp", "backpack"):
        scores["linear", method] = LinearInfluence(damping=0.01, method=method).score(inputs)
        scores["dot", method] = GradientDot(method=method).score(inputs)
    assert calls == {"jvp": 2, "backpack": 2}
    assert LinearInfluence().method == "jvp" and GradientDot().method == "jvp"
    assert "method='backpack'" in repr(GradientDot(method="backpack"))
    torch.testing.assert_close(scores["linear", "jvp"], scores["linear", "backpack"], rtol=1e-4, atol=1e-10)
    torch.testing.assert_close(scores["dot", "jvp"], scores["dot", "backpack"], rtol=1e-4, atol=1e-10)
    torch.testing.assert_close(scores["dot", "jvp"], linear_influence(model, train, failures, None))
    with pytest.raises(ValueError, match="scoring method"):
        LinearInfluence(method="exact")
    with pytest.raises(ValueError, match="scoring method"):
        GradientDot(method="exact")


class DictAdapter(BatchAdapter):
    """Batches ``{"pixels": x, "target": y}`` and logits from the model's ``head`` applied to ``body``."""

    def inputs(self, batch):
        return {"pixels": batch["pixels"]}

    def labels(self, batch):
        return batch["target"]

    def logits(self, model, inputs):
        return model.head(model.body(inputs["pixels"]))


class BodyHead(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Linear(4, 6), nn.Tanh())
        self.head = nn.Linear(6, 3)

    def forward(self, x):  # never called by DictAdapter
        raise AssertionError("the adapter's logits must be used")


def test_jvp_uses_the_adapter():
    model = BodyHead().to(DOUBLE).eval()
    model.body[0].bias.requires_grad_(False)
    x, y = tiny_inputs("mlp", 7)
    data = [{"pixels": x[i:i + 3], "target": y[i:i + 3]} for i in range(0, 7, 3)]
    direction = random_direction(model)
    adapter = DictAdapter()
    got = directional_derivatives(model, data, direction, adapter)
    torch.testing.assert_close(got, gradient_alignment(model, data, direction, adapter), rtol=1e-4, atol=1e-10)


class NoForwardAD(torch.autograd.Function):
    """2x with a backward formula but no ``jvp``: forward-mode AD cannot go through it."""

    @staticmethod
    def forward(ctx, x):
        return 2 * x

    @staticmethod
    def backward(ctx, grad):
        return 2 * grad


class Doubling(nn.Module):
    def forward(self, x):
        return NoForwardAD.apply(x)


def test_jvp_falls_back_to_backpack_with_a_warning():
    model = nn.Sequential(nn.Linear(4, 5), Doubling(), nn.ReLU(), nn.Linear(5, 3)).to(DOUBLE).eval()
    x, y = tiny_inputs("mlp", 6)
    xf, yf = tiny_inputs("mlp", 3, seed=5)
    with pytest.raises(influence.ForwardADUnsupportedError, match="method='backpack'"):
        directional_derivatives(model, loader(x, y), random_direction(model))
    with pytest.warns(RuntimeWarning, match="jvp function"):
        scores = linear_influence(model, loader(x, y), loader(xf, yf), None)
    torch.testing.assert_close(scores, linear_influence(model, loader(x, y), loader(xf, yf), None, method="backpack"))


def test_directional_derivatives_edge_cases():
    model = MODELS["mlp"](DOUBLE).eval()
    x, y = tiny_inputs("mlp", 5)
    assert directional_derivatives(model, loader(x[:0], y[:0]), random_direction(model)).shape == (0,)
    with pytest.raises(ValueError, match="trainable parameters"):
        directional_derivatives(model, loader(x, y), random_direction(model)[:-1])
    # A direction of zeros gives zeros, and the model's own parameters are untouched.
    before = [p.detach().clone() for p in model.parameters()]
    zeros = directional_derivatives(model, loader(x, y), [torch.zeros_like(p) for p in trainable(model)])
    torch.testing.assert_close(zeros, torch.zeros(5, dtype=DOUBLE))
    for p, b in zip(model.parameters(), before):
        assert type(p) is nn.Parameter and torch.equal(p, b)
