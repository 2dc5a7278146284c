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
    SimulationTruth,
    simulate,
    simulate_with_truth,
)
from fraudflow.errors import ConfigError

SMALL = SimulationConfig(n_customers=300, n_terminals=600, n_days=60, start_date=date(2025, 3, 10))
# Large enough that every scenario has several events, still well under a second.
MODERATE = SimulationConfig(n_customers=2000, n_terminals=4000, n_days=60, seed=7)
# The structural scenarios five times as often as by default, so each has many events.
STRUCTURAL = replace(
    MODERATE,
    cpp_rate_per_terminal_day=2e-4,
    ato_rate_per_card_day=1e-3,
    ring_rate_per_card_day=8e-5,
)
NEW_SCENARIOS = ("common_point_of_compromise", "account_takeover", "fraud_ring")
NO_NEW_SCENARIOS = {
    "cpp_rate_per_terminal_day": 0.0,
    "ato_rate_per_card_day": 0.0,
    "ring_rate_per_card_day": 0.0,
}

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


@pytest.fixture(scope="module")
def structural() -> tuple[pl.DataFrame, SimulationTruth]:
    return simulate_with_truth(STRUCTURAL)


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
    assert moderate[FRAUD_SCENARIO].null_count() == 0  # legitimate rows carry "", not null
    named = (moderate[FRAUD_SCENARIO] != "").cast(pl.Int8)
    assert (moderate["is_fraud"] == named).all()


def test_the_new_scenarios_only_add_rows(moderate: pl.DataFrame) -> None:
    """The first four scenarios are untouched: without the new ones, the same rows remain."""
    without = simulate(replace(MODERATE, **NO_NEW_SCENARIOS))
    assert set(without[FRAUD_SCENARIO].unique()) == {"", *SCENARIOS[:4]}
    kept = moderate.filter(~pl.col(FRAUD_SCENARIO).is_in(NEW_SCENARIOS))
    assert kept.drop("transaction_id").equals(without.drop("transaction_id"))
    assert moderate.height > without.height


def test_each_new_scenario_is_a_small_share_of_the_transactions() -> None:
    frame = simulate(SimulationConfig(n_customers=3000, n_terminals=6000, n_days=90))
    share = frame[FRAUD_SCENARIO].value_counts(normalize=True)
    for name in NEW_SCENARIOS:
        assert 0.0002 < share.filter(pl.col(FRAUD_SCENARIO) == name)["proportion"].item() < 0.002
    assert 0.005 < frame["is_fraud"].mean() < 0.009  # type: ignore[operator]


def test_truth_is_deterministic(structural: tuple[pl.DataFrame, SimulationTruth]) -> None:
    frame, truth = structural
    again_frame, again = simulate_with_truth(STRUCTURAL)
    assert again_frame.equals(frame)
    for name in ("skimmed", "takeovers", "ring_cards", "ring_terminals"):
        assert getattr(again, name).equals(getattr(truth, name))
        assert getattr(truth, name).height > 0


def test_negative_scenario_rates_are_refused() -> None:
    with pytest.raises(ConfigError, match="ato_rate_per_card_day must be >= 0, however got -1"):
        SimulationConfig(ato_rate_per_card_day=-1)


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


# --- the structural scenarios, checked against the simulator's ground truth -----------------


def _legit_visits(frame: pl.DataFrame, truth: SimulationTruth) -> pl.DataFrame:
    """Legitimate payments at a skimmed terminal during its window: the leaked cards."""
    return (
        frame.filter(pl.col(FRAUD_SCENARIO) == "")
        .join(truth.skimmed, on="terminal_id")
        .filter(pl.col("timestamp").is_between("window_start", "window_end", closed="left"))
        .select("customer_id", skimmed="terminal_id", window_end="window_end")
    )


def test_cpp_cards_paid_at_the_skimmed_terminal_before_their_fraud_elsewhere(
    structural: tuple[pl.DataFrame, SimulationTruth],
) -> None:
    frame, truth = structural
    fraud = frame.filter(pl.col(FRAUD_SCENARIO) == "common_point_of_compromise")
    assert fraud["customer_id"].n_unique() >= 50
    # Each fraud row: the card was leaked by a window that closed 1 to 12 days before it,
    # and the row is at another terminal than the one that leaked it.
    explained = (
        fraud.join(_legit_visits(frame, truth), on="customer_id")
        .filter(
            (pl.col("timestamp") >= pl.col("window_end") + timedelta(days=1))
            & (pl.col("timestamp") < pl.col("window_end") + timedelta(days=12))
            & (pl.col("terminal_id") != pl.col("skimmed"))
        )["transaction_id"]
        .unique()
    )
    assert explained.len() == fraud.height


def test_every_card_paying_at_a_skimmed_terminal_is_leaked(
    structural: tuple[pl.DataFrame, SimulationTruth],
) -> None:
    frame, truth = structural
    # Windows that closed 12 days before the end: all of their cards' frauds are in the data.
    end = _start(STRUCTURAL) + timedelta(days=STRUCTURAL.n_days - 12)
    visitors = _legit_visits(frame, truth).filter(pl.col("window_end") <= end)["customer_id"]
    fraud = frame.filter(pl.col(FRAUD_SCENARIO) == "common_point_of_compromise")["customer_id"]
    assert visitors.n_unique() >= 50
    assert set(visitors) <= set(fraud)


