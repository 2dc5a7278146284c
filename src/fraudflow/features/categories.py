"""Integer codes for categorical columns, learned on the training rows only.

A column's codes (``CategoryCodes.fit``):

* 0 is the unseen code: a value absent from the training rows, a null, or a value cut by
  ``max_categories``;
* 1, 2, ... go to the training rows' values from the most frequent down, equal counts in
  ascending value order, so the same rows always give the same codes;
* with ``max_categories = K`` only the K most frequent values get their own code; rarer ones
  share the unseen code (they are too rare to learn from, and a cap bounds the model's size).

A column's cardinality, what LightGBM and an embedding table are told, is its number of coded
values + 1. Codes are learned from the training rows, never from validation or test rows: a
value first met there is unseen to the model, as it would be in production.

The model matrix is (N, F) in the feature order, each categorical column replaced by its codes
(exact in float32 below 2**24 values). ``matrix_from_frame`` builds it from a feature table,
``matrix_from_rows`` from raw feature rows as the service holds them.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import polars as pl

from fraudflow.errors import ConfigError

__all__ = ["UNSEEN", "CategoryCodes", "matrix_from_frame", "matrix_from_rows"]

UNSEEN = 0
Value = str | int | bool


@dataclass(frozen=True)
class CategoryCodes:
    """Per categorical column, its coded values in code order: value i has code i + 1."""

    values: dict[str, tuple[Value, ...]]
    _lookup: dict[str, dict[Value, int]] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        lookup = {
            column: {value: code for code, value in enumerate(values, start=1)}
            for column, values in self.values.items()
        }
        object.__setattr__(self, "_lookup", lookup)

    @classmethod
    def fit(
        cls, rows: pl.LazyFrame | pl.DataFrame, caps: Mapping[str, int | None]
    ) -> CategoryCodes:
        """Codes of the ``caps`` columns (column -> max_categories, None: no cap) from ``rows``,
        the training rows."""
        lazy = rows.lazy()
        return cls({column: _ranked(lazy, column, cap) for column, cap in caps.items()})

    @property
    def columns(self) -> list[str]:
        return list(self.values)

    def cardinality(self, column: str) -> int:
        return len(self.values[column]) + 1

    def encode(self, column: str, values: Iterable[Any]) -> np.ndarray:
        """Codes (N,) int64 of raw values; unseen values and nulls get ``UNSEEN``."""
        lookup = self._lookup[column]
        return np.fromiter((_get(lookup, v) for v in values), dtype=np.int64)

    def expression(self, column: str) -> pl.Expr:
        """The column's codes as a Polars expression (Int64)."""
        values = self.values[column]
        source = pl.col(column)
        if not values:
            return pl.lit(UNSEEN, dtype=pl.Int64).alias(column)
        if isinstance(values[0], str):
            source = source.cast(pl.String)  # Categorical and Enum columns
        codes = range(1, len(values) + 1)
        coded = source.replace_strict(list(values), codes, default=UNSEEN, return_dtype=pl.Int64)
        return coded.fill_null(UNSEEN).alias(column)

    def to_dict(self) -> dict[str, Any]:
        return {"columns": {column: list(values) for column, values in self.values.items()}}

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> CategoryCodes:
        columns = raw.get("columns")
        if not isinstance(columns, dict) or not all(isinstance(v, list) for v in columns.values()):
            raise ConfigError(
                f'category codes must map columns to value lists under "columns", however got '
                f"{raw!r:.200}"
            )
        return cls({column: tuple(values) for column, values in columns.items()})


def _ranked(rows: pl.LazyFrame, column: str, cap: int | None) -> tuple[Value, ...]:
    counts = (
        rows.select(pl.col(column).cast(pl.String) if _is_categorical(rows, column) else column)
        .drop_nulls()
        .group_by(column)
        .len()
        .sort(["len", column], descending=[True, False])
        .collect()
    )
    values = counts[column].to_list()
    return tuple(values if cap is None else values[:cap])


def _is_categorical(rows: pl.LazyFrame, column: str) -> bool:
    dtype = rows.collect_schema()[column]
    return dtype == pl.Categorical or dtype == pl.Enum


def _get(lookup: dict[Value, int], value: Any) -> int:
    try:
        return lookup.get(value, UNSEEN)
    except TypeError:  # unhashable: not a value any column holds
        return UNSEEN


def matrix_from_frame(
    frame: pl.DataFrame, features: Sequence[str], codes: CategoryCodes | None
) -> np.ndarray:
    """The model matrix (N, F) float32 of a feature table's rows."""
    coded = [] if codes is None else [codes.expression(c) for c in codes.columns]
    selected = frame.select(features) if not coded else frame.select(features).with_columns(coded)
    return selected.to_numpy().astype(np.float32, copy=False)  # (N, F)


def matrix_from_rows(rows: Any, features: Sequence[str], codes: CategoryCodes | None) -> np.ndarray:
    """The model matrix (N, F) float64 of raw feature rows (N, F) in ``features`` order:
    numbers (None or NaN: missing) and, in the categorical columns, raw values."""
    if codes is None or not codes.columns:
        return np.asarray(rows, dtype=np.float64)
    raw = np.asarray(rows, dtype=object)
    if raw.ndim != 2 or raw.shape[1] != len(features):
        raise ConfigError(
            f"expected raw feature rows of shape (N, {len(features)}), however got {raw.shape}"
        )
    out = np.empty(raw.shape, dtype=np.float64)
    position = {name: index for index, name in enumerate(features)}
    categorical = {position[c] for c in codes.columns}
    for index in range(raw.shape[1]):
        column = raw[:, index]
        if index in categorical:
            out[:, index] = codes.encode(features[index], column)
        else:
            out[:, index] = np.array([np.nan if v is None else v for v in column], dtype=float)
    return out
