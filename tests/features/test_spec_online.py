"""The online engine of feature specs against the batch engine, event by event."""

import random

import polars as pl
import pytest

from fraudflow.errors import DataError
from fraudflow.features import build_features, parse_spec
from fraudflow.features.spec_online import SpecFeatures
from tests.helpers.random_specs import random_log, random_spec


def _stream(rng: random.Random, log: pl.DataFrame) -> list[tuple[str, dict]]:
    """The log's events in arrival order, with label reports in between: a label (or its
    retraction) for an earlier transaction, now and then."""
    steps: list[tuple[str, dict]] = []
    seen: list[int] = []
    for row in log.to_dicts():
        steps.append(("event", row))
        seen.append(row["transaction_id"])
        for _ in range(rng.choice([0, 0, 1, 2])):
            steps.append(("label", {"id": rng.choice(seen), "is_fraud": rng.random() < 0.5}))
    return steps


@pytest.mark.parametrize("seed", range(12))
def test_each_event_gets_the_batch_features_of_the_log_as_it_stood(seed: int) -> None:
    """Ties, late events (the log's times are shuffled), labels reported late and retracted:
    an event's online features are the batch features of the events so far, with the labels
    reported so far."""
    rng = random.Random(seed)
    log, spec = random_log(rng, 45), parse_spec(random_spec(rng))
    online = SpecFeatures(spec)
    labels: dict[int, int] = {}
    arrived: list[dict] = []
    for kind, item in _stream(rng, log):
        if kind == "label":
            online.record_label(item["id"], item["is_fraud"])
            labels[item["id"]] = int(item["is_fraud"])
            continue
        got = online.features(item)
        arrived.append(item)
        so_far = pl.DataFrame(arrived, schema=log.schema).with_columns(
            pl.col("transaction_id").replace_strict(labels, default=0).alias("is_fraud")
        )
        batch = build_features(so_far, spec).filter(
            pl.col("transaction_id") == item["transaction_id"]
        )
        want = batch.select(spec.feature_names).row(0, named=True)
        for name in spec.feature_names:
            where = f"seed {seed}, transaction {item['transaction_id']}, {name}"
            if want[name] is None:
                assert got[name] is None, where
            else:
                assert got[name] == pytest.approx(want[name], rel=1e-6, abs=1e-6), where


def test_a_repeated_transaction_or_an_unknown_label_is_refused() -> None:
    rng = random.Random(0)
    log, spec = random_log(rng, 5), parse_spec(random_spec(rng))
    online = SpecFeatures(spec)
    first = log.row(0, named=True)
    online.features(first)
    with pytest.raises(DataError, match="was already recorded"):
        online.features(first)
    with pytest.raises(DataError, match="not recorded"):
        online.record_label("nope", True)