def _takeover_rows(frame: pl.DataFrame, truth: SimulationTruth) -> pl.DataFrame:
    return frame.filter(pl.col(FRAUD_SCENARIO) == "account_takeover").join(
        truth.takeovers, on="customer_id"
    )


def test_ato_is_on_cards_with_legitimate_history(
    structural: tuple[pl.DataFrame, SimulationTruth],
) -> None:
    frame, truth = structural
    ato = _takeover_rows(frame, truth)
    assert ato["customer_id"].n_unique() >= 50
    assert (ato["timestamp"] >= ato["takeover"]).all()
    history = (
        frame.filter(pl.col(FRAUD_SCENARIO) == "")
        .join(truth.takeovers, on="customer_id")
        .filter(pl.col("timestamp") < pl.col("takeover"))
        .group_by("customer_id")
        .len()
    )
    ato_cards = ato.select("customer_id").unique().join(history, on="customer_id", how="left")
    assert (ato_cards["len"].fill_null(0) >= 5).all()


def test_ato_terminals_are_far_from_home_and_new_to_the_card(
    structural: tuple[pl.DataFrame, SimulationTruth],
) -> None:
    frame, truth = structural
    ato = (
        _takeover_rows(frame, truth)
        .join(truth.customers, on="customer_id")
        .join(truth.terminals, on="terminal_id", suffix="_terminal")
    )
    distance = ((ato["x"] - ato["x_terminal"]) ** 2 + (ato["y"] - ato["y_terminal"]) ** 2).sqrt()
    assert distance.min() >= 30.0  # type: ignore[operator]
    legit = frame.filter(pl.col(FRAUD_SCENARIO) == "").select("customer_id", "terminal_id")
    assert ato.join(legit, on=["customer_id", "terminal_id"], how="semi").height == 0


def test_ato_happens_at_new_hours(structural: tuple[pl.DataFrame, SimulationTruth]) -> None:
    frame, truth = structural
    ato = _takeover_rows(frame, truth).join(truth.customers, on="customer_id")
    ts = ato["timestamp"]
    hour = ts.dt.hour() + ts.dt.minute() / 60 + ts.dt.second() / 3600
    gap = (hour - ato["preferred_hour"]).abs()
    circular = pl.select(pl.min_horizontal(gap, 24 - gap)).to_series()
    assert circular.min() >= 8.0  # type: ignore[operator]


def test_ato_is_a_burst_then_larger_amounts_days_later(
    structural: tuple[pl.DataFrame, SimulationTruth],
) -> None:
    frame, truth = structural
    ato = _takeover_rows(frame, truth).with_columns(
        burst=pl.col("timestamp") < pl.col("takeover") + timedelta(hours=1),
        later=pl.col("timestamp") >= pl.col("takeover") + timedelta(hours=23),
    )
    assert (ato["burst"] | ato["later"]).all()  # nothing in between
    per_card = ato.group_by("customer_id").agg(
        n_burst=pl.col("burst").sum(),
        top_burst=pl.col("amount").filter("burst").max(),
        low_later=pl.col("amount").filter("later").min(),
    )
    assert per_card["n_burst"].is_between(3, 6).all()
    both = per_card.drop_nulls()
    assert both.height >= 30
    assert (both["top_burst"] < both["low_later"]).all()


def test_ring_frauds_use_only_their_ring_cards_and_terminals(
    structural: tuple[pl.DataFrame, SimulationTruth],
) -> None:
    frame, truth = structural
    ring = frame.filter(pl.col(FRAUD_SCENARIO) == "fraud_ring").join(
        truth.ring_cards, on="customer_id", how="left"
    )
    assert ring.height >= 200
    assert ring["ring"].null_count() == 0  # every ring fraud is by a ring member
    inside = ring.join(truth.ring_terminals, on=["ring", "terminal_id"], how="semi")
    assert inside.height == ring.height  # ... at one of its own ring's terminals
    assert truth.ring_cards["customer_id"].is_unique().all()
    assert truth.ring_terminals["terminal_id"].is_unique().all()


def test_ring_cards_pay_repeatedly_at_a_few_terminals_for_three_weeks(
    structural: tuple[pl.DataFrame, SimulationTruth],
) -> None:
    frame, truth = structural
    rings = (
        frame.filter(pl.col(FRAUD_SCENARIO) == "fraud_ring")
        .join(truth.ring_cards, on="customer_id")
        .group_by("ring")
        .agg(
            rows=pl.len(),
            cards=pl.col("customer_id").n_unique(),
            terminals=pl.col("terminal_id").n_unique(),
            span=pl.col("timestamp").max() - pl.col("timestamp").min(),
        )
    )
    assert rings["cards"].is_between(1, 8).all()
    assert rings["terminals"].is_between(1, 4).all()
    assert rings["span"].max() < timedelta(days=21)  # type: ignore[operator]
    busy = rings.filter(pl.col("cards") >= 4)
    assert busy.height >= 5
    assert (busy["rows"] >= 3 * busy["terminals"]).all()  # each terminal used again and again
