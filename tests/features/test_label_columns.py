"""Labels never become features: `is_fraud` and `fraud_scenario` are refused wherever a spec
could read them, and the default features carry `fraud_scenario` along without reading it."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import polars as pl
import pytest

from fraudflow.config import FeatureConfig
from fraudflow.errors import ConfigError
from fraudflow.features import build_features, default_spec, parse_spec

T0 = datetime(2026, 2, 2, 9, tzinfo=UTC)
LOG = pl.DataFrame(
    {
        "transaction_id": [1, 2, 3, 4],
        "timestamp": [T0 + timedelta(minutes=m) for m in (0, 5, 60, 90)],
        "customer_id": ["A", "A", "B", "A"],
        "terminal_id": ["T", "U", "T", "T"],
        "amount": [10.0, 20.0, 30.0, 40.0],
        "is_fraud": [0, 1, 0, 1],
        "fraud_scenario": ["", "fraud_ring", "", "account_takeover"],
    }
)


@pytest.mark.parametrize(
    ("entry", "label"),
    [
        ({"column": [{"name": "fraud_scenario"}]}, "fraud_scenario"),
        ({"column": [{"name": "is_fraud"}]}, "is_fraud"),
        ({"aggregate": [{"name": "a", "by": ["fraud_scenario"], "fn": "count",
                         "windows": ["1d"]}]}, "fraud_scenario"),
        ({"aggregate": [{"name": "a", "by": ["customer_id"], "fn": "count",
                         "where": "fraud_scenario == 1", "windows": ["1d"]}]}, "fraud_scenario"),
        ({"derive": [{"name": "a", "expr": "amount + fraud_scenario"}]}, "fraud_scenario"),
    ],
)  # fmt: skip
def test_a_spec_reading_a_label_is_refused(entry: dict, label: str) -> None:
    with pytest.raises(ConfigError, match=f"reads `{label}`"):
        build_features(LOG, parse_spec({"label_delay": "1h", **entry}))


def test_default_features_carry_fraud_scenario_without_reading_it() -> None:
    cfg = FeatureConfig(label_delay_days=1)
    spec = default_spec(cfg)
    assert "fraud_scenario" not in spec.feature_names
    table = build_features(LOG, spec)
    assert table["fraud_scenario"].to_list() == LOG["fraud_scenario"].to_list()
    # Other scenario names (or none at all) give the same feature values.
    renamed = build_features(LOG.with_columns(pl.lit("x").alias("fraud_scenario")), spec)
    dropped = build_features(LOG.drop("fraud_scenario"), spec)
    assert renamed.select(spec.feature_names).equals(table.select(spec.feature_names))
    assert dropped.select(spec.feature_names).equals(table.select(spec.feature_names))
