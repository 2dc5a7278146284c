"""Decision thresholds for the service, chosen on a run's validation period.

The decision service maps a calibrated fraud probability to an action: ``block`` at or above
the block threshold, else ``review`` at or above the review threshold (or when a rule fires),
else ``approve``. Both thresholds are read off the validation period
(``RUN_DIR/validation_predictions.parquet``), never the test period, which stays unseen:

* review: a team of analysts checks about ``review_budget`` cards a day (the Fraud Detection
  Handbook, Le Borgne et al. 2022, ch. 4, "Precision top-k metrics", takes k = 100). The review
  threshold is the lowest one at which the mean, over validation days, of the number of
  distinct cards with at least one transaction scored >= threshold that day is <= the budget.
* block: the lowest threshold whose transaction-level precision (frauds among transactions
  scored >= threshold) on validation is >= ``block_precision``, i.e. the most recall at that
  precision. If no threshold reaches it, block is 1.0: never block automatically.
  Block is then raised to at least review, so that every blocked score would also be reviewed.

Thresholds are taken at observed scores: any threshold between two neighbouring observed
scores selects the same validation rows, so the observed score is the lowest one attained.

The policy file (``policy_yaml``) is the contract with ``fraudflow.serve.policy``:

    version: 1
    thresholds: {review: <float>, block: <float>}
    rules:
      - {name: large_amount, when: {feature: amount, above: <float>}, action: review}
      - ...
    calibration: {run: <abs path>, review_budget_cards_per_day: ..., ...}
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from datetime import date, datetime
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import polars as pl
import yaml

from fraudflow.data.schema import AMOUNT, CUSTOMER_ID, IS_FRAUD, TIMESTAMP
from fraudflow.data.splits import in_period
from fraudflow.errors import ArtifactError, ConfigError, DataError, SchemaError
from fraudflow.features import open_feature_source

__all__ = [
    "LARGE_AMOUNT_QUANTILE",
    "POLICY_VERSION",
    "VALIDATION_PREDICTIONS",
    "PolicyCalibration",
    "block_threshold",
    "calibrate_policy",
    "large_amount_threshold",
    "policy_document",
    "policy_yaml",
    "precision_recall_at",
    "read_validation",
    "review_cards_per_day",
    "review_threshold",
    "validation_amounts",
    "validation_review_threshold",
]

POLICY_VERSION = 1
VALIDATION_PREDICTIONS = "validation_predictions.parquet"
LARGE_AMOUNT_QUANTILE = 0.999
NEVER_BLOCK = 1.0
# Fixed rules: a burst of card activity (card testing) and a terminal with many recent known
# frauds (a compromised terminal) go to review whatever the score.
_FIXED_RULES: tuple[dict[str, Any], ...] = (
    {"name": "burst", "when": {"feature": "customer__count__1h", "above": 10}, "action": "review"},
    {
        "name": "terminal_with_known_fraud",
        "when": {"feature": "terminal__fraud_rate__30d", "above": 0.2},
        "action": "review",
    },
)
_VALIDATION_COLUMNS = (CUSTOMER_ID, TIMESTAMP, IS_FRAUD, "score")


@dataclass(frozen=True)
class PolicyCalibration:
    """The chosen thresholds and what they did on the validation period."""

    review: float
    block: float
    block_reachable: bool  # False: no threshold reached block_precision, so block = 1.0
    review_budget: int
    block_precision: float
    validation_days: int
    expected_review_cards_per_day: float
    expected_block_precision: float | None  # None when block is never reached
    expected_block_recall: float | None
    large_amount: float


def review_threshold(
    customer_ids: npt.ArrayLike, days: npt.ArrayLike, scores: npt.ArrayLike, budget: float
) -> float:
    """The lowest observed score t with mean daily cards (max score that day >= t) <= budget.

    0.0 when every card fits the budget; when not even the top score does (ties), the next
    float above it, capped at 1.0.
    """
    if budget <= 0:
        raise ValueError(f"budget must be > 0 cards a day, however: {budget}")
    card_max, n_days = _card_day_max(customer_ids, days, scores)
    candidates = np.unique(card_max)  # ascending
    flagged = card_max.size - np.searchsorted(card_max, candidates, side="left")
    fits = flagged / n_days <= budget  # a suffix: flagged decreases as t grows
    if fits.all():
        return 0.0
    if not fits.any():
        return min(float(np.nextafter(candidates[-1], np.inf)), 1.0)
    return float(candidates[fits][0])


def validation_review_threshold(validation: pl.DataFrame, budget: float) -> float:
    """``review_threshold`` on a validation predictions table (its calibrated ``score``): the
    review threshold ``calibrate_policy`` would choose for this budget."""
    _check_columns(validation)
    cards, scores = validation[CUSTOMER_ID].to_numpy(), validation["score"].to_numpy()
    return review_threshold(cards, _utc_days(validation), scores, budget)


def review_cards_per_day(
    customer_ids: npt.ArrayLike, days: npt.ArrayLike, scores: npt.ArrayLike, threshold: float
) -> float:
    """Mean over days of the distinct cards with a transaction scored >= threshold that day."""
    card_max, n_days = _card_day_max(customer_ids, days, scores)
    return float((card_max >= threshold).sum() / n_days)


def block_threshold(labels: npt.ArrayLike, scores: npt.ArrayLike, precision: float) -> float | None:
    """The lowest observed score t whose precision (frauds / rows with score >= t) is >=
    ``precision``; None when no threshold reaches it."""
    y, s = _labels_scores(labels, scores)
    order = np.argsort(s, kind="stable")
    s_sorted, y_sorted = s[order], y[order]
    candidates = np.unique(s_sorted)  # ascending
    start = np.searchsorted(s_sorted, candidates, side="left")  # first row >= candidate
    frauds_below = np.concatenate([[0], np.cumsum(y_sorted)])[start]
    flagged = s.size - start  # >= 1: every candidate is an observed score
    hits = (y.sum() - frauds_below) / flagged >= precision
    return float(candidates[hits][0]) if hits.any() else None


def precision_recall_at(
    labels: npt.ArrayLike, scores: npt.ArrayLike, threshold: float
) -> tuple[float | None, float | None]:
    """Precision and recall of flagging scores >= threshold; None where undefined."""
    y, s = _labels_scores(labels, scores)
    flagged = s >= threshold
    caught, frauds = int(y[flagged].sum()), int(y.sum())
    precision = caught / int(flagged.sum()) if flagged.any() else None
    recall = caught / frauds if frauds else None
    return precision, recall


def large_amount_threshold(amounts: npt.ArrayLike) -> float:
    """The 99.9th percentile of the amounts, rounded up to a whole currency unit."""
    arr = np.asarray(amounts, dtype=np.float64)
    if arr.size == 0:
        raise DataError("the validation period has no amounts to set the large_amount rule from")
    return float(math.ceil(np.quantile(arr, LARGE_AMOUNT_QUANTILE)))


def calibrate_policy(
    validation: pl.DataFrame,
    amounts: npt.ArrayLike,
    *,
    review_budget: int,
    block_precision: float,
) -> PolicyCalibration:
    """Both thresholds (module docstring) on a validation predictions table with calibrated
    ``score``, plus the large-amount rule from the validation ``amounts``."""
    if review_budget < 1:
        raise ConfigError(f"--review-budget must be >= 1 card a day, however: {review_budget}")
    if not 0.0 < block_precision <= 1.0:
        raise ConfigError(f"--block-precision must be in (0, 1], however: {block_precision}")
    _check_columns(validation)
    cards, days = validation[CUSTOMER_ID].to_numpy(), _utc_days(validation)
    y, s = validation[IS_FRAUD].to_numpy(), validation["score"].to_numpy()
    review = review_threshold(cards, days, s, review_budget)
    reached = block_threshold(y, s, block_precision)
    block = NEVER_BLOCK if reached is None else max(reached, review)
    precision, recall = precision_recall_at(y, s, block) if reached is not None else (None, None)
    return PolicyCalibration(
        review=review,
        block=block,
        block_reachable=reached is not None,
        review_budget=review_budget,
        block_precision=block_precision,
        validation_days=int(np.unique(days).size),
        expected_review_cards_per_day=review_cards_per_day(cards, days, s, review),
        expected_block_precision=precision,
        expected_block_recall=recall,
        large_amount=large_amount_threshold(amounts),
    )


def policy_document(cal: PolicyCalibration, *, run_dir: Path, created: datetime) -> dict[str, Any]:
    """The policy as plain data, in the order and with the keys of the contract."""
    large = {"feature": AMOUNT, "above": cal.large_amount}
    calibration = {
        "run": str(Path(run_dir).resolve()),
        "review_budget_cards_per_day": cal.review_budget,
        "block_precision": cal.block_precision,
        "validation_days": cal.validation_days,
        "expected_review_cards_per_day": cal.expected_review_cards_per_day,
        "expected_block_precision": cal.expected_block_precision,
        "expected_block_recall": cal.expected_block_recall,
        "created": created.isoformat(timespec="seconds"),
    }
    return {
        "version": POLICY_VERSION,
        "thresholds": {"review": cal.review, "block": cal.block},
        "rules": [{"name": "large_amount", "when": large, "action": "review"}, *_FIXED_RULES],
        "calibration": calibration,
    }


def policy_yaml(doc: dict[str, Any]) -> str:
    """The policy file's text: block style at the top, one flow mapping per line below, so
    that the file reads like the contract in the module docstring."""
    lines = [f"version: {_flow(doc['version'])}", f"thresholds: {_flow(doc['thresholds'])}"]
    lines += ["rules:", *(f"  - {_flow(rule)}" for rule in doc["rules"])]
    lines.append(f"calibration: {_flow(doc['calibration'])}")
    return "\n".join(lines) + "\n"


def read_validation(run_dir: Path) -> pl.DataFrame:
    """A run's validation predictions; ``ArtifactError`` when the run or the file is missing."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ArtifactError(f"run folder {run_dir} does not exist or is not a folder")
    path = run_dir / VALIDATION_PREDICTIONS
    if not path.is_file():
        raise ArtifactError(
            f"{path} does not exist: the run was trained by an older fraudflow, which kept no "
            "validation scores; retrain it with this version (`fraudflow train`)"
        )
    frame = pl.read_parquet(path)
    _check_columns(frame, path)
    return frame


