"""Tests for Newton removal: exactness on a convex model, LiSSA, the γ selection and the Treatment wrapper."""

import copy

import pytest
import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from lightning_repair.acceptance import Judge
from lightning_repair.adapter import BatchAdapter
from lightning_repair.curvature import diagonal_fisher, loss_gradient
from lightning_repair.identify.influence import natural_gradient
from lightning_repair.optimize import accuracy_of
from lightning_repair.params import trainable
from lightning_repair.treat.base import TreatmentInputs
from lightning_repair.treat.newton import (NewtonRemoval, choose_step_size, largest_eigenvalue, lissa_inverse_hvp,
                                           newton_removal)

N, DIM, CLASSES, L2 = 80, 4, 3, 0.1
CAUSES = [3, 17, 42]


def _flat(model: nn.Module) -> Tensor:
    return torch.cat([p.detach().flatten() for p in trainable(model)])


def _unflat(model: nn.Module, vector: Tensor) -> list[Tensor]:
    parameters = trainable(model)
    return [t.view_as(p) for t, p in zip(vector.split([p.numel() for p in parameters]), parameters)]


def _loader(x: Tensor, y: Tensor, batch_size: int | None = None) -> DataLoader:
    return DataLoader(TensorDataset(x, y), batch_size=batch_size or max(len(y), 1))


def _objective(model: nn.Module, x: Tensor, y: Tensor, l2: float) -> Tensor:
    """Σ_i ℓ(z_i) + (λ/2)‖θ‖², summed as in Guo et al."""
    return F.cross_entropy(model(x), y, reduction="sum") + 0.5 * l2 * sum(p.pow(2).sum() for p in trainable(model))


