"""The seams between the trainer and the models.

Every model declares what it consumes (``inputs``, an ``InputSpec``); the data path, the loop,
the bundle and the service build exactly that, and never ask which class a model is. Inputs
come as two dicts of tensors: per-row ones, all (N, ...) and sliced on their first dimension
by the loop (batches, DDP shards, back-off, resume), and shared tables, passed whole with every
batch, that per-row indices point into. The kinds:

* ``VectorInputs``: the row's own feature vector. Per row: "x" (B, F - C) float32, the
  standardised numeric columns; with C > 0 categorical columns, "codes" (B, C) int64
  (``preprocessing.neural_inputs``).
* ``SequenceInputs``: the card's last ``length`` events (T), the current one last, padding on
  the left. Per row: "history" (B, T) int64, positions in the shared event table, -1 where
  padded; "gaps" (B, T, 2) float32, log1p of the seconds from each event to the current one
  and from the card's previous event to it (0 where padded). Shared: "events" (M, F - C) the
  standardised numeric columns of every event, and with C > 0 "event_codes" (M, C) int64.
  Built point-in-time by ``fraudflow.features.sequences``.
* ``GraphInputs``: a sampled neighbourhood of the customer-terminal graph, the card's and the
  terminal's last ``hop1`` transactions and each neighbour's last ``hop2`` (K1, K2), all
  before the row. Per row: the vector kind's "x" (and "codes"); "card_hop1",
  "terminal_hop1" (B, K1) and "card_hop2", "terminal_hop2" (B, K1, K2) int64, positions in
  the shared event table, -1 in an empty slot; each with "<name>_gap" of its shape, float32
  log1p of the days from the edge to the row (0 where empty). Shared: "events" (M, F - C).
  Sampled point-in-time by ``fraudflow.features.graph``.

Two kinds of model share one data path and one metrics path:

* ``NeuralModel``: a torch module trained by ``fraudflow.train.loop``. It takes the dict of
  input tensors its declaration names and returns class logits (B, 2).
* ``Estimator``: a model with its own fitting procedure (LightGBM), trained on NumPy arrays.
  It declares ``VectorInputs``; x is (N, F) float32, the model matrix (categorical columns
  hold their codes), y is (N,) int; ``predict_proba`` returns (N,) fraud probabilities.

A model is told which columns of the model matrix are categorical (``Categorical``: the
position and the number of codes), never what they mean (``FeatureLayout``).

A neural model may declare ``cuda_graph_safe = True`` (a class attribute): its forward has
shapes fixed by the batch's and no host synchronisation, so the trainer may capture and replay
its whole training step as a CUDA graph. Models without it train eagerly. It may also declare
``predict_batch_rows``: rows per scoring batch, where a row's activations are large (a
sequence's); scorers default to ``PREDICT_BATCH_ROWS``.

The trainer relies on these protocols only, never on a concrete model.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Protocol, runtime_checkable

import numpy as np
from torch import Tensor

from fraudflow.errors import ArtifactError

__all__ = [
    "PREDICT_BATCH_ROWS",
    "Categorical",
    "Estimator",
    "FeatureLayout",
    "GraphInputs",
    "InputSpec",
    "NeuralModel",
    "SequenceInputs",
    "VectorInputs",
    "input_spec_from_dict",
    "predict_batch_rows",
]

PREDICT_BATCH_ROWS = 65_536


@dataclass(frozen=True)
class Categorical:
    """A column of the model matrix that holds integer codes 0 .. cardinality - 1 (0: unseen)."""

    position: int
    cardinality: int


@dataclass(frozen=True)
class FeatureLayout:
    """The model matrix's columns: ``n_features`` of them, ``categorical`` among them."""

    n_features: int
    categorical: tuple[Categorical, ...] = ()

    @property
    def n_numeric(self) -> int:
        return self.n_features - len(self.categorical)

    @property
    def cardinalities(self) -> tuple[int, ...]:
        return tuple(c.cardinality for c in self.categorical)


@dataclass(frozen=True)
class VectorInputs:
    """The row's own feature vector (see the module docstring)."""

    kind: ClassVar[str] = "vector"

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind}


@dataclass(frozen=True)
class SequenceInputs:
    """The card's last ``length`` events, the current one last (see the module docstring)."""

    length: int
    kind: ClassVar[str] = "sequence"

    def __post_init__(self) -> None:
        if self.length < 1:
            raise ArtifactError(f"a sequence must hold >= 1 event, however got {self.length}")

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "length": self.length}


@dataclass(frozen=True)
class GraphInputs:
    """A sampled customer-terminal neighbourhood, ``hop1`` then ``hop2`` edges per node (see
    the module docstring)."""

    hop1: int
    hop2: int
    kind: ClassVar[str] = "graph"

    def __post_init__(self) -> None:
        for name in ("hop1", "hop2"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ArtifactError(f"a graph's {name} fan-out must be >= 1, however got {value!r}")

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "hop1": self.hop1, "hop2": self.hop2}


# A new kind is a frozen dataclass with ``kind`` and ``to_dict``,
# added here and to ``_KINDS``; ``fraudflow.inputs`` builds its arrays.
InputSpec = VectorInputs | SequenceInputs | GraphInputs
_KINDS: dict[str, type[InputSpec]] = {
    "vector": VectorInputs,
    "sequence": SequenceInputs,
    "graph": GraphInputs,
}


def input_spec_from_dict(raw: dict[str, Any]) -> InputSpec:
    """The declaration that ``to_dict`` wrote (a bundle's meta.json)."""
    fields = dict(raw)
    kind = fields.pop("kind", None)
    if kind not in _KINDS:
        raise ArtifactError(f"input kind must be one of {', '.join(_KINDS)}, however got {kind!r}")
    try:
        return _KINDS[kind](**fields)
    except TypeError as exc:
        raise ArtifactError(f"the {kind} inputs {raw!r} are unreadable: {exc}") from None


def predict_batch_rows(model: object) -> int:
    """Rows per scoring batch: the model's ``predict_batch_rows``, else the default."""
    return int(getattr(model, "predict_batch_rows", PREDICT_BATCH_ROWS))


@runtime_checkable
class NeuralModel(Protocol):
    @property
    def inputs(self) -> InputSpec:
        """What the model consumes (see the module docstring)."""
        ...

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
    @property
    def inputs(self) -> InputSpec: ...

    def fit(
        self, x: np.ndarray, y: np.ndarray, x_valid: np.ndarray, y_valid: np.ndarray
    ) -> Estimator: ...

    def predict_proba(self, x: np.ndarray) -> np.ndarray: ...

    def save(self, path: Path) -> None: ...
