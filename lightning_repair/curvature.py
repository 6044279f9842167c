"""Per-example gradients and the diagonal Fisher, from BackPACK.

The only module that imports BackPACK: the rest of the library asks for gradients and curvature and does not
care how they were obtained. Losses use ``reduction="sum"`` so that BackPACK's per-example quantities are
those of ℓ(z) itself, without a 1/B factor.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Iterator
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


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter."""
    return next(model.parameters()).device


def batches(loader: Iterable, model: nn.Module, adapter: BatchAdapter) -> Iterator[tuple[Any, Tensor]]:
    """Yields ``(inputs, labels)`` of each batch of ``loader``, moved to the model's device."""
    device = model_device(model)
    for batch in loader:
        yield to_device(adapter.inputs(batch), device), adapter.labels(batch).to(device)


def checked_logits(model: nn.Module, inputs: Any, labels: Tensor, adapter: BatchAdapter) -> Tensor:
    """Logits of ``inputs``, checked to be class scores that the labels index into."""
    logits = adapter.logits(model, inputs)
    if not isinstance(logits, Tensor) or logits.dim() != 2 or logits.shape[0] != labels.shape[0]:
        shape = tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
        raise ValueError(
            f"The model returned {shape} for a batch of {labels.shape[0]} examples; RepairCallback needs class "
            "logits of shape (batch, classes). Override `BatchAdapter.logits` to return them."
        )
    if labels.numel() and (labels.min() < 0 or labels.max() >= logits.shape[1]):
        raise ValueError(
            f"Labels range over [{int(labels.min())}, {int(labels.max())}] but the model has {logits.shape[1]} "
            "classes; labels must be class indices in [0, classes)."
        )
    return logits


def _leaves(model: nn.Module) -> list[nn.Module]:
    return [module for module in model.modules() if next(module.children(), None) is None]


@contextmanager
def backpack_ready(model: nn.Module) -> Iterator[nn.Module]:
    """BackPACK's hooks on every leaf module of ``model`` for the duration of the block, then removed.

    Containers (``Sequential``, the LightningModule itself) stay plain, so a custom ``forward`` that only
    chains modules works; functional operations between modules are invisible to BackPACK's second-order
    extensions (the Fisher), so keep them inside modules or restrict the repair with ``params=``. Outside the
    block the model runs at full speed, without BackPACK storing every layer's input.
    """
    leaves = [m for m in _leaves(model) if not getattr(m, "_backpack_extend", False)]
    handles = [hook for m in leaves for hook in (m.register_forward_hook(hook_store_io),
                                                 m.register_full_backward_hook(hook_run_extensions))]
    try:
        with warnings.catch_warnings():
            # BackPACK relies on backward hooks of layers whose inputs need no gradient (the first layer).
            warnings.filterwarnings("ignore", message="Full backward hook is firing")
            yield model
    finally:
        for handle in handles:
            handle.remove()
        for module in leaves:
            memory_cleanup(module)


def per_example_gradients(model: nn.Module, inputs: Any, labels: Tensor,
                          adapter: BatchAdapter | None = None) -> tuple[list[Tensor], Tensor]:
    """∇_θ ℓ(z_i) for each example of one batch, for the model's trainable parameters (BackPACK ``BatchGrad``).

    Args:
        model: the classifier.
        inputs: a batch of inputs on the model's device.
        labels: their class labels.
        adapter: how to get logits; the default calls ``model(inputs)``.

    Returns:
        One ``(batch, *parameter.shape)`` tensor per trainable parameter, and the per-example losses.
    """
    adapter = adapter or BatchAdapter()
    loss_fn = extend(nn.CrossEntropyLoss(reduction="sum"))
    parameters = trainable(model)
    with torch.enable_grad(), backpack_ready(model):
        logits = checked_logits(model, inputs, labels, adapter)
        with backpack(BatchGrad()):
            loss_fn(logits, labels).backward()
    grads = [p.grad_batch.detach() for p in parameters]
    for p in parameters:
        p.grad, p.grad_batch = None, None
    losses = F.cross_entropy(logits.detach(), labels, reduction="none")
    return grads, losses


def diagonal_fisher(model: nn.Module, loader: DataLoader, kind: FisherKind = "mc",
                    adapter: BatchAdapter | None = None, mc_samples: int = 1) -> list[Tensor]:
    """The diagonal Fisher F̂, the per-example mean over ``loader``, one tensor per trainable parameter.

    Args:
        model: the classifier, in eval mode.
        loader: the examples to average over (``fisher_samples`` training examples in the callback).
        kind: ``"mc"``: E[(∇ℓ(x, ŷ))²] with ŷ sampled from the model (BackPACK ``DiagGGNMC``); ``"exact"``: the
            GGN diagonal, equal to the Fisher for cross-entropy (``DiagGGNExact``); ``"empirical"``: the mean of
            (∇ℓ(z))² at the given labels (``SumGradSquared``), the paper's choice.
        adapter: how to read batches and logits.
        mc_samples: samples of ŷ per example for ``kind="mc"``; seed the global RNG for repeatability.
    """
    if kind not in FISHER_KINDS:
        raise ValueError(f"Unknown Fisher kind {kind!r}; choose one of {FISHER_KINDS}.")
    adapter = adapter or BatchAdapter()
    extension, attribute = {
        "mc": (DiagGGNMC(mc_samples=mc_samples), "diag_ggn_mc"),
        "exact": (DiagGGNExact(), "diag_ggn_exact"),
        "empirical": (SumGradSquared(), "sum_grad_squared"),
    }[kind]
    loss_fn = extend(nn.CrossEntropyLoss(reduction="sum"))
    parameters = trainable(model)
    total = [torch.zeros_like(p) for p in parameters]
    count = 0
    with torch.enable_grad(), backpack_ready(model):
        for inputs, labels in batches(loader, model, adapter):
            logits = checked_logits(model, inputs, labels, adapter)
            with backpack(extension):
                loss_fn(logits, labels).backward()
            for acc, p in zip(total, parameters):
                acc += getattr(p, attribute).detach()
                setattr(p, attribute, None)
                p.grad = None
            count += labels.shape[0]
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
