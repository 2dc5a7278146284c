"""The shipped feature spec: the 25 features fraudflow has always computed, as data.

``default_spec(cfg)`` builds the spec from a ``FeatureConfig`` (label delay, window days, the
card-testing amount), so ``fraudflow features`` without ``--spec`` computes exactly the feature
set that the online service computes (``fraudflow.features.online``), name for name and value
for value. ``fraudflow features spec --out FILE`` writes it as a starting point.

``default_spec(cfg, v2=True)`` adds the v2 block (``fraudflow features spec --v2``): what fraud
teams add next, all point in time; ``benchmarks/feature_sets.py`` measures what it adds. It is
not the default yet: the service computes the 25 through its fast path
(``fraudflow.features.online``), and a spec with the v2 block through the spec engine
(``fraudflow.features.spec_online``), which does not hold ``benchmarks/serve.py``'s targets
(``serve.py --v2`` measures it).
"""

from __future__ import annotations

from typing import Any

from fraudflow.config import FeatureConfig
from fraudflow.features.spec import FeatureSpec, parse_spec
from fraudflow.features.specs import HOURS_SINCE_PREV_CAP, customer_windows, terminal_windows

__all__ = ["default_spec"]


def default_spec(cfg: FeatureConfig, *, v2: bool = False) -> FeatureSpec:
    customer = [w.label for w in customer_windows(cfg)]  # 1h plus the configured days
    terminal = [w.label for w in terminal_windows(cfg)]
    longest = customer[-1]
    ratio_windows = [label for label in customer if label != "1h"]
    cap = f"{HOURS_SINCE_PREV_CAP:g}"
    features = ["tx__log_amount", "tx__is_weekend", "tx__is_night", "tx__hour"]
    for label in customer:
        features += [f"customer__count__{label}", f"customer__mean_amount__{label}"]
    features.append("customer__small_count__1d")
    features += [f"customer__amount_ratio__{label}" for label in ratio_windows]
    features += ["customer__hours_since_prev", f"customer__known_fraud_count__{longest}"]
    features.append("terminal__live_count__1d")
    for label in terminal:
        features += [f"terminal__count__{label}", f"terminal__fraud_rate__{label}"]
    card = ["customer_id"]
    raw = {
        "label_delay": f"{cfg.label_delay_days}d",
        "features": features,
        "aggregate": [
            {"name": "customer__count", "by": card, "fn": "count", "windows": customer},
            {"name": "customer__mean_amount", "by": card, "fn": "mean", "of": "amount",
             "windows": customer},
            # Card testing: many small amounts in a day, whatever the configured windows.
            {"name": "customer__small_count", "by": card, "fn": "count",
             "where": f"amount < {cfg.small_amount!r}", "windows": ["1d"]},
            {"name": "customer__known_fraud_count", "by": card, "fn": "fraud_count",
             "windows": [longest]},
            # Read by customer__hours_since_prev only (not a model feature by itself).
            {"name": "customer__hours_since_last", "by": card, "fn": "time_since_last",
             "unit": "h", "windows": ["30d"]},
            {"name": "terminal__live_count", "by": ["terminal_id"], "fn": "count",
             "windows": ["1d"]},
            # The terminal's transactions whose labels are all known: fraud_rate's denominator.
            {"name": "terminal__count", "by": ["terminal_id"], "fn": "count", "delayed": True,
             "windows": terminal},
            {"name": "terminal__fraud_rate", "by": ["terminal_id"], "fn": "fraud_rate",
             "default": 0.0, "windows": terminal},
        ],
        "derive": [
            {"name": "tx__log_amount", "expr": "log1p(amount)"},
            {"name": "tx__is_weekend", "expr": "is_weekend"},
            {"name": "tx__is_night", "expr": "is_night"},
            {"name": "tx__hour", "expr": "hour"},
            # A mean of 0 (only zero amounts) would divide by zero: the ratio is 1 then.
            *(
                {"name": f"customer__amount_ratio__{label}",
                 "expr": f"where(customer__mean_amount__{label} > 0, "
                 f"amount / customer__mean_amount__{label}, 1)"}
                for label in ratio_windows
            ),
            # A card's first transaction (or none in 30 days) counts as the cap.
            {"name": "customer__hours_since_prev",
             "expr": f"min(coalesce(customer__hours_since_last__30d, {cap}), {cap})"},
        ],
    }  # fmt: skip
    if v2:
        _add_v2(raw, delay_days=cfg.label_delay_days)
    return parse_spec(raw)


def _add_v2(raw: dict[str, Any], *, delay_days: int) -> None:
    card, terminal = ["customer_id"], ["terminal_id"]
    raw["aggregate"] += [
        {"name": "customer__std_amount", "by": card, "fn": "std", "of": "amount",
         "windows": ["30d"]},
        {"name": "customer__recent_mean_amount", "by": card, "fn": "mean", "of": "amount",
         "windows": ["last 10"]},
        {"name": "customer__terminals", "by": card, "fn": "count_distinct", "of": "terminal_id",
         "windows": ["1d", "7d"]},
        # Transactions above 3 times the card's typical amount (its 30-day mean before each):
        # a takeover spends big, more than once. 3x: well outside a card's usual spread.
        {"name": "customer__count_above_typical", "by": card, "fn": "count_above",
         "of": "amount", "k": 3.0, "typical": "30d", "windows": ["1d", "7d"]},
        {"name": "terminal__cards", "by": terminal, "fn": "count_distinct", "of": "customer_id",
         "windows": ["1d"]},
        # Known frauds in the terminal's latest labelled day: (t - delay - 1d, t - delay].
        {"name": "terminal__known_fraud_count", "by": terminal, "fn": "fraud_count",
         "windows": ["1d"]},
        # Card age, capped at 30 days: new cards are where takeovers and testing start.
        {"name": "customer__days_since_first", "by": card, "fn": "time_since_first",
         "unit": "d", "windows": ["30d"]},
        # Days since the terminal's latest known fraud; none known counts as the window's far
        # end (30 days plus the label delay), so the value only grows with safety.
        {"name": "terminal__days_since_fraud", "by": terminal, "fn": "time_since_fraud",
         "unit": "d", "windows": ["30d"], "default": float(30 + delay_days)},
    ]  # fmt: skip
    raw["derive"] += [
        # The amount against the card's own typical amount.
        {"name": "customer__amount_zscore__30d",
         "expr": "where(customer__std_amount__30d > 0, (amount - customer__mean_amount__30d) "
         "/ customer__std_amount__30d, 0)"},
        {"name": "customer__amount_ratio__last10",
         "expr": "where(customer__recent_mean_amount__last10 > 0, "
         "amount / customer__recent_mean_amount__last10, 1)"},
    ]  # fmt: skip
    raw["features"] += [
        "customer__amount_zscore__30d", "customer__amount_ratio__last10",
        "customer__terminals__1d", "customer__terminals__7d", "terminal__cards__1d",
        "terminal__known_fraud_count__1d", "customer__days_since_first__30d",
        "terminal__days_since_fraud__30d", "customer__count_above_typical__1d",
        "customer__count_above_typical__7d",
    ]  # fmt: skip
