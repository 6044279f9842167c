"""Which parameters a repair touches, and the small vector algebra over them.

Per-parameter tensors are kept as lists aligned with :func:`scoped_parameters`, never flattened into one
N × parameters matrix.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator, Sequence
from typing import Literal

import torch
from torch import Tensor, nn


def scoped_parameters(model: nn.Module, params: Sequence[str] | None = None) -> list[nn.Parameter]:
    """Returns the trainable parameters a repair uses, in ``model.parameters()`` order.

    Args:
        model: the classifier.
        params: names of submodules (as in ``model.named_modules()``, e.g. ``["net.9"]`` or ``["head"]``) whose
            parameters the Fisher, the scores and the treatment use. ``None`` takes every parameter that
            requires a gradient.
    """
    if params is None:
        selected = [p for p in model.parameters() if p.requires_grad]
    else:
        modules = dict(model.named_modules())
        missing = [name for name in params if name not in modules]
        if missing:
            candidates = [name for name, m in modules.items() if name and any(True for _ in m.parameters(recurse=False))]
            raise ValueError(
                f"`params` names modules {missing} that the model does not have. Modules with parameters: "
                f"{candidates[:20]}{' ...' if len(candidates) > 20 else ''}."
            )
        chosen = {id(p) for name in params for p in modules[name].parameters()}
        selected = [p for p in model.parameters() if id(p) in chosen and p.requires_grad]
    if not selected:
        raise ValueError("No trainable parameters in scope: check `params` and that the model has parameters "
                         "with requires_grad=True.")
    return selected


def last_linear_name(model: nn.Module) -> str | None:
    """Name of the model's last ``nn.Linear`` in registration order (usually the classification head), or None."""
    names = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    return names[-1] if names else None


def check_finetune_modules(modules: Sequence[str] | Literal["all"] | None, argument: str = "modules") -> None:
    """Rejects a single module name given as a string (it would read as a list of characters)."""
    if isinstance(modules, str) and modules != "all":
        raise ValueError(f"{argument} must be None, 'all' or a list of module names, got {modules!r}; for one module "
                         f"write [{modules!r}].")


def finetune_parameters(model: nn.Module, finetune_modules: Sequence[str] | Literal["all"] | None = None
                        ) -> list[nn.Parameter]:
    """The parameters a treatment's fine-tune trains: trainable (``requires_grad``) ones of the chosen modules.

    Args:
        model: the repair copy.
        finetune_modules: ``None``: the last ``nn.Linear`` in ``model.named_modules()`` order (usually the
            classification head); ``"all"``: every trainable parameter; a list: the named submodules (names as
            in ``model.named_modules()``, e.g. ``["net.12"]``).
    """
    if finetune_modules is None:
        last = last_linear_name(model)
        if last is None:
            raise ValueError("The model has no nn.Linear layer to fine-tune by default; name the layers to train, "
                             "e.g. `finetune_modules=['head']`, or pass `finetune_modules='all'`.")
        names = [last]
    else:
        names = None if finetune_modules == "all" else list(finetune_modules)
    try:
        return scoped_parameters(model, names)
    except ValueError as error:
        raise ValueError(f"`finetune_modules={finetune_modules!r}`: {error}") from error


def repair_copy(model: nn.Module, params: Sequence[str] | None = None) -> nn.Module:
    """A deep copy of ``model`` in eval mode with only the scoped parameters trainable.

    Repair work happens on this copy, so the user's module keeps its hooks, mode and grad flags; an attached
    Lightning ``Trainer`` is shared, not copied. In-place activations (``ReLU(inplace=True)``) of the copy are
    made out-of-place, which computes the same values.
    """
    memo: dict[int, object] = {}
    for attribute in ("_trainer", "_fabric"):
        attached = getattr(model, attribute, None)
        if attached is not None:
            memo[id(attached)] = None
    scope_ids = {id(p) for p in scoped_parameters(model, params)}
    flags = [id(p) in scope_ids for p in model.parameters()]
    clone = copy.deepcopy(model, memo)
    for parameter, trainable in zip(clone.parameters(), flags):
        parameter.requires_grad_(trainable)
    for module in clone.modules():
        if getattr(module, "inplace", False) is True:
            module.inplace = False  # in-place activations overwrite the inputs BackPACK stores; same values without
    return clone.eval()


@contextlib.contextmanager
def moving_only(model: nn.Module, moving: Sequence[nn.Parameter]) -> Iterator[list[nn.Parameter]]:
    """Within the block, only ``moving`` of the repair copy's trainable parameters are trainable; restored after.

    Lets methods written against :func:`trainable` (gradients, Hessian-vector products) work on a subset, e.g.
    the last layer, of a repair copy.
    """
    others = [p for p in trainable(model) if all(p is not m for m in moving)]
    for parameter in others:
        parameter.requires_grad_(False)
    try:
        yield trainable(model)
    finally:
        for parameter in others:
            parameter.requires_grad_(True)


def copy_parameters_(target: nn.Module, source: nn.Module) -> None:
    """Copies ``source``'s parameter values into ``target`` in place (optimizer references stay valid)."""
    with torch.no_grad():
        for mine, theirs in zip(target.parameters(), source.parameters()):
            mine.copy_(theirs)


@torch.no_grad()
def assign_(parameters: Sequence[Tensor], values: Sequence[Tensor]) -> None:
    """Sets each parameter to its value in place, e.g. back to θ̂ or to the best candidate seen."""
    for parameter, value in zip(parameters, values):
        parameter.copy_(value)


def trainable(model: nn.Module) -> list[nn.Parameter]:
    """The parameters of a :func:`repair_copy` that are in scope."""
    return [p for p in model.parameters() if p.requires_grad]


def detached(tensors: Sequence[Tensor]) -> list[Tensor]:
    """Detached clones, e.g. θ̂ before a fine-tune moves the parameters."""
    return [t.detach().clone() for t in tensors]


def dot(a: Sequence[Tensor], b: Sequence[Tensor]) -> Tensor:
    """Σ over parameters of ⟨a_p, b_p⟩."""
    return sum((x * y).sum() for x, y in zip(a, b))


def anchor_penalty(parameters: Sequence[Tensor], anchor: Sequence[Tensor], weights: Sequence[Tensor]) -> Tensor:
    """(θ − θ̂)ᵀ diag(w) (θ − θ̂), the EWC penalty without its coefficient."""
    return sum((w * (p - a) ** 2).sum() for p, a, w in zip(parameters, anchor, weights))
