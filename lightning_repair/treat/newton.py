"""Newton removal (Guo et al. 2020, treatment 2): one second-order step that takes the causes out of θ̂.

Removing C from the summed training loss moves its minimiser by, to first order, θ⁻ − θ̂ = H_{−C}⁻¹ Σ_{c ∈ C}
∇ℓ(c; θ̂), H_{−C} the Hessian of the summed loss on D \\ C. With H the Hessian of the *mean* loss the step is
θ⁻ = θ̂ + γ H⁻¹ Σ_{c ∈ C} ∇ℓ(c; θ̂) with nominal γ = 1/N. H⁻¹ is either the diagonal (F̂ + δ)⁻¹, or a LiSSA
estimate (Agarwal et al. 2017, as Koh & Liang 2017 used it) from Hessian-vector products on D \\ C. Since F̂
and LiSSA only approximate H, γ is chosen from a grid of multiples of 1/N by a check on validation data (never F_h or
test data), and θ̂ is kept when no step beats it.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.utils.data import DataLoader

from lightning_repair.acceptance import Judge, as_judge, choose
from lightning_repair.adapter import BatchAdapter
from lightning_repair.curvature import FISHER_DAMPING, batches, checked_logits, endless, loss_gradient, natural_gradient
from lightning_repair.params import check_finetune_modules, detached, dot, finetune_parameters, moving_only, trainable
from lightning_repair.treat.base import Treatment, TreatmentInputs

InverseHVP = Callable[[list[Tensor]], list[Tensor]]
"""Maps g, one tensor per trainable parameter, to H⁻¹ g with H the Hessian of the mean training loss."""

Inverse = Literal["diagonal", "lissa"]
INVERSES = ("diagonal", "lissa")
Step = Literal["kept_loss", "influence"]
STEPS = ("kept_loss", "influence")
SCALE_OVER_EIGENVALUE = 2.0  # LiSSA's scale over the mean Hessian's |λ|_max: batch Hessians reach further
MIN_SCALE = 1e-3


def _check_arguments(damping: float, gamma_multipliers: Sequence[float], inverse: str | InverseHVP,
                     lissa_steps: int, lissa_scale: float | None, lissa_damping: float, step: str) -> None:
    """Raises ValueError naming the first bad Newton-removal argument."""
    if not damping > 0:
        raise ValueError(f"damping must be > 0 to invert the Fisher, got {damping}.")
    multipliers = list(gamma_multipliers)
    if not multipliers or not all(isinstance(m, (int, float)) and math.isfinite(m) and m > 0 for m in multipliers):
        raise ValueError(f"gamma_multipliers must be a non-empty list of finite numbers > 0 (multiples of the "
                         f"nominal γ = 1/N), got {gamma_multipliers!r}.")
    if step not in STEPS:
        raise ValueError(f"Unknown Newton step {step!r}; choose one of {STEPS}.")
    if not callable(inverse) and inverse not in INVERSES:
        raise ValueError(f"Unknown inverse {inverse!r}; choose one of {INVERSES}.")
    _check_lissa(lissa_steps, lissa_scale, lissa_damping)


def _check_lissa(steps: int, scale: float | None, damping: float) -> None:
    if steps < 1 or (scale is not None and not scale > 0) or not 0 <= damping < 1:
        raise ValueError(f"LiSSA needs lissa_steps ≥ 1, lissa_scale > 0 and 0 ≤ lissa_damping < 1; got {steps}, "
                         f"{scale}, {damping}.")


@dataclass(kw_only=True)
class NewtonRemoval(Treatment):
    """Newton removal of the causes (Guo et al. 2020): θ⁻ = θ̂ + γ H⁻¹ Σ_{c ∈ C} ∇ℓ(c; θ̂), γ chosen by the judge.

    γ is the multiple of the nominal 1/N the acceptance rule rates best, the smallest on ties; when it accepts
    none, θ̂ is kept unchanged. H⁻¹ is LiSSA's estimate on D \\ C by default, as in the paper, with its scale set
    from the largest Hessian eigenvalue; the diagonal (F̂ + δ)⁻¹ is badly scaled on a CNN (its nominal step moved θ
    by about 12 ‖θ̂‖, measured) and stays an option.

    Args:
        damping: δ added to F̂ before inverting it, relative to F̂'s mean entry (``inverse="diagonal"``).
        gamma_multipliers: the γ · N to try.
        inverse: ``"lissa"`` estimates H⁻¹ Σ∇ℓ(c) by LiSSA on D \\ C; ``"diagonal"`` inverts H ≈ F̂ + δ.
        lissa_steps: LiSSA recursion steps, one Hessian-vector product on one batch of D \\ C each.
        lissa_scale: LiSSA's scale s; None (default): twice the largest Hessian eigenvalue (power iteration).
        lissa_damping: LiSSA's damping d in [0, 1); H is damped by d·s.
        step: ``"kept_loss"``: a Newton step on the loss of D \\ C; ``"influence"``: the paper's γ H⁻¹ Σ_C ∇ℓ(c).
        modules: layers that move: ``"all"``, every parameter in the repair scope; None, the last ``nn.Linear``;
            or module names.
    """

    damping: float = FISHER_DAMPING
    gamma_multipliers: Sequence[float] = (0.25, 0.5, 1.0, 2.0, 4.0, 8.0)  # around the nominal γN = 1
    inverse: Inverse = "lissa"
    lissa_steps: int = 300
    lissa_scale: float | None = None
    lissa_damping: float = 0.01
    step: Step = "kept_loss"
    modules: list[str] | Literal["all"] | None = "all"

    def __post_init__(self) -> None:
        if callable(self.inverse):
            raise ValueError('NewtonRemoval takes inverse="diagonal" or "lissa"; pass a callable to '
                             "`newton_removal` instead.")
        _check_arguments(self.damping, self.gamma_multipliers, self.inverse, self.lissa_steps, self.lissa_scale,
                         self.lissa_damping, self.step)
        check_finetune_modules(self.modules)
        self.gamma_multipliers = tuple(float(m) for m in self.gamma_multipliers)

    @property
    def needs_fisher(self) -> bool:  # type: ignore[override]
        return self.inverse == "diagonal"

    @property
    def trains_on_kept(self) -> bool:  # type: ignore[override]
        return self.step == "kept_loss"  # a Newton step down the loss of D \ C; the paper's step reads only C

    def candidates(self, inputs: TreatmentInputs) -> Iterator[float]:
        return newton_candidates(inputs.model, inputs.causes, inputs.fisher, inputs.n_train, kept_loader=inputs.kept,
                                 damping=self.damping, gamma_multipliers=self.gamma_multipliers,
                                 inverse=self.inverse, lissa_steps=self.lissa_steps, lissa_scale=self.lissa_scale,
                                 lissa_damping=self.lissa_damping, step=self.step, modules=self.modules,
                                 seed=inputs.seed, adapter=inputs.adapter)


DEFAULTS = NewtonRemoval()  # the functions below default to its hyperparameters


def lissa_inverse_hvp(model: nn.Module, loader: DataLoader, vector: Sequence[Tensor], *, scale: float,
                      steps: int = DEFAULTS.lissa_steps, damping: float = DEFAULTS.lissa_damping,
                      adapter: BatchAdapter | None = None) -> list[Tensor]:
    """LiSSA estimate of H⁻¹ v, H the Hessian of the mean cross-entropy over ``loader``.

    The recursion h_j = v + (1 − d) h_{j−1} − H_j h_{j−1} / s, h_0 = v, with H_j the Hessian of batch j's mean
    loss (double backward, cycling over the loader), converges to s (H + d s)⁻¹ v when every eigenvalue of H
    lies in [0, (2 − d) s); the result h / s is therefore (H + d s)⁻¹ v, damped by d·s.

    Args:
        model: the classifier at θ̂; only its trainable parameters enter H.
        loader: the examples whose mean loss H is the Hessian of (D \\ C for Newton removal).
        vector: v, one tensor per trainable parameter.
        scale: s; must exceed half the largest eigenvalue of H, or the recursion diverges
            (:func:`largest_eigenvalue` finds it).
        steps: recursion steps; the error shrinks like (1 − d − λ_min(H)/s)^steps.
        damping: d in [0, 1).
        adapter: how to read batches and logits.
    """
    _check_lissa(steps, scale, damping)
    adapter = adapter or BatchAdapter()
    parameters = trainable(model)
    v = [t.detach() for t in vector]
    h = list(v)
    with torch.enable_grad():
        for _, (inputs, labels) in zip(range(steps), batches(endless(loader), model, adapter)):
            hvp = _hessian_vector_product(model, parameters, inputs, labels, h, adapter)
            h = [vi + (1.0 - damping) * hi - hv / scale for vi, hi, hv in zip(v, h, hvp)]
    result = [hi / scale for hi in h]
    if not all(torch.isfinite(t).all() for t in result):
        raise FloatingPointError(f"LiSSA diverged: lissa_scale={scale} is below half the largest Hessian "
                                 "eigenvalue. Raise `lissa_scale` (and `lissa_steps` with it).")
    return result


def largest_eigenvalue(model: nn.Module, loader: DataLoader, *, iterations: int = 20, batches_used: int = 4,
                       seed: int = 0, adapter: BatchAdapter | None = None) -> float:
    """|λ|_max of the Hessian of the mean cross-entropy over the first ``batches_used`` batches, by power iteration.

    Sets LiSSA's scale: the recursion converges only when the scale exceeds half the largest eigenvalue of every
    batch's Hessian.
    """
    adapter = adapter or BatchAdapter()
    parameters = trainable(model)
    fixed = list(itertools.islice(batches(endless(loader), model, adapter), batches_used))
    generator = torch.Generator().manual_seed(seed)
    vector = [torch.randn(p.shape, generator=generator).to(p) for p in parameters]
    eigenvalue = 0.0
    with torch.enable_grad():
        for _ in range(iterations):
            norm = math.sqrt(float(dot(vector, vector)))
            if norm == 0:
                return 0.0
            vector = [v / norm for v in vector]
            products = [_hessian_vector_product(model, parameters, x, y, vector, adapter) for x, y in fixed]
            mean = [sum(parts) / len(fixed) for parts in zip(*products)]
            eigenvalue = float(dot(vector, mean))
            vector = mean
    return abs(eigenvalue)


def newton_candidates(model: nn.Module, cause_loader: DataLoader, fisher: Sequence[Tensor] | None, n_train: int,
                      *, kept_loader: DataLoader | None = None, damping: float = DEFAULTS.damping,
                      gamma_multipliers: Sequence[float] = DEFAULTS.gamma_multipliers,
                      inverse: Inverse | InverseHVP = DEFAULTS.inverse, lissa_steps: int = DEFAULTS.lissa_steps,
                      lissa_scale: float | None = DEFAULTS.lissa_scale, lissa_damping: float = DEFAULTS.lissa_damping,
                      step: Step = DEFAULTS.step, modules: Sequence[str] | Literal["all"] | None = DEFAULTS.modules,
                      seed: int = 0, adapter: BatchAdapter | None = None) -> Iterator[float]:
    """Places ``model`` at θ̂ + γ H⁻¹ Σ_{c ∈ C} ∇ℓ(c; θ̂) for each γ = m / N, m in ``gamma_multipliers`` (ascending),
    yielding γ. Arguments as in :func:`newton_removal`."""
    _check_arguments(damping, gamma_multipliers, inverse, lissa_steps, lissa_scale, lissa_damping, step)
    if n_train < 1:
        raise ValueError(f"n_train (N) must be ≥ 1, got {n_train}.")
    moving = finetune_parameters(model, modules)
    if fisher is not None:
        fisher_of = {id(p): f for p, f in zip(trainable(model), fisher)}
        fisher = [fisher_of[id(p)] for p in moving]
    with moving_only(model, moving):
        yield from _newton_steps(model, cause_loader, fisher, n_train, kept_loader=kept_loader, damping=damping,
                                 gamma_multipliers=gamma_multipliers, inverse=inverse, lissa_steps=lissa_steps,
                                 lissa_scale=lissa_scale, lissa_damping=lissa_damping, step=step, seed=seed,
                                 adapter=adapter)


def _newton_steps(model: nn.Module, cause_loader: DataLoader, fisher: Sequence[Tensor] | None, n_train: int, *,
                  kept_loader: DataLoader | None, damping: float, gamma_multipliers: Sequence[float],
                  inverse: Inverse | InverseHVP, lissa_steps: int, lissa_scale: float | None, lissa_damping: float,
                  step: Step, seed: int, adapter: BatchAdapter | None) -> Iterator[float]:
    """:func:`newton_candidates` over the model's trainable parameters."""
    if step == "kept_loss":
        if kept_loader is None:
            raise ValueError('step="kept_loss" needs `kept_loader` (D \\ C), whose loss it steps down.')
        gradient = [-g for g in loss_gradient(model, kept_loader, adapter)]  # Σ_C ∇ℓ − Σ_D ∇ℓ
    else:
        gradient = loss_gradient(model, cause_loader, adapter)
    if callable(inverse):
        direction = inverse(gradient)
    elif inverse == "diagonal":
        if fisher is None:
            raise ValueError('inverse="diagonal" needs the diagonal Fisher; pass `fisher` or use inverse="lissa".')
        direction = natural_gradient(gradient, fisher, damping=damping)
    else:
        if kept_loader is None:
            raise ValueError('inverse="lissa" needs `kept_loader` (D \\ C), whose Hessian it inverts.')
        if lissa_scale is None:
            lissa_scale = max(SCALE_OVER_EIGENVALUE * largest_eigenvalue(model, kept_loader, seed=seed,
                                                                         adapter=adapter), MIN_SCALE)
        direction = lissa_inverse_hvp(model, kept_loader, gradient, scale=lissa_scale, steps=lissa_steps,
                                      damping=lissa_damping, adapter=adapter)
    parameters = trainable(model)
    start = detached(parameters)
    for multiplier in sorted(gamma_multipliers):
        _place(parameters, start, direction, multiplier / n_train)
        yield multiplier / n_train


