"""Predictions of a model whose last layer alone moved, from that layer's inputs recorded once.

Treatments move only the classification head by default (EWC deletion, fine-tuning), and a round predicts V many
times after one: every candidate is judged on F_q and R_q, and the choice on F_h and R. The layers below the head
do not move, so neither do the head's inputs. One no-grad pass over V at θ̂ records them (Lightning's validation
loop, when the callback can read it, else the round's own pass); after it, a model's predictions cost the head
alone, one small matrix multiply per batch instead of a forward pass.

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
from lightning_repair.examples import Rows
from lightning_repair.identify.base import RecordedInputs

MAX_ELEMENTS = 2**24
"""At most this many head-input numbers are kept (64 MB in float32); a larger V is predicted by forward passes."""


@dataclass(frozen=True)
class HeadInputs:
    """The inputs of a model's head on each batch of a pass over V at θ̂, in order, from :class:`HeadRecorder`.

    Attributes:
        head: the head's name in the model (``model.named_modules()``), so that a copy of the model finds its own.
        inputs: one tensor per batch.
        probe: the first batch's model inputs, for the weight-tying check.
    """

    head: str
    inputs: list[Tensor]
    probe: Any


class HeadRecorder:
    """Records a model's head inputs batch by batch during a no-grad pass over V that someone else runs: the round's
    own (:meth:`HeadCache.record`) or Lightning's validation loop (the callback), which then costs nothing extra.

    Built on the pass's first batch, before the model sees it. That batch's own forward finds the head (the last
    module with parameters to finish), so the recorder adds no forward of its own and the user's module runs exactly
    the calls it would without it. After each batch, :meth:`batch_done` gets the logits the pass computed;
    :meth:`finish` gives the inputs, or None (the reason is logged) wherever a cache could not serve.
    """

    def __init__(self, model: nn.Module, first_inputs: Any, max_elements: int = MAX_ELEMENTS) -> None:
        self.model, self.max_elements, self.probe, self.elements = model, max_elements, first_inputs, 0
        self.recorded: list[Tensor] = []
        self.calls, self.batches, self.paused = 0, 0, False
        self.agrees = torch.ones((), dtype=torch.bool, device=model_device(model))
        self.head: nn.Module | None = None
        self.name: str | None = None
        self.handle: Any = None
        self.reason = "the model is in train mode" if any(m.training for m in model.modules()) else None
        # Until the first batch is done, every module with parameters is watched: the last to finish is the head.
        self.owners = [m for m in model.modules() if any(True for _ in m.parameters(recurse=False))]
        self.started: dict[int, Tensor | None] = {}  # inputs of the watched modules now running
        self.last_finished: tuple[nn.Module, Tensor | None] | None = None  # keeps one input, not the whole pass's
        self.finish_counts: dict[int, int] = {}
        self.discovery = [] if self.reason is not None else [
            handle for m in self.owners
            for handle in (m.register_forward_pre_hook(self._watch_start, with_kwargs=True),
                           m.register_forward_hook(self._watch_finish))]

    def _watch_start(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        single = len(args) == 1 and not kwargs and isinstance(args[0], Tensor)
        self.started[id(module)] = args[0].detach().clone() if single else None

    def _watch_finish(self, module: nn.Module, args: tuple, output: Any) -> None:
        self.last_finished = module, self.started.pop(id(module), None)
        self.finish_counts[id(module)] = self.finish_counts.get(id(module), 0) + 1

    def _found_head(self) -> None:
        """After the first batch's forward: the head is the last watched module to finish; from now on only its
        inputs are recorded."""
        for handle in self.discovery:
            handle.remove()
        self.discovery = []
        if self.last_finished is None:
            self.reason = self.reason or "no module with parameters ran"
            return
        head, first_input = self.last_finished
        shared = {id(p) for p in head.parameters()}
        if any(id(p) in shared for m in self.owners if m is not head for p in m.parameters(recurse=False)):
            self.reason = self.reason or "the head shares its parameters with another layer"
            return
        self.head, self.calls = head, self.finish_counts[id(head)]
        self.name = next((name for name, m in self.model.named_modules() if m is head), None)
        if first_input is not None:
            self.recorded.append(first_input)
        self.handle = head.register_forward_pre_hook(self._keep_input, with_kwargs=True)

    def _keep_input(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if self.paused:
            return
        self.calls += 1
        if len(args) == 1 and not kwargs and isinstance(args[0], Tensor):
            self.recorded.append(args[0].detach().clone())

    def _decline(self, why: str) -> None:
        self.reason = self.reason or why
        self.recorded.clear()
        self.close()

    @torch.no_grad()
    def batch_done(self, logits: Tensor) -> None:
        """After the pass's forward of one batch: check that the head ran once, on one tensor, and gave ``logits``."""
        if self.discovery:
            self._found_head()
        if self.reason is not None:
            return
        calls, self.calls = self.calls, 0
        if calls != 1 or len(self.recorded) != self.batches + 1:
            return self._decline("the head is called more than once per batch, or with more than one tensor")
        if self.recorded[-1].dtype != next(self.head.parameters()).dtype:
            return self._decline("the pass ran in another precision than the head's weights (autocast)")
        self.elements += self.recorded[-1].numel()
        if self.elements > self.max_elements:
            return self._decline(f"its inputs over V would exceed {self.max_elements:,} numbers")
        self.paused = True  # the check below calls the head
        self.agrees = self.agrees & _close(self.head(self.recorded[-1]), logits)  # on the device: no host sync
        self.paused = False
        self.batches += 1

    def finish(self, log: bool = True) -> HeadInputs | None:
        """The recorded inputs, or None (and, with ``log``, the reason logged) where a cache could not serve."""
        self.close()
        if self.reason is None and not self.recorded:
            self.reason = "there were no batches"
        if self.reason is None and len(self.recorded) != self.batches:
            self.reason = "the pass ended inside a batch"
        if self.reason is None and not bool(self.agrees):  # one host sync for the whole pass
            self.reason = "the head's output is not the model's logits"
        if self.reason is not None:
            if log:
                rank_zero_info(f"RepairCallback: predicting candidates by full forward passes ({self.reason}).")
            return None
        return HeadInputs(self.name, self.recorded, self.probe)

    def close(self) -> None:
        """Removes the hooks (a pass that ends early must call it)."""
        for handle in self.discovery:
            handle.remove()
        self.discovery = []
        if self.handle is not None:
            self.handle.remove()
            self.handle = None


