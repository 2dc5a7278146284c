"""Point-in-time behavioural features: in batch with Polars, and online one event at a time."""

from fraudflow.features.batch import build_features, check_categorical, check_input
from fraudflow.features.default_spec import default_spec
from fraudflow.features.online import MemoryStore, OnlineFeatures, StateStore
from fraudflow.features.spec import FeatureSpec, load_spec, parse_spec, spec_to_toml
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
    "FeatureSpec",
    "FeatureTable",
    "MemoryStore",
    "OnlineFeatures",
    "StateStore",
    "build_features",
    "check_categorical",
    "check_input",
    "default_spec",
    "describe_features",
    "feature_names",
    "load_spec",
    "open_feature_source",
    "parse_spec",
    "read_feature_table",
    "spec_to_toml",
    "write_feature_shards",
    "write_feature_table",
]
