"""Treatment: move the model from θ̂ to θ⁻, erasing what it learnt from the causes.

Each method is a :class:`Treatment` class for the callback and LightningCLI, and a plain function usable
without a Trainer.
"""

from lightning_repair.treat.base import Treatment, TreatmentInputs
from lightning_repair.treat.best_of import BestOf
from lightning_repair.treat.ewc_unlearning import EWCUnlearning, ewc_unlearning
from lightning_repair.treat.energy import (EnergyAlignment, align_inputs, aligned_causes, energy, energy_alignment,
                                           energy_gradient, soft_labels)
from lightning_repair.treat.finetune import Finetune, finetune
from lightning_repair.treat.newton import NewtonRemoval, choose_step_size, lissa_inverse_hvp, newton_removal

__all__ = [
    "BestOf", "EWCUnlearning", "EnergyAlignment", "Finetune", "NewtonRemoval", "Treatment", "TreatmentInputs", "align_inputs",
    "aligned_causes", "choose_step_size", "energy", "energy_alignment", "energy_gradient", "ewc_unlearning",
    "finetune", "lissa_inverse_hvp", "newton_removal", "soft_labels",
]
