"""Treatment: move the model from θ̂ to θ⁻, erasing what it learnt from the causes.

Each method is a :class:`Treatment` class for the callback and LightningCLI, and a plain function usable
without a Trainer.
"""

from lightning_repair.treat.base import Treatment, TreatmentInputs
from lightning_repair.treat.ewc_unlearning import EWCUnlearning, ewc_unlearning
from lightning_repair.treat.finetune import Finetune, finetune

__all__ = ["EWCUnlearning", "Finetune", "Treatment", "TreatmentInputs", "ewc_unlearning", "finetune"]
