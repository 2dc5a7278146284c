"""Metrics on inputs whose answer is known: scikit-learn, hand-built ROC and card tables."""

from __future__ import annotations

import math
import warnings
from datetime import UTC, datetime, timedelta

import numpy as np
import polars as pl
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score

from fraudflow.errors import SchemaError
from fraudflow.eval.metrics import (
    average_precision,
    card_precision_at_k,
    compute_metrics,
    metrics_from_predictions,
    recall_at_fpr,
    roc_auc,
)


def _random_labels_scores(seed: int, n: int = 2_000) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < 0.1).astype(np.int64)
    s = np.clip(rng.normal(0.3 + 0.3 * y, 0.2), 0, 1)
    return y, s


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_roc_auc_and_ap_equal_scikit_learn(seed: int) -> None:
    y, s = _random_labels_scores(seed)
    assert roc_auc(y, s) == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    assert average_precision(y, s) == pytest.approx(average_precision_score(y, s), abs=1e-12)


@pytest.mark.parametrize("label", [0, 1])
def test_single_class_gives_nan_without_warning(label: int) -> None:
    y, s = np.full(5, label), np.linspace(0, 1, 5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        values = [roc_auc(y, s), average_precision(y, s), recall_at_fpr(y, s)]
    assert all(math.isnan(v) for v in values)


# 10 legitimate, 4 fraud. Sorted by score: 0.95 F, 0.9 L, 0.85 F, 0.7 L, 0.6 F, 0.5 L, 0.4 L,
# 0.3 F, then 6 more L. Operating points (FPR, TPR): score >= 0.95 -> (0, 1/4);
# >= 0.9 -> (1/10, 1/4); >= 0.85 -> (1/10, 2/4); >= 0.7 -> (2/10, 2/4); >= 0.6 -> (2/10, 3/4);
# >= 0.5 -> (3/10, 3/4); >= 0.4 -> (4/10, 3/4); >= 0.3 -> (4/10, 4/4).
_ROC_Y = np.array([1, 0, 1, 0, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0])
_ROC_S = np.array([0.95, 0.9, 0.85, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.15, 0.1, 0.05, 0.02, 0.01])


@pytest.mark.parametrize(
    ("max_fpr", "expected"),
    [(0.0, 0.25), (0.05, 0.25), (0.1, 0.5), (0.2, 0.75), (0.35, 0.75), (0.4, 1.0), (1.0, 1.0)],
)
def test_recall_at_fpr_hand_built(max_fpr: float, expected: float) -> None:
    assert recall_at_fpr(_ROC_Y, _ROC_S, max_fpr) == expected


def test_recall_at_fpr_rejects_out_of_range_fpr() -> None:
    with pytest.raises(ValueError, match=r"max_fpr must be in \[0, 1\], however: max_fpr=1.5"):
        recall_at_fpr(_ROC_Y, _ROC_S, 1.5)


# Card table, k = 2. Rows: (customer, day, is_fraud, score).
# Day 0: A max 0.9 (fraud), B 0.8, C max 0.85 (its 0.3 transaction is the fraud one), D 0.5 fraud.
#   Ranking A 0.9, C 0.85, B 0.8, D 0.5 -> top 2 = A, C, both fraud -> 2/2 = 1.0.
#   (Ranking C by its mean 0.575 would put B in the top 2 and give 0.5.) Detected: A, C.
# Day 1: A 0.95 fraud is dropped (detected on day 0); B 0.7, D 0.6, E 0.6 fraud.
#   D and E tie; the lower id D ranks first -> top 2 = B, D, no fraud -> 0/2 = 0.0.
#   (Keeping A would give 1/2; ranking E before D would give 1/2.) Nothing detected.
# Day 2: C 0.99 fraud is dropped (detected on day 0); B 0.4 fraud stays (it was in day 1's
#   top 2 but not fraudulent, so not detected). Only 1 card for k = 2 -> 1/2 = 0.5.
# Mean: (1.0 + 0.0 + 0.5) / 3 = 0.5.
_CARD_ROWS = [
    ("A", 0, 1, 0.9),
    ("A", 0, 0, 0.1),
    ("B", 0, 0, 0.8),
    ("C", 0, 0, 0.85),
    ("C", 0, 1, 0.3),
    ("D", 0, 1, 0.5),
    ("A", 1, 1, 0.95),
    ("B", 1, 0, 0.7),
    ("D", 1, 0, 0.6),
    ("E", 1, 1, 0.6),
    ("C", 2, 1, 0.99),
    ("B", 2, 1, 0.4),
]
_CARD_PER_DAY = [1.0, 0.0, 0.5]


def _card_arrays(rows: list[tuple[str, int, int, float]]) -> tuple[np.ndarray, ...]:
    ids, days, y, s = zip(*rows, strict=True)
    return np.array(ids), np.array(days), np.array(y), np.array(s)


def test_card_precision_at_k_hand_computed() -> None:
    mean, per_day = card_precision_at_k(*_card_arrays(_CARD_ROWS), k=2)
    assert per_day == _CARD_PER_DAY
    assert mean == pytest.approx(0.5)


def test_card_precision_at_k_ignores_row_order() -> None:
    order = np.random.default_rng(0).permutation(len(_CARD_ROWS))
    _, per_day = card_precision_at_k(*_card_arrays([_CARD_ROWS[i] for i in order]), k=2)
    assert per_day == _CARD_PER_DAY


def test_card_precision_divides_by_k_when_fewer_cards() -> None:
    # One day, 3 cards, 1 fraud, k = 100: 1 / 100 (not 1 / 3).
    mean, per_day = card_precision_at_k([1, 2, 3], [5, 5, 5], [0, 1, 0], [0.2, 0.9, 0.4])
    assert per_day == [0.01]
    assert mean == 0.01


def test_card_precision_empty_input_is_nan() -> None:
    mean, per_day = card_precision_at_k([], [], [], [], k=2)
    assert math.isnan(mean)
    assert per_day == []


def test_compute_metrics_keys_and_counts() -> None:
    result = compute_metrics(*_card_arrays(_CARD_ROWS), k=2)
    assert set(result) == {
        "roc_auc",
        "average_precision",
        "card_precision_at_100",
        "recall_at_1pct_fpr",
        "card_precision_at_100_per_day",
        "n_transactions",
        "n_fraud",
    }
    assert result["card_precision_at_100_per_day"] == _CARD_PER_DAY
    assert (result["n_transactions"], result["n_fraud"]) == (12, 7)  # 12 rows, 7 with is_fraud=1


def _predictions(seed: int, n: int = 3_000) -> pl.DataFrame:
    rng = np.random.default_rng(seed)
    start = datetime(2024, 3, 1, tzinfo=UTC)
    y, s = _random_labels_scores(seed, n)
    return pl.DataFrame(
        {
            "transaction_id": np.arange(n),
            "customer_id": rng.integers(0, 300, n),
            "timestamp": [start + timedelta(minutes=int(m)) for m in rng.integers(0, 10 * 1440, n)],
            "is_fraud": pl.Series(y, dtype=pl.Int8),
            "score": s,
            "known_compromised": rng.random(n) < 0.2,
        }
    )


def test_metrics_from_predictions_ignores_known_compromised_rows() -> None:
    pred = _predictions(0)
    changed = pred.with_columns(
        pl.when(pl.col("known_compromised"))
        .then(1.0 - pl.col("score"))
        .otherwise(pl.col("score"))
        .alias("score"),
        pl.when(pl.col("known_compromised"))
        .then(1 - pl.col("is_fraud"))
        .otherwise(pl.col("is_fraud"))
        .alias("is_fraud"),
    )
    before, after = metrics_from_predictions(pred), metrics_from_predictions(changed)
    assert before == after
    assert before["n_transactions"] == pred.filter(~pl.col("known_compromised")).height


def test_metrics_from_predictions_uses_utc_dates() -> None:
    # 23:30 UTC on 1 March and 00:30 UTC on 2 March are two test days, even though they are the
    # same day in New York: the timestamps are stored in that zone but the day is the UTC date.
    stamps = [datetime(2024, 3, 1, 23, 30, tzinfo=UTC), datetime(2024, 3, 2, 0, 30, tzinfo=UTC)]
    pred = pl.DataFrame(
        {
            "transaction_id": [1, 2],
            "customer_id": ["a", "a"],
            "timestamp": pl.Series(stamps).dt.convert_time_zone("America/New_York"),
            "is_fraud": pl.Series([1, 1], dtype=pl.Int8),
            "score": [0.9, 0.8],
            "known_compromised": [False, False],
        }
    )
    # Day 1: a is fraud -> 1/2, and detected; day 2: a is dropped -> 0/2.
    assert metrics_from_predictions(pred, k=2)["card_precision_at_100_per_day"] == [0.5, 0.0]


def test_metrics_from_predictions_names_missing_columns() -> None:
    pred = _predictions(1).drop("known_compromised")
    with pytest.raises(SchemaError, match=r"however: missing \['known_compromised'\]"):
        metrics_from_predictions(pred)
