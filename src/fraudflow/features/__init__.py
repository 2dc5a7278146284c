"""Point-in-time behavioural features, computed in batch with Polars."""

from fraudflow.features.batch import build_features
from fraudflow.features.specs import FEATURE_VERSION, describe_features, feature_names
from fraudflow.features.table import (
    FeatureSource,
    FeatureTable,
    open_feature_source,
    read_feature_table,
    write_feature_shards,
    write_feature_table,
)

__all__ = [
    "FEATURE_VERSION",
    "FeatureSource",
    "FeatureTable",
    "build_features",
    "describe_features",
    "feature_names",
    "open_feature_source",
    "read_feature_table",
    "write_feature_shards",
    "write_feature_table",
]