def _fit(model: nn.Module, x: Tensor, y: Tensor, l2: float) -> None:
    optimizer = torch.optim.LBFGS(model.parameters(), lr=1, max_iter=500, tolerance_grad=1e-12,
                                  tolerance_change=1e-14, history_size=50, line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        optimizer.zero_grad()
        loss = _objective(model, x, y, l2)
        loss.backward()
        return loss

    optimizer.step(closure)
    for _ in range(3):  # polish to round-off with exact Newton steps
        grad = torch.autograd.grad(_objective(model, x, y, l2), trainable(model))
        step = torch.linalg.solve(_hessian(model, x, y, l2), torch.cat([g.flatten() for g in grad]))
        with torch.no_grad():
            for p, s in zip(trainable(model), _unflat(model, step)):
                p -= s
    grad = torch.autograd.grad(_objective(model, x, y, l2), trainable(model))
    assert torch.cat([g.flatten() for g in grad]).norm() < 1e-10


def _hessian(model: nn.Module, x: Tensor, y: Tensor, l2: float, reduction: str = "sum") -> Tensor:
    """The exact Hessian of the data loss (summed or mean) plus (λ/2)‖θ‖² over the flattened parameters."""
    def objective(flat: Tensor) -> Tensor:
        weight, bias = _unflat(model, flat)
        return F.cross_entropy(x @ weight.T + bias, y, reduction=reduction) + 0.5 * l2 * flat.pow(2).sum()

    return torch.autograd.functional.hessian(objective, _flat(model))


def _convex_setting(mislabelled: bool) -> dict:
    """L2-regularised multinomial logistic regression at θ̂ and retrained without the causes, in float64."""
    generator = torch.Generator().manual_seed(0)
    centres = 1.5 * torch.randn(CLASSES, DIM, generator=generator, dtype=torch.float64)
    y = torch.arange(N) % CLASSES
    x = centres[y] + torch.randn(N, DIM, generator=generator, dtype=torch.float64)
    if mislabelled:
        y[CAUSES] = (y[CAUSES] + 1) % CLASSES
    keep = torch.ones(N, dtype=torch.bool)
    keep[CAUSES] = False
    torch.manual_seed(0)
    model = nn.Linear(DIM, CLASSES).double()
    _fit(model, x, y, L2)
    retrained = _copy(model)
    _fit(retrained, x[keep], y[keep], L2)
    return {"model": model, "x": x, "y": y, "keep": keep, "theta_hat": _flat(model), "theta_retrain": _flat(retrained)}


@pytest.fixture(scope="module")
def convex() -> dict:
    """Guo et al.'s setting: the causes are ordinary training points, so removing them moves θ̂ a little."""
    return _convex_setting(mislabelled=False)


@pytest.fixture(scope="module")
def mislabelled() -> dict:
    """The causes are mislabelled: removing them moves θ̂ far, beyond a single Newton step's reach."""
    return _convex_setting(mislabelled=True)


def _copy(model: nn.Module) -> nn.Module:
    clone = nn.Linear(DIM, CLASSES).double()
    clone.load_state_dict(model.state_dict())
    return clone


def _errors(data: dict, theta: Tensor) -> tuple[float, float]:
    """‖θ − θ_retrain‖ and ‖θ̂ − θ_retrain‖."""
    return ((theta - data["theta_retrain"]).norm().item(),
            (data["theta_hat"] - data["theta_retrain"]).norm().item())


@pytest.mark.parametrize("causes", [CAUSES[:1], CAUSES])
def test_exact_newton_step_matches_retraining(convex: dict, causes: list[int]) -> None:
    x, y = convex["x"], convex["y"]
    keep = torch.ones(N, dtype=torch.bool)
    keep[causes] = False
    model = _copy(convex["model"])
    retrained = _copy(model)
    _fit(retrained, x[keep], y[keep], L2)
    # H of the summed objective on D \ C; newton_removal's inverse is that of the mean loss, H / N.
    mean_hessian = _hessian(model, x[keep], y[keep], L2) / N

    def exact_inverse(gradient: list[Tensor]) -> list[Tensor]:
        flat = torch.cat([g.flatten() for g in gradient])
        return _unflat(model, torch.linalg.solve(mean_hessian, flat))

    gamma = newton_removal(model, _loader(x[causes], y[causes]), None, None, N, inverse=exact_inverse,
                           step="influence")
    assert gamma == pytest.approx(1 / N)
    error = (_flat(model) - _flat(retrained)).norm()
    moved = (convex["theta_hat"] - _flat(retrained)).norm()
    assert moved > 1e-4
    assert error < 0.05 * moved, (error.item(), moved.item())


@pytest.mark.parametrize("setting", ["convex", "mislabelled"])
def test_diagonal_fisher_step_moves_toward_retraining(setting: str, request: pytest.FixtureRequest) -> None:
    data = request.getfixturevalue(setting)
    x, y = data["x"], data["y"]
    model = _copy(data["model"])
    fisher = diagonal_fisher(model, _loader(x, y, 16), kind="exact")
    gamma = newton_removal(model, _loader(x[CAUSES], y[CAUSES]), None, fisher, N, inverse="diagonal",
                           step="influence")
    assert gamma == pytest.approx(1 / N)
    error, moved = _errors(data, _flat(model))
    assert error < moved, (error, moved)


def test_lissa_approximates_the_inverse_hessian(convex: dict) -> None:
    x, y, keep = convex["x"], convex["y"], convex["keep"]
    model = convex["model"]
    vector = loss_gradient(model, _loader(x[CAUSES], y[CAUSES]))  # what Newton removal inverts
    steps, scale, damping = 400, 2.0, 0.01
    estimate = lissa_inverse_hvp(model, _loader(x[keep], y[keep]), vector, scale=scale, steps=steps, damping=damping)
    # LiSSA inverts the mean-loss Hessian damped by d·s.
    hessian = _hessian(model, x[keep], y[keep], 0.0, reduction="mean")
    exact = torch.linalg.solve(hessian + damping * scale * torch.eye(len(hessian), dtype=hessian.dtype),
                               torch.cat([v.flatten() for v in vector]))
    relative = (torch.cat([e.flatten() for e in estimate]) - exact).norm() / exact.norm()
    assert relative < 0.01, relative.item()


def test_power_iteration_finds_the_largest_hessian_eigenvalue(convex: dict) -> None:
    x, y, keep = convex["x"], convex["y"], convex["keep"]
    exact = torch.linalg.eigvalsh(_hessian(convex["model"], x[keep], y[keep], 0.0, reduction="mean")).abs().max()
    estimate = largest_eigenvalue(convex["model"], _loader(x[keep], y[keep]), iterations=100, batches_used=1)
    assert estimate == pytest.approx(exact.item(), rel=1e-3)


def test_lissa_with_its_scale_from_power_iteration_matches_the_exact_newton_step(convex: dict) -> None:
    # The default Newton removal: LiSSA, its scale twice the largest eigenvalue, against an exact solve of the
    # mean-loss Hessian damped as LiSSA damps it.
    x, y, keep = convex["x"], convex["y"], convex["keep"]
    model = _copy(convex["model"])
    kept = _loader(x[keep], y[keep])
    scale = 2 * largest_eigenvalue(model, kept)
    hessian = _hessian(model, x[keep], y[keep], 0.0, reduction="mean")
    gradient = torch.cat([g.flatten() for g in loss_gradient(model, _loader(x[CAUSES], y[CAUSES]))])
    exact = torch.linalg.solve(hessian + 0.01 * scale * torch.eye(len(hessian), dtype=hessian.dtype), gradient)
    gamma = newton_removal(model, _loader(x[CAUSES], y[CAUSES]), None, None, N, kept_loader=kept, lissa_steps=2000,
                           step="influence")
    step = (_flat(model) - convex["theta_hat"]) / gamma
    assert (step - exact).norm() < 0.02 * exact.norm(), ((step - exact).norm() / exact.norm()).item()


class _LastLogitZero(nn.Module):
    """Softmax regression with the last class's logit fixed at 0: no penalty needed for a unique minimum."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(DIM, CLASSES - 1).double()

    def forward(self, x: Tensor) -> Tensor:
        logits = self.linear(x)
        return torch.cat([logits, torch.zeros_like(logits[:, :1])], dim=1)


def _mean_loss_hessian(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    """The exact Hessian of the summed cross-entropy over the flattened trainable parameters."""
    names = [name for name, p in model.named_parameters() if p.requires_grad]

    def objective(flat: Tensor) -> Tensor:
        values = dict(zip(names, _unflat(model, flat)))
        return F.cross_entropy(torch.func.functional_call(model, values, (x,)), y, reduction="sum")

    return torch.autograd.functional.hessian(objective, _flat(model))


def _minimise(model: nn.Module, x: Tensor, y: Tensor) -> None:
    for _ in range(30):  # Newton's method on a strictly convex problem
        grad = torch.autograd.grad(F.cross_entropy(model(x), y, reduction="sum"), trainable(model))
        step = torch.linalg.solve(_mean_loss_hessian(model, x, y), torch.cat([g.flatten() for g in grad]))
        with torch.no_grad():
            for p, s in zip(trainable(model), _unflat(model, step)):
                p -= s
    grad = torch.autograd.grad(F.cross_entropy(model(x), y, reduction="sum"), trainable(model))
    assert torch.cat([g.flatten() for g in grad]).norm() < 1e-10


def _unregularised(trained: bool) -> dict:
    """Softmax regression without a penalty on overlapping classes: at its minimum on D, or stopped early."""
    generator = torch.Generator().manual_seed(1)
    centres = 0.7 * torch.randn(CLASSES, DIM, generator=generator, dtype=torch.float64)
    y = torch.arange(N) % CLASSES
    x = centres[y] + torch.randn(N, DIM, generator=generator, dtype=torch.float64)
    torch.manual_seed(0)
    model = _LastLogitZero()
    if trained:
        _minimise(model, x, y)
    else:  # a few gradient steps: far from the minimum, as a network is after a few epochs
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
        for _ in range(5):
            optimizer.zero_grad()
            F.cross_entropy(model(x), y).backward()
            optimizer.step()
    keep = torch.ones(N, dtype=torch.bool)
    keep[CAUSES] = False
    retrained = copy.deepcopy(model)
    _minimise(retrained, x[keep], y[keep])
    return {"model": model, "x": x, "y": y, "keep": keep, "theta_retrain": _flat(retrained)}


def _exact_step(data: dict, step: str) -> Tensor:
    """θ after newton_removal with the exact inverse of D \\ C's mean-loss Hessian at θ̂, nominal γ = 1/N."""
    x, y, keep = data["x"], data["y"], data["keep"]
    model = copy.deepcopy(data["model"])
    mean_hessian = _mean_loss_hessian(model, x[keep], y[keep]) / N

    def exact_inverse(gradient: list[Tensor]) -> list[Tensor]:
        return _unflat(model, torch.linalg.solve(mean_hessian, torch.cat([g.flatten() for g in gradient])))

    newton_removal(model, _loader(x[CAUSES], y[CAUSES]), None, None, N, kept_loader=_loader(x[keep], y[keep]),
                   inverse=exact_inverse, step=step)
    return _flat(model)


def test_kept_loss_step_equals_the_papers_step_at_a_minimum() -> None:
    data = _unregularised(trained=True)
    assert torch.allclose(_exact_step(data, "kept_loss"), _exact_step(data, "influence"), atol=1e-8)


def test_kept_loss_step_stays_right_away_from_a_minimum() -> None:
    # Stopped early, θ̂ is no minimum of D's loss, and the paper's step (which assumes one) barely moves towards
    # the model retrained on D \\ C; the kept-loss step is one Newton step on D \\ C's loss and gets close.
    data = _unregularised(trained=False)
    start = (_flat(data["model"]) - data["theta_retrain"]).norm()
    influence = (_exact_step(data, "influence") - data["theta_retrain"]).norm()
    kept_loss = (_exact_step(data, "kept_loss") - data["theta_retrain"]).norm()
    assert kept_loss < 0.5 * start, (kept_loss.item(), start.item())
    assert kept_loss < 0.5 * influence, (kept_loss.item(), influence.item())


def test_lissa_diverges_loudly_when_scale_too_small(convex: dict) -> None:
    x, y = convex["x"], convex["y"]
    vector = [torch.ones_like(p) for p in trainable(convex["model"])]
    with pytest.raises(FloatingPointError, match="lissa_scale"):
        lissa_inverse_hvp(convex["model"], _loader(x, y), vector, steps=300, scale=1e-3, damping=0.0)


def _threshold_model() -> nn.Linear:
    """Two classes on 1-D inputs with margin logit₁ − logit₀ = −x; a direction on class 1's bias adds γ."""
    model = nn.Linear(1, 2).double()
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[0.5], [-0.5]], dtype=torch.float64))
        model.bias.zero_()
    return model


