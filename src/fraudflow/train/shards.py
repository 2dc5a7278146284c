"""Training rows streamed from Parquet shards, one shard per loop segment.

Used when the feature table is a folder: only the current shard is in memory. On CUDA the
host copy is pinned so that the transfer to the device runs asynchronously. Shard sizes and
label counts come from cheap aggregate scans; the standardiser is fitted from per-shard sums,
so fitting it never needs the whole table either.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import polars as pl
import torch

from fraudflow.data.schema import IS_FRAUD
from fraudflow.inputs import FeatureInputs, build_arrays, stands_alone
from fraudflow.models import InputSpec, Standardizer
from fraudflow.train.loop import TensorData

__all__ = ["ShardRows", "fit_standardizer"]


def _counts(fit: pl.LazyFrame) -> tuple[int, int]:
    row = fit.select(pl.len(), pl.col(IS_FRAUD).sum()).collect().row(0)
    return int(row[0]), int(row[1] or 0)


@dataclass
class ShardRows:
    """TrainingRows over lazy per-shard scans, already filtered to the fit period: each shard's
    rows become the inputs ``declared`` names, a kind whose rows stand alone."""

    shards: list[pl.LazyFrame]
    inputs: FeatureInputs
    standardizer: Standardizer
    declared: InputSpec

    def __post_init__(self) -> None:
        assert stands_alone(self.declared), "a row that reads other rows needs the whole table"
        counts = [_counts(s) for s in self.shards]
        self._sizes = [c[0] for c in counts]
        self._positives = sum(c[1] for c in counts)

    def __len__(self) -> int:
        return sum(self._sizes)

    def positives(self) -> int:
        return self._positives

    def segment_sizes(self) -> list[int]:
        return list(self._sizes)

    def for_device(self, device: torch.device) -> ShardRows:
        return self  # streamed: each shard reaches the device when its segment comes

    def segment(self, index: int, device: torch.device) -> TensorData:
        frame = self.shards[index].select(*self.inputs.features, IS_FRAUD).collect()
        arrays = build_arrays(self.declared, frame, self.inputs, self.standardizer)
        y = torch.from_numpy(frame[IS_FRAUD].to_numpy().astype(np.int64))  # (n,)
        data = TensorData(inputs=arrays.rows, labels=y, shared=arrays.shared)
        if device.type == "cuda":
            data = _pinned(data)
        return data.to(device)


def _pinned(data: TensorData) -> TensorData:
    """Page-locked host copies, so that the transfer to the device runs asynchronously."""
    return TensorData(
        inputs={k: v.pin_memory() for k, v in data.inputs.items()},
        labels=data.labels.pin_memory(),
        shared={k: v.pin_memory() for k, v in data.shared.items()},
    )


def fit_standardizer(shards: list[pl.LazyFrame], features: list[str]) -> Standardizer:
    """Mean and standard deviation of each feature over all shards, from per-shard sums of
    the present values (nulls are left out, as ``Standardizer.fit`` leaves out NaN)."""
    sums = np.zeros(len(features))
    squares = np.zeros(len(features))
    rows = np.zeros(len(features))
    for shard in shards:
        cast = [pl.col(f).cast(pl.Float64) for f in features]
        agg = shard.select(
            *(c.sum().alias(f"s{i}") for i, c in enumerate(cast)),
            *((c * c).sum().alias(f"q{i}") for i, c in enumerate(cast)),
            *(c.count().alias(f"n{i}") for i, c in enumerate(cast)),
        ).collect()
        sums += np.array([agg[f"s{i}"][0] for i in range(len(features))], dtype=np.float64)
        squares += np.array([agg[f"q{i}"][0] for i in range(len(features))], dtype=np.float64)
        rows += np.array([agg[f"n{i}"][0] for i in range(len(features))], dtype=np.float64)
    mean = sums / np.maximum(rows, 1)
    variance = np.maximum(squares / np.maximum(rows, 1) - mean**2, 0.0)
    return Standardizer.from_moments(torch.from_numpy(mean), torch.from_numpy(variance))
