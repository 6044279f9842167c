"""Per-example gradients and the diagonal Fisher, from BackPACK or, where BackPACK cannot follow the model,
from ``torch.func``.

The only module that imports BackPACK: the rest of the library asks for gradients and curvature and does not
care how they were obtained. Losses use ``reduction="sum"`` so that the per-example quantities are those of
ℓ(z) itself, without a 1/B factor.

Two backends compute the same estimators:

- ``"backpack"``: BackPACK's extensions (``BatchGrad``, ``DiagGGNMC``, ``DiagGGNExact``, ``SumGradSquared``) on
  the model as it is. Fast, but its second-order extensions need every operation between parameters to be a
  module it knows: residual additions, functional calls (``F.relu``), ``x.view`` and attention stop it.
- ``"torch_func"``: per-example gradients by ``torch.func`` (``vmap`` over ``grad``), for any model autograd
  can differentiate. The MC Fisher squares the gradients at labels sampled from the model, which is what
  ``DiagGGNMC`` estimates; the exact Fisher sums them over every class, weighted by the model's probabilities,
  so it costs one per-example gradient per class.

:func:`choose_backend` tries BackPACK on one batch and falls back to ``torch.func`` when it fails.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Literal

import torch
from backpack import backpack, extend, hook_run_extensions, hook_store_io, memory_cleanup
from backpack.extensions import BatchGrad, DiagGGNExact, DiagGGNMC, SumGradSquared
from torch import Tensor, nn
from torch.nn import functional as F
from torch.utils.data import DataLoader

from lightning_repair.adapter import BatchAdapter, to_device
from lightning_repair.params import trainable

FisherKind = Literal["mc", "exact", "empirical"]
FISHER_KINDS = ("mc", "exact", "empirical")
Backend = Literal["backpack", "torch_func"]
BACKENDS = ("backpack", "torch_func")
GRADIENT_FLOATS = 2**25  # torch.func: per-example gradients held at once, in floats (128 MiB in float32)


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter."""
    return next(model.parameters()).device


def forked_rng(model: nn.Module) -> contextlib.AbstractContextManager:
    """Forks the global CPU RNG and, for a model on a GPU, that GPU's: random draws inside the block leave the
    streams outside it as they were."""
    device = next(model.parameters(), torch.empty(0)).device
    return torch.random.fork_rng(devices=[device] if device.type == "cuda" else [])


def batches(loader: Iterable, model: nn.Module, adapter: BatchAdapter) -> Iterator[tuple[Any, Tensor]]:
    """Yields ``(inputs, labels)`` of each batch of ``loader``, moved to the model's device."""
    device = model_device(model)
    for batch in loader:
        yield to_device(adapter.inputs(batch), device), adapter.labels(batch).to(device)


def endless(loader: Iterable) -> Iterator:
    """The loader's batches, pass after pass (a shuffled loader reshuffles each pass)."""
    while True:
        empty = True
        for batch in loader:
            empty = False
            yield batch
        if empty:
            raise ValueError("Cannot draw batches from an empty loader (e.g. D \\ C or the causes C is empty).")


def checked_logits(model: nn.Module, inputs: Any, labels: Tensor, adapter: BatchAdapter, *,
                   check_values: bool = True) -> Tensor:
    """Logits of ``inputs``, checked to be class scores that the labels index into.

    The shape checks cost nothing; the value checks (probabilities instead of logits, labels out of range) read
    the values back to the host, so a pass over many batches makes them on its first batch only
    (``check_values=False`` after it).
    """
    logits = adapter.logits(model, inputs)
    if not isinstance(logits, Tensor) or logits.dim() != 2 or logits.shape[0] != labels.shape[0]:
        shape = tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
        raise ValueError(
            f"The model returned {shape} for a batch of {labels.shape[0]} examples; RepairCallback needs class "
            "logits of shape (batch, classes). Override `BatchAdapter.logits` to return them."
        )
    if logits.shape[1] < 2:
        raise ValueError(
            f"The model returned {logits.shape[1]} output per example; RepairCallback repairs classifiers and needs "
            "class logits of shape (batch, classes ≥ 2), not a regression or single-logit head."
        )
    if not check_values:
        return logits
    if (logits.detach() >= 0).all() and torch.allclose(logits.detach().sum(dim=1), logits.new_ones(()), atol=1e-5):
        raise ValueError(
            "The model's outputs are probabilities (non-negative, summing to 1): RepairCallback needs logits, "
            "the input of cross-entropy. Drop the final softmax, or override `BatchAdapter.logits` to return logits."
        )
    if labels.numel() and (labels.min() < 0 or labels.max() >= logits.shape[1]):
        raise ValueError(
            f"Labels range over [{int(labels.min())}, {int(labels.max())}] but the model has {logits.shape[1]} "
            "classes; labels must be class indices in [0, classes)."
        )
    return logits


