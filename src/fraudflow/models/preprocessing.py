"""Input standardisation, fitted on training rows only.

Shape: x is (N, F); mean and std are (F,).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

__all__ = ["Standardizer"]

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
