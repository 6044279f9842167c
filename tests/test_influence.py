"""Linear influence, gradient dot, EWC influence and the training-loss baseline against first principles.

Sign convention (METHODS.md): higher score = more likely a cause = an example whose loss rises when the model
learns its failures, i.e. one whose removal would lower the failures' loss.
"""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import MODELS, tiny_inputs
from torch import Tensor, nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from lightning_repair import curvature
from lightning_repair.adapter import BatchAdapter
from lightning_repair.curvature import diagonal_fisher, loss_gradient
from lightning_repair.identify.base import ScoringInputs
from lightning_repair.identify.baselines import training_loss
from lightning_repair.identify.ewc import EWCInfluence, ewc_influence, fit_to_failures, loss_change
from lightning_repair.identify.influence import GradientDot, LinearInfluence, linear_influence, natural_gradient
from lightning_repair.optimize import accuracy_of
from lightning_repair.params import trainable

DOUBLE = torch.float64


def ready(model: nn.Module) -> nn.Module:
    """The model as the BackPACK functions take it (older versions needed ``curvature.extended`` first)."""
    return getattr(curvature, "extended", lambda m: m)(model)


def loader(x: Tensor, y: Tensor, batch_size: int = 4) -> DataLoader:
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=False)


def ranks(values: Tensor) -> Tensor:
    """0-based ranks (ties broken by position; the tests' scores are continuous)."""
    out = torch.empty_like(values, dtype=DOUBLE)
    out[values.argsort()] = torch.arange(len(values), dtype=DOUBLE)
    return out


def spearman(a: Tensor, b: Tensor) -> float:
    """Spearman rank correlation: the Pearson correlation of the ranks."""
    return float(torch.corrcoef(torch.stack([ranks(a), ranks(b)]))[0, 1])