def validation_amounts(run_dir: Path) -> np.ndarray:
    """The amounts of the run's validation period, from the feature table it was trained on
    (``config.json`` names the table and the periods)."""
    path = Path(run_dir) / "config.json"
    try:
        config = json.loads(path.read_text())
        features_path, periods = Path(config["features_path"]), config["periods"]
        start, end = (date.fromisoformat(periods[k]) for k in ("valid_start", "delay_start"))
    except FileNotFoundError:
        raise ArtifactError(f"{path} does not exist; was the run completed?") from None
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise ArtifactError(f"{path} does not name a feature table and periods: {exc}") from None
    scan = open_feature_source(features_path).scan().filter(in_period(start, end))
    return scan.select(AMOUNT).collect()[AMOUNT].to_numpy()


def _card_day_max(
    customer_ids: npt.ArrayLike, days: npt.ArrayLike, scores: npt.ArrayLike
) -> tuple[np.ndarray, int]:
    """Each card's highest score on each day, ascending (a card is reviewed once a day if any
    of its transactions is flagged), and the number of days."""
    s = np.asarray(scores, dtype=np.float64)
    frame = pl.DataFrame({"card": np.asarray(customer_ids), "day": np.asarray(days), "score": s})
    if frame.height == 0:
        raise DataError("the validation period has no transactions to choose thresholds on")
    per_card = frame.group_by("day", "card").agg(pl.col("score").max())
    return np.sort(per_card["score"].to_numpy()), frame["day"].n_unique()


