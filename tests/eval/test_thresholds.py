"""Review and block thresholds on a hand-built validation table, and the policy file format."""

from __future__ import annotations

import math
import re
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import yaml

from fraudflow.errors import ArtifactError, ConfigError
from fraudflow.eval.thresholds import (
    block_threshold,
    calibrate_policy,
    large_amount_threshold,
    policy_document,
    policy_yaml,
    read_validation,
    review_cards_per_day,
    review_threshold,
)

# Two validation days, five cards (A-E), twelve transactions: (day, card, score, is_fraud).
# Day 2 starts at 00:00 UTC; the 23:30 row belongs to day 1.
#
# Each card's highest score per day (a card is reviewed once a day):
#   day 1: A 0.9, B 0.8, C 0.6, D 0.3        day 2: B 0.95, A 0.7, E 0.5, C 0.1
# Card-days with max >= t, descending: .95 (1), .9 (2), .8 (3), .7 (4), .6 (5), .5 (6), .3 (7),
# .1 (8); cards a day = that / 2.
#   budget 2 -> at most 4 card-days -> review = 0.7 (0.6 would give 5 / 2 = 2.5 cards a day).
#     Counting transactions instead of cards would give 0.85 (0.7 flags 6 rows: 3 a day), and
#     counting distinct cards over both days instead of per day would give 0.5.
#   budget 2.5 -> 5 card-days -> 0.6; budget 3 -> 6 -> 0.5; budget 4 -> all fit -> 0.0.
#
# Transactions by score: .95 F, .9 F, .9 F, .85 F, .8 L, .7 L, .6 F, .5 F, .4 L, .3 L, .2 L, .1 L
# Precision of "score >= t": .95 1/1, .9 3/3, .85 4/4, .8 4/5, .7 4/6, .6 5/7, .5 6/8 = 0.75,
# .4 6/9, .3 6/10, .2 6/11, .1 6/12. The lowest t with precision >= 0.75 is 0.5 (0.7 and 0.6
# fall short in between: the rule is the lowest threshold, not the first miss from the top);
# >= 0.8 -> 0.8; >= 1.0 -> 0.85.
ROWS = [
    (1, "A", 0.90, 1),
    (1, "A", 0.85, 1),
    (1, "A", 0.20, 0),
    (1, "B", 0.80, 0),
    (1, "C", 0.60, 1),
    (1, "D", 0.30, 0),
    (2, "B", 0.95, 1),
    (2, "B", 0.90, 1),
    (2, "A", 0.70, 0),
    (2, "E", 0.50, 1),
    (2, "E", 0.40, 0),
    (2, "C", 0.10, 0),
]
AMOUNTS = np.arange(1, 1001, dtype=float)


def _validation(rows: list[tuple[int, str, float, int]] = ROWS) -> pl.DataFrame:
    # Row i at hour i of its day, except row 5, the last of day 1, at 23:30.
    hours = [23.5 if i == 5 else float(i) for i in range(len(rows))]
    return pl.DataFrame(
        {
            "transaction_id": [f"t{i}" for i in range(len(rows))],
            "customer_id": [card for _, card, _, _ in rows],
            "timestamp": [
                datetime(2026, 3, day, tzinfo=UTC) + timedelta(hours=h)
                for (day, *_), h in zip(rows, hours, strict=True)
            ],
            "is_fraud": [y for *_, y in rows],
            "score": [s for _, _, s, _ in rows],
        }
    )


def _arrays() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    days, cards, scores, labels = (np.array(col) for col in zip(*ROWS, strict=True))
    return cards, days, scores.astype(float), labels.astype(int)


@pytest.mark.parametrize(("budget", "expected"), [(2, 0.7), (2.5, 0.6), (3, 0.5), (4, 0.0)])
def test_review_threshold_hand_built(budget: float, expected: float) -> None:
    cards, days, scores, _ = _arrays()
    threshold = review_threshold(cards, days, scores, budget)
    assert threshold == expected
    assert review_cards_per_day(cards, days, scores, threshold) <= budget


def test_review_cards_per_day_counts_each_card_once_a_day() -> None:
    cards, days, scores, _ = _arrays()
    assert review_cards_per_day(cards, days, scores, 0.7) == 2.0  # A, B on day 1; B, A on day 2
    assert review_cards_per_day(cards, days, scores, 0.0) == 4.0


def test_review_budget_below_the_top_card_reviews_nothing() -> None:
    # Even the top card-day alone is 1 / 2 = 0.5 cards a day > 0.4.
    cards, days, scores, _ = _arrays()
    threshold = review_threshold(cards, days, scores, 0.4)
    assert threshold == np.nextafter(0.95, 1.0)
    assert review_cards_per_day(cards, days, scores, threshold) == 0.0


@pytest.mark.parametrize(("precision", "expected"), [(0.75, 0.5), (0.8, 0.8), (1.0, 0.85)])
def test_block_threshold_hand_built(precision: float, expected: float) -> None:
    _, _, scores, labels = _arrays()
    assert block_threshold(labels, scores, precision) == expected


