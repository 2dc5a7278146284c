"""Time-based train / validation / delay / test split (Fraud Detection Handbook, ch. 5.2).

Layout on the calendar, in UTC days:

    | warm-up | fit ............ | valid | delay | test |
              <---------- train ------->

* warm-up: skipped so that the longest feature windows are full;
* train: the model learns from it; its last ``valid_days`` are held out for early stopping;
* delay: a gap as long as the label delay, because labels of the last training days would
  not be known yet on the first test day;
* test: the held-out future period that the metrics describe.

Cards already known to be compromised before the test period (a fraud whose label was known
by then) are flagged ``known_compromised`` in the test set: a fraud team would have blocked
them already, so counting them would flatter any model.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta

import polars as pl

from fraudflow.config import SplitConfig
from fraudflow.data.schema import CUSTOMER_ID, IS_FRAUD, TIMESTAMP
from fraudflow.errors import DataError

__all__ = ["KNOWN_COMPROMISED", "Periods", "Split", "plan_periods", "split_by_time"]

KNOWN_COMPROMISED = "known_compromised"


@dataclass(frozen=True)
class Periods:
    """Half-open day ranges [start, end) of each part."""

    train_start: date
    valid_start: date
    delay_start: date
    test_start: date
    test_end: date

    def as_dict(self) -> dict[str, str]:
        return {k: v.isoformat() for k, v in self.__dict__.items()}


@dataclass(frozen=True)
class Split:
    periods: Periods
    fit: pl.DataFrame
    valid: pl.DataFrame
    test: pl.DataFrame  # with a boolean KNOWN_COMPROMISED column


def plan_periods(first_day: date, last_day: date, cfg: SplitConfig) -> Periods:
    """Where each part starts, from the data's first and last day and the split settings."""
    if cfg.train_start is not None:
        train_start = cfg.train_start
        if cfg.train_days is not None:
            delay_start = train_start + timedelta(days=cfg.train_days)
        else:
            delay_start = last_day + timedelta(days=1 - cfg.test_days - cfg.delay_days)
    else:
        delay_start = last_day + timedelta(days=1 - cfg.test_days - cfg.delay_days)
        if cfg.train_days is not None:
            train_start = delay_start - timedelta(days=cfg.train_days)
        else:
            train_start = first_day + timedelta(days=cfg.warmup_days)
    test_start = delay_start + timedelta(days=cfg.delay_days)
    periods = Periods(
        train_start=train_start,
        valid_start=delay_start - timedelta(days=cfg.valid_days),
        delay_start=delay_start,
        test_start=test_start,
        test_end=test_start + timedelta(days=cfg.test_days),
    )
    _check_order(periods, first_day, last_day)
    return periods


def _check_order(p: Periods, first_day: date, last_day: date) -> None:
    span = f"the data covers {first_day} to {last_day}"
    if p.valid_start <= p.train_start:
        raise DataError(
            f"the training period {p.train_start} to {p.delay_start} must be longer than the "
            f"validation days, however it has {(p.delay_start - p.train_start).days} day(s) "
            f"({span})"
        )
    if p.train_start < first_day or p.test_end > last_day + timedelta(days=1):
        raise DataError(
            f"the split needs data from {p.train_start} to {p.test_end - timedelta(days=1)}, "
            f"however {span}"
        )


def split_by_time(frame: pl.DataFrame, cfg: SplitConfig, *, label_delay_days: int) -> Split:
    """Cut a feature table into fit / valid / test by day, flagging known-compromised cards."""
    if frame.height == 0:
        raise DataError("the feature table is empty")
    days = frame[TIMESTAMP].dt.date()
    periods = plan_periods(days.min(), days.max(), cfg)  # type: ignore[arg-type]
    fit = _between(frame, periods.train_start, periods.valid_start)
    valid = _between(frame, periods.valid_start, periods.delay_start)
    test = _between(frame, periods.test_start, periods.test_end)
    for name, part in (("fit", fit), ("validation", valid), ("test", test)):
        _require_labels(name, part)
    known = _known_compromised(frame, periods.test_start, label_delay_days)
    test = test.with_columns(pl.col(CUSTOMER_ID).is_in(known.implode()).alias(KNOWN_COMPROMISED))
    return Split(periods=periods, fit=fit, valid=valid, test=test)


def _midnight(day: date) -> datetime:
    return datetime.combine(day, time(0), tzinfo=UTC)


def _between(frame: pl.DataFrame, start: date, end: date) -> pl.DataFrame:
    ts = pl.col(TIMESTAMP)
    return frame.filter((ts >= _midnight(start)) & (ts < _midnight(end)))


def _require_labels(name: str, part: pl.DataFrame) -> None:
    if part.height == 0:
        raise DataError(f"the {name} period has no transactions; adjust the split flags")
    if int(part[IS_FRAUD].sum()) == 0:
        raise DataError(f"the {name} period has no fraud labels; adjust the split flags")


def _known_compromised(frame: pl.DataFrame, test_start: date, label_delay_days: int) -> pl.Series:
    """Customers with a fraud whose label was known before the test period began."""
    known_by = _midnight(test_start) - timedelta(days=label_delay_days)
    frauds = frame.filter((pl.col(IS_FRAUD) == 1) & (pl.col(TIMESTAMP) <= known_by))
    return frauds[CUSTOMER_ID].unique()