FISHER_DAMPING = 1e-3
"""The default δ of :func:`natural_gradient`, relative to mean(F̂); linear influence and Newton removal take theirs
from it."""


def natural_gradient(gradient: Sequence[Tensor], fisher: Sequence[Tensor] | None, *,
                     damping: float = FISHER_DAMPING) -> list[Tensor]:
    """(F̂ + δ)⁻¹ g elementwise, with δ = ``damping`` × mean(F̂); g itself when ``fisher`` is None."""
    if fisher is None:
        return list(gradient)
    if damping <= 0:
        raise ValueError(f"damping must be > 0 to invert the Fisher, got {damping}.")
    delta = damping * torch.cat([f.flatten() for f in fisher]).mean()
    delta = torch.clamp(delta, min=torch.finfo(delta.dtype).tiny)
    return [g / (f + delta) for g, f in zip(gradient, fisher)]


def _leaves(model: nn.Module) -> list[nn.Module]:
    return [module for module in model.modules() if next(module.children(), None) is None]


class _BackpackHooks:
    """BackPACK's hooks on the leaf modules of a model, and a count of their calls per forward pass."""

    def __init__(self, model: nn.Module) -> None:
        self.names = {id(m): name for name, m in model.named_modules()}
        self.leaves = [m for m in _leaves(model) if not getattr(m, "_backpack_extend", False)]
        self.calls: dict[int, int] = {}
        self.last: int | None = None
        self.handles = [hook for m in self.leaves for hook in (
            m.register_forward_hook(self._count),
            m.register_forward_hook(hook_store_io),
            m.register_full_backward_hook(hook_run_extensions))]

    def _count(self, module: nn.Module, inputs: Any, output: Any) -> None:
        self.last = id(module)
        # Only a module the backward pass goes through matters: with the repair restricted to a head, the body's
        # outputs need no gradient and BackPACK never visits them, reused or not.
        outputs = output if isinstance(output, (tuple, list)) else (output,)
        if any(isinstance(t, Tensor) and t.requires_grad for t in outputs):
            self.calls[id(module)] = self.calls.get(id(module), 0) + 1

    def logits(self, model: nn.Module, inputs: Any, labels: Tensor, adapter: BatchAdapter,
               check_values: bool) -> Tensor:
        """The model's checked logits with the hooks on; what BackPACK cannot follow becomes an error naming where.

        BackPACK's backward hooks wrap each layer's output, and PyTorch forbids changing that output in place
        (torchvision's ResNets add the shortcut with ``out += identity``): the raw error names no layer.
        """
        self.last = None
        try:
            logits = checked_logits(model, inputs, labels, adapter, check_values=check_values)
        except RuntimeError as error:
            if "BackwardHookFunction" not in str(error):
                raise
            where = f"right after `{self.names[self.last]}` ran" if self.last is not None else "before any layer ran"
            raise ValueError(
                f"BackPACK cannot follow this model: an in-place operation {where} changes a layer's output (as "
                "`out += identity` does in torchvision's ResNets), which BackPACK's hooks forbid. Use "
                "`curvature='torch_func'`, or `curvature='auto'` (the default), which falls back to it by itself; "
                "or restrict the repair to layers after it with `params=[...]`.") from error
        self.check_forward()
        return logits

    def check_forward(self) -> None:
        """Raises if a module ran twice in the last forward pass: BackPACK keeps only its last input."""
        reused = [self.names[i] for i, count in self.calls.items() if count > 1]
        self.calls.clear()
        if reused:
            raise ValueError(
                f"Module(s) {reused} run more than once in one forward pass; BackPACK stores one input per module, "
                "so its gradients and Fisher would be wrong. Use a separate module instance per use, or restrict "
                "the repair with `params=[...]` to modules that run once and after the reused ones.")

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        for module in self.leaves:
            memory_cleanup(module)