def _labels_scores(labels: npt.ArrayLike, scores: npt.ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(labels).astype(np.int64, copy=False)
    s = np.asarray(scores, dtype=np.float64)
    if y.shape != s.shape or s.size == 0:
        raise ValueError(
            f"labels and scores must be non-empty and of one shape, however: {y.shape}, {s.shape}"
        )
    return y, s


def _utc_days(frame: pl.DataFrame) -> np.ndarray:
    """The UTC calendar date of each row as days since 1970-01-01; naive means UTC already."""
    dtype = frame.schema[TIMESTAMP]
    if not isinstance(dtype, pl.Datetime):
        raise SchemaError(f"`timestamp` must be a Datetime column, however: it is {dtype}")
    ts = pl.col(TIMESTAMP)
    utc = ts.dt.convert_time_zone("UTC") if dtype.time_zone else ts
    return frame.select(utc.dt.date().cast(pl.Int32))[TIMESTAMP].to_numpy()


def _check_columns(frame: pl.DataFrame, source: Path | None = None) -> None:
    missing = [c for c in _VALIDATION_COLUMNS if c not in frame.columns]
    if missing:
        where = f"{source} " if source is not None else "the validation table "
        raise SchemaError(
            f"{where}needs the columns {list(_VALIDATION_COLUMNS)}, however: missing {missing}"
        )


def _flow(value: Any) -> str:
    # One line whatever its length: width=inf stops PyYAML from folding long flow mappings.
    text: str = yaml.safe_dump(
        value, default_flow_style=True, sort_keys=False, width=math.inf
    ).strip()
    return text.removesuffix("\n...").strip()
