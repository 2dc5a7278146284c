"""Batch feature computation with Polars.

Every window aggregate is a difference of running totals. Rows are ordered by entity, then by
arrival (timestamp order, input order within equal timestamps); ``P`` is the prefix sum of a
quantity in that order. For a row at position i and time t, the sum over (t - w, t] is
``P[i] - P[j]`` with P inclusive at i and exclusive at j, where j is the first position of the
entity with time > t - w, found by binary search. Using the row's own position for the right
end, not a search on t, means a row sees earlier rows with the same timestamp and itself, never
later ones: the same answer an online service gives processing one event at a time. Label
windows use two searches, t - delay and t - delay - w (see ``fraudflow.features.specs``).

The binary search runs on one sorted integer key per entity block,
``block_index * stride + (t - t_min)``, with ``stride`` wider than the time span plus the
longest window, so a search never leaves its entity's block. Blocks are processed in chunks
small enough that the key fits in 63 bits (one chunk for any realistic data set).
"""

from __future__ import annotations

import polars as pl

from fraudflow.config import FeatureConfig
from fraudflow.data.schema import AMOUNT, CUSTOMER_ID, IS_FRAUD, TERMINAL_ID, TIMESTAMP
from fraudflow.errors import DataError
from fraudflow.features.specs import (
    DAY_SECONDS,
    HOURS_SINCE_PREV_CAP,
    NIGHT_END_HOUR,
    customer_windows,
    feature_names,
    terminal_windows,
)

__all__ = ["build_features"]

_T = "__t_us"  # timestamp as integer microseconds since the epoch
_ROW = "__row"  # arrival position
_US = 1_000_000
_KEY_LIMIT = 2**62


def build_features(transactions: pl.DataFrame, cfg: FeatureConfig) -> pl.DataFrame:
    """The transactions in timestamp order (arrival order within ties) with feature columns added.

    ``transactions`` must follow the canonical schema (see ``fraudflow.data.ingest``) and carry
    ``is_fraud``, which the label-delayed features need.
    """
    if IS_FRAUD not in transactions.columns:
        raise DataError(f"`{IS_FRAUD}` is required: the label-delayed features are built from it")
    base = (
        transactions.lazy()
        .sort(TIMESTAMP, maintain_order=True)
        .with_columns(pl.col(TIMESTAMP).dt.epoch("us").alias(_T))
        .collect()
    )
    customer = _entity_totals(base, CUSTOMER_ID, *_customer_plan(cfg))
    terminal = _entity_totals(base, TERMINAL_ID, *_terminal_plan(cfg))
    out = pl.concat([base, customer, terminal], how="horizontal").lazy()
    out = out.with_columns(*_customer_features(cfg), *_terminal_features(cfg))
    out = out.with_columns(*_derived(cfg))
    return out.select(*transactions.columns, *feature_names(cfg)).collect()


def _customer_plan(cfg: FeatureConfig) -> tuple[dict[str, pl.Expr], dict[str, int]]:
    totals = {
        "c_n": pl.lit(1, dtype=pl.Int64),
        "c_amt": pl.col(AMOUNT).cast(pl.Float64),
        "c_small": (pl.col(AMOUNT) < cfg.small_amount).cast(pl.Int64),
        "c_fraud": pl.col(IS_FRAUD).cast(pl.Int64),
    }
    delay = cfg.label_delay_days * DAY_SECONDS
    probes = {w.label: w.window_seconds * _US for w in customer_windows(cfg)}
    longest = customer_windows(cfg)[-1].window_seconds
    probes |= {"delay": delay * _US, "delay_w": (delay + longest) * _US}
    return totals, probes


def _terminal_plan(cfg: FeatureConfig) -> tuple[dict[str, pl.Expr], dict[str, int]]:
    totals = {"t_n": pl.lit(1, dtype=pl.Int64), "t_fraud": pl.col(IS_FRAUD).cast(pl.Int64)}
    delay = cfg.label_delay_days * DAY_SECONDS
    probes = {"live1d": DAY_SECONDS * _US, "delay": delay * _US}
    probes |= {f"delay_{w.label}": (delay + w.window_seconds) * _US for w in terminal_windows(cfg)}
    return totals, probes


