from datetime import UTC, datetime, timedelta

import numpy as np
import polars as pl
import pytest

from fraudflow.config import FeatureConfig
from fraudflow.errors import DataError
from fraudflow.features import build_features, feature_names
from fraudflow.features.specs import HOURS_SINCE_PREV_CAP

D0 = datetime(2026, 3, 2, tzinfo=UTC)  # a Monday
CFG = FeatureConfig(label_delay_days=1, customer_windows_days=(1, 7), terminal_windows_days=(1,))


def _frame(rows: list[tuple]) -> pl.DataFrame:
    tx, ts, cust, term, amount, fraud = zip(*rows, strict=True)
    return pl.DataFrame(
        {
            "transaction_id": list(tx),
            "timestamp": pl.Series(list(ts), dtype=pl.Datetime("us", "UTC")),
            "customer_id": list(cust),
            "terminal_id": list(term),
            "amount": list(amount),
            "is_fraud": pl.Series(list(fraud), dtype=pl.Int8),
        }
    )


def _at(day: int, hour: int, minute: int) -> datetime:
    return D0 + timedelta(days=day, hours=hour, minutes=minute)


# r2 has the same timestamp as r1 and arrives after it.
TINY = _frame(
    [
        ("r0", _at(0, 10, 0), "A", "X", 10.0, 0),
        ("r1", _at(0, 10, 30), "A", "X", 20.0, 1),
        ("r2", _at(0, 10, 30), "B", "X", 4.0, 0),
        ("r3", _at(1, 10, 15), "A", "Y", 30.0, 0),
        ("r4", _at(1, 10, 45), "A", "X", 60.0, 0),
    ]
)


def _column(out: pl.DataFrame, name: str) -> list[float]:
    return out[name].to_list()


def test_customer_windows_by_hand() -> None:
    out = build_features(TINY, CFG)
    assert out["transaction_id"].to_list() == ["r0", "r1", "r2", "r3", "r4"]
    # r3 (day 1 10:15): 1h -> r3; 1d (day0 10:15, day1 10:15] -> r1, r3; 7d -> r0, r1, r3.
    # r4 (day 1 10:45): 1h and 1d -> r3, r4; 7d -> all four of A.
    assert _column(out, "customer__count__1h") == [1, 2, 1, 1, 2]
    assert _column(out, "customer__count__1d") == [1, 2, 1, 2, 2]
    assert _column(out, "customer__count__7d") == [1, 2, 1, 3, 4]
    assert _column(out, "customer__mean_amount__1h") == [10, 15, 4, 30, 45]
    assert _column(out, "customer__mean_amount__1d") == [10, 15, 4, 25, 45]
    assert _column(out, "customer__mean_amount__7d") == [10, 15, 4, 20, 30]
    assert _column(out, "customer__amount_ratio__1d") == pytest.approx(
        [1, 20 / 15, 1, 1.2, 60 / 45]
    )
    assert _column(out, "customer__small_count__1d") == [0, 0, 1, 0, 0]
    assert _column(out, "customer__hours_since_prev") == [
        HOURS_SINCE_PREV_CAP,
        0.5,
        720,
        23.75,
        0.5,
    ]


def test_label_delayed_windows_by_hand() -> None:
    out = build_features(TINY, CFG)
    # Customer A's fraud r1 (day 0 10:30) is known from day 1 10:30: r3 (10:15) cannot see it,
    # r4 (10:45) can. Longest customer window is 7d: (t - 8d, t - 1d].
    assert _column(out, "customer__known_fraud_count__7d") == [0, 0, 0, 0, 1]
    # Terminal X for r4: delayed 1d window (day0 10:45 - 1d, day0 10:45] -> r0, r1, r2; 1 fraud.
    assert _column(out, "terminal__count__1d") == [0, 0, 0, 0, 3]
    assert _column(out, "terminal__fraud_rate__1d") == pytest.approx([0, 0, 0, 0, 1 / 3])


def test_equal_timestamps_follow_arrival_order() -> None:
    out = build_features(TINY, CFG)
    # r1 and r2 share a timestamp at terminal X: r1 sees r0 and itself, r2 also sees r1.
    assert _column(out, "terminal__live_count__1d") == [1, 2, 3, 1, 1]


def test_calendar_flags() -> None:
    rows = [("a", datetime(2026, 3, 7, 3, 0, tzinfo=UTC), 1, 1, 5.0, 0)]  # Saturday 03:00
    rows.append(("b", datetime(2026, 3, 9, 12, 0, tzinfo=UTC), 1, 1, 5.0, 0))  # Monday noon
    out = build_features(_frame(rows), CFG)
    assert _column(out, "tx__is_weekend") == [1, 0]
    assert _column(out, "tx__is_night") == [1, 0]
    assert _column(out, "tx__hour") == [3, 12]
    assert _column(out, "tx__log_amount") == pytest.approx([np.log1p(5.0)] * 2)