def per_example_losses(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    with torch.no_grad():
        return F.cross_entropy(model(x), y, reduction="none")


def shifted(model: nn.Module, direction: list[Tensor], step: float) -> nn.Module:
    """A copy of ``model`` with its trainable parameters moved by ``step × direction``."""
    moved = copy.deepcopy(model)
    with torch.no_grad():
        for p, d in zip(trainable(moved), direction):
            p.add_(step * d)
    return moved


def misclassified(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    with torch.no_grad():
        return (model(x).argmax(1) != y).nonzero().flatten()


def test_spearman_helper():
    a = torch.tensor([0.1, 0.5, 0.3, 2.0], dtype=DOUBLE)
    assert spearman(a, a**3) == pytest.approx(1.0)
    assert spearman(a, -a) == pytest.approx(-1.0)
    assert spearman(a, torch.tensor([1.0, 3.0, 4.0, 2.0], dtype=DOUBLE)) == pytest.approx(0.2)  # 1 − 6·8/(4·15)


# ---------------------------------------------------------------------------------------------------------------
# Natural gradient and linear influence


def test_natural_gradient_damping_is_relative_to_the_mean_fisher():
    gradient = [torch.tensor([1.0, -2.0], dtype=DOUBLE), torch.tensor([[3.0]], dtype=DOUBLE)]
    fisher = [torch.tensor([0.5, 2.0], dtype=DOUBLE), torch.tensor([[0.5]], dtype=DOUBLE)]
    delta = 0.1 * (0.5 + 2.0 + 0.5) / 3
    got = natural_gradient(gradient, fisher, damping=0.1)
    torch.testing.assert_close(got[0], torch.tensor([1.0 / (0.5 + delta), -2.0 / (2.0 + delta)], dtype=DOUBLE))
    torch.testing.assert_close(got[1], torch.tensor([[3.0 / (0.5 + delta)]], dtype=DOUBLE))
    # Scaling the Fisher by c scales the natural gradient by 1/c (the damping scales with it).
    scaled = natural_gradient(gradient, [7.0 * f for f in fisher], damping=0.1)
    for a, b in zip(scaled, got):
        torch.testing.assert_close(7.0 * a, b)
    assert natural_gradient(gradient, None) == gradient
    with pytest.raises(ValueError):
        natural_gradient(gradient, fisher, damping=0.0)


@pytest.mark.parametrize("fisher_kind", ["exact", "empirical"])
@pytest.mark.parametrize("freeze_first", [False, True])
def test_linear_influence_is_loss_change_along_natural_gradient_step(model_kind, fisher_kind, freeze_first):
    """r(z) = −∇ℓ(z)ᵀ v is the derivative of ℓ(z; θ̂ − εv) in ε at 0: compare with a central difference."""
    # BackPACK 1.7.1 builds its AdaptiveAvgPool2d second-order derivative in the default dtype (conftest restores it).
    torch.set_default_dtype(DOUBLE)
    model = MODELS[model_kind](DOUBLE)
    if freeze_first:
        model[0].requires_grad_(False)
    model = ready(model)
    x, y = tiny_inputs(model_kind, 12)
    xf, yf = tiny_inputs(model_kind, 4, seed=7)
    train, failures = loader(x, y, 5), loader(xf, yf, 3)
    fisher = diagonal_fisher(model, train, kind=fisher_kind)
    damping = 0.05
    scores = linear_influence(model, train, failures, fisher, damping=damping)

    v = natural_gradient(loss_gradient(model, failures), fisher, damping=damping)
    assert len(v) == len(trainable(model))
    eps = 1e-4 / float(torch.cat([t.flatten() for t in v]).abs().max())
    before = shifted(model, v, -eps)  # θ̂ − εv: the step that fits the failures
    after = shifted(model, v, +eps)
    finite_difference = (per_example_losses(before, x, y) - per_example_losses(after, x, y)) / (2 * eps)
    assert scores.shape == (12,)
    torch.testing.assert_close(scores, finite_difference, rtol=1e-4, atol=1e-8)
    # The step θ̂ − εv lowers the failures' summed loss (it is a descent direction for them).
    assert per_example_losses(before, xf, yf).sum() < per_example_losses(model, xf, yf).sum()


def autograd_gradient(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    """∇ of the summed loss of (x, y), flattened over the trainable parameters."""
    loss = F.cross_entropy(model(x), y, reduction="sum")
    return torch.cat([g.flatten() for g in torch.autograd.grad(loss, trainable(model))])


def test_linear_influence_without_fisher_is_gradient_dot(model_kind):
    model = ready(MODELS[model_kind](DOUBLE))
    x, y = tiny_inputs(model_kind, 9)
    xf, yf = tiny_inputs(model_kind, 3, seed=5)
    scores = linear_influence(model, loader(x, y, 4), loader(xf, yf, 2), None)
    g_failures = autograd_gradient(model, xf, yf)
    expected = torch.stack([-autograd_gradient(model, x[i:i + 1], y[i:i + 1]) @ g_failures for i in range(9)])
    torch.testing.assert_close(scores, expected, rtol=1e-8, atol=1e-12)


def test_linear_influence_does_not_depend_on_batching():
    model = ready(MODELS["mlp"](DOUBLE))
    x, y = tiny_inputs("mlp", 11)
    xf, yf = tiny_inputs("mlp", 5, seed=3)
    fisher = diagonal_fisher(model, loader(x, y, 11), kind="exact")
    one = linear_influence(model, loader(x, y, 1), loader(xf, yf, 5), fisher)
    other = linear_influence(model, loader(x, y, 4), loader(xf, yf, 2), fisher)
    torch.testing.assert_close(one, other, rtol=1e-10, atol=1e-12)


# ---------------------------------------------------------------------------------------------------------------
# Linear influence against true leave-one-out retraining on a convex model


class RegularisedSoftmaxRegression:
    """Multinomial logistic regression, J(θ) = Σ_i ℓ(z_i; θ) + (λ/2)‖θ‖², θ = (W, b) of an ``nn.Linear``."""

    def __init__(self, x: Tensor, y: Tensor, classes: int, l2: float) -> None:
        self.x, self.y, self.l2 = x, y, l2
        self.shapes = [(classes, x.shape[1]), (classes,)]

    def unflatten(self, theta: Tensor) -> tuple[Tensor, Tensor]:
        k, d = self.shapes[0]
        return theta[: k * d].view(k, d), theta[k * d:]

    def losses(self, theta: Tensor, x: Tensor, y: Tensor) -> Tensor:
        weight, bias = self.unflatten(theta)
        return F.cross_entropy(x @ weight.T + bias, y, reduction="none")

    def objective(self, theta: Tensor, keep: Tensor | None = None) -> Tensor:
        losses = self.losses(theta, self.x, self.y)
        if keep is not None:
            losses = losses[keep]
        return losses.sum() + 0.5 * self.l2 * (theta**2).sum()

    def fit(self, start: Tensor, keep: Tensor | None = None) -> Tensor:
        """argmin J (over ``keep`` only) by LBFGS, then checked to be a stationary point."""
        theta = start.clone().requires_grad_(True)
        optimizer = torch.optim.LBFGS([theta], lr=1, max_iter=500, history_size=50, tolerance_grad=1e-12,
                                      tolerance_change=1e-15, line_search_fn="strong_wolfe")

        def closure():
            optimizer.zero_grad()
            value = self.objective(theta, keep)
            value.backward()
            return value

        optimizer.step(closure)
        gradient = torch.autograd.grad(self.objective(theta, keep), theta)[0]
        assert gradient.abs().max() < 1e-5, "the fit did not converge"
        return theta.detach()

    def module(self, theta: Tensor) -> nn.Linear:
        k, d = self.shapes[0]
        linear = nn.Linear(d, k).to(DOUBLE)
        weight, bias = self.unflatten(theta)
        with torch.no_grad():
            linear.weight.copy_(weight)
            linear.bias.copy_(bias)
        return linear


def test_linear_influence_ranks_like_leave_one_out_retraining():
    """Removing z from J moves θ̂ by ≈ +H⁻¹∇ℓ(z) (J_{−z} = J − ℓ(z), one Newton step from θ̂), so the failures'
    loss changes by Δ(z) ≈ +g_Fᵀ H⁻¹ ∇ℓ(z). The score r(z) = −∇ℓ(z)ᵀ H⁻¹ g_F ≈ −Δ(z): a cause is an example whose
    removal lowers the failure loss. For softmax regression the GGN (= Fisher) is the Hessian of the data term, so
    H = N F + λI and the library's (F̂ + δ)⁻¹ with δ = λ/N is its diagonal approximation, up to the factor N."""
    n, d, classes, l2 = 50, 4, 3, 1.0
    generator = torch.Generator().manual_seed(0)
    true_weight = 1.5 * torch.randn(classes, d, generator=generator, dtype=DOUBLE)

    def sample(count: int) -> tuple[Tensor, Tensor]:
        inputs = torch.randn(count, d, generator=generator, dtype=DOUBLE)  # standardized, independent features
        return inputs, (inputs @ true_weight.T).argmax(1)

    x, y = sample(n)
    flipped = torch.randperm(n, generator=generator)[: n * 15 // 100]
    y[flipped] = (y[flipped] + torch.randint(1, classes, (len(flipped),), generator=generator)) % classes
    x_val, y_val = sample(200)

    problem = RegularisedSoftmaxRegression(x, y, classes, l2)
    theta_hat = problem.fit(torch.zeros(classes * d + classes, dtype=DOUBLE))
    model = ready(problem.module(theta_hat))
    failures = misclassified(model, x_val, y_val)[:10]
    assert len(failures) == 10
    xf, yf = x_val[failures], y_val[failures]

    # True leave-one-out change of the summed failure loss, each refit warm-started at θ̂.
    base = problem.losses(theta_hat, xf, yf).sum()
    delta = torch.empty(n, dtype=DOUBLE)
    for i in range(n):
        keep = torch.ones(n, dtype=torch.bool)
        keep[i] = False
        delta[i] = problem.losses(problem.fit(theta_hat, keep), xf, yf).sum() - base

    # The same formula with the exact Hessian: checks the derivation and the sign.
    theta = theta_hat.clone().requires_grad_(True)
    hessian = torch.autograd.functional.hessian(problem.objective, theta_hat)
    g_failures = torch.autograd.grad(problem.losses(theta, xf, yf).sum(), theta)[0]
    per_example = torch.stack([torch.autograd.grad(problem.losses(theta, x[i:i + 1], y[i:i + 1]).sum(), theta)[0]
                               for i in range(n)])
    exact_scores = -per_example @ torch.linalg.solve(hessian, g_failures)
    rho_exact = spearman(exact_scores, -delta)
    pearson_exact = float(torch.corrcoef(torch.stack([exact_scores, -delta]))[0, 1])

    train, failure_loader = loader(x, y, 16), loader(xf, yf, 16)
    rho_library = {}
    for kind in ("exact", "empirical"):
        fisher = diagonal_fisher(model, train, kind=kind)
        damping = l2 / (n * float(torch.cat([f.flatten() for f in fisher]).mean()))  # δ = λ/N
        scores = linear_influence(model, train, failure_loader, fisher, damping=damping)
        rho_library[kind] = spearman(scores, -delta)
    print(f"Spearman with -Δ(LOO): exact Hessian {rho_exact:.3f} (Pearson {pearson_exact:.3f}); "
          f"diagonal Fisher exact {rho_library['exact']:.3f}, empirical {rho_library['empirical']:.3f}")
    assert rho_exact >= 0.9
    assert pearson_exact >= 0.9
    assert rho_library["exact"] >= 0.9
    assert rho_library["empirical"] >= 0.9


# ---------------------------------------------------------------------------------------------------------------
# EWC influence


@pytest.fixture
def mlp_with_failures():
    """A tiny untrained MLP, 40 training examples, and 10 of its misclassified examples as F_q."""
    model = ready(MODELS["mlp"](DOUBLE))
    x, y = tiny_inputs("mlp", 40)
    wrong = misclassified(model, x, y)[:10]
    assert len(wrong) == 10
    return model, x, y, x[wrong], y[wrong]


def test_ewc_influence_with_infinite_anchor_is_near_zero(mlp_with_failures):
    model, x, y, xf, yf = mlp_with_failures
    train, failures = loader(x, y, 16), loader(xf, yf, 16)
    fisher = diagonal_fisher(model, train, kind="exact")
    free = ewc_influence(model, train, failures, None, n_train=40, lr=1e-2)
    assert free.abs().max() > 0.1
    # Adam's steps are ~lr whatever the anchor, so θ₊F stays within ~lr of θ̂ rather than exactly on it.
    for anchored in (ewc_influence(model, train, failures, [1e12 * f for f in fisher], n_train=40, lr=1e-2),
                     ewc_influence(model, train, failures, fisher, n_train=10**14, lr=1e-2)):
        assert anchored.abs().max() < 1e-3 * free.abs().max()
    weak = ewc_influence(model, train, failures, fisher, n_train=40, lr=1e-2)
    assert weak.abs().max() > 1e-2 * free.abs().max()


def test_fit_to_failures_without_anchor_fits_failures_on_a_copy(mlp_with_failures):
    model, x, y, xf, yf = mlp_with_failures
    before = [p.detach().clone() for p in model.parameters()]
    flags = [p.requires_grad for p in model.parameters()]
    failures = loader(xf, yf, 16)
    plus = fit_to_failures(model, failures, None, n_train=40, l2=0.0, lr=1e-2, max_steps=100)
    assert plus is not model
    assert accuracy_of(model, failures) == 0.0
    assert accuracy_of(plus, failures) > 0.5
    for p, b, flag in zip(model.parameters(), before, flags):
        assert torch.equal(p, b) and p.requires_grad == flag and p.grad is None
    assert not all(torch.equal(p, b) for p, b in zip(plus.parameters(), before))


def test_ewc_influence_is_loss_change_to_fitted_model(mlp_with_failures):
    model, x, y, xf, yf = mlp_with_failures
    train, failures = loader(x, y, 16), loader(xf, yf, 16)
    fisher = diagonal_fisher(model, train, kind="empirical")
    scores = ewc_influence(model, train, failures, fisher, n_train=40, lr=1e-2, max_steps=30)
    plus = fit_to_failures(model, failures, fisher, n_train=40, lr=1e-2, max_steps=30)  # deterministic: full batch
    expected = per_example_losses(plus, x, y) - per_example_losses(model, x, y)
    torch.testing.assert_close(scores, expected, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(loss_change(model, plus, loader(x, y, 7)), expected, rtol=1e-10, atol=1e-12)


def test_training_loss_is_per_example_cross_entropy(model_kind):
    model = MODELS[model_kind](DOUBLE)
    x, y = tiny_inputs(model_kind, 10)
    expected = torch.stack([F.cross_entropy(model(x[i:i + 1]), y[i:i + 1]) for i in range(10)]).detach()
    torch.testing.assert_close(training_loss(model, loader(x, y, 3)), expected, rtol=1e-12, atol=1e-14)


# ---------------------------------------------------------------------------------------------------------------
# Orientation: a mislabeled training point next to a failure is a top cause


@pytest.fixture(scope="module")
def memorised_mislabel():
    """Two 2-D blobs; one training point in blob 1 labelled 0. A small MLP memorises it, carving a class-0 pocket
    that swallows a class-1 validation point right next to it: that point is the failure."""
    generator = torch.Generator().manual_seed(0)
    n = 20
    centre = torch.tensor([1.5, 0.0], dtype=DOUBLE)
    x0 = 0.6 * torch.randn(n, 2, generator=generator, dtype=DOUBLE) - centre
    x1 = 0.6 * torch.randn(n, 2, generator=generator, dtype=DOUBLE) + centre
    x = torch.cat([x0, x1, centre[None]])
    y = torch.cat([torch.zeros(n), torch.ones(n), torch.zeros(1)]).long()
    order = torch.randperm(2 * n + 1, generator=generator)
    x, y = x[order], y[order]
    mislabeled = int((order == 2 * n).nonzero())
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 32), nn.Tanh(), nn.Linear(32, 2)).to(DOUBLE)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.03)
    for _ in range(400):
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
    model.eval()
    xf, yf = centre[None] + torch.tensor([[0.05, 0.05]], dtype=DOUBLE), torch.tensor([1])
    assert len(misclassified(model, x, y)) == 0, "the MLP should memorise the mislabeled point"
    assert len(misclassified(model, xf, yf)) == 1, "the point next to it should be a failure"
    return ready(model), x, y, xf, yf, mislabeled


@pytest.mark.parametrize("fisher_kind", ["exact", "empirical", "mc"])
def test_mislabeled_neighbour_of_failure_ranks_top(memorised_mislabel, fisher_kind):
    model, x, y, xf, yf, mislabeled = memorised_mislabel
    train, failures = loader(x, y, 8), loader(xf, yf)
    torch.manual_seed(0)
    fisher = diagonal_fisher(model, train, kind=fisher_kind)
    linear = linear_influence(model, train, failures, fisher)
    ewc = ewc_influence(model, train, failures, fisher, n_train=len(y), lr=1e-2, max_steps=100)
    for scores in (linear, ewc):
        assert mislabeled in scores.topk(3).indices.tolist()
        assert scores[mislabeled] > 0  # the paper's selection rule r(z) > 0 picks it


# ---------------------------------------------------------------------------------------------------------------
# Scorer classes wrap the functions


def test_scorers_match_functions(mlp_with_failures):
    model, x, y, xf, yf = mlp_with_failures
    train, failures = loader(x, y, 16), loader(xf, yf, 16)
    fisher = diagonal_fisher(model, train, kind="exact")
    inputs = ScoringInputs(model=model, train=train, query=failures, stop=None, trusted=None, fisher=fisher,
                           n_train=40, adapter=BatchAdapter())
    torch.testing.assert_close(LinearInfluence(damping=0.01).score(inputs),
                               linear_influence(model, train, failures, fisher, damping=0.01))
    torch.testing.assert_close(GradientDot().score(inputs), linear_influence(model, train, failures, None))
    torch.testing.assert_close(EWCInfluence(lr=1e-2, max_steps=20).score(inputs),
                               ewc_influence(model, train, failures, fisher, 40, lr=1e-2, max_steps=20))
    with pytest.raises(ValueError):
        LinearInfluence(damping=0)
