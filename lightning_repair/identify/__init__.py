"""Identification: rank training examples by how likely each caused the failures (higher = more likely).

Each method is a :class:`Scorer` class for the callback and LightningCLI, and a plain function usable
without a Trainer.
"""

from lightning_repair.identify.base import RecordedInputs, Scorer, ScoringInputs
from lightning_repair.identify.baselines import RandomScores, TrainingLoss, training_loss
from lightning_repair.identify.ewc import EWCInfluence, ewc_influence
from lightning_repair.identify.influence import GradientDot, LinearInfluence, linear_influence
from lightning_repair.identify.knn_shapley import KNNShapley, knn_shapley_scores, knn_shapley_values

# The scorers and their plain functions; helpers (embeddings, loss_change, ...) stay in their modules.
__all__ = [
    "EWCInfluence", "GradientDot", "KNNShapley", "LinearInfluence", "RandomScores", "RecordedInputs", "Scorer",
    "ScoringInputs", "TrainingLoss", "ewc_influence", "knn_shapley_scores", "knn_shapley_values", "linear_influence",
    "training_loss",
]