@contextmanager
def backpack_ready(model: nn.Module) -> Iterator[_BackpackHooks]:
    """BackPACK's hooks on every leaf module of ``model`` for the duration of the block, then removed.

    Containers (``Sequential``, the LightningModule itself) stay plain, so a custom ``forward`` that only
    chains modules works; functional operations between modules are invisible to BackPACK's second-order
    extensions (the Fisher), so keep them inside modules or restrict the repair with ``params=``. Outside the
    block the model runs at full speed, without BackPACK storing every layer's input.
    """
    hooks = _BackpackHooks(model)
    try:
        with warnings.catch_warnings():
            # BackPACK relies on backward hooks of layers whose inputs need no gradient (the first layer).
            warnings.filterwarnings("ignore", message="Full backward hook is firing")
            yield hooks
    finally:
        hooks.remove()


def _backward_with(extension: Any, loss: Tensor, model: nn.Module) -> None:
    """``loss.backward()`` with a BackPACK extension, turning "no extension for this module" into advice."""
    try:
        with backpack(extension):
            loss.backward()
    except NotImplementedError as error:
        names = [name for name, m in model.named_modules() if type(m).__name__ in str(error) and name]
        raise ValueError(
            f"BackPACK does not support {names or 'a layer'} of the model for {type(extension).__name__} ({error}). "
            "Restrict the repair to supported submodules, e.g. the classifier head: `RepairCallback(params=[...])`."
        ) from error


def per_example_gradients(model: nn.Module, inputs: Any, labels: Tensor, adapter: BatchAdapter | None = None,
                          backend: Backend = "backpack", *, check_values: bool = True) -> tuple[list[Tensor], Tensor]:
    """∇_θ ℓ(z_i) for each example of one batch, for the model's trainable parameters.

    Args:
        model: the classifier.
        inputs: a batch of inputs on the model's device.
        labels: their class labels.
        adapter: how to get logits; the default calls ``model(inputs)``.
        backend: ``"backpack"`` (``BatchGrad``) or ``"torch_func"`` (``vmap`` over ``grad``).

    Returns:
        One ``(batch, *parameter.shape)`` tensor per trainable parameter, and the per-example losses.
    """
    adapter = adapter or BatchAdapter()
    _check_backend(backend)
    if backend == "torch_func":
        with torch.no_grad():
            logits = checked_logits(model, inputs, labels, adapter, check_values=check_values)
        grads = [torch.cat(parts) for parts in zip(*_func_gradient_chunks(model, inputs, labels, adapter))]
        return grads, F.cross_entropy(logits, labels, reduction="none")
    loss_fn = extend(nn.CrossEntropyLoss(reduction="sum"))
    parameters = trainable(model)
    with torch.enable_grad(), backpack_ready(model) as hooks:
        logits = hooks.logits(model, inputs, labels, adapter, check_values)
        _backward_with(BatchGrad(), loss_fn(logits, labels), model)
    grads = [p.grad_batch.detach() for p in parameters]
    for p in parameters:
        p.grad, p.grad_batch = None, None
    losses = F.cross_entropy(logits.detach(), labels, reduction="none")
    return grads, losses


