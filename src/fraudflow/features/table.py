"""The feature table on disk: Parquet with the feature list, version and config recorded.

A table is one Parquet file, or a folder of Parquet shards (``part-00000.parquet``, ...) that
share one feature list; a folder is read lazily, so it may be larger than memory.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import polars as pl

from fraudflow.config import FeatureConfig, to_dict
from fraudflow.data.io import read_parquet_metadata, write_table, write_table_parts
from fraudflow.data.schema import TIMESTAMP
from fraudflow.errors import ConfigError, DataError
from fraudflow.features.default_spec import default_spec
from fraudflow.features.spec import FeatureSpec, parse_spec
from fraudflow.features.specs import FEATURE_VERSION, describe_features

__all__ = [
    "FeatureSource",
    "FeatureTable",
    "open_feature_source",
    "read_feature_table",
    "write_feature_parts",
    "write_feature_shards",
    "write_feature_table",
]


class FeatureTable:
    """A loaded feature table: the frame plus what it records about its features."""

    def __init__(self, frame: pl.DataFrame, meta: dict[str, Any]) -> None:
        self.frame = frame
        self.meta = meta

    @property
    def feature_names(self) -> list[str]:
        return list(self.meta["features"])

    @property
    def label_delay_days(self) -> int:
        return int(self.meta["feature_config"]["label_delay_days"])


@dataclass(frozen=True)
class FeatureSource:
    """A feature table opened lazily: its shard files (one for a plain file) and metadata."""

    files: tuple[Path, ...]
    meta: dict[str, Any]
    # A folder of shards: training then streams them instead of loading all.
    sharded: bool = False

    @property
    def feature_names(self) -> list[str]:
        return list(self.meta["features"])

    @property
    def label_delay_days(self) -> int:
        return int(self.meta["feature_config"]["label_delay_days"])

    @property
    def categorical(self) -> dict[str, int | None]:
        """The categorical features, each with its spec's max_categories (None: no cap).
        Tables from before specs record none: all their features are numeric."""
        raw = self.meta.get("feature_spec")
        if raw is None:
            return {}
        spec = parse_spec(raw)
        caps = {c.name: c.max_categories for c in spec.columns}
        return {name: caps[name] for name in spec.categorical}

    def scan(self) -> pl.LazyFrame:
        return pl.scan_parquet(list(self.files))


def _metadata_meta(cfg: FeatureConfig, spec: FeatureSpec | None) -> dict[str, Any]:
    """What a table records: the features, the spec that made them (and its hash), the config.

    Without ``spec`` the table holds the default spec's features for ``cfg``.
    """
    spec = spec or default_spec(cfg)
    if spec.hash == default_spec(cfg).hash:
        descriptions = describe_features(cfg)
    else:
        descriptions = {
            name: f"defined by the feature spec {spec.hash[:12]}" for name in spec.feature_names
        }
    return {
        "feature_version": FEATURE_VERSION,
        "features": spec.feature_names,
        "descriptions": descriptions,
        "feature_config": to_dict(cfg),
        "feature_spec": spec.to_dict(),
        "feature_spec_hash": spec.hash,
    }


def write_feature_table(
    frame: pl.DataFrame, path: Path, cfg: FeatureConfig, *, spec: FeatureSpec | None = None
) -> None:
    write_table(frame, path, metadata=_metadata_meta(cfg, spec))


def write_feature_parts(
    parts: Sequence[Path],
    path: Path,
    cfg: FeatureConfig,
    *,
    schema: Mapping[str, Any],
    spec: FeatureSpec | None = None,
) -> int:
    """``write_feature_table`` of the rows of the Parquet files ``parts`` in order, holding one
    part in memory at a time (``schema``: the columns when no part has a row). Returns the rows."""
    return write_table_parts(parts, path, schema=schema, metadata=_metadata_meta(cfg, spec))


def write_feature_shards(
    frame: pl.DataFrame,
    folder: Path,
    cfg: FeatureConfig,
    *,
    shard_days: int,
    spec: FeatureSpec | None = None,
) -> list[Path]:
    """Write ``frame`` as one shard per ``shard_days`` days.

    The shards are written into a temporary folder that is renamed into place at the end, so a
    failure never leaves a partial set of shards behind.
    """
    if shard_days < 1:
        raise ConfigError(f"--shard-days must be >= 1, however got {shard_days}")
    folder = Path(folder)
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        raise ConfigError(f"shard folder {folder} already exists and is not empty")
    first = frame[TIMESTAMP].min()
    day = (pl.col(TIMESTAMP) - pl.lit(first)).dt.total_days() // shard_days
    parts = frame.with_columns(day.alias("__shard")).partition_by("__shard", maintain_order=True)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        for index, part in enumerate(parts):
            write_feature_table(
                part.drop("__shard"), tmp / f"part-{index:05d}.parquet", cfg, spec=spec
            )
        if folder.exists():
            folder.rmdir()
        os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return sorted(folder.glob("*.parquet"))


def _checked_meta(path: Path) -> dict[str, Any]:
    meta = read_parquet_metadata(path)
    if "features" not in meta:
        raise DataError(f"{path} is not a fraudflow feature table: it records no feature list")
    if meta.get("feature_version") != FEATURE_VERSION:
        raise DataError(
            f"{path} has feature version {meta.get('feature_version')!r}, however this fraudflow "
            f"builds version {FEATURE_VERSION!r}: rebuild it with `fraudflow features`"
        )
    return meta


def open_feature_source(path: Path) -> FeatureSource:
    """Open a feature file or a folder of shards without reading the rows."""
    path = Path(path)
    if path.is_dir():
        files = tuple(sorted(path.glob("*.parquet")))
        if not files:
            raise DataError(f"feature folder {path} holds no .parquet shards")
    elif path.is_file():
        files = (path,)
    else:
        raise DataError(f"feature table {path} does not exist (build it with `fraudflow features`)")
    meta = _checked_meta(files[0])
    for other in files[1:]:
        if _checked_meta(other)["features"] != meta["features"]:
            raise DataError(f"shard {other} has other features than {files[0]}")
    return FeatureSource(files=files, meta=meta, sharded=path.is_dir())


def read_feature_table(path: Path) -> FeatureTable:
    source = open_feature_source(path)
    return FeatureTable(source.scan().collect(), source.meta)
