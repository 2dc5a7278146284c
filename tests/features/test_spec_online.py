"""The online engine of feature specs against the batch engine, event by event."""

import random
from datetime import timedelta

import pytest

from fraudflow.config import FeatureConfig
from fraudflow.errors import DataError
from fraudflow.features import default_spec, parse_spec
from fraudflow.features.online import MemoryStore, OnlineFeatures
from fraudflow.features.spec_online import (
    MemorySpecStore,
    SpecOnline,
    extra_columns,
    layout_of,
    reference_engine,
)
from tests.helpers.random_specs import (
    T0,
    assert_same_features,
    batch_as_it_stood,
    random_log,
    random_spec,
    random_stream,
)


@pytest.mark.parametrize("seed", range(12))
def test_each_event_gets_the_batch_features_of_the_log_as_it_stood(seed: int) -> None:
    """Ties, late events (the log's times are shuffled), labels reported late and retracted:
    an event's online features are the batch features of the events so far, with the labels
    reported so far."""
    rng = random.Random(seed)
    log, spec = random_log(rng, 45), parse_spec(random_spec(rng))
    online = reference_engine(spec)
    labels: dict[int, int] = {}
    arrived: list[dict] = []
    for kind, item in random_stream(rng, log):
        if kind == "label":
            online.record_label(item["id"], item["is_fraud"])
            labels[item["id"]] = int(item["is_fraud"])
            continue
        got = online.features(item)
        arrived.append(item)
        want = batch_as_it_stood(arrived, labels, spec, log.schema)
        assert_same_features(got, want, f"seed {seed}, transaction {item['transaction_id']}")


def test_a_repeated_transaction_or_an_unknown_label_is_refused() -> None:
    rng = random.Random(0)
    log, spec = random_log(rng, 5), parse_spec(random_spec(rng))
    online = reference_engine(spec)
    first = log.row(0, named=True)
    online.features(first)
    with pytest.raises(DataError, match="was already recorded"):
        online.features(first)
    with pytest.raises(DataError, match="not recorded"):
        online.record_label("nope", True)


@pytest.mark.parametrize("seed", range(6))
def test_forgetting_changes_no_feature_of_events_in_time_order(seed: int) -> None:
    """Events arriving in time order (ties included): what the store forgets (older than the
    retention, beyond the last N of a key) is never read again, and it does forget."""
    rng = random.Random(seed)
    log, spec = random_log(rng, 60), parse_spec(random_spec(rng))
    log = log.sort("timestamp", maintain_order=True)
    store = MemorySpecStore()
    forgetting, keeping = SpecOnline(spec, store=store), reference_engine(spec)
    for row in log.to_dicts():
        assert_same_features(forgetting.features(row), keeping.features(row), f"seed {seed}")
    if layout_of(spec).retention_us < 86_400 * 1_000_000:  # the log spans three days
        assert len(store.records) < log.height


def test_last_n_windows_keep_a_quiet_key_s_events_past_the_retention() -> None:
    spec = parse_spec({
        "label_delay": "1h",
        "aggregate": [
            {"name": "c", "by": ["customer_id"], "fn": "mean", "of": "amount",
             "windows": ["1h", "last 3"]},
            {"name": "f", "by": ["customer_id"], "fn": "fraud_count", "windows": ["last 2"]},
        ],
    })  # fmt: skip
    store = MemorySpecStore()
    online = SpecOnline(spec, store=store)

    def tx(i: int, days: int, customer: str = "A") -> dict:
        return {"transaction_id": i, "timestamp": T0 + timedelta(days=days),
                "customer_id": customer, "terminal_id": 1, "amount": float(i)}  # fmt: skip

    for i in range(1, 6):
        online.features(tx(i, i))
    online.record_label(4, True)  # older than the retention (2h), but among the last 2
    online.features(tx(6, 30, "B"))  # another key: the first one is not touched
    assert sorted(store.records) == ["3", "4", "5", "6"]  # A keeps its last 3
    got = online.features(tx(7, 31))
    assert got["c__last3"] == (4 + 5 + 7) / 3
    assert got["c__1h"] == 7.0
    assert got["f__last2"] == 1.0  # 4 and 5, dated before t - delay; 4 is a fraud
    with pytest.raises(DataError, match="not recorded"):
        online.record_label(1, True)  # forgotten


def test_extra_columns_are_what_the_spec_reads_beyond_the_canonical_ones() -> None:
    rng = random.Random(0)
    spec = parse_spec(random_spec(rng))
    assert set(extra_columns(spec)) <= {"category", "score"}
    assert extra_columns(default_spec(FeatureConfig())) == ()


@pytest.mark.parametrize("seed", range(6))
def test_the_fast_path_and_the_spec_engine_agree_on_the_default_spec(seed: int) -> None:
    """``OnlineFeatures`` (the service's speed path) and ``SpecOnline`` over the default
    spec: the same features for random streams (late events, ties, labels and retractions)."""
    rng = random.Random(seed)
    cfg = FeatureConfig(
        label_delay_days=1, customer_windows_days=(1, 2), terminal_windows_days=(1,)
    )
    log = random_log(rng, 80)
    fast = OnlineFeatures(cfg=cfg, store=MemoryStore())
    generic = SpecOnline(default_spec(cfg), store=MemorySpecStore())
    assert fast.names == generic.names
    for kind, item in random_stream(rng, log):
        if kind == "label":
            fast.record_label(item["id"], item["is_fraud"])
            generic.record_label(item["id"], item["is_fraud"])
            continue
        assert_same_features(generic.features(item), fast.features(item), f"seed {seed}")