BIAS_UP = [torch.zeros(2, 1, dtype=torch.float64), torch.tensor([0.0, 1.0], dtype=torch.float64)]


def test_step_size_selection_picks_best_query_accuracy() -> None:
    # x = 1, label 1: right once γ > 1; x = 3.5, label 0: right while γ < 3.5. Only γ = 2 gets both.
    model = _threshold_model()
    query = _loader(torch.tensor([[1.0], [3.5]], dtype=torch.float64), torch.tensor([1, 0]))
    gamma = choose_step_size(model, BIAS_UP, [0.25, 0.5, 1.0, 2.0, 4.0], Judge.accuracy_on(model, query, margin=0))
    assert gamma == 2.0
    assert model.bias.tolist() == [0.0, 2.0]


def test_step_size_selection_breaks_ties_to_smallest_step() -> None:
    model = _threshold_model()
    query = _loader(torch.tensor([[1.0]], dtype=torch.float64), torch.tensor([1]))
    assert choose_step_size(model, BIAS_UP, [4.0, 2.0, 8.0], Judge.accuracy_on(model, query, margin=0)) == 2.0


def test_step_size_selection_keeps_theta_hat_when_every_step_hurts() -> None:
    # x = −0.1, label 1: right at θ̂ (margin 0.1), wrong for every step down class 1's bias.
    model = _threshold_model()
    before = [p.detach().clone() for p in model.parameters()]
    query = _loader(torch.tensor([[-0.1]], dtype=torch.float64), torch.tensor([1]))
    gamma = choose_step_size(model, [-d for d in BIAS_UP], [0.25, 0.5, 1.0, 2.0, 4.0],
                             Judge.accuracy_on(model, query, margin=0))
    assert gamma == 0.0
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))