def choose_step_size(model: nn.Module, direction: Sequence[Tensor], gammas: Iterable[float],
                     judge: Judge | DataLoader, adapter: BatchAdapter | None = None) -> float:
    """Moves θ̂ to θ̂ + γ · ``direction`` for the γ the judge accepts best, in place; returns that γ (0.0: θ̂ kept).

    Ties go to the smallest γ.

    Args:
        model: a repair copy at θ̂; its trainable parameters move.
        direction: one tensor per trainable parameter.
        gammas: the step sizes to try, all > 0.
        judge: the acceptance rule's judge, or a loader whose accuracy judges (e.g. F_q).
        adapter: how to read batches and logits.
    """
    judge = as_judge(judge, model, adapter)
    parameters = trainable(model)
    start = detached(parameters)

    def steps() -> Iterator[float]:
        for gamma in sorted(gammas):
            _place(parameters, start, direction, gamma)
            yield gamma

    choice = choose(model, steps(), judge)
    return 0.0 if choice.label is None else float(choice.label)


def newton_removal(model: nn.Module, cause_loader: DataLoader, judge: Judge | DataLoader | None,
                   fisher: Sequence[Tensor] | None, n_train: int, *, kept_loader: DataLoader | None = None,
                   damping: float = DEFAULTS.damping, gamma_multipliers: Sequence[float] = DEFAULTS.gamma_multipliers,
                   inverse: Inverse | InverseHVP = DEFAULTS.inverse, lissa_steps: int = DEFAULTS.lissa_steps,
                   lissa_scale: float | None = DEFAULTS.lissa_scale, lissa_damping: float = DEFAULTS.lissa_damping,
                   step: Step = DEFAULTS.step, modules: Sequence[str] | Literal["all"] | None = DEFAULTS.modules,
                   seed: int = 0, adapter: BatchAdapter | None = None) -> float:
    """Removes the causes from ``model`` in place by θ⁻ = θ̂ + γ H⁻¹ Σ_{c ∈ C} ∇ℓ(c; θ̂); returns γ (0.0: θ̂ kept).

    Args:
        model: a repair copy at θ̂; its trainable parameters move to θ⁻.
        cause_loader: the cause set C.
        judge: the acceptance rule's judge (or a loader whose accuracy judges) picks γ among the multiples of
            1/N in ``gamma_multipliers``; None takes the nominal γ = 1/N without selection.
        fisher: F̂ per trainable parameter, the per-example mean; read only by ``inverse="diagonal"``.
        n_train: N, the number of training examples.
        kept_loader: D \\ C, whose Hessian ``inverse="lissa"`` inverts.
        damping: δ relative to the mean of F̂ for ``inverse="diagonal"``.
        gamma_multipliers: the grid of γ · N to try.
        inverse: ``"lissa"`` (default): :func:`lissa_inverse_hvp` on ``kept_loader``; ``"diagonal"``: (F̂ + δ)⁻¹;
            or any callable g ↦ H⁻¹ g with H the Hessian of the mean training loss.
        lissa_steps: LiSSA recursion steps.
        lissa_scale: LiSSA's scale s; None: twice the largest Hessian eigenvalue, by power iteration.
        lissa_damping: LiSSA's damping d (H is damped by d·s).
        step: ``"kept_loss"`` (default): a Newton step on the loss of D \\ C, −γ H⁻¹ Σ_{D \\ C} ∇ℓ(z; θ̂), which
            equals the paper's step when θ̂ minimises the loss on D and stays right when it does not;
            ``"influence"``: the paper's γ H⁻¹ Σ_{c ∈ C} ∇ℓ(c; θ̂).
        modules: which layers move: ``"all"`` (default), every parameter in scope; None, the last ``nn.Linear``; or
            module names. H, the gradient and the step are restricted to them.
        seed: seeds the power iteration's start.
        adapter: how to read batches and logits.
    """
    arguments = dict(kept_loader=kept_loader, damping=damping, gamma_multipliers=gamma_multipliers,
                     inverse=inverse, lissa_steps=lissa_steps, lissa_scale=lissa_scale,
                     lissa_damping=lissa_damping, step=step, modules=modules, seed=seed, adapter=adapter)
    if judge is None:  # the nominal step, unjudged
        return next(newton_candidates(model, cause_loader, fisher, n_train, **arguments | {"gamma_multipliers": (1,)}))
    judge = as_judge(judge, model, adapter)
    choice = choose(model, newton_candidates(model, cause_loader, fisher, n_train, **arguments), judge)
    return 0.0 if choice.label is None else float(choice.label)


