"""The seams between the trainer and the models.

Two kinds of model share one data path and one metrics path:

* ``NeuralModel``: a torch module trained by ``fraudflow.train.loop``. It takes a dict of input
  tensors, all sliced on their first (batch) dimension, and returns class logits.
  Shape: inputs["x"] is (B, F - C) float32, the standardised numeric columns; with C > 0
  categorical columns, inputs["codes"] is (B, C) int64 (``preprocessing.neural_inputs``);
  the output is (B, 2).
* ``Estimator``: a model with its own fitting procedure (LightGBM), trained on NumPy arrays.
  Shape: x is (N, F) float32, the model matrix (categorical columns hold their codes), y is
  (N,) int; ``predict_proba`` returns (N,) fraud probabilities.

A model is told which columns of the model matrix are categorical (``Categorical``: the
position and the number of codes), never what they mean.

A neural model may declare ``cuda_graph_safe = True`` (a class attribute): its forward has
shapes fixed by the batch's and no host synchronisation, so the trainer may capture and replay
its whole training step as a CUDA graph. Models without it train eagerly.

The trainer relies on these protocols only, never on a concrete model.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
from torch import Tensor

__all__ = ["Categorical", "Estimator", "NeuralModel"]


@dataclass(frozen=True)
class Categorical:
    """A column of the model matrix that holds integer codes 0 .. cardinality - 1 (0: unseen)."""

    position: int
    cardinality: int


@runtime_checkable
class NeuralModel(Protocol):
    def __call__(self, inputs: dict[str, Tensor]) -> Tensor: ...

    def parameters(self, recurse: bool = True) -> Any: ...

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, Any]: ...

    def load_state_dict(
        self, state_dict: Any, strict: bool = True, assign: bool = False
    ) -> Any: ...

    def train(self, mode: bool = True) -> Any: ...

    def eval(self) -> Any: ...


@runtime_checkable
class Estimator(Protocol):
    def fit(
        self, x: np.ndarray, y: np.ndarray, x_valid: np.ndarray, y_valid: np.ndarray
    ) -> Estimator: ...

    def predict_proba(self, x: np.ndarray) -> np.ndarray: ...

    def save(self, path: Path) -> None: ...
