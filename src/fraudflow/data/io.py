"""Atomic writing of tables (Parquet with key-value metadata, or CSV)."""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from fraudflow.errors import ConfigError
from fraudflow.files import atomic_path

__all__ = ["read_parquet_metadata", "write_table", "write_table_parts"]

_METADATA_KEY = b"fraudflow"


def write_table(df: pl.DataFrame, path: Path, *, metadata: Mapping[str, Any] | None = None) -> None:
    """Write ``df`` to ``path`` (.parquet or .csv) atomically; metadata goes into Parquet only."""
    suffix = Path(path).suffix.lower()
    with atomic_path(path) as tmp:
        if suffix == ".parquet":
            table = df.to_arrow()
            table = table.replace_schema_metadata(_with_metadata(table.schema, metadata).metadata)
            pq.write_table(table, tmp, compression="zstd")
        elif suffix == ".csv":
            df.write_csv(tmp)
        else:
            raise ConfigError(f"output file must end in .parquet or .csv, however got {path}")


def write_table_parts(
    parts: Iterable[Path],
    path: Path,
    *,
    schema: Mapping[str, Any],
    metadata: Mapping[str, Any] | None = None,
) -> int:
    """Write the Parquet files ``parts``, in order, as one table at ``path`` (as
    ``write_table``: atomic, .parquet with metadata or .csv), holding one part in memory at a
    time; ``schema`` (Polars dtypes by name) is the table's when there are no parts. Returns
    the rows written."""
    suffix = Path(path).suffix.lower()
    if suffix not in (".parquet", ".csv"):
        raise ConfigError(f"output file must end in .parquet or .csv, however got {path}")
    frames = (frame for frame in map(pl.read_parquet, parts) if frame.height)
    first = next(frames, None)
    if first is None:  # the empty table, with its columns and metadata as always
        write_table(pl.DataFrame(schema=dict(schema)), path, metadata=metadata)
        return 0
    rows = 0
    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
        if suffix == ".csv":
            for k, frame in enumerate(itertools.chain([first], frames)):
                frame.write_csv(handle, include_header=k == 0)
                rows += frame.height
            return rows
        with pq.ParquetWriter(
            handle, _with_metadata(first.to_arrow().schema, metadata), compression="zstd"
        ) as writer:
            for frame in itertools.chain([first], frames):
                writer.write_table(frame.to_arrow().replace_schema_metadata(writer.schema.metadata))
                rows += frame.height
    return rows


def _with_metadata(schema: pa.Schema, metadata: Mapping[str, Any] | None) -> pa.Schema:
    if metadata is None:
        return schema
    merged = dict(schema.metadata or {})
    merged[_METADATA_KEY] = json.dumps(dict(metadata), sort_keys=True).encode()
    return schema.with_metadata(merged)


def read_parquet_metadata(path: Path) -> dict[str, Any]:
    """The fraudflow metadata stored by ``write_table`` (empty if there is none)."""
    raw = (pq.read_schema(path).metadata or {}).get(_METADATA_KEY)
    return {} if raw is None else dict(json.loads(raw))
