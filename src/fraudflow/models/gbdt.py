"""LightGBM gradient-boosted trees: the baseline every neural model must beat.

Categorical columns (``categorical_features``, their positions in x) hold integer codes;
LightGBM splits them by partitioning their values rather than by thresholds (its
``categorical_feature``).

Shape: x (N, F) float32, y (N,) in {0, 1}; predict_proba -> (N,) fraud probabilities.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import lightgbm as lgb
import numpy as np

from fraudflow.models.interface import VectorInputs

__all__ = ["GBDT"]


class GBDT:
    """LightGBM binary classifier with early stopping on validation average precision."""

    inputs = VectorInputs()

    def __init__(
        self,
        *,
        n_estimators: int,
        learning_rate: float,
        num_leaves: int,
        min_child_samples: int,
        subsample: float,
        colsample_bytree: float,
        early_stopping_rounds: int,
        num_threads: int,
        seed: int,
        categorical_features: tuple[int, ...] = (),
    ) -> None:
        self.params = {
            "objective": "binary",
            "learning_rate": learning_rate,
            "num_leaves": num_leaves,
            "min_child_samples": min_child_samples,
            "bagging_fraction": subsample,
            "bagging_freq": 1,
            "feature_fraction": colsample_bytree,
            "num_threads": num_threads,
            "seed": seed,
            "deterministic": True,
            "force_row_wise": True,
            "metric": "average_precision",
            "verbosity": -1,
        }
        self.n_estimators = n_estimators
        self.early_stopping_rounds = early_stopping_rounds
        self.categorical_features = categorical_features

    def fit(self, x: np.ndarray, y: np.ndarray, x_valid: np.ndarray, y_valid: np.ndarray) -> GBDT:
        # "auto", LightGBM's default, reads categories from pandas frames only: none here.
        categorical: list[int] | Literal["auto"] = (
            list(self.categorical_features) if self.categorical_features else "auto"
        )
        train = lgb.Dataset(x, label=y, free_raw_data=True, categorical_feature=categorical)
        valid = lgb.Dataset(x_valid, label=y_valid, reference=train)
        self.booster_ = lgb.train(
            self.params,
            train,
            num_boost_round=self.n_estimators,
            valid_sets=[valid],
            callbacks=[lgb.early_stopping(self.early_stopping_rounds, verbose=False)],
        )
        self.best_iteration_ = int(self.booster_.best_iteration or self.n_estimators)
        return self

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        scores = self.booster_.predict(x, num_iteration=self.best_iteration_)
        return np.asarray(scores, dtype=np.float64)

    def save(self, path: Path) -> None:
        self.booster_.save_model(str(path), num_iteration=self.best_iteration_)
