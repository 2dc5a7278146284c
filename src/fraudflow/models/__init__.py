"""Models behind one interface: the MLP, the sequence Transformer and the LightGBM baseline
(tensors, not frames). Each declares its inputs (``interface``)."""

from fraudflow.models.gbdt import GBDT
from fraudflow.models.interface import (
    Categorical,
    Estimator,
    FeatureLayout,
    GraphInputs,
    InputSpec,
    NeuralModel,
    SequenceInputs,
    VectorInputs,
    input_spec_from_dict,
    predict_batch_rows,
)
from fraudflow.models.mlp import MLP
from fraudflow.models.preprocessing import Standardizer, neural_inputs, numeric_columns
from fraudflow.models.registry import MODEL_NAMES, NEURAL_MODELS, build_model
from fraudflow.models.sequence import SequenceTransformer

__all__ = [
    "GBDT",
    "MLP",
    "MODEL_NAMES",
    "NEURAL_MODELS",
    "Categorical",
    "Estimator",
    "FeatureLayout",
    "GraphInputs",
    "InputSpec",
    "NeuralModel",
    "SequenceInputs",
    "SequenceTransformer",
    "Standardizer",
    "VectorInputs",
    "build_model",
    "input_spec_from_dict",
    "neural_inputs",
    "numeric_columns",
    "predict_batch_rows",
]
