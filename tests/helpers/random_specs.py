"""Random feature specs and event logs, for property tests of the feature engines."""

import random
from datetime import UTC, datetime, timedelta

import polars as pl
import pytest

from fraudflow.features import build_features
from fraudflow.features.spec import FUNCTIONS, FeatureSpec

T0 = datetime(2026, 3, 2, 12, 0, tzinfo=UTC)  # a Monday, noon

# Row filters and what they mean, for the oracle.
WHERE = {
    None: lambda row: True,
    "amount < 50": lambda row: row["amount"] < 50,
    'category == "x"': lambda row: row["category"] == "x",
    "score > 0.5 or amount > 80": lambda row: (
        (row["score"] is not None and row["score"] > 0.5) or row["amount"] > 80
    ),
}
KEYS = [["customer_id"], ["customer_id", "category"], ["terminal_id"]]
WINDOWS = ["30m", "2h", "1d", "last 1", "last 3"]
SECONDS = {"30m": 1_800, "2h": 7_200, "1d": 86_400, "1h": 3_600, "6h": 21_600}


def random_log(rng: random.Random, n: int) -> pl.DataFrame:
    minutes = sorted(rng.choice(range(0, 3 * 24 * 60, 20)) for _ in range(n))  # many ties
    order = list(range(n))
    rng.shuffle(order)  # arrival order differs from time order
    return pl.DataFrame(
        {
            "transaction_id": list(range(n)),
            "timestamp": [T0 + timedelta(minutes=minutes[i]) for i in order],
            "customer_id": [rng.choice("ABC") for _ in order],
            "terminal_id": [rng.choice([1, 2]) for _ in order],
            "amount": [float(rng.randint(1, 100)) for _ in order],
            "is_fraud": [int(rng.random() < 0.3) for _ in order],
            "category": [rng.choice("xy") for _ in order],
            "score": [None if rng.random() < 0.2 else rng.random() for _ in order],
        }
    )


def random_spec(rng: random.Random) -> dict:
    aggregates = []
    for index in range(rng.randint(3, 7)):
        fn = rng.choice(FUNCTIONS)
        durations = [w for w in WINDOWS if not w.startswith("last")]
        only_durations = fn in ("time_since_fraud", "count_above")
        windows = rng.sample(durations if only_durations else WINDOWS, rng.randint(1, 2))
        entry = {"name": f"f{index}", "by": rng.choice(KEYS), "fn": fn, "windows": windows}
        if fn in ("sum", "mean", "min", "max", "std"):
            entry["of"] = rng.choice(["amount", "score"])
        if fn == "count_distinct":
            entry["of"] = rng.choice(["category", "terminal_id"])
        if fn == "count_above":
            # k = 1 on whole amounts: many values exactly at k times the mean, the tie case.
            entry |= {"of": rng.choice(["amount", "score"]), "k": rng.choice([1, 1.5, 2.0])}
            entry["typical"] = rng.choice(["2h", "1d"])
        where = rng.choice(list(WHERE))
        if where is not None:
            entry["where"] = where
        delayable = fn not in ("time_since_last", "time_since_first", "count_above") and not (
            fn == "count_distinct" and any(w.startswith("last") for w in windows)
        )
        if fn in ("fraud_count", "fraud_rate", "time_since_fraud") or (
            delayable and rng.random() < 0.3
        ):
            entry["delayed"] = True
        nullable = ("mean", "min", "max", "std", "fraud_rate", "time_since_first")
        if fn in (*nullable, "time_since_fraud") and rng.random() < 0.5:
            entry["default"] = -7.0
        if fn.startswith("time_since") and rng.random() < 0.5:
            entry["unit"] = "h"
        aggregates.append(entry)
    names = [f"{a['name']}__{a['windows'][0].replace(' ', '')}" for a in aggregates]
    derives = [
        {
            "name": f"d{k}",
            "expr": rng.choice(DERIVES).format(a=rng.choice(names), b=rng.choice(names)),
        }
        for k in range(rng.randint(0, 3))
    ]
    return {
        "label_delay": rng.choice(["1h", "6h", "1d"]),
        "aggregate": aggregates,
        "derive": derives,
    }


DERIVES = [
    "amount / {a}",
    "where({a} > 2, log1p(abs({a})), -1)",
    "coalesce({a}, 0) + max({b}, 1)",
    "clip({a} - {b}, -5, 5)",
    # Comparisons against constants no value lands on: engines' sums round differently.
    "({a} > 2.345) or is_weekend",
    "min({a}, hour) * weekday",
    "not ({a} < 1.5)",
]


def random_stream(rng: random.Random, log: pl.DataFrame) -> list[tuple[str, dict]]:
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


def batch_as_it_stood(
    arrived: list[dict], labels: dict[int, int], spec: FeatureSpec, schema: pl.Schema
) -> dict:
    """The batch features of the last arrived event, over the events so far with the labels
    reported so far."""
    so_far = pl.DataFrame(arrived, schema=schema).with_columns(
        pl.col("transaction_id").replace_strict(labels, default=0).alias("is_fraud")
    )
    last = arrived[-1]["transaction_id"]
    batch = build_features(so_far, spec).filter(pl.col("transaction_id") == last)
    return batch.select(spec.feature_names).row(0, named=True)


def assert_same_features(got: dict, want: dict, where: str) -> None:
    for name, expected in want.items():
        if expected is None:
            assert got[name] is None, f"{where}, {name}: {got[name]} (expected null)"
        else:
            assert got[name] == pytest.approx(expected, rel=1e-6, abs=1e-6), f"{where}, {name}"
