"""Point-in-time behavioural features: in batch with Polars, and online one event at a time."""

from fraudflow.features.batch import build_features
from fraudflow.features.online import MemoryStore, OnlineFeatures, StateStore
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
    "MemoryStore",
    "OnlineFeatures",
    "StateStore",
    "build_features",
    "describe_features",
    "feature_names",
    "open_feature_source",
    "read_feature_table",
    "write_feature_shards",
    "write_feature_table",
]