def test_newton_removal_scales_grid_by_n_and_selects_on_query(mislabelled: dict) -> None:
    x, y = mislabelled["x"], mislabelled["y"]
    # F_q: the causes with their true labels, which θ̂ (having fitted the wrong ones) misses.
    query = _loader(x[CAUSES], (y[CAUSES] - 1) % CLASSES)
    causes = _loader(x[CAUSES], y[CAUSES])
    fisher = diagonal_fisher(_copy(mislabelled["model"]), _loader(x, y), kind="exact")
    multipliers = (0.5, 4.0, 32.0, 256.0)
    theta_hat = mislabelled["model"]
    direction = natural_gradient(loss_gradient(theta_hat, causes), fisher, damping=1e-3)
    accuracies = []
    for multiplier in multipliers:
        stepped = _copy(theta_hat)
        with torch.no_grad():
            for p, d in zip(trainable(stepped), direction):
                p += multiplier / N * d
        accuracies.append(accuracy_of(stepped, query))
    model = _copy(mislabelled["model"])
    gamma = newton_removal(model, causes, Judge.accuracy_on(model, query, margin=0), fisher, N,
                           gamma_multipliers=multipliers, inverse="diagonal", step="influence")
    assert accuracy_of(mislabelled["model"], query) < max(accuracies)
    assert gamma == pytest.approx(multipliers[accuracies.index(max(accuracies))] / N), accuracies
    assert accuracy_of(model, query) == max(accuracies)


