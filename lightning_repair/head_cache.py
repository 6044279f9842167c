"""Predictions of a model whose last layer alone moved, from that layer's inputs recorded once.

Treatments move only the classification head by default (EWC deletion, fine-tuning), and a round predicts V many
times after one: every candidate is judged on F_q and R_q, and the choice on F_h and R. The layers below the head
do not move, so neither do the head's inputs. One no-grad pass over V at θ̂ records them; after it, a model's
predictions cost the head alone, one small matrix multiply per batch instead of a forward pass.

The cache answers only where it gives what a forward pass would, and says None otherwise (the caller then runs the
model):

- the model is the one it was built on, in eval mode;
- no parameter or buffer outside the head has changed (compared by value);
- the head's output is the model's logits: checked on every batch at θ̂ (a temperature, a final BatchNorm or a
  second use of the head fail it);
- the head's weights feed nothing else (weight tying): checked once, against a forward pass, the first time the
  head has moved.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn
from torch.utils.data import DataLoader

from lightning_repair.adapter import BatchAdapter
from lightning_repair.curvature import batches, checked_logits, model_device

MAX_ELEMENTS = 2**24
"""At most this many head-input numbers are kept (64 MB in float32); a larger V is predicted by forward passes."""


@dataclass
class HeadCache:
    """The inputs of ``model``'s head on each batch of a loader, recorded at θ̂. Build with :meth:`record`."""

    model: nn.Module
    head: nn.Module
    inputs: list[Tensor]
    probe: Any
    adapter: BatchAdapter
    frozen: list[tuple[Tensor, Tensor]]
    head_at_build: list[Tensor]
    tying_checked: bool = False

    @classmethod
    @torch.no_grad()
    def record(cls, model: nn.Module, loader: DataLoader, adapter: BatchAdapter | None = None,
               max_elements: int = MAX_ELEMENTS) -> tuple["HeadCache | None", Tensor]:
        """One no-grad pass over ``loader``: the model's predicted classes, in order (on the CPU), and the cache,
        or None where it cannot serve this model (the reason is logged)."""
        adapter = adapter or BatchAdapter()
        head, reason = _last_module_with_parameters(model, loader, adapter)
        recorded: list[Tensor] = []
        calls, recording = [0], [reason is None]

        def keep_input(module: nn.Module, args: tuple, kwargs: dict) -> None:
            if recording[0]:
                calls[0] += 1
                if len(args) == 1 and not kwargs and isinstance(args[0], Tensor):
                    recorded.append(args[0].detach().clone())

        def declined(why: str) -> str:
            recording[0] = False
            recorded.clear()
            return why

        handle = head.register_forward_pre_hook(keep_input, with_kwargs=True) if head is not None else None
        device = model_device(model)
        predictions, agrees, probe, elements = [], torch.ones((), dtype=torch.bool, device=device), None, 0
        try:
            for index, (inputs, labels) in enumerate(batches(loader, model, adapter)):
                calls[0], before = 0, len(recorded)
                logits = checked_logits(model, inputs, labels, adapter, check_values=index == 0)
                predictions.append(logits.argmax(dim=1))
                if reason is not None:
                    continue
                if calls[0] != 1 or len(recorded) != before + 1:
                    reason = declined("the head is called more than once per batch, or with more than one tensor")
                    continue
                elements += recorded[-1].numel()
                if elements > max_elements:
                    reason = declined(f"its inputs over V would exceed {max_elements:,} numbers")
                    continue
                probe = inputs if probe is None else probe
                recording[0] = False  # the check below calls the head
                agrees = agrees & _close(head(recorded[-1]), logits)  # on the device: no host sync per batch
                recording[0] = True
        finally:
            if handle is not None:
                handle.remove()
        predicted = torch.cat(predictions).cpu() if predictions else torch.empty(0, dtype=torch.long)
        if reason is None and not recorded:
            reason = "there were no batches"
        if reason is None and not bool(agrees):  # one host sync for the whole pass
            reason = "the head's output is not the model's logits"
        if reason is not None:
            rank_zero_info(f"RepairCallback: predicting candidates by full forward passes ({reason}).")
            return None, predicted
        head_tensors = {id(t) for t in [*head.parameters(), *head.buffers()]}
        frozen = [(t, t.detach().clone()) for t in [*model.parameters(), *model.buffers()] if id(t) not in head_tensors]
        head_at_build = [p.detach().clone() for p in head.parameters()]
        return cls(model, head, recorded, probe, adapter, frozen, head_at_build), predicted

    @torch.no_grad()
    def predictions(self, model: nn.Module) -> Tensor | None:
        """``model``'s predicted classes on the recorded examples, in order, on the CPU; None where only a forward
        pass can tell (see the module docstring)."""
        if model is not self.model or any(m.training for m in model.modules()):
            return None
        if any(not torch.equal(live, value) for live, value in self.frozen):
            return None
        if not self.tying_checked and self._head_moved():
            self.tying_checked = True
            if not _close(self.head(self.inputs[0]), self.adapter.logits(model, self.probe)):
                rank_zero_info("RepairCallback: the head's weights feed other layers; predicting candidates by full "
                               "forward passes.")
                self.inputs = []
        if not self.inputs:
            return None
        return torch.cat([self.head(features).argmax(dim=1) for features in self.inputs]).cpu()

    def features(self, positions: Tensor) -> Tensor | None:
        """The head's recorded inputs (flattened, float32, on the model's device) of the examples at ``positions``;
        None once the cache has found it cannot serve."""
        if not self.inputs:
            return None
        flat = torch.cat([features.flatten(1) for features in self.inputs]).float()
        return flat[positions.to(flat.device)]

    def _head_moved(self) -> bool:
        return any(not torch.equal(p, value) for p, value in zip(self.head.parameters(), self.head_at_build))


def _last_module_with_parameters(model: nn.Module, loader: DataLoader, adapter: BatchAdapter
                                 ) -> tuple[nn.Module | None, str | None]:
    """The module with parameters of its own that runs last in a forward pass (the head), or why there is none."""
    owners = [m for m in model.modules() if any(True for _ in m.parameters(recurse=False))]
    if any(m.training for m in model.modules()):
        return None, "the model is in train mode"
    order: list[nn.Module] = []
    handles = [m.register_forward_hook(lambda module, args, output: order.append(module)) for m in owners]
    try:
        first = next(iter(batches(loader, model, adapter)), None)
        if first is None:
            return None, "there were no batches"
        adapter.logits(model, first[0])
    finally:
        for handle in handles:
            handle.remove()
    if not order:
        return None, "no module with parameters ran"
    head = order[-1]
    shared = {id(p) for p in head.parameters()}
    if any(id(p) in shared for m in owners if m is not head for p in m.parameters(recurse=False)):
        return None, "the head shares its parameters with another layer"
    return head, None


def _close(a: Tensor, b: Any) -> bool | Tensor:
    """Whether two logits tensors agree to float32 rounding (a 0-dim bool tensor; no host sync)."""
    if not isinstance(b, Tensor) or a.shape != b.shape:
        return torch.zeros((), dtype=torch.bool, device=a.device)
    return torch.isclose(a, b, rtol=1e-4, atol=1e-5).all()
