"""Identification: rank training examples by how likely each caused the failures (higher = more likely).

Each method is a :class:`Scorer` class for the callback and LightningCLI, and a plain function usable
without a Trainer.
"""

from lightning_repair.identify.base import Scorer, ScoringInputs
from lightning_repair.identify.baselines import RandomScores, TrainingLoss, training_loss
from lightning_repair.identify.ewc import EWCInfluence, ewc_influence, fit_to_failures, loss_change
from lightning_repair.identify.influence import GradientDot, LinearInfluence, linear_influence, natural_gradient
from lightning_repair.identify.knn_shapley import KNNShapley, embeddings, knn_shapley_scores, knn_shapley_values

__all__ = [
    "EWCInfluence", "GradientDot", "KNNShapley", "LinearInfluence", "RandomScores", "Scorer", "ScoringInputs",
    "TrainingLoss", "embeddings", "ewc_influence", "fit_to_failures", "knn_shapley_scores", "knn_shapley_values",
    "linear_influence", "loss_change", "natural_gradient", "training_loss",
]
