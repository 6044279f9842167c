"""How lightning-repair reads a user's batches and model: inputs, labels and logits.

Everything else in the library goes through one :class:`BatchAdapter`, so supporting a new batch format
means overriding one small class (the pattern of kronfluence's ``Task``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from lightning.fabric.utilities.apply_func import move_data_to_device
from torch import Tensor, nn

INPUT_KEYS = ("x", "input", "inputs", "image", "images", "pixel_values")
LABEL_KEYS = ("y", "label", "labels", "target", "targets")


class BatchAdapter:
    """Takes inputs, labels and logits from a batch and a model.

    The default handles ``(x, y, ...)`` tuples and lists, and dicts keyed by one of
    ``x/input/inputs/image/images/pixel_values`` and one of ``y/label/labels/target/targets``; logits are
    ``model(inputs)``. Subclass and override :meth:`inputs`, :meth:`labels` or :meth:`logits` for anything
    else, and pass an instance as ``RepairCallback(adapter=...)``.
    """

    def inputs(self, batch: Any) -> Any:
        """Returns the model inputs of ``batch``."""
        if isinstance(batch, Mapping):
            return batch[_find_key(batch, INPUT_KEYS, "inputs")]
        if isinstance(batch, Sequence) and not isinstance(batch, str) and len(batch) >= 2:
            return batch[0]
        raise _format_error(batch)

    def labels(self, batch: Any) -> Tensor:
        """Returns the integer class labels of ``batch`` as a 1-D long tensor."""
        if isinstance(batch, Mapping):
            labels = batch[_find_key(batch, LABEL_KEYS, "labels")]
        elif isinstance(batch, Sequence) and not isinstance(batch, str) and len(batch) >= 2:
            labels = batch[1]
        else:
            raise _format_error(batch)
        labels = torch.as_tensor(labels)
        if labels.dim() != 1 or labels.is_floating_point():
            raise ValueError(
                f"Expected labels as a 1-D tensor of class indices, got dtype {labels.dtype} and shape "
                f"{tuple(labels.shape)}. lightning-repair repairs classifiers trained with cross-entropy on "
                "integer labels; override `BatchAdapter.labels` if your labels are stored differently."
            )
        return labels.long()

    def logits(self, model: nn.Module, inputs: Any) -> Tensor:
        """Returns class logits of shape ``(batch, classes)`` for ``inputs``."""
        return model(inputs)


def _find_key(batch: Mapping, keys: tuple[str, ...], what: str) -> str:
    for key in keys:
        if key in batch:
            return key
    raise ValueError(
        f"Cannot find the {what} in a batch with keys {sorted(batch)}: expected one of {list(keys)}. "
        "Subclass `lightning_repair.BatchAdapter` and pass it as `RepairCallback(adapter=...)`."
    )


def _format_error(batch: Any) -> ValueError:
    return ValueError(
        f"Cannot read a batch of type {type(batch).__name__}: the default adapter understands `(inputs, labels)` "
        "tuples/lists and dicts with input and label keys. Subclass `lightning_repair.BatchAdapter` and pass it "
        "as `RepairCallback(adapter=...)`."
    )


def to_device(data: Any, device: torch.device) -> Any:
    """Moves tensors in ``data`` (any nesting of sequences and mappings) to ``device``."""
    return move_data_to_device(data, device)
