"""Energy-based alignment (report proposal 1, adapted from Huang et al. NeurIPS 2023, treatment 4).

Keep the causes C but move them toward the clean data under θ₊F, the model fitted to the failures F_q.
With the energy E(x) = −log Σ_k exp f_{θ₊F}(x)[k], each cause's input descends it, x̃ ← x̃ − η ∇_x E(x̃), for
T steps from x̃ = x, and takes the soft label ỹ = softmax f_{θ₊F}(x̃). The model is then fine-tuned (by default
only its last linear layer) on (D \\ C) ∪ {(x̃_c, ỹ_c)}. The ``relabel`` variant keeps x and trains on the hard
label argmax ỹ instead.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from lightning_repair.acceptance import Choice, Judge, as_judge, choose
from lightning_repair.adapter import BatchAdapter
from lightning_repair.curvature import batches, checked_logits, endless, model_device
from lightning_repair.optimize import FIT_DEFAULTS, fit_to_failures
from lightning_repair.params import check_finetune_modules, finetune_parameters
from lightning_repair.treat.base import Treatment, TreatmentInputs

AlignmentMode = Literal["soft", "relabel"]
ALIGNMENT_MODES = ("soft", "relabel")


def _check_alignment(step_size: float, steps: int) -> None:
    if not step_size > 0 or steps < 0:
        raise ValueError(f"Energy alignment needs step_size > 0 and steps ≥ 0, got {step_size} and {steps}.")


def _check_mode(mode: str) -> None:
    if mode not in ALIGNMENT_MODES:
        raise ValueError(f"Unknown alignment mode {mode!r}; choose one of {ALIGNMENT_MODES}.")


@dataclass(kw_only=True)
class EnergyAlignment(Treatment):
    """Energy-based alignment: move the causes toward clean data under θ₊F, then fine-tune on them and D \\ C.

    Args:
        step_size: η of x̃ ← x̃ − η ∇_x E(x̃), in input units. The default suits standardized images (unit
            pixel variance): on the Fashion-MNIST CNN, |∂E/∂x| is about 0.02 per pixel, so 10 steps of 0.1
            move each pixel by at most about 0.2 standard deviations: the causes gain confidence under θ₊F
            and keep their look. Raise η to move them further.
        steps: T, alignment steps per cause; 0 keeps x (then ``"soft"`` trains on θ₊F's soft labels of x).
        mode: ``"soft"``: train on (x̃, softmax f_{θ₊F}(x̃)); ``"relabel"``: train on (x, argmax of it).
        finetune_modules: modules to fine-tune. ``None``: the last ``nn.Linear`` (the head); ``"all"``: every
            parameter in the repair scope; a list of module names: those (within the repair scope).
        finetune_steps: Adam steps of the fine-tune on (D \\ C) ∪ aligned C.
        lr: Adam's learning rate for the fine-tune.
        fit_lr: Adam's learning rate for θ₊F (as in EWC influence).
        fit_steps: Adam steps for θ₊F.
        eval_every: fine-tune steps between the candidates the judge rates.
    """

    needs_fisher = True

    step_size: float = 0.1
    steps: int = 10
    mode: AlignmentMode = "soft"
    finetune_modules: list[str] | Literal["all"] | None = None
    finetune_steps: int = 100
    lr: float = 1e-3
    fit_lr: float = FIT_DEFAULTS.lr
    fit_steps: int = FIT_DEFAULTS.max_steps
    eval_every: int = 10

    def __post_init__(self) -> None:
        _check_mode(self.mode)
        _check_alignment(self.step_size, self.steps)
        if self.finetune_steps < 1 or self.lr <= 0 or self.fit_lr <= 0 or self.fit_steps < 1 or self.eval_every < 1:
            raise ValueError("EnergyAlignment needs finetune_steps ≥ 1, lr > 0, fit_lr > 0, fit_steps ≥ 1 and "
                             f"eval_every ≥ 1; got {self.finetune_steps}, {self.lr}, {self.fit_lr}, {self.fit_steps}, "
                             f"{self.eval_every}.")
        check_finetune_modules(self.finetune_modules, "finetune_modules")

    @property
    def moving_modules(self) -> list[str] | Literal["all"] | None:
        return self.finetune_modules

    def candidates(self, inputs: TreatmentInputs) -> Iterator[int]:
        return energy_alignment_candidates(
            inputs.model, inputs.causes, inputs.kept, inputs.query, inputs.fisher, inputs.n_train,
            step_size=self.step_size, steps=self.steps, mode=self.mode, finetune_modules=self.finetune_modules,
            finetune_steps=self.finetune_steps, lr=self.lr, fit_lr=self.fit_lr, fit_steps=self.fit_steps,
            eval_every=self.eval_every, seed=inputs.seed, adapter=inputs.adapter)


DEFAULTS = EnergyAlignment()  # the functions below default to its hyperparameters


def energy(model: nn.Module, inputs: Tensor, adapter: BatchAdapter | None = None) -> Tensor:
    """E(x) = −logsumexp_k f(x)[k] of each input, shape ``(batch,)``; differentiable in ``inputs``."""
    adapter = adapter or BatchAdapter()
    return -torch.logsumexp(adapter.logits(model, inputs), dim=1)


def energy_gradient(model: nn.Module, inputs: Tensor, adapter: BatchAdapter | None = None) -> Tensor:
    """∇_x E(x) of each input, shaped like ``inputs``; no parameter receives a gradient.

    The gradient of Σ_i E(x_i) is taken, which is each example's own gradient when the model treats examples
    independently (eval mode: no batch statistics).
    """
    _check_floating(inputs)
    x = inputs.detach().requires_grad_(True)
    with torch.enable_grad():
        (gradient,) = torch.autograd.grad(energy(model, x, adapter).sum(), x)
    return gradient


def align_inputs(model: nn.Module, inputs: Tensor, *, step_size: float = DEFAULTS.step_size,
                 steps: int = DEFAULTS.steps, adapter: BatchAdapter | None = None) -> Tensor:
    """x̃ after ``steps`` steps of x̃ ← x̃ − η ∇_x E(x̃) from x̃ = x, as a new tensor (``inputs`` is untouched).

    Args:
        model: the model whose energy is descended (θ₊F), in eval mode.
        inputs: a batch of floating-point inputs.
        step_size: η, in the units of the inputs.
        steps: T; 0 returns a copy of ``inputs``.
        adapter: how to get logits.
    """
    _check_floating(inputs)
    _check_alignment(step_size, steps)
    aligned = inputs.detach().clone()
    for _ in range(steps):
        aligned = aligned - step_size * energy_gradient(model, aligned, adapter)
    return aligned


@torch.no_grad()
def soft_labels(model: nn.Module, inputs: Tensor, adapter: BatchAdapter | None = None) -> Tensor:
    """ỹ = softmax f(x), shape ``(batch, classes)``."""
    adapter = adapter or BatchAdapter()
    return F.softmax(adapter.logits(model, inputs), dim=1)


def aligned_causes(model: nn.Module, cause_loader: DataLoader, *, step_size: float = DEFAULTS.step_size,
                   steps: int = DEFAULTS.steps, mode: AlignmentMode = DEFAULTS.mode,
                   adapter: BatchAdapter | None = None) -> tuple[Tensor, Tensor]:
    """The causes' training examples under alignment, on the CPU, in ``cause_loader``'s order.

    Args:
        model: θ₊F, in eval mode.
        cause_loader: the cause set C; its inputs must be floating-point tensors (they are copied, not moved).
        step_size: η of :func:`align_inputs`.
        steps: T of :func:`align_inputs`.
        mode: ``"soft"``: the aligned inputs x̃ and soft labels ỹ, shape ``(|C|, classes)``; ``"relabel"``: the
            original inputs x and the hard labels argmax ỹ, shape ``(|C|,)``.
        adapter: how to read batches and logits.
    """
    _check_mode(mode)
    _check_alignment(step_size, steps)
    adapter = adapter or BatchAdapter()
    inputs, targets = [], []
    for x, labels in batches(cause_loader, model, adapter):
        _check_floating(x)
        checked_logits(model, x, labels, adapter)  # the causes' labels must index the model's classes
        x_aligned = align_inputs(model, x, step_size=step_size, steps=steps, adapter=adapter)
        y_soft = soft_labels(model, x_aligned, adapter)
        if mode == "soft":
            inputs.append(x_aligned.cpu())
            targets.append(y_soft.cpu())
        else:
            inputs.append(x.detach().cpu().clone())
            targets.append(y_soft.argmax(dim=1).cpu())
    if not inputs:
        return torch.empty(0), torch.empty(0)
    return torch.cat(inputs), torch.cat(targets)


def energy_alignment_candidates(model: nn.Module, cause_loader: DataLoader, kept_loader: DataLoader,
                                failure_loader: DataLoader, fisher: Sequence[Tensor] | None, n_train: int, *,
                                step_size: float = DEFAULTS.step_size, steps: int = DEFAULTS.steps,
                                mode: AlignmentMode = DEFAULTS.mode,
                                finetune_modules: Sequence[str] | Literal["all"] | None = DEFAULTS.finetune_modules,
                                finetune_steps: int = DEFAULTS.finetune_steps, lr: float = DEFAULTS.lr,
                                fit_lr: float = DEFAULTS.fit_lr, fit_steps: int = DEFAULTS.fit_steps,
                                eval_every: int = DEFAULTS.eval_every, seed: int = 0,
                                adapter: BatchAdapter | None = None) -> Iterator[int]:
    """Aligns the causes under θ₊F and fine-tunes ``model`` in place on (D \\ C) ∪ {(x̃_c, ỹ_c)}, yielding the
    step every ``eval_every`` steps and after the last: the candidates the acceptance rule chooses among.

    Each fine-tune step takes one batch of D \\ C (hard labels) and one batch of aligned causes and minimises
    (|D \\ C| · mean ℓ_kept + |C| · mean ℓ_aligned) / (|D \\ C| + |C|), an unbiased estimate of the mean
    cross-entropy over the union; ℓ_aligned is taken against the soft labels ỹ (``"soft"``) or argmax ỹ
    (``"relabel"``). Only :func:`finetune_parameters` move; ``requires_grad`` flags are left as they were.

    Args:
        model: a repair copy at θ̂ in eval mode; its fine-tuned parameters move to θ⁻.
        cause_loader: the cause set C (floating-point inputs).
        kept_loader: D \\ C.
        failure_loader: F_q, to which θ₊F is fitted.
        fisher: F̂ per trainable parameter for θ₊F's anchor; None fits θ₊F without an anchor.
        n_train: N, which scales θ₊F's anchor (N/2) F̂.
        step_size: η, the alignment step, in input units.
        steps: T, the alignment steps.
        mode: ``"soft"`` or ``"relabel"`` (see :func:`aligned_causes`).
        finetune_modules: which layers train (see :func:`finetune_parameters`).
        finetune_steps: Adam steps of the fine-tune.
        lr: Adam's learning rate for the fine-tune.
        fit_lr: Adam's learning rate for θ₊F.
        fit_steps: Adam steps for θ₊F.
        eval_every: fine-tune steps between candidates.
        seed: seeds the shuffling of the aligned causes.
        adapter: how to read batches and logits.
    """
    _check_mode(mode)
    _check_alignment(step_size, steps)
    adapter = adapter or BatchAdapter()
    parameters = finetune_parameters(model, finetune_modules)
    plus = fit_to_failures(model, failure_loader, fisher, n_train, lr=fit_lr, max_steps=fit_steps, adapter=adapter)
    cause_inputs, cause_targets = aligned_causes(plus, cause_loader, step_size=step_size, steps=steps, mode=mode,
                                                 adapter=adapter)
    del plus
    n_causes, n_kept = len(cause_inputs), len(kept_loader.dataset)
    if n_causes + n_kept == 0:
        return
    generator = torch.Generator().manual_seed(seed)
    aligned_loader = DataLoader(TensorDataset(cause_inputs, cause_targets), batch_size=cause_loader.batch_size or 64,
                                shuffle=True, generator=generator)
    device = model_device(model)
    kept = batches(endless(kept_loader), model, adapter) if n_kept else None
    # Soft targets are not class indices, so the aligned batches bypass the adapter's label check.
    aligned = ((x.to(device), t.to(device)) for x, t in endless(aligned_loader)) \
        if n_causes else None
    optimizer = torch.optim.Adam(parameters, lr=lr)
    for step in range(1, finetune_steps + 1):
        with torch.enable_grad():
            loss = 0.0
            if kept is not None:
                x, y = next(kept)
                loss = loss + n_kept * F.cross_entropy(checked_logits(model, x, y, adapter), y)
            if aligned is not None:
                x, y = next(aligned)
                loss = loss + n_causes * F.cross_entropy(adapter.logits(model, x), y)
            loss = loss / (n_kept + n_causes)
            if not torch.isfinite(loss):
                break
            optimizer.zero_grad(set_to_none=True)
            # `inputs=` keeps gradients off every parameter outside the fine-tune, frozen or not.
            loss.backward(inputs=parameters)
        optimizer.step()
        for p in parameters:
            p.grad = None
        if step % eval_every == 0 or step == finetune_steps:
            yield step


def energy_alignment(model: nn.Module, cause_loader: DataLoader, kept_loader: DataLoader,
                     failure_loader: DataLoader, judge: Judge | DataLoader, fisher: Sequence[Tensor] | None,
                     n_train: int, *, step_size: float = DEFAULTS.step_size, steps: int = DEFAULTS.steps,
                     mode: AlignmentMode = DEFAULTS.mode,
                     finetune_modules: Sequence[str] | Literal["all"] | None = DEFAULTS.finetune_modules,
                     finetune_steps: int = DEFAULTS.finetune_steps, lr: float = DEFAULTS.lr,
                     fit_lr: float = DEFAULTS.fit_lr, fit_steps: int = DEFAULTS.fit_steps,
                     eval_every: int = DEFAULTS.eval_every, seed: int = 0,
                     adapter: BatchAdapter | None = None) -> Choice:
    """Energy alignment of ``model`` in place, keeping the fine-tune step the judge accepts best (θ̂ if none).

    ``judge`` is the acceptance rule's judge, or a loader whose accuracy judges (e.g. F_q); the other arguments
    are those of :func:`energy_alignment_candidates`.
    """
    judge = as_judge(judge, model, adapter)
    candidates = energy_alignment_candidates(
        model, cause_loader, kept_loader, failure_loader, fisher, n_train, step_size=step_size, steps=steps,
        mode=mode, finetune_modules=finetune_modules, finetune_steps=finetune_steps, lr=lr, fit_lr=fit_lr,
        fit_steps=fit_steps, eval_every=eval_every, seed=seed, adapter=adapter)
    return choose(model, candidates, judge)


def _check_floating(inputs: object) -> None:
    if not isinstance(inputs, Tensor) or not inputs.is_floating_point():
        what = f"dtype {inputs.dtype}" if isinstance(inputs, Tensor) else f"type {type(inputs).__name__}"
        raise ValueError(f"Energy alignment moves the causes' inputs along ∇_x E, so they must be one floating-point "
                         f"tensor; got {what}. Discrete inputs (token ids, ...) cannot be aligned: choose another "
                         "treatment, e.g. EWCUnlearning, or override `BatchAdapter.inputs` to return a float tensor.")