def _hessian_vector_product(model: nn.Module, parameters: list[nn.Parameter], inputs: Any, labels: Tensor,
                            vector: list[Tensor], adapter: BatchAdapter) -> list[Tensor]:
    """H v for one batch's mean cross-entropy by double backward; zero for parameters the gradient ignores.

    Attention runs on PyTorch's math kernel here: the fused ones (flash, memory-efficient) have no second
    derivative.
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.MATH):
        loss = F.cross_entropy(checked_logits(model, inputs, labels, adapter), labels)
    grads = torch.autograd.grad(loss, parameters, create_graph=True)
    curved = [i for i, g in enumerate(grads) if g.requires_grad]
    products = [torch.zeros_like(p) for p in parameters]
    if curved:
        hv = torch.autograd.grad([grads[i] for i in curved], parameters, [vector[i] for i in curved],
                                 allow_unused=True)
        products = [z if h is None else h.detach() for z, h in zip(products, hv)]
    return products


@torch.no_grad()
def _place(parameters: Sequence[Tensor], start: Sequence[Tensor], direction: Sequence[Tensor],
           gamma: float) -> None:
    """Sets the parameters to start + γ · direction (exactly start for γ = 0)."""
    if not all(torch.isfinite(d).all() for d in direction):
        raise FloatingPointError("The Newton direction has NaN or infinite entries; raise `damping`, or check "
                                 "that the causes' losses are finite.")
    for p, s, d in zip(parameters, start, direction):
        p.copy_(s + gamma * d if gamma else s)