def _entity_totals(
    base: pl.DataFrame, entity: str, totals: dict[str, pl.Expr], probes: dict[str, int]
) -> pl.DataFrame:
    """Per row, in ``base`` order: ``<total>`` (running, this row included) and ``<total>@<probe>``
    (running as of t - offset, i.e. over the entity's rows with time <= t - offset)."""
    ordered = (
        base.lazy()
        .select(
            pl.int_range(pl.len(), dtype=pl.UInt32).alias(_ROW),
            entity,
            _T,
            *(expr.alias(name) for name, expr in totals.items()),
        )
        .sort(entity, _ROW)
        .with_columns(
            ((pl.col(entity) != pl.col(entity).shift(1)).fill_null(True).cum_sum() - 1)
            .cast(pl.Int64)
            .alias("__block")
        )
        .collect()
    )
    t_min, t_max = int(base[_T].min()), int(base[_T].max())  # type: ignore[arg-type]
    stride = t_max - t_min + max(probes.values()) + 1
    per_chunk = max(1, _KEY_LIMIT // stride)
    chunks = ordered.with_columns((pl.col("__block") // per_chunk).alias("__chunk"))
    parts = [
        _chunk_totals(chunk, list(totals), probes, stride, per_chunk, t_min)
        for chunk in chunks.partition_by("__chunk", maintain_order=True)
    ]
    return pl.concat(parts).sort(_ROW).drop(_ROW)


def _chunk_totals(
    chunk: pl.DataFrame,
    totals: list[str],
    probes: dict[str, int],
    stride: int,
    per_chunk: int,
    t_min: int,
) -> pl.DataFrame:
    key = ((chunk["__block"] % per_chunk) * stride + (chunk[_T] - t_min)).alias("key")
    # Offsets are > 0, so each search lands inside the row's own block, at or before the row.
    positions = {
        tag: key.search_sorted(key - offset, side="right") for tag, offset in probes.items()
    }
    cols = [chunk[_ROW]]
    for name in totals:
        # Running totals restart at each entity, so an entity's values never depend (not even
        # in floating-point rounding) on other entities' transactions.
        inclusive = chunk.select(pl.col(name).cum_sum().over("__block")).to_series()
        exclusive = inclusive - chunk[name]
        cols.append(inclusive)
        cols += [exclusive.gather(pos).alias(f"{name}@{tag}") for tag, pos in positions.items()]
    return pl.DataFrame(cols)


def _window(total: str, tag: str) -> pl.Expr:
    """The total over (t - w, t]: running total minus the total as of t - w."""
    return pl.col(total) - pl.col(f"{total}@{tag}")


def _between(total: str, recent: str, older: str) -> pl.Expr:
    """The total over (t - older, t - recent]."""
    return pl.col(f"{total}@{recent}") - pl.col(f"{total}@{older}")


def _customer_features(cfg: FeatureConfig) -> list[pl.Expr]:
    exprs: list[pl.Expr] = []
    for w in customer_windows(cfg):
        count = _window("c_n", w.label)
        exprs.append(count.cast(pl.Float64).alias(f"customer__count__{w.label}"))
        exprs.append((_window("c_amt", w.label) / count).alias(f"customer__mean_amount__{w.label}"))
    exprs.append(_window("c_small", "1d").cast(pl.Float64).alias("customer__small_count__1d"))
    longest = customer_windows(cfg)[-1].label
    known = _between("c_fraud", "delay", "delay_w").cast(pl.Float64)
    exprs.append(known.alias(f"customer__known_fraud_count__{longest}"))
    return exprs


def _terminal_features(cfg: FeatureConfig) -> list[pl.Expr]:
    exprs = [_window("t_n", "live1d").cast(pl.Float64).alias("terminal__live_count__1d")]
    for w in terminal_windows(cfg):
        count = _between("t_n", "delay", f"delay_{w.label}")
        frauds = _between("t_fraud", "delay", f"delay_{w.label}")
        rate = pl.when(count > 0).then(frauds / count).otherwise(0.0)
        exprs.append(count.cast(pl.Float64).alias(f"terminal__count__{w.label}"))
        exprs.append(rate.cast(pl.Float64).alias(f"terminal__fraud_rate__{w.label}"))
    return exprs


def _derived(cfg: FeatureConfig) -> list[pl.Expr]:
    ts = pl.col(TIMESTAMP)
    gap_hours = (pl.col(_T) - pl.col(_T).shift(1).over(CUSTOMER_ID)) / (3_600 * _US)
    exprs = [
        pl.col(AMOUNT).log1p().alias("tx__log_amount"),
        (ts.dt.weekday() >= 6).cast(pl.Float64).alias("tx__is_weekend"),
        (ts.dt.hour() < NIGHT_END_HOUR).cast(pl.Float64).alias("tx__is_night"),
        ts.dt.hour().cast(pl.Float64).alias("tx__hour"),
        gap_hours.fill_null(HOURS_SINCE_PREV_CAP)
        .clip(upper_bound=HOURS_SINCE_PREV_CAP)
        .alias("customer__hours_since_prev"),
    ]
    for w in customer_windows(cfg):
        if w.label == "1h":
            continue
        mean = pl.col(f"customer__mean_amount__{w.label}")
        # A mean of 0 (only zero-amount transactions) would divide by zero: the ratio is 1 then.
        ratio = pl.when(mean > 0).then(pl.col(AMOUNT) / mean).otherwise(1.0)
        exprs.append(ratio.alias(f"customer__amount_ratio__{w.label}"))
    return exprs