def test_block_threshold_unreachable_is_none() -> None:
    assert block_threshold([0, 1, 0], [0.9, 0.5, 0.1], 0.9) is None  # the top score is legit


def test_policy_raises_block_to_review() -> None:
    # Budget 2: review 0.7; precision 0.75 alone gives block 0.5, raised to 0.7, where 4 of
    # the 6 rows >= 0.7 are fraud (precision 2/3) and 4 of the 6 frauds are caught.
    cal = calibrate_policy(_validation(), AMOUNTS, review_budget=2, block_precision=0.75)
    assert (cal.review, cal.block, cal.block_reachable) == (0.7, 0.7, True)
    assert cal.validation_days == 2
    assert cal.expected_review_cards_per_day == 2.0
    assert cal.expected_block_precision == pytest.approx(4 / 6)
    assert cal.expected_block_recall == pytest.approx(4 / 6)


def test_policy_block_above_review() -> None:
    # Budget 3: review 0.5; precision 1.0: block 0.85, 4 rows all fraud, 4 of 6 frauds.
    cal = calibrate_policy(_validation(), AMOUNTS, review_budget=3, block_precision=1.0)
    assert (cal.review, cal.block) == (0.5, 0.85)
    assert (cal.expected_block_precision, cal.expected_block_recall) == (1.0, pytest.approx(4 / 6))


def test_policy_never_blocks_when_the_precision_is_out_of_reach() -> None:
    rows = [(d, c, s, 0 if s == 0.95 else y) for d, c, s, y in ROWS]  # the top row now legit
    cal = calibrate_policy(_validation(rows), AMOUNTS, review_budget=2, block_precision=1.0)
    assert (cal.block, cal.block_reachable) == (1.0, False)
    assert (cal.expected_block_precision, cal.expected_block_recall) == (None, None)


def test_large_amount_is_the_999th_permille_rounded_up() -> None:
    # Linear quantile of 1..1000 at 0.999: position 998.001 -> 999.001 -> rounded up 1000.
    assert large_amount_threshold(AMOUNTS) == 1000.0
    assert large_amount_threshold([5.2] * 10) == 6.0


@pytest.mark.parametrize(
    ("budget", "precision", "message"),
    [
        (0, 0.9, "--review-budget must be >= 1 card a day, however: 0"),
        (2, 0.0, r"--block-precision must be in \(0, 1\], however: 0.0"),
        (2, 1.5, r"--block-precision must be in \(0, 1\], however: 1.5"),
    ],
)
def test_bad_settings_are_refused(budget: int, precision: float, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        calibrate_policy(_validation(), AMOUNTS, review_budget=budget, block_precision=precision)


def test_policy_yaml_layout_and_round_trip(tmp_path: Path) -> None:
    cal = calibrate_policy(_validation(), AMOUNTS, review_budget=2, block_precision=0.75)
    created = datetime(2026, 4, 1, 12, 0, tzinfo=UTC)
    doc = policy_document(cal, run_dir=tmp_path, created=created)
    text = policy_yaml(doc)
    assert yaml.safe_load(text) == doc
    lines = text.splitlines()
    assert lines[:3] == ["version: 1", "thresholds: {review: 0.7, block: 0.7}", "rules:"]
    assert lines[3:6] == [
        "  - {name: large_amount, when: {feature: amount, above: 1000.0}, action: review}",
        "  - {name: burst, when: {feature: customer__count__1h, above: 10}, action: review}",
        "  - {name: terminal_with_known_fraud, when: {feature: terminal__fraud_rate__30d, "
        "above: 0.2}, action: review}",
    ]
    assert re.fullmatch(
        rf"calibration: \{{run: {re.escape(str(tmp_path.resolve()))}, "
        r"review_budget_cards_per_day: 2, block_precision: 0.75, validation_days: 2, "
        r"expected_review_cards_per_day: 2.0, expected_block_precision: 0.666\d+, "
        r"expected_block_recall: 0.666\d+, created: '2026-04-01T12:00:00\+00:00'\}",
        lines[6],
    )
    assert len(lines) == 7


def test_read_validation_names_what_is_missing(tmp_path: Path) -> None:
    with pytest.raises(ArtifactError, match="does not exist or is not a folder"):
        read_validation(tmp_path / "nope")
    with pytest.raises(ArtifactError, match="retrain it with this version"):
        read_validation(tmp_path)


def test_a_naive_timestamp_is_read_as_utc() -> None:
    naive = _validation().with_columns(pl.col("timestamp").dt.replace_time_zone(None))
    cal = calibrate_policy(naive, AMOUNTS, review_budget=2, block_precision=0.75)
    assert (cal.review, cal.validation_days) == (0.7, 2)
    assert math.isclose(cal.expected_review_cards_per_day, 2.0)
