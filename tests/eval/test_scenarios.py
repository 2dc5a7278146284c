"""Metrics per fraud scenario on predictions whose answers are worked out by hand."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import polars as pl
import pytest

from fraudflow.errors import SchemaError
from fraudflow.eval.scenarios import per_scenario_metrics, scenario_metrics

DAY0 = datetime(2026, 3, 2, 12, tzinfo=UTC)


def _pred(
    rows: list[tuple[int, str | None, float, bool]], days: list[int] | None = None
) -> pl.DataFrame:
    """Rows of (is_fraud, fraud_scenario, score, known_compromised), one card each."""
    days = days or [0] * len(rows)
    return pl.DataFrame(
        {
            "transaction_id": range(len(rows)),
            "customer_id": range(len(rows)),
            "timestamp": [DAY0 + timedelta(days=d) for d in days],
            "is_fraud": pl.Series([r[0] for r in rows], dtype=pl.Int8),
            "score": [r[2] for r in rows],
            "known_compromised": [r[3] for r in rows],
            "fraud_scenario": pl.Series([r[1] for r in rows], dtype=pl.String),
        }
    )


TEST = _pred(
    [
        (1, "ring", 0.9, False),
        (1, "ring", 0.3, False),
        (1, "ato", 0.7, False),
        (1, "ato", 0.99, True),  # known compromised: left out
        (1, "", 0.8, False),  # a fraud with no scenario name counts in none
        (1, None, 0.8, False),
        (0, "", 0.6, False),
        (0, "", 0.2, False),
        (0, None, 0.1, False),
        (0, "", 0.95, True),  # left out
    ]
)


def test_per_scenario_counts_recall_and_average_precision() -> None:
    got = per_scenario_metrics(TEST, threshold=0.5)
    assert list(got) == ["ato", "ring"]
    # ato: 0.7 above legit 0.6, 0.2, 0.1 -> AP 1; ring: 0.9 first (precision 1), 0.3 after
    # 0.6 (precision 2/3) -> AP (1 + 2/3) / 2.
    assert got["ato"] == {"n_fraud": 1, "recall_at_review_threshold": 1.0, "average_precision": 1.0}
    assert got["ring"]["n_fraud"] == 2
    assert got["ring"]["recall_at_review_threshold"] == 0.5
    assert got["ring"]["average_precision"] == pytest.approx((1 + 2 / 3) / 2)


def test_a_score_equal_to_the_threshold_is_reviewed() -> None:
    got = per_scenario_metrics(TEST, threshold=0.3)
    assert got["ring"]["recall_at_review_threshold"] == 1.0


def test_scenario_metrics_take_the_threshold_from_validation() -> None:
    # Two validation days; the top card each day scores 0.9 and 0.8, the others lower.
    validation = _pred(
        [(0, "", 0.9, False), (0, "", 0.4, False), (0, "", 0.8, False), (0, "", 0.1, False)],
        days=[0, 0, 1, 1],
    )
    got = scenario_metrics(TEST, validation, budget=1)
    # One card a day: the lowest threshold flagging <= 1 card a day on average is 0.8.
    assert got["review_threshold"] == 0.8
    assert got["review_budget_cards_per_day"] == 1
    assert got["per_scenario"]["ring"]["recall_at_review_threshold"] == 0.5
    assert got["per_scenario"]["ato"]["recall_at_review_threshold"] == 0.0


def test_without_the_column_the_error_says_what_is_missing() -> None:
    with pytest.raises(SchemaError, match="need the column `fraud_scenario`, however"):
        per_scenario_metrics(TEST.drop("fraud_scenario"), threshold=0.5)