def test_output_keeps_extra_columns_and_sorts_by_time() -> None:
    shuffled = TINY.reverse().with_columns(pl.lit("x").alias("channel"))
    out = build_features(shuffled, CFG)
    assert out.columns == [*shuffled.columns, *feature_names(CFG)]
    assert out["timestamp"].is_sorted()


def test_missing_label_is_an_error() -> None:
    with pytest.raises(DataError, match="`is_fraud` is required"):
        build_features(TINY.drop("is_fraud"), CFG)


def _random_log(seed: int, n: int = 400) -> pl.DataFrame:
    rng = np.random.default_rng(seed)
    # Timestamps on a coarse grid so that equal timestamps are common.
    minutes = np.sort(rng.integers(0, 20 * 24 * 4, n)) * 15
    return _frame(
        [
            (
                i,
                D0 + timedelta(minutes=int(minutes[i])),
                int(rng.integers(0, 8)),
                int(rng.integers(0, 5)),
                float(np.round(rng.gamma(2.0, 20.0), 2)),
                int(rng.random() < 0.2),
            )
            for i in range(n)
        ]
    )


def _reference(df: pl.DataFrame, cfg: FeatureConfig) -> dict[str, list[float]]:
    """Row-by-row definitions, written independently of the running-total method."""
    rows = df.rows(named=True)
    delay = timedelta(days=cfg.label_delay_days)
    ref: dict[str, list[float]] = {}
    for i, row in enumerate(rows):
        t = row["timestamp"]
        seen = rows[: i + 1]  # arrival order: earlier rows and this one
        mine = [r for r in seen if r["customer_id"] == row["customer_id"]]
        for label, width in (("1h", timedelta(hours=1)), ("1d", timedelta(days=1))):
            window = [r["amount"] for r in mine if r["timestamp"] > t - width]
            ref.setdefault(f"customer__count__{label}", []).append(len(window))
            ref.setdefault(f"customer__mean_amount__{label}", []).append(np.mean(window))
        at_term = [r for r in rows if r["terminal_id"] == row["terminal_id"]]
        known = [r for r in at_term if t - delay - timedelta(days=1) < r["timestamp"] <= t - delay]
        ref.setdefault("terminal__count__1d", []).append(len(known))
        rate = np.mean([r["is_fraud"] for r in known]) if known else 0.0
        ref.setdefault("terminal__fraud_rate__1d", []).append(rate)
    return ref


def test_matches_row_by_row_reference_with_ties() -> None:
    df = _random_log(seed=1)
    cfg = FeatureConfig(label_delay_days=2, customer_windows_days=(1,), terminal_windows_days=(1,))
    out = build_features(df, cfg)
    for name, expected in _reference(df, cfg).items():
        assert _column(out, name) == pytest.approx(expected, rel=1e-12), name


def _earlier_features(df: pl.DataFrame, cutoff: datetime) -> pl.DataFrame:
    out = build_features(df, CFG)
    return out.filter(pl.col("timestamp") <= cutoff).select(feature_names(CFG))


def test_leakage_trap_later_transactions_and_unknown_labels() -> None:
    df = _random_log(seed=2)
    cutoff = D0 + timedelta(days=10)
    before = _earlier_features(df, cutoff)
    later = pl.col("timestamp") > cutoff
    # Any change to transactions after the cutoff.
    changed = df.with_columns(
        pl.when(later).then(pl.col("amount") * 7 + 1).otherwise(pl.col("amount")).alias("amount")
    )
    assert _earlier_features(changed, cutoff).equals(before)
    # Flip every label not yet known at the cutoff (transactions after cutoff - delay).
    unknown = pl.col("timestamp") > cutoff - timedelta(days=CFG.label_delay_days)
    flipped = df.with_columns(
        pl.when(unknown)
        .then(1 - pl.col("is_fraud"))
        .otherwise(pl.col("is_fraud"))
        .alias("is_fraud")
    )
    assert _earlier_features(flipped, cutoff).equals(before)
    # The trap can spring: the same flips do change features after the cutoff.
    assert not build_features(flipped, CFG).equals(build_features(df, CFG))


def test_empty_table_and_null_labels_are_errors() -> None:
    with pytest.raises(DataError, match="the transaction table is empty"):
        build_features(TINY.head(0), CFG)
    nulled = TINY.with_columns(
        pl.when(pl.col("transaction_id") == "r0")
        .then(None)
        .otherwise(pl.col("is_fraud"))
        .alias("is_fraud")
    )
    with pytest.raises(DataError, match="1 row is empty"):
        build_features(nulled, CFG)


def test_card_testing_window_is_one_day_whatever_the_configured_windows() -> None:
    cfg = FeatureConfig(label_delay_days=1, customer_windows_days=(7,), terminal_windows_days=(7,))
    out = build_features(TINY, cfg)
    assert _column(out, "customer__small_count__1d") == [0, 0, 1, 0, 0]
    assert "customer__count__7d" in out.columns and "customer__count__1d" not in out.columns
