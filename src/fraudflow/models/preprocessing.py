"""Input standardisation, fitted on training rows only, and the neural models' inputs.

Shape: x is (N, F); mean and std are (F,). ``neural_inputs``: the model matrix (N, F) with C
categorical columns -> "x" (N, F - C) standardised and, when C > 0, "codes" (N, C) int64.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from fraudflow.models.interface import Categorical

__all__ = ["Standardizer", "neural_inputs", "numeric_columns"]

# Standardised values are clipped: a handful of extreme rows (e.g. a 50x amount ratio) would
# otherwise dominate the first layer's activations.
CLIP = 10.0
MIN_STD = 1e-6


@dataclass(frozen=True)
class Standardizer:
    mean: Tensor  # (F,)
    std: Tensor  # (F,)

    @classmethod
    def fit(cls, x: Tensor) -> Standardizer:
        """Moments of the present values: a missing one (NaN) is left out of them."""
        x64 = x.double()
        mean = torch.nanmean(x64, dim=0).nan_to_num(0.0)
        variance = torch.nanmean((x64 - mean) ** 2, dim=0).nan_to_num(0.0)
        return cls(mean=mean.float(), std=variance.sqrt().clamp_min(MIN_STD).float())

    @classmethod
    def from_moments(cls, mean: Tensor, variance: Tensor) -> Standardizer:
        std = variance.double().sqrt().clamp_min(MIN_STD)
        return cls(mean=mean.float(), std=std.float())

    def transform(self, x: Tensor) -> Tensor:
        """Standardised and clipped; a missing value (NaN, e.g. a feature over an empty
        window) becomes 0, the training mean."""
        mean, std = self.mean.to(x.device), self.std.to(x.device)
        return ((x - mean) / std).clamp(-CLIP, CLIP).nan_to_num(0.0)

    def to_dict(self) -> dict[str, Any]:
        return {"mean": self.mean.tolist(), "std": self.std.tolist()}

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> Standardizer:
        return cls(
            mean=torch.tensor(raw["mean"], dtype=torch.float32),
            std=torch.tensor(raw["std"], dtype=torch.float32),
        )


def numeric_columns(matrix: Tensor, categorical: Sequence[Categorical]) -> Tensor:
    """The model matrix's numeric columns (N, F - C): what the standardiser is fitted on."""
    if not categorical:
        return matrix
    skip = {c.position for c in categorical}
    keep = [j for j in range(matrix.shape[1]) if j not in skip]
    return matrix[:, keep]


def neural_inputs(
    matrix: Tensor, categorical: Sequence[Categorical], standardizer: Standardizer
) -> dict[str, Tensor]:
    """A neural model's inputs from the model matrix (N, F) (see the module docstring)."""
    inputs = {"x": standardizer.transform(numeric_columns(matrix, categorical))}
    if categorical:
        positions = [c.position for c in categorical]
        inputs["codes"] = matrix[:, positions].long()  # (N, C)
    return inputs
