"""A model's inputs from feature rows: exactly what the model declares (STYLE habit 14).

``FeatureInputs`` holds the features in order and the codes of the categorical ones: it makes
a frame's model matrix and the ``FeatureLayout`` a model is built with. ``build_arrays`` turns
a frame of feature rows, in arrival order, into the tensors of the model's ``InputSpec``
(``fraudflow.models.interface`` names them): per-row tensors for every row of the frame, and
shared tables. The trainer, the bundle and any later scorer call this one function, so a new
kind of input is built in one place.

A vector row stands alone; a sequence row reads the card's earlier rows, and a graph row its
card's and terminal's earlier rows and their neighbours' (``fraudflow.features.graph``), so
their frame must hold them (``stands_alone``): the whole feature table, in the order it was
written.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import polars as pl
import torch
from torch import Tensor

from fraudflow.data.schema import CUSTOMER_ID, TERMINAL_ID, TIMESTAMP
from fraudflow.errors import ConfigError
from fraudflow.features.categories import CategoryCodes, matrix_from_frame
from fraudflow.features.graph import Fanout, TransactionGraph, slot_gaps
from fraudflow.features.sequences import card_histories
from fraudflow.models import (
    Categorical,
    FeatureLayout,
    GraphInputs,
    InputSpec,
    SequenceInputs,
    Standardizer,
    VectorInputs,
    neural_inputs,
)

__all__ = ["FeatureInputs", "ModelArrays", "build_arrays", "sequence_arrays", "stands_alone"]


@dataclass(frozen=True)
class FeatureInputs:
    """How feature rows become the model matrix: the features in order, the codes of the
    categorical ones (None: all numeric)."""

    features: list[str]
    codes: CategoryCodes | None = None

    @property
    def layout(self) -> FeatureLayout:
        categorical: tuple[Categorical, ...] = ()
        if self.codes is not None:
            categorical = tuple(
                Categorical(self.features.index(c), self.codes.cardinality(c))
                for c in self.codes.columns
            )
        return FeatureLayout(n_features=len(self.features), categorical=categorical)

    @property
    def numeric(self) -> list[str]:
        return [f for f in self.features if self.codes is None or f not in self.codes.values]

    def matrix(self, frame: pl.DataFrame) -> np.ndarray:
        return matrix_from_frame(frame, self.features, self.codes)  # (N, F)


@dataclass(frozen=True)
class ModelArrays:
    """Per-row tensors, each (N, ...), and shared tables that they index into."""

    rows: dict[str, Tensor]
    shared: dict[str, Tensor]

    def take(self, positions: Tensor) -> ModelArrays:
        """The rows at ``positions`` (K,) int64; shared tables stay whole."""
        return ModelArrays({k: v[positions] for k, v in self.rows.items()}, self.shared)


def stands_alone(declared: InputSpec) -> bool:
    """Whether a row's inputs come from the row alone (else from the card's earlier rows too)."""
    return isinstance(declared, VectorInputs)


def build_arrays(
    declared: InputSpec, frame: pl.DataFrame, inputs: FeatureInputs, standardizer: Standardizer
) -> ModelArrays:
    """The declared inputs of every row of ``frame`` (feature rows in arrival order)."""
    matrix = torch.from_numpy(inputs.matrix(frame))  # (N, F)
    vector = neural_inputs(matrix, inputs.layout.categorical, standardizer)
    match declared:
        case VectorInputs():
            return ModelArrays(rows=vector, shared={})
        case SequenceInputs(length=length):
            return _sequence_arrays(frame, vector, length)
        case GraphInputs(hop1=hop1, hop2=hop2):
            return _graph_arrays(frame, vector, Fanout(hop1=hop1, hop2=hop2))
    raise ConfigError(f"no inputs are built for the kind {declared.kind!r}")


def _sequence_arrays(frame: pl.DataFrame, vector: dict[str, Tensor], length: int) -> ModelArrays:
    missing = [c for c in (CUSTOMER_ID, TIMESTAMP) if c not in frame.columns]
    if missing:
        raise ConfigError(
            f"a sequence model reads each card's events, however the feature rows have no "
            f"{', '.join(missing)} column"
        )
    seconds = frame[TIMESTAMP].dt.epoch("us").to_numpy() / 1e6  # (N,)
    history, gaps = card_histories(frame[CUSTOMER_ID].to_numpy(), seconds, length)
    return sequence_arrays(vector, history, gaps)


def sequence_arrays(
    vector: dict[str, Tensor], history: np.ndarray, gaps: np.ndarray
) -> ModelArrays:
    """A sequence model's inputs: the events' vectors (``neural_inputs`` of their model
    matrix) as shared tables, each row's history (Q, T) into them and its gaps (Q, T, 2).
    The batch builds the histories from a table (``card_histories``), the service from each
    card's stored events (``fraudflow.serve.sequence_scoring``)."""
    shared = {"events": vector["x"]}  # (N, F - C)
    if "codes" in vector:
        shared["event_codes"] = vector["codes"]  # (N, C)
    rows = {"history": torch.from_numpy(history), "gaps": torch.from_numpy(gaps)}
    return ModelArrays(rows=rows, shared=shared)


def _graph_arrays(frame: pl.DataFrame, vector: dict[str, Tensor], fanout: Fanout) -> ModelArrays:
    missing = [c for c in (CUSTOMER_ID, TERMINAL_ID, TIMESTAMP) if c not in frame.columns]
    if missing:
        raise ConfigError(
            "a graph model reads each card's and terminal's earlier transactions, however the "
            f"feature rows have no {', '.join(missing)} column"
        )
    times_us = frame[TIMESTAMP].dt.epoch("us").to_numpy()  # (N,)
    graph = TransactionGraph(frame[CUSTOMER_ID].to_numpy(), frame[TERMINAL_ID].to_numpy(), times_us)
    rows = dict(vector)  # the row's own "x" (and "codes")
    for name, slots in graph.sample(np.arange(frame.height), fanout).parts().items():
        rows[name] = torch.from_numpy(slots)  # (N, K1) or (N, K1, K2)
        rows[f"{name}_gap"] = torch.from_numpy(slot_gaps(slots, times_us, times_us))
    # The edges' vectors: every row's standardised numeric features (N, F - C).
    return ModelArrays(rows=rows, shared={"events": vector["x"]})