def diagonal_fisher(model: nn.Module, loader: DataLoader, kind: FisherKind = "mc",
                    adapter: BatchAdapter | None = None, mc_samples: int = 1,
                    backend: Backend = "backpack") -> list[Tensor]:
    """The diagonal Fisher F̂, the per-example mean over ``loader``, one tensor per trainable parameter.

    Args:
        model: the classifier, in eval mode.
        loader: the examples to average over (``fisher_samples`` training examples in the callback).
        kind: ``"mc"``: E[(∇ℓ(x, ŷ))²] with ŷ sampled from the model (BackPACK ``DiagGGNMC``); ``"exact"``: the
            GGN diagonal, equal to the Fisher for cross-entropy (``DiagGGNExact``); ``"empirical"``: the mean of
            (∇ℓ(z))² at the given labels (``SumGradSquared``), the paper's choice.
        adapter: how to read batches and logits.
        mc_samples: samples of ŷ per example for ``kind="mc"``; seed the global RNG for repeatability.
        backend: ``"backpack"`` or ``"torch_func"`` (see the module docstring); the same estimator either way.
    """
    if kind not in FISHER_KINDS:
        raise ValueError(f"Unknown Fisher kind {kind!r}; choose one of {FISHER_KINDS}.")
    _check_backend(backend)
    adapter = adapter or BatchAdapter()
    if backend == "torch_func":
        return _checked_fisher(*_func_fisher_sum(model, loader, kind, adapter, mc_samples))
    extension, attribute = {
        "mc": (DiagGGNMC(mc_samples=mc_samples), "diag_ggn_mc"),
        "exact": (DiagGGNExact(), "diag_ggn_exact"),
        "empirical": (SumGradSquared(), "sum_grad_squared"),
    }[kind]
    loss_fn = extend(nn.CrossEntropyLoss(reduction="sum"))
    parameters = trainable(model)
    total = [torch.zeros_like(p) for p in parameters]
    count = 0
    with torch.enable_grad(), backpack_ready(model) as hooks:
        for index, (inputs, labels) in enumerate(batches(loader, model, adapter)):
            logits = hooks.logits(model, inputs, labels, adapter, check_values=index == 0)
            _backward_with(extension, loss_fn(logits, labels), model)
            for acc, p in zip(total, parameters):
                acc += getattr(p, attribute).detach()
                setattr(p, attribute, None)
                p.grad = None
            count += labels.shape[0]
    return _checked_fisher(total, count)


def _checked_fisher(total: list[Tensor], count: int) -> list[Tensor]:
    """The per-example mean of a summed Fisher, refusing an empty or non-finite one."""
    if count == 0:
        raise ValueError("Cannot estimate the Fisher from an empty loader.")
    fisher = [t / count for t in total]
    if not all(torch.isfinite(t).all() for t in fisher):
        raise FloatingPointError("The diagonal Fisher has NaN or infinite entries: the model's losses are not "
                                 "finite. Check the model and data, or lower the learning rate.")
    return fisher


def loss_gradient(model: nn.Module, loader: DataLoader, adapter: BatchAdapter | None = None) -> list[Tensor]:
    """Σ over the loader's examples of ∇_θ ℓ(z), e.g. g_F for the failures F_q (plain autograd)."""
    adapter = adapter or BatchAdapter()
    parameters = trainable(model)
    total = [torch.zeros_like(p) for p in parameters]
    with torch.enable_grad():
        for inputs, labels in batches(loader, model, adapter):
            loss = F.cross_entropy(checked_logits(model, inputs, labels, adapter), labels, reduction="sum")
            for acc, g in zip(total, torch.autograd.grad(loss, parameters)):
                acc += g
    return total


# ---- torch.func: per-example gradients of any differentiable model ----------------------------------------


def _check_backend(backend: str) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"Unknown curvature backend {backend!r}; choose one of {BACKENDS}.")


class AdapterLogits(nn.Module):
    """``adapter``'s logits of ``model`` as one module call, for :func:`torch.func.functional_call`.

    ``model`` is a registered submodule, so ``functional_call(wrapper, {"model.<name>": tensor}, ...)`` swaps the
    model's parameters for the duration of the call, whatever the adapter does with the model (``model(x)``,
    ``model.backbone(x)``, a custom method...). With ``checked``, the logits go through :func:`checked_logits`
    (which branches on their values, so not under ``vmap``); ``check_values`` is passed on to it, and a pass sets
    it for its first batch only.
    """

    def __init__(self, model: nn.Module, adapter: BatchAdapter, checked: bool = False) -> None:
        super().__init__()
        self.model, self.adapter, self.checked, self.check_values = model, adapter, checked, True

    def forward(self, inputs: Any, labels: Tensor | None = None) -> Tensor:
        if self.checked:
            return checked_logits(self.model, inputs, labels, self.adapter, check_values=self.check_values)
        return self.adapter.logits(self.model, inputs)


