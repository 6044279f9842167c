"""Fine-tuning on D \\ C from θ̂ (the paper's reference treatment)."""

from __future__ import annotations

from torch import nn
from torch.utils.data import DataLoader

from lightning_repair.adapter import BatchAdapter
from lightning_repair.optimize import FitResult, anchored_fit
from lightning_repair.treat.base import Treatment, TreatmentInputs


def finetune(model: nn.Module, kept_loader: DataLoader, steps: int = 100, lr: float = 1e-3,
             adapter: BatchAdapter | None = None) -> FitResult:
    """Trains ``model`` in place for ``steps`` Adam steps on D \\ C (``kept_loader``, shuffled)."""
    return anchored_fit(model, kept_loader, direction=1.0, fisher=None, anchor_weight=0.0, lr=lr,
                        max_steps=steps, adapter=adapter)


class Finetune(Treatment):
    """Fine-tune on D \\ C. During training the user's own training, which goes on without C, continues it.

    Args:
        steps: Adam steps on D \\ C within the round; 0 leaves the weights to the continuing training.
        lr: Adam's learning rate.
    """

    def __init__(self, steps: int = 100, lr: float = 1e-3) -> None:
        if steps < 0 or lr <= 0:
            raise ValueError(f"Finetune needs steps ≥ 0 and lr > 0, got {steps} and {lr}.")
        self.steps, self.lr = steps, lr

    def treat(self, inputs: TreatmentInputs) -> None:
        if self.steps:
            finetune(inputs.model, inputs.kept, self.steps, self.lr, inputs.adapter)
