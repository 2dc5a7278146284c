"""Atomic writing of tables (Parquet with key-value metadata, or CSV)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import polars as pl
import pyarrow.parquet as pq

from fraudflow.errors import ConfigError
from fraudflow.files import atomic_path

__all__ = ["read_parquet_metadata", "write_table"]

_METADATA_KEY = b"fraudflow"


def write_table(df: pl.DataFrame, path: Path, *, metadata: Mapping[str, Any] | None = None) -> None:
    """Write ``df`` to ``path`` (.parquet or .csv) atomically; metadata goes into Parquet only."""
    suffix = Path(path).suffix.lower()
    with atomic_path(path) as tmp:
        if suffix == ".parquet":
            table = df.to_arrow()
            if metadata is not None:
                merged = dict(table.schema.metadata or {})
                merged[_METADATA_KEY] = json.dumps(dict(metadata), sort_keys=True).encode()
                table = table.replace_schema_metadata(merged)
            pq.write_table(table, tmp, compression="zstd")
        elif suffix == ".csv":
            df.write_csv(tmp)
        else:
            raise ConfigError(f"output file must end in .parquet or .csv, however got {path}")


def read_parquet_metadata(path: Path) -> dict[str, Any]:
    """The fraudflow metadata stored by ``write_table`` (empty if there is none)."""
    raw = (pq.read_schema(path).metadata or {}).get(_METADATA_KEY)
    return {} if raw is None else dict(json.loads(raw))