def _func_gradient_chunks(model: nn.Module, inputs: Any, labels: Tensor, adapter: BatchAdapter
                          ) -> Iterator[list[Tensor]]:
    """Per-example ∇ℓ(x_i, labels_i) over the trainable parameters, in chunks of examples that fit in memory."""
    from torch.func import functional_call, grad, vmap
    from torch.utils._pytree import tree_map

    wrapper = AdapterLogits(model, adapter)
    names = [f"model.{name}" for name, p in model.named_parameters() if p.requires_grad]
    parameters = {name: p.detach() for name, p in zip(names, trainable(model))}
    width = sum(p.numel() for p in parameters.values())
    chunk = max(1, GRADIENT_FLOATS // max(width, 1))

    def example_loss(values: dict[str, Tensor], x: Any, y: Tensor) -> Tensor:
        logits = functional_call(wrapper, values, (tree_map(lambda t: t.unsqueeze(0), x),))
        return F.cross_entropy(logits, y.unsqueeze(0), reduction="sum")

    per_example = vmap(grad(example_loss), in_dims=(None, 0, 0))
    with torch.enable_grad():
        for start in range(0, labels.shape[0], chunk):
            part = tree_map(lambda t: t[start:start + chunk], inputs)
            try:
                grads = per_example(parameters, part, labels[start:start + chunk])
            except RuntimeError as error:
                raise ValueError(
                    f"torch.func could not compute per-example gradients of this model ({error}). They need a "
                    "forward pass that works one example at a time: no `.item()`, no Python branches on tensor "
                    "values, no BatchNorm in train mode. Restrict the repair to layers without them, e.g. "
                    "`RepairCallback(params=['head'])`.") from error
            yield [grads[name].detach() for name in names]


def _func_fisher_sum(model: nn.Module, loader: DataLoader, kind: FisherKind, adapter: BatchAdapter,
                     mc_samples: int) -> tuple[list[Tensor], int]:
    """Σ over the loader's examples of the per-example Fisher diagonal, and the number of examples.

    Each example is repeated once per label it needs: the given one (empirical), ``mc_samples`` labels drawn
    from the model, weighted 1/S (mc, DiagGGNMC's estimator), or every class weighted by its probability (exact,
    Σ_y p(y | x) (∇ℓ(x, y))²).
    """
    from torch.utils._pytree import tree_map

    total = [torch.zeros_like(p) for p in trainable(model)]
    count = 0
    for index, (inputs, labels) in enumerate(batches(loader, model, adapter)):
        with torch.no_grad():
            probabilities = F.softmax(checked_logits(model, inputs, labels, adapter, check_values=index == 0), dim=1)
        if kind == "empirical":
            repeats, targets, weights = 1, labels, torch.ones_like(probabilities[:, 0])
        elif kind == "mc":
            repeats = mc_samples
            targets = torch.multinomial(probabilities, mc_samples, replacement=True).flatten()
            weights = probabilities.new_full(targets.shape, 1.0 / mc_samples)
        else:
            repeats = probabilities.shape[1]
            targets = torch.arange(repeats, device=labels.device).repeat(labels.shape[0])
            weights = probabilities.flatten()
        expanded = tree_map(lambda t: t.repeat_interleave(repeats, dim=0), inputs) if repeats > 1 else inputs
        start = 0
        for grads in _func_gradient_chunks(model, expanded, targets, adapter):
            w = weights[start:start + grads[0].shape[0]]
            for acc, g in zip(total, grads):
                acc += torch.einsum("n,n...->...", w, g**2)
            start += grads[0].shape[0]
        count += labels.shape[0]
    return total, count


def choose_backend(model: nn.Module, loader: DataLoader, kind: FisherKind, adapter: BatchAdapter | None = None
                   ) -> tuple[Backend, str | None]:
    """``"backpack"`` when BackPACK computes the ``kind`` Fisher on the loader's first batch, else ``"torch_func"``.

    Returns the backend and, for the fallback, why BackPACK failed. The trial runs under a forked RNG and leaves
    no BackPACK state on the model.
    """
    adapter = adapter or BatchAdapter()
    first = next(iter(loader), None)
    if first is None:
        raise ValueError("Cannot choose a curvature backend from an empty loader.")
    try:
        with forked_rng(model):
            diagonal_fisher(model, [first], kind, adapter, backend="backpack")
    except FloatingPointError:
        raise
    except Exception as error:  # noqa: BLE001 - whatever stops BackPACK, torch.func is exact for any model
        for p in model.parameters():
            p.grad = None
            for attribute in ("grad_batch", "diag_ggn_mc", "diag_ggn_exact", "sum_grad_squared"):
                if hasattr(p, attribute):
                    delattr(p, attribute)
        return "torch_func", f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"[:300]
    return "backpack", None
