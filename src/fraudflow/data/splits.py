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

__all__ = [
    "KNOWN_COMPROMISED",
    "LazySplit",
    "Periods",
    "Split",
    "in_period",
    "plan_periods",
    "split_by_time",
    "split_lazy",
]

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


@dataclass(frozen=True)
class LazySplit:
    """A split whose fit part stays lazy (it may be larger than memory)."""

    periods: Periods
    fit: pl.LazyFrame
    valid: pl.DataFrame
    test: pl.DataFrame  # with a boolean KNOWN_COMPROMISED column


def split_by_time(frame: pl.DataFrame, cfg: SplitConfig, *, label_delay_days: int) -> Split:
    """Cut a feature table into fit / valid / test by day, flagging known-compromised cards."""
    lazy = split_lazy(frame.lazy(), cfg, label_delay_days=label_delay_days)
    return Split(periods=lazy.periods, fit=lazy.fit.collect(), valid=lazy.valid, test=lazy.test)


def split_lazy(scan: pl.LazyFrame, cfg: SplitConfig, *, label_delay_days: int) -> LazySplit:
    """The same split over a lazy scan (e.g. a folder of Parquet shards): only the validation
    and test periods, and the few rows needed to know compromised cards, are collected."""
    ts = pl.col(TIMESTAMP)
    bounds = scan.select(ts.min().alias("first"), ts.max().alias("last")).collect()
    if bounds["first"][0] is None:
        raise DataError("the feature table is empty")
    periods = plan_periods(bounds["first"][0].date(), bounds["last"][0].date(), cfg)
    fit = scan.filter(in_period(periods.train_start, periods.valid_start))
    valid = scan.filter(in_period(periods.valid_start, periods.delay_start)).collect()
    test = scan.filter(in_period(periods.test_start, periods.test_end)).collect()
    counts = fit.select(pl.len().alias("rows"), pl.col(IS_FRAUD).sum().alias("frauds")).collect()
    _require_labels("fit", int(counts["rows"][0]), int(counts["frauds"][0]))
    for name, part in (("validation", valid), ("test", test)):
        _require_labels(name, part.height, int(part[IS_FRAUD].sum()))
    known = _known_compromised(scan, periods.test_start, label_delay_days)
    test = test.with_columns(pl.col(CUSTOMER_ID).is_in(known.implode()).alias(KNOWN_COMPROMISED))
    return LazySplit(periods=periods, fit=fit, valid=valid, test=test)


def in_period(start: date, end: date) -> pl.Expr:
    """Rows with start <= timestamp < end (UTC days)."""
    ts = pl.col(TIMESTAMP)
    return (ts >= _midnight(start)) & (ts < _midnight(end))


def _midnight(day: date) -> datetime:
    return datetime.combine(day, time(0), tzinfo=UTC)


def _require_labels(name: str, rows: int, frauds: int) -> None:
    if rows == 0:
        raise DataError(f"the {name} period has no transactions; adjust the split flags")
    if frauds == 0:
        raise DataError(f"the {name} period has no fraud labels; adjust the split flags")


def _known_compromised(scan: pl.LazyFrame, test_start: date, label_delay_days: int) -> pl.Series:
    """Customers with a fraud whose label was known before the test period began."""
    known_by = _midnight(test_start) - timedelta(days=label_delay_days)
    frauds = scan.filter((pl.col(IS_FRAUD) == 1) & (pl.col(TIMESTAMP) <= known_by))
    return frauds.select(pl.col(CUSTOMER_ID).unique()).collect().to_series()
