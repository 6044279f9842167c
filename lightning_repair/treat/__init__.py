"""Treatment: move the model from θ̂ to θ⁻, erasing what it learnt from the causes.

Each method is a :class:`Treatment` class for the callback and LightningCLI, and a plain function usable
without a Trainer.
"""

from lightning_repair.treat.base import Treatment, TreatmentInputs
from lightning_repair.treat.best_of import BestOf
from lightning_repair.treat.ewc_unlearning import EWCUnlearning, ewc_unlearning
from lightning_repair.treat.energy import EnergyAlignment, energy_alignment
from lightning_repair.treat.exclude import Exclude
from lightning_repair.treat.finetune import Finetune, finetune
from lightning_repair.treat.newton import NewtonRemoval, newton_removal

# The treatments and their plain functions; helpers (lissa_inverse_hvp, energy, ...) stay in their modules.
__all__ = [
    "BestOf", "EWCUnlearning", "EnergyAlignment", "Exclude", "Finetune", "NewtonRemoval", "Treatment",
    "TreatmentInputs", "energy_alignment", "ewc_unlearning", "finetune", "newton_removal",
]
