"""The feature table on disk: Parquet with the feature list, version and config recorded."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import polars as pl

from fraudflow.config import FeatureConfig, to_dict
from fraudflow.data.io import read_parquet_metadata, write_table
from fraudflow.errors import DataError
from fraudflow.features.specs import FEATURE_VERSION, describe_features

__all__ = ["FeatureTable", "read_feature_table", "write_feature_table"]


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


def write_feature_table(frame: pl.DataFrame, path: Path, cfg: FeatureConfig) -> None:
    meta = {
        "feature_version": FEATURE_VERSION,
        "features": list(describe_features(cfg)),
        "descriptions": describe_features(cfg),
        "feature_config": to_dict(cfg),
    }
    write_table(frame, path, metadata=meta)


def read_feature_table(path: Path) -> FeatureTable:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"feature file {path} does not exist (build it with `fraudflow features`)")
    meta = read_parquet_metadata(path)
    if "features" not in meta:
        raise DataError(f"{path} is not a fraudflow feature table: it records no feature list")
    if meta.get("feature_version") != FEATURE_VERSION:
        raise DataError(
            f"{path} has feature version {meta.get('feature_version')!r}, however this fraudflow "
            f"builds version {FEATURE_VERSION!r}: rebuild it with `fraudflow features`"
        )
    return FeatureTable(pl.read_parquet(path), meta)