@dataclass
class HeadCache:
    """The inputs of ``model``'s head on each batch of a loader, recorded at θ̂. Build with :meth:`record` (its own
    pass) or :meth:`from_inputs` (inputs a :class:`HeadRecorder` took from another pass)."""

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
        recorder: HeadRecorder | None = None
        predictions = Rows.of(loader)
        try:
            for index, (inputs, labels) in enumerate(batches(loader, model, adapter)):
                recorder = recorder or HeadRecorder(model, inputs, max_elements)
                logits = checked_logits(model, inputs, labels, adapter, check_values=index == 0)
                predictions.append(logits.argmax(dim=1))
                recorder.batch_done(logits)
        finally:
            if recorder is not None:
                recorder.close()
        predicted = predictions.tensor(torch.empty(0, dtype=torch.long)).cpu()
        if recorder is None:
            rank_zero_info("RepairCallback: predicting candidates by full forward passes (there were no batches).")
            return None, predicted
        recorded = recorder.finish()
        return (cls.from_inputs(model, recorded, adapter) if recorded is not None else None), predicted

    @classmethod
    def from_inputs(cls, model: nn.Module, recorded: HeadInputs, adapter: BatchAdapter | None = None) -> "HeadCache":
        """A cache for ``model`` (at θ̂; the recorded model itself or a copy of it) from a recorder's inputs."""
        head = dict(model.named_modules())[recorded.head]
        head_tensors = {id(t) for t in [*head.parameters(), *head.buffers()]}
        frozen = [(t, t.detach().clone()) for t in [*model.parameters(), *model.buffers()] if id(t) not in head_tensors]
        head_at_build = [p.detach().clone() for p in head.parameters()]
        return cls(model, head, recorded.inputs, recorded.probe, adapter or BatchAdapter(), frozen, head_at_build)

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

    def scorer_inputs(self, query: Tensor, trusted: Tensor, labels: Tensor) -> RecordedInputs | None:
        """The recorded inputs (flattened, float32, on the model's device) and labels of F_q and of F_q ∪ R_q, given
        as positions in V, for a scorer; None once the cache has found it cannot serve."""
        if not self.inputs:
            return None
        flat = torch.cat([features.flatten(1) for features in self.inputs]).float()

        def at(positions: Tensor) -> tuple[Tensor, Tensor]:
            return flat[positions.to(flat.device)], labels[positions].to(flat.device)

        return RecordedInputs(self.head, at(query), at(trusted))

    def _head_moved(self) -> bool:
        return any(not torch.equal(p, value) for p, value in zip(self.head.parameters(), self.head_at_build))


def _close(a: Tensor, b: Any) -> bool | Tensor:
    """Whether two logits tensors agree to float32 rounding (a 0-dim bool tensor; no host sync)."""
    if not isinstance(b, Tensor) or a.shape != b.shape:
        return torch.zeros((), dtype=torch.bool, device=a.device)
    return torch.isclose(a, b, rtol=1e-4, atol=1e-5).all()