def _mlp_inputs(seed: int = 0) -> TreatmentInputs:
    """A tiny MLP fitted to three blobs with one corner of blob 0 labelled 1; F_q are clean points there."""
    generator = torch.Generator().manual_seed(seed)
    centres = torch.tensor([[0.0, 0.0], [4.0, 0.0], [0.0, 4.0]])
    y = torch.arange(90) % 3
    x = centres[y] + 0.8 * torch.randn(90, 2, generator=generator)
    poisoned = torch.where((y == 0) & (x[:, 0] > 0.3))[0]
    y_poisoned = y.clone()
    y_poisoned[poisoned] = 1
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(2, 16), nn.Tanh(), nn.Linear(16, 3))
    optimizer = torch.optim.Adam(model.parameters(), lr=0.05)
    for _ in range(300):
        optimizer.zero_grad()
        F.cross_entropy(model(x), y_poisoned).backward()
        optimizer.step()
    model.eval()
    query_x = torch.tensor([[0.8, 0.0], [1.0, 0.5], [1.2, -0.5], [0.9, -0.2]])
    keep = torch.ones(90, dtype=torch.bool)
    keep[poisoned] = False
    fisher = diagonal_fisher(model, _loader(x, y_poisoned, 30), kind="exact")
    return TreatmentInputs(model=model, causes=_loader(x[poisoned], y_poisoned[poisoned], 8),
                           kept=_loader(x[keep], y_poisoned[keep], 32), query=_loader(query_x, torch.zeros(4).long()),
                           judge=Judge.accuracy_on(model, _loader(query_x, torch.zeros(4).long()), margin=0),
                           fisher=fisher, n_train=90, adapter=BatchAdapter())


@pytest.mark.parametrize("inverse", ["diagonal", "lissa"])
def test_newton_removal_treat_smoke(inverse: str) -> None:
    inputs = _mlp_inputs()
    before = [p.detach().clone() for p in inputs.model.parameters()]
    treatment = NewtonRemoval(inverse=inverse, gamma_multipliers=(1, 4, 16, 64, 256), lissa_steps=100,
                              lissa_scale=10.0)
    treatment.treat(inputs)
    after = list(inputs.model.parameters())
    assert all(torch.isfinite(p).all() for p in after)
    assert any(not torch.equal(p, b) for p, b in zip(after, before))
    assert "NewtonRemoval(" in repr(treatment)


@pytest.mark.parametrize("kwargs, match", [
    ({"damping": 0.0}, "damping"),
    ({"gamma_multipliers": ()}, "gamma_multipliers"),
    ({"gamma_multipliers": (1.0, -2.0)}, "gamma_multipliers"),
    ({"gamma_multipliers": (float("nan"),)}, "gamma_multipliers"),
    ({"inverse": "full"}, "inverse"),
    ({"lissa_steps": 0}, "lissa_steps"),
    ({"lissa_scale": 0.0}, "lissa_scale"),
    ({"lissa_damping": 1.0}, "lissa_damping"),
    ({"step": "exact"}, "step"),
    ({"modules": "head"}, "modules"),
])
def test_bad_arguments_raise(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        NewtonRemoval(**kwargs)


def test_missing_inputs_raise(convex: dict) -> None:
    x, y = convex["x"], convex["y"]
    causes = _loader(x[:2], y[:2])
    with pytest.raises(ValueError, match="fisher"):
        newton_removal(_copy(convex["model"]), causes, None, None, N, inverse="diagonal", step="influence")
    with pytest.raises(ValueError, match="kept_loader"):
        newton_removal(_copy(convex["model"]), causes, None, None, N)
    with pytest.raises(ValueError, match="kept_loader"):
        newton_removal(_copy(convex["model"]), causes, None, None, N, inverse=lambda g: g)
    with pytest.raises(ValueError, match="n_train"):
        newton_removal(_copy(convex["model"]), causes, None, None, 0)
    with pytest.raises(ValueError, match="callable"):
        NewtonRemoval(inverse=lambda g: g)


def test_non_finite_direction_raises() -> None:
    model = _threshold_model()
    query = _loader(torch.tensor([[1.0]], dtype=torch.float64), torch.tensor([1]))
    with pytest.raises(FloatingPointError, match="damping"):
        choose_step_size(model, [d * float("nan") for d in BIAS_UP], [1.0], query)
