"""Models behind one interface: the MLP and the LightGBM baseline (tensors, not frames)."""

from fraudflow.models.gbdt import GBDT
from fraudflow.models.interface import Categorical, Estimator, NeuralModel
from fraudflow.models.mlp import MLP
from fraudflow.models.preprocessing import Standardizer, neural_inputs, numeric_columns
from fraudflow.models.registry import MODEL_NAMES, NEURAL_MODELS, build_model

__all__ = [
    "GBDT",
    "MLP",
    "MODEL_NAMES",
    "NEURAL_MODELS",
    "Categorical",
    "Estimator",
    "NeuralModel",
    "Standardizer",
    "build_model",
    "neural_inputs",
    "numeric_columns",
]
