"""Benchmark: fraudflow's batch features against a plain pandas groupby-rolling implementation.

Both sides compute every feature of ``fraudflow.features.describe_features(FeatureConfig())``
on the same simulated transactions (about 1.0M rows with the defaults):

* fraudflow: ``build_features`` (Polars, prefix sums and binary searches), timed as the best
  of ``--repeat`` runs after one warm-up run;
* pandas: the way a data scientist writes it from the Fraud Detection Handbook (Le Borgne et
  al., ch. 3): ``df.groupby(entity).rolling(window, on="timestamp")[column].agg()`` per window,
  and label-delayed windows as the rolling total over (delay + w) minus the one over (delay).
  It runs once; the clock covers the feature computation only, not the Polars-to-pandas
  conversion.

It also times the default spec with its v2 block (``default_spec(cfg, v2=True)``: the 25 plus
10 more, which pandas does not reproduce, so they are timed, not compared) and a spec four
times larger than the default (``large_spec``: the default's 25 features plus 75 more over more
keys, functions and windows), and prints their transactions/s.

Rows are aligned by ``transaction_id`` and every feature column must agree within 1e-6
(relative to the value where it exceeds 1); otherwise the script prints the first mismatches
and exits with status 1. It prints a table, then a JSON object as its last line.

Run from the repository root:

    PYTHONPATH=src .venv/bin/python benchmarks/features.py [--n-days 106] [--customers 5000]
        [--terminals 10000] [--seed 0] [--repeat 3]
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable

import numpy as np
import pandas as pd
import polars as pl

from fraudflow.config import FeatureConfig, SimulationConfig
from fraudflow.data.simulator import simulate
from fraudflow.features import FeatureSpec, build_features, default_spec, feature_names, parse_spec
from fraudflow.features.specs import (
    DAY_SECONDS,
    HOURS_SINCE_PREV_CAP,
    NIGHT_END_HOUR,
    customer_windows,
    terminal_windows,
)

TOLERANCE = 1e-6
TARGET_SPEEDUP = 20.0
TARGET_TRANSACTIONS_PER_SECOND = 1.5e6
SHOWN_MISMATCHES = 5

# roll(window_seconds, column, aggregation) -> one value per row of the frame, in its order.
Roll = Callable[[int, str, str], pd.Series]


# --- the pandas reference ----------------------------------------------------------------------


def pandas_features(tx: pd.DataFrame, cfg: FeatureConfig) -> pd.DataFrame:
    """Every fraudflow feature in pandas, rows in timestamp order (input order within ties)."""
    df = tx.sort_values("timestamp", kind="stable", ignore_index=True)
    df["small"] = (df["amount"] < cfg.small_amount).astype("float64")
    df["fraud"] = df["is_fraud"].astype("float64")
    columns = {"transaction_id": df["transaction_id"]}
    columns |= _pandas_calendar(df)
    columns |= _pandas_customer(df, cfg)
    columns |= _pandas_terminal(df, cfg)
    return pd.DataFrame(columns)[["transaction_id", *feature_names(cfg)]]


def _group_rolling(df: pd.DataFrame, key: str) -> Roll:
    """Time-based rolling windows per ``key`` over (t - w, t], returned in ``df``'s row order.

    Tie rule: pandas' variable-window bounds end each row's window at the row's own position
    (default ``closed="right"``; checked on pandas 3.1), so among rows with equal timestamps a
    row sees the earlier ones and itself, never the later ones: fraudflow's arrival-order rule.

    ``groupby().rolling(on=...)`` returns its rows grouped by key, in ``df`` order within a
    group, indexed by (key, timestamp), which cannot be joined back to ``df``. ``df`` sorted
    stably by key has that same order, so its index puts the values back in place.
    """
    by_key = df.sort_values(key, kind="stable")
    groups = by_key.groupby(key, sort=False)

    def roll(window_seconds: int, column: str, aggregation: str) -> pd.Series:
        window = groups.rolling(f"{window_seconds}s", on="timestamp")[column]
        values = getattr(window, aggregation)().to_numpy()
        return pd.Series(values, index=by_key.index).sort_index()

    return roll


def _pandas_calendar(df: pd.DataFrame) -> dict[str, pd.Series]:
    ts = df["timestamp"]  # UTC
    return {
        "tx__log_amount": np.log1p(df["amount"]),
        "tx__is_weekend": (ts.dt.day_of_week >= 5).astype("float64"),
        "tx__is_night": (ts.dt.hour < NIGHT_END_HOUR).astype("float64"),
        "tx__hour": ts.dt.hour.astype("float64"),
    }


def _pandas_customer(df: pd.DataFrame, cfg: FeatureConfig) -> dict[str, pd.Series]:
    roll = _group_rolling(df, "customer_id")
    out: dict[str, pd.Series] = {}
    for w in customer_windows(cfg):
        out[f"customer__count__{w.label}"] = roll(w.window_seconds, "amount", "count")
        out[f"customer__mean_amount__{w.label}"] = roll(w.window_seconds, "amount", "mean")
    out["customer__small_count__1d"] = roll(DAY_SECONDS, "small", "sum")
    for w in customer_windows(cfg):
        if w.label != "1h":
            mean = out[f"customer__mean_amount__{w.label}"]
            ratio = (df["amount"] / mean).where(mean > 0, 1.0)
            out[f"customer__amount_ratio__{w.label}"] = ratio
    gap = df.groupby("customer_id")["timestamp"].diff().dt.total_seconds() / 3_600
    out["customer__hours_since_prev"] = gap.fillna(HOURS_SINCE_PREV_CAP).clip(
        upper=HOURS_SINCE_PREV_CAP
    )
    longest = customer_windows(cfg)[-1]
    delay = cfg.label_delay_days * DAY_SECONDS
    # Label delay (Handbook ch. 3.4): the total over (t - delay - w, t] minus the one over
    # (t - delay, t] is the total over (t - delay - w, t - delay]. Both windows end at the row
    # and include the same earlier ties, which cancel.
    known = roll(delay + longest.window_seconds, "fraud", "sum") - roll(delay, "fraud", "sum")
    out[f"customer__known_fraud_count__{longest.label}"] = known
    return out


def _pandas_terminal(df: pd.DataFrame, cfg: FeatureConfig) -> dict[str, pd.Series]:
    roll = _group_rolling(df, "terminal_id")
    out = {"terminal__live_count__1d": roll(DAY_SECONDS, "fraud", "count")}
    delay = cfg.label_delay_days * DAY_SECONDS
    # Label delay as for the customer: window (delay + w) minus window (delay), per terminal.
    recent_count, recent_frauds = roll(delay, "fraud", "count"), roll(delay, "fraud", "sum")
    for w in terminal_windows(cfg):
        count = roll(delay + w.window_seconds, "fraud", "count") - recent_count
        frauds = roll(delay + w.window_seconds, "fraud", "sum") - recent_frauds
        out[f"terminal__count__{w.label}"] = count
        out[f"terminal__fraud_rate__{w.label}"] = (frauds / count).where(count > 0, 0.0)
    return out


# --- timing --------------------------------------------------------------------------------------


def large_spec(cfg: FeatureConfig) -> FeatureSpec:
    """The default spec plus 75 features: 4x its size, every aggregate function used."""
    raw = default_spec(cfg).to_dict()
    raw.pop("features")  # all defined features are outputs
    card, terminal = ["customer_id"], ["terminal_id"]
    days = ["1d", "7d", "30d"]
    more = [
        ("customer__std_amount", card, "std", "amount", days),
        ("customer__max_amount", card, "max", "amount", ["1h", *days]),
        ("customer__min_amount", card, "min", "amount", days),
        ("customer__sum_amount", card, "sum", "amount", ["1h", *days]),
        ("customer__terminals", card, "count_distinct", "terminal_id", ["1h", *days]),
        ("customer__last_mean_amount", card, "mean", "amount", ["last 3", "last 10", "last 30"]),
        ("terminal__cards", terminal, "count_distinct", "customer_id", ["1h", *days]),
        ("terminal__mean_amount", terminal, "mean", "amount", ["1h", *days]),
        ("terminal__max_amount", terminal, "max", "amount", days),
        ("terminal__std_amount", terminal, "std", "amount", days),
        ("terminal__count", terminal, "count", None, ["1h", "7d", "30d"]),
        ("customer__fraud_rate", card, "fraud_rate", None, ["7d", "30d", "90d"]),
        ("customer__since_large", card, "time_since_last", None, ["1d", "7d", "30d"]),
        ("customer__large_count", card, "count", None, ["1h", *days]),
        ("terminal__fraud_count", terminal, "fraud_count", None, ["1d", "7d", "30d"]),
    ]
    for name, by, fn, of, windows in more:
        entry = {"name": name, "by": by, "fn": fn, "windows": windows}
        if of is not None:
            entry["of"] = of
        if name.startswith("customer__since_large") or name.startswith("customer__large"):
            entry["where"] = "amount > 100"
        if name == "terminal__count":
            entry["name"] = "terminal__live_count_more"
        raw["aggregate"].append(entry)
    for index in range(23):
        window = ["1d", "7d", "30d"][index % 3]
        raw["derive"].append(
            {
                "name": f"derived__{index}",
                "expr": f"where(customer__std_amount__{window} > 0, (amount - "
                f"customer__mean_amount__{window}) / customer__std_amount__{window}, 0) + {index}",
            }
        )
    return parse_spec(raw)


def time_spec(tx: pl.DataFrame, spec: FeatureSpec, repeat: int) -> float:
    build_features(tx, spec)
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        build_features(tx, spec)
        best = min(best, time.perf_counter() - start)
    return best


def time_fraudflow(tx: pl.DataFrame, cfg: FeatureConfig, repeat: int) -> tuple[pl.DataFrame, float]:
    """The features and the best wall time of ``repeat`` runs, after one warm-up run."""
    out = build_features(tx, cfg)
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        out = build_features(tx, cfg)
        best = min(best, time.perf_counter() - start)
    return out, best


def time_pandas(tx: pd.DataFrame, cfg: FeatureConfig) -> tuple[pd.DataFrame, float]:
    start = time.perf_counter()
    out = pandas_features(tx, cfg)
    return out, time.perf_counter() - start


# --- correctness ---------------------------------------------------------------------------------


def compare(ours: pl.DataFrame, reference: pd.DataFrame, names: list[str]) -> dict[str, dict]:
    """Per feature: max absolute and relative difference, and the first mismatching rows."""
    ref = pl.from_pandas(reference).rename({n: f"{n}__pandas" for n in names})
    joined = ours.select("transaction_id", *names).join(ref, on="transaction_id", how="inner")
    if joined.height != ours.height or ref.height != ours.height:
        raise SystemExit(
            f"row alignment failed: fraudflow {ours.height} rows, pandas {ref.height} rows, "
            f"{joined.height} matched by transaction_id"
        )
    return {name: _column_diff(joined, name) for name in names}


def _column_diff(joined: pl.DataFrame, name: str) -> dict:
    a, b = pl.col(name), pl.col(f"{name}__pandas")
    abs_diff = (a - b).abs()
    rel_diff = abs_diff / pl.max_horizontal(pl.lit(1.0), b.abs())
    missing = (a.is_null() != b.is_null()) | (a.is_nan() != b.is_nan()).fill_null(False)
    bad = missing | (rel_diff > TOLERANCE).fill_null(False)
    stats = joined.select(
        abs_diff.max().alias("abs"), rel_diff.max().alias("rel"), bad.sum().alias("n_bad")
    ).row(0, named=True)
    first = joined.filter(bad).select("transaction_id", a, b).head(SHOWN_MISMATCHES)
    return {**stats, "first": first}


# --- reporting -----------------------------------------------------------------------------------


def report_mismatches(diffs: dict[str, dict]) -> bool:
    """Print every column with mismatches; True when all columns agree."""
    ok = True
    for name, d in diffs.items():
        if d["n_bad"]:
            ok = False
            print(f"MISMATCH {name}: {d['n_bad']} rows, max abs diff {d['abs']:.3g}")
            print(d["first"])
    return ok


def print_table(result: dict) -> None:
    speedup_ok = result["speedup_vs_pandas"] >= TARGET_SPEEDUP
    tps_ok = result["transactions_per_second"] >= TARGET_TRANSACTIONS_PER_SECOND
    rows = [
        ("transactions", f"{result['n_transactions']:,}"),
        ("features", f"{result['n_features']}"),
        ("pandas (groupby-rolling)", f"{result['pandas_seconds']:.3f} s"),
        ("fraudflow (best of repeat)", f"{result['fraudflow_seconds']:.3f} s"),
        ("speedup vs pandas", f"{result['speedup_vs_pandas']:.1f}x"),
        ("fraudflow transactions/s", f"{result['transactions_per_second']:,.0f}"),
        ("max abs diff", f"{result['max_abs_diff']:.3g} ({result['worst_column']})"),
        (
            f"default + v2 ({result['v2_spec_features']} features)",
            f"{result['v2_spec_seconds']:.3f} s, "
            f"{result['v2_spec_transactions_per_second']:,.0f} tx/s",
        ),
        (
            f"spec of {result['large_spec_features']} features",
            f"{result['large_spec_seconds']:.3f} s, "
            f"{result['large_spec_transactions_per_second']:,.0f} tx/s",
        ),
        (f"target >= {TARGET_SPEEDUP:g}x", "met" if speedup_ok else "NOT met"),
        (f"target >= {TARGET_TRANSACTIONS_PER_SECOND:,.0f} tx/s", "met" if tps_ok else "NOT met"),
    ]
    width = max(len(label) for label, _ in rows)
    for label, value in rows:
        print(f"{label:<{width}}  {value}")


def summarise(n: int, n_features: int, seconds: tuple[float, float], diffs: dict) -> dict:
    pandas_s, fraudflow_s = seconds
    worst = max(diffs, key=lambda name: diffs[name]["abs"] or 0.0)
    return {
        "n_transactions": n,
        "n_features": n_features,
        "pandas_seconds": round(pandas_s, 4),
        "fraudflow_seconds": round(fraudflow_s, 4),
        "speedup_vs_pandas": round(pandas_s / fraudflow_s, 2),
        "transactions_per_second": round(n / fraudflow_s),
        "max_abs_diff": max(d["abs"] or 0.0 for d in diffs.values()),
        "max_rel_diff": max(d["rel"] or 0.0 for d in diffs.values()),
        "worst_column": worst,
        "speedup_target_met": pandas_s / fraudflow_s >= TARGET_SPEEDUP,
        "throughput_target_met": n / fraudflow_s >= TARGET_TRANSACTIONS_PER_SECOND,
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-days", type=int, default=106, help="simulated days (106: ~1.0M rows)")
    parser.add_argument("--customers", type=int, default=5_000)
    parser.add_argument("--terminals", type=int, default=10_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeat", type=int, default=3, help="timed fraudflow runs (best kept)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    sim = SimulationConfig(
        n_customers=args.customers, n_terminals=args.terminals, n_days=args.n_days, seed=args.seed
    )
    cfg = FeatureConfig()
    tx = simulate(sim)
    ours, fraudflow_s = time_fraudflow(tx, cfg, max(1, args.repeat))
    reference, pandas_s = time_pandas(tx.to_pandas(), cfg)
    names = feature_names(cfg)
    diffs = compare(ours, reference, names)
    ok = report_mismatches(diffs)
    result = summarise(tx.height, len(names), (pandas_s, fraudflow_s), diffs)
    result["features_match"] = ok
    v2 = default_spec(cfg, v2=True)
    v2_s = time_spec(tx, v2, max(1, args.repeat))
    result["v2_spec_features"] = len(v2.feature_names)
    result["v2_spec_seconds"] = round(v2_s, 4)
    result["v2_spec_transactions_per_second"] = round(tx.height / v2_s)
    large = large_spec(cfg)
    large_s = time_spec(tx, large, max(1, args.repeat))
    result["large_spec_features"] = len(large.feature_names)
    result["large_spec_seconds"] = round(large_s, 4)
    result["large_spec_transactions_per_second"] = round(tx.height / large_s)
    print_table(result)
    print(json.dumps(result))
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
