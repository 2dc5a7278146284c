"""Fraud-detection metrics as pure functions of labels and scores.

The same functions serve every model (LightGBM and the neural ones), so nothing here imports
torch. Inputs are numpy arrays: ``y`` holds 0/1 labels, ``s`` holds scores (higher means more
likely fraud). Where a metric is undefined because ``y`` has a single class, it is ``nan``.

The predictions table (``predictions.parquet`` in a run folder) has the columns:
    transaction_id     any
    customer_id        any orderable type (str or int)
    timestamp          Datetime, UTC
    is_fraud           0/1 integer
    score              Float64 in [0, 1]
    known_compromised  Boolean; true rows are left out of every metric
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import numpy.typing as npt
import polars as pl
from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve

from fraudflow.errors import SchemaError

__all__ = [
    "PREDICTION_COLUMNS",
    "average_precision",
    "card_precision_at_k",
    "compute_metrics",
    "drop_known_compromised",
    "metrics_from_predictions",
    "recall_at_fpr",
    "roc_auc",
]

PREDICTION_COLUMNS: tuple[str, ...] = (
    "transaction_id",
    "customer_id",
    "timestamp",
    "is_fraud",
    "score",
    "known_compromised",
)


def roc_auc(y: npt.ArrayLike, s: npt.ArrayLike) -> float:
    """Area under the ROC curve (scikit-learn); ``nan`` when ``y`` has a single class."""
    y_arr, s_arr = _labels_and_scores(y, s)
    if not _has_both_classes(y_arr):
        return math.nan
    return float(roc_auc_score(y_arr, s_arr))


def average_precision(y: npt.ArrayLike, s: npt.ArrayLike) -> float:
    """Average precision, the step-wise area under the PR curve (scikit-learn).

    ``nan`` when ``y`` has a single class: with no frauds precision is undefined, and with no
    legitimate transactions the value says nothing about the model.
    """
    y_arr, s_arr = _labels_and_scores(y, s)
    if not _has_both_classes(y_arr):
        return math.nan
    return float(average_precision_score(y_arr, s_arr))


def recall_at_fpr(y: npt.ArrayLike, s: npt.ArrayLike, max_fpr: float = 0.01) -> float:
    """The highest true-positive rate of any threshold whose false-positive rate is <= ``max_fpr``.

    Read off the empirical ROC curve (scikit-learn ``roc_curve``) without interpolating between
    thresholds: only operating points a real threshold reaches count. ``nan`` for a single class.
    """
    if not 0.0 <= max_fpr <= 1.0:
        raise ValueError(f"max_fpr must be in [0, 1], however: max_fpr={max_fpr}")
    y_arr, s_arr = _labels_and_scores(y, s)
    if not _has_both_classes(y_arr):
        return math.nan
    # drop_intermediate=False keeps every threshold, so no reachable point is skipped.
    fpr, tpr, _ = roc_curve(y_arr, s_arr, drop_intermediate=False)
    return float(tpr[fpr <= max_fpr].max())  # fpr[0] == 0, so the selection is never empty


def card_precision_at_k(
    customer_ids: npt.ArrayLike,
    days: npt.ArrayLike,
    y: npt.ArrayLike,
    s: npt.ArrayLike,
    k: int = 100,
) -> tuple[float, list[float]]:
    """Card precision top-k: the mean over test days, and the value of each day in day order.

    Definition from the Fraud Detection Handbook (Le Borgne et al. 2022, "Reproducible Machine
    Learning for Credit Card Fraud Detection", chapter 4, "Precision top-k metrics", card
    precision top-k): each day, an investigator checks the k cards
    (customers) with the highest risk. A card's risk that day is its maximum transaction score and
    it counts as fraudulent if any of its transactions that day is fraud. Cards already detected
    (in an earlier day's top k and fraudulent that day) are blocked, so they leave the ranking of
    every later day. See ``_card_precision_frame`` for the tie rule and the denominator.
    """
    frame = _card_frame(customer_ids, days, y, s)
    return _card_precision_frame(frame, k)


def compute_metrics(
    customer_ids: npt.ArrayLike,
    days: npt.ArrayLike,
    y: npt.ArrayLike,
    s: npt.ArrayLike,
    *,
    k: int = 100,
) -> dict[str, Any]:
    """The metrics every run reports, as a JSON-ready dict.

    The card precision key is ``card_precision_at_100`` whatever ``k`` is, so that every run
    folder and report reads the same key; a run that changes ``k`` records it in its config.
    """
    return _metrics(_card_frame(customer_ids, days, y, s), k)


def drop_known_compromised(pred: pl.DataFrame) -> pl.DataFrame:
    """The rows that count for evaluation.

    Cards already known to be compromised before the test period would be blocked, not scored,
    so they are left out (as in the handbook's card precision top-k, chapter 4).
    """
    _check_prediction_columns(pred)
    return pred.filter(~pl.col("known_compromised").fill_null(False))


def metrics_from_predictions(pred: pl.DataFrame, k: int = 100) -> dict[str, Any]:
    """``compute_metrics`` on a predictions table, after ``drop_known_compromised``.

    The day of a transaction is its UTC calendar date.
    """
    frame = drop_known_compromised(pred).select(
        pl.col("customer_id"),
        _utc_day(pl.col("timestamp"), pred.schema["timestamp"]).alias("day"),
        pl.col("is_fraud").cast(pl.Int8),
        pl.col("score").cast(pl.Float64),
    )
    return _metrics(frame, k)


def _metrics(frame: pl.DataFrame, k: int) -> dict[str, Any]:
    y = frame["is_fraud"].to_numpy()
    s = frame["score"].to_numpy()
    mean_cp, per_day = _card_precision_frame(frame, k)
    return {
        "roc_auc": roc_auc(y, s),
        "average_precision": average_precision(y, s),
        "card_precision_at_100": mean_cp,
        "recall_at_1pct_fpr": recall_at_fpr(y, s, 0.01),
        "card_precision_at_100_per_day": per_day,
        "n_transactions": frame.height,
        "n_fraud": int(y.sum()),
    }


def _card_precision_frame(frame: pl.DataFrame, k: int) -> tuple[float, list[float]]:
    """Card precision top-k over a frame with ``customer_id, day, is_fraud, score``.

    Ties: cards with equal max score are ranked by ascending customer id. The handbook sorts with
    pandas (an unstable sort), so its tie order is arbitrary; fixing it keeps results reproducible.
    Denominator: always k, as in the handbook, even on a day with fewer than k cards to rank; an
    investigator with capacity k who finds fewer cards has wasted the rest. A day with no cards
    left scores 0. The days are those present in the frame; with none, the mean is ``nan``.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, however: k={k}")
    detected: set[Any] = set()
    per_day: list[float] = []
    for day_cards in _daily_cards(frame):
        remaining = day_cards.filter(~pl.col("customer_id").is_in(list(detected)))
        top = remaining.head(k)
        hits = top.filter(pl.col("is_fraud") == 1)["customer_id"].to_list()
        detected.update(hits)
        per_day.append(len(hits) / k)
    mean = float(np.mean(per_day)) if per_day else math.nan
    return mean, per_day


def _daily_cards(frame: pl.DataFrame) -> list[pl.DataFrame]:
    """One frame per day in ascending day order: a row per card, ranked by risk that day."""
    cards = (
        frame.group_by("day", "customer_id")
        .agg(pl.col("score").max(), pl.col("is_fraud").max())
        .sort(["day", "score", "customer_id"], descending=[False, True, False])
    )
    # Sorted by day first, so first-appearance order is day order and row order is rank order.
    return cards.partition_by("day", maintain_order=True)


def _card_frame(
    customer_ids: npt.ArrayLike, days: npt.ArrayLike, y: npt.ArrayLike, s: npt.ArrayLike
) -> pl.DataFrame:
    y_arr, s_arr = _labels_and_scores(y, s)
    ids, day_arr = np.asarray(customer_ids), np.asarray(days)
    if not len(ids) == len(day_arr) == len(y_arr):
        raise ValueError(
            "customer_ids, days, y and s must have the same length, however: "
            f"{len(ids)}, {len(day_arr)}, {len(y_arr)}, {len(s_arr)}"
        )
    return pl.DataFrame({"customer_id": ids, "day": day_arr, "is_fraud": y_arr, "score": s_arr})


def _labels_and_scores(y: npt.ArrayLike, s: npt.ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    y_arr = np.asarray(y).astype(np.int64, copy=False)
    s_arr = np.asarray(s, dtype=np.float64)
    if y_arr.shape != s_arr.shape:
        raise ValueError(
            f"y and s must have the same shape, however: {y_arr.shape} != {s_arr.shape}"
        )
    return y_arr, s_arr


def _has_both_classes(y: np.ndarray) -> bool:
    return bool(np.any(y == 0) and np.any(y == 1))


def _utc_day(ts: pl.Expr, dtype: pl.DataType) -> pl.Expr:
    """Days since 1970-01-01 of the UTC date; a naive timestamp is taken to be UTC already."""
    if not isinstance(dtype, pl.Datetime):
        raise SchemaError(f"`timestamp` must be a Datetime column, however: it is {dtype}")
    utc = ts.dt.replace_time_zone("UTC") if dtype.time_zone is None else ts
    return utc.dt.convert_time_zone("UTC").dt.date().cast(pl.Int32)


def _check_prediction_columns(pred: pl.DataFrame) -> None:
    needed = ("customer_id", "timestamp", "is_fraud", "score", "known_compromised")
    missing = [c for c in needed if c not in pred.columns]
    if missing:
        raise SchemaError(
            f"a predictions table needs the columns {list(needed)}, however: missing {missing}"
        )
