"""``build_model``: the one place that maps a model name and its config to a model."""

from __future__ import annotations

import torch

from fraudflow.config import GBDTConfig, TrainConfig
from fraudflow.errors import ConfigError
from fraudflow.models.gbdt import GBDT
from fraudflow.models.interface import Categorical, Estimator, NeuralModel
from fraudflow.models.mlp import MLP

__all__ = ["MODEL_NAMES", "NEURAL_MODELS", "build_model"]

NEURAL_MODELS = ("mlp",)
MODEL_NAMES = ("mlp", "gbdt")


def build_model(
    name: str,
    *,
    n_features: int,
    train: TrainConfig,
    gbdt: GBDTConfig,
    categorical: tuple[Categorical, ...] = (),
) -> NeuralModel | Estimator:
    """``n_features``: columns of the model matrix, ``categorical`` among them."""
    if name == "mlp":
        # Seeded here so that the initial weights depend on the run's seed only.
        torch.manual_seed(train.seed)
        return MLP(
            n_features=n_features - len(categorical), hidden_sizes=train.hidden_sizes,
            dropout=train.dropout, cardinalities=tuple(c.cardinality for c in categorical),
        )  # fmt: skip
    if name == "gbdt":
        return GBDT(
            n_estimators=gbdt.n_estimators,
            learning_rate=gbdt.learning_rate,
            num_leaves=gbdt.num_leaves,
            min_child_samples=gbdt.min_child_samples,
            subsample=gbdt.subsample,
            colsample_bytree=gbdt.colsample_bytree,
            early_stopping_rounds=gbdt.early_stopping_rounds,
            num_threads=gbdt.num_threads,
            seed=train.seed,
            categorical_features=tuple(c.position for c in categorical),
        )
    raise ConfigError(f"--model must be one of {', '.join(MODEL_NAMES)}, however got {name!r}")
