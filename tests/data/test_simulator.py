"""Behaviour of the transaction simulator: schema, determinism, scenarios and rhythm."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, date, datetime, timedelta

import numpy as np
import polars as pl
import pytest

from fraudflow.config import SimulationConfig
from fraudflow.data.simulator import (
    FRAUD_SCENARIO,
    LARGE_AMOUNT_THRESHOLD,
    SCENARIOS,
    SIMULATED_COLUMNS,
    simulate,
)

SMALL = SimulationConfig(n_customers=300, n_terminals=600, n_days=60, start_date=date(2025, 3, 10))
# Large enough that every scenario has several events, still well under a second.
MODERATE = SimulationConfig(n_customers=2000, n_terminals=4000, n_days=60, seed=7)

EXPECTED_SCHEMA = {
    "transaction_id": pl.Int64,
    "timestamp": pl.Datetime("us", "UTC"),
    "customer_id": pl.Int64,
    "terminal_id": pl.Int64,
    "amount": pl.Float64,
    "is_fraud": pl.Int8,
    "fraud_scenario": pl.String,
}


@pytest.fixture(scope="module")
def small() -> pl.DataFrame:
    return simulate(SMALL)


@pytest.fixture(scope="module")
def moderate() -> pl.DataFrame:
    return simulate(MODERATE)


def _start(cfg: SimulationConfig) -> datetime:
    return datetime(cfg.start_date.year, cfg.start_date.month, cfg.start_date.day, tzinfo=UTC)


def test_columns_dtypes_and_order_are_exact(small: pl.DataFrame) -> None:
    assert small.columns == list(SIMULATED_COLUMNS)
    assert dict(small.schema) == EXPECTED_SCHEMA


def test_ids_are_row_numbers_in_timestamp_order(small: pl.DataFrame) -> None:
    assert small["transaction_id"].to_list() == list(range(small.height))
    assert small["timestamp"].is_sorted()


def test_values_stay_in_their_ranges(small: pl.DataFrame) -> None:
    start = _start(SMALL)
    end = start + timedelta(days=SMALL.n_days)
    assert small["timestamp"].is_between(start, end, closed="left").all()
    assert small["customer_id"].is_between(0, SMALL.n_customers - 1).all()
    assert small["terminal_id"].is_between(0, SMALL.n_terminals - 1).all()
    amount = small["amount"].to_numpy()
    assert (amount > 0).all()
    np.testing.assert_allclose(amount * 100, np.round(amount * 100), atol=1e-6)


def test_same_seed_gives_an_identical_frame(small: pl.DataFrame) -> None:
    assert simulate(SMALL).equals(small)


def test_different_seed_gives_a_different_frame(small: pl.DataFrame) -> None:
    other = simulate(replace(SMALL, seed=1))
    assert not other.equals(small)


def test_progress_counts_up_to_its_total() -> None:
    calls: list[tuple[int, int]] = []
    simulate(
        SimulationConfig(n_customers=20, n_terminals=40, n_days=3),
        progress=lambda d, t: calls.append((d, t)),
    )
    total = calls[-1][1]
    assert calls == [(done, total) for done in range(1, total + 1)]


def test_tiny_world_falls_back_to_the_nearest_terminal() -> None:
    frame = simulate(SimulationConfig(n_customers=5, n_terminals=1, n_days=2))
    legit = frame.filter(pl.col(FRAUD_SCENARIO) == "")
    assert legit.height > 0
    assert legit["terminal_id"].unique().to_list() == [0]


def test_fraud_rate_is_realistic_and_every_scenario_occurs(moderate: pl.DataFrame) -> None:
    rate = moderate["is_fraud"].mean()
    assert 0.001 < rate < 0.01  # type: ignore[operator]
    assert set(moderate[FRAUD_SCENARIO].unique()) == {"", *SCENARIOS}


def test_is_fraud_is_set_exactly_where_a_scenario_is_named(moderate: pl.DataFrame) -> None:
    named = (moderate[FRAUD_SCENARIO] != "").cast(pl.Int8)
    assert (moderate["is_fraud"] == named).all()


def test_every_large_amount_is_fraud(moderate: pl.DataFrame) -> None:
    large = moderate.filter(pl.col("amount") > LARGE_AMOUNT_THRESHOLD)
    assert large.height > 0
    assert (large["is_fraud"] == 1).all()


def test_compromised_terminal_fraud_is_one_period_of_at_most_28_days(
    moderate: pl.DataFrame,
) -> None:
    labelled = moderate.filter(pl.col(FRAUD_SCENARIO) == "compromised_terminal")
    span = labelled.group_by("terminal_id").agg(
        first=pl.col("timestamp").min(), last=pl.col("timestamp").max()
    )
    assert (span["last"] - span["first"]).max() < timedelta(days=28)  # type: ignore[operator]
    # Between its first and last such row, every row at the terminal is fraud (no gaps).
    during = moderate.join(span, on="terminal_id").filter(
        pl.col("timestamp").is_between(pl.col("first"), pl.col("last"))
    )
    assert (during["is_fraud"] == 1).all()


def test_compromised_card_fraud_is_one_period_of_at_most_14_days(moderate: pl.DataFrame) -> None:
    labelled = moderate.filter(pl.col(FRAUD_SCENARIO) == "compromised_card")
    span = labelled.group_by("customer_id").agg(
        pl.col("timestamp").max() - pl.col("timestamp").min()
    )
    assert span["timestamp"].max() < timedelta(days=14)  # type: ignore[operator]


def test_card_testing_is_small_probes_then_large_follow_ups(moderate: pl.DataFrame) -> None:
    bursts = (
        moderate.filter(pl.col(FRAUD_SCENARIO) == "card_testing")
        .group_by("customer_id", pl.col("timestamp").dt.date().alias("day"))
        .agg(
            n_small=(pl.col("amount") < 5).sum(),
            n_large=(pl.col("amount") >= 5).sum(),
            last_small=pl.col("timestamp").filter(pl.col("amount") < 5).max(),
            first_large=pl.col("timestamp").filter(pl.col("amount") >= 5).min(),
            probe_terminals=pl.col("terminal_id").filter(pl.col("amount") < 5).n_unique(),
        )
    )
    assert bursts.height > 0
    assert bursts["n_small"].is_between(5, 15).all()
    assert bursts["n_large"].is_between(1, 3).all()
    assert (bursts["last_small"] < bursts["first_large"]).all()
    assert bursts["probe_terminals"].is_between(1, 3).all()


def test_card_testing_probes_are_seconds_to_minutes_apart(moderate: pl.DataFrame) -> None:
    probes = moderate.filter(
        (pl.col(FRAUD_SCENARIO) == "card_testing") & (pl.col("amount") < 5)
    ).sort("customer_id", "timestamp")
    gaps = probes.select(pl.col("timestamp").diff().over("customer_id")).drop_nulls()
    assert gaps["timestamp"].max() <= timedelta(minutes=3)  # type: ignore[operator]


def test_most_transactions_happen_in_daytime(moderate: pl.DataFrame) -> None:
    hour = moderate["timestamp"].dt.hour()
    assert hour.is_between(8, 19).mean() > 0.7  # type: ignore[operator]
    assert hour.is_between(0, 4).mean() < 0.05  # type: ignore[operator]


def test_weekends_are_quieter_than_weekdays(small: pl.DataFrame) -> None:
    per_day = small.group_by(pl.col("timestamp").dt.date().alias("day")).len()
    weekday = per_day["day"].dt.weekday()  # 1 = Monday
    weekend_mean = per_day.filter(weekday >= 6)["len"].mean()
    workday_mean = per_day.filter(weekday <= 5)["len"].mean()
    assert weekend_mean < 0.85 * workday_mean  # type: ignore[operator]
