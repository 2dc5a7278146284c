"""The feature catalogue: names, one-line meanings, and the rules they follow.

Names follow ``<entity>__<aggregate>__<window>``. Two timing rules hold for every feature:

* Point in time: a row sees only transactions at or before its own timestamp. Rows with equal
  timestamps are ordered by their position in the input (arrival order), and a row sees the
  earlier ones and itself, never the later ones, exactly as an online service would.
* Label delay: a fraud label becomes known ``label_delay_days`` after its transaction
  (chargebacks and investigations take days; Le Borgne et al., Fraud Detection Handbook,
  ch. 3.4). Label-based features therefore aggregate over the window
  (t - delay - w, t - delay], whose labels are all known at t.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from fraudflow.config import FeatureConfig

__all__ = [
    "FEATURE_VERSION",
    "HOURS_SINCE_PREV_CAP",
    "WindowSpec",
    "customer_windows",
    "describe_features",
    "feature_names",
    "terminal_windows",
]

# Bump when any definition below changes: bundles record it and refuse mismatched features.
FEATURE_VERSION = "1"
HOUR_SECONDS = 3_600
DAY_SECONDS = 86_400
# The value of customer__hours_since_prev for a customer's first transaction, and its cap.
HOURS_SINCE_PREV_CAP = 30 * 24.0
NIGHT_END_HOUR = 6  # hours [0, 6) UTC count as night

Entity = Literal["customer", "terminal"]


@dataclass(frozen=True)
class WindowSpec:
    """A sliding window over one entity's transactions."""

    entity: Entity
    label: str  # e.g. "1h", "7d"
    window_seconds: int
    delayed: bool  # True: the window is shifted back by the label delay


def _label(seconds: int) -> str:
    return (
        f"{seconds // DAY_SECONDS}d"
        if seconds % DAY_SECONDS == 0
        else f"{seconds // HOUR_SECONDS}h"
    )


def customer_windows(cfg: FeatureConfig) -> list[WindowSpec]:
    """Card activity windows: the last hour (card-testing bursts) plus the configured days."""
    seconds = sorted({HOUR_SECONDS, *(d * DAY_SECONDS for d in cfg.customer_windows_days)})
    return [WindowSpec("customer", _label(s), s, delayed=False) for s in seconds]


def terminal_windows(cfg: FeatureConfig) -> list[WindowSpec]:
    return [
        WindowSpec("terminal", _label(d * DAY_SECONDS), d * DAY_SECONDS, delayed=True)
        for d in sorted(set(cfg.terminal_windows_days))
    ]


def describe_features(cfg: FeatureConfig) -> dict[str, str]:
    """Every feature's name and its one-line meaning, in the order of the feature table."""
    out = {
        "tx__log_amount": "log(1 + amount)",
        "tx__is_weekend": "1 if the transaction is on a Saturday or Sunday (UTC)",
        "tx__is_night": f"1 if the transaction is between 00:00 and 0{NIGHT_END_HOUR}:00 UTC",
        "tx__hour": "hour of day (UTC), 0-23",
    }
    for w in customer_windows(cfg):
        out[f"customer__count__{w.label}"] = (
            f"card's transactions in the last {w.label}, this one included"
        )
        out[f"customer__mean_amount__{w.label}"] = f"card's mean amount over the last {w.label}"
    longest = customer_windows(cfg)[-1].label
    out["customer__small_count__1d"] = (
        f"card's transactions under {cfg.small_amount:g} in the last 1d (card testing)"
    )
    for w in customer_windows(cfg):
        if w.label != "1h":
            out[f"customer__amount_ratio__{w.label}"] = f"amount / customer__mean_amount__{w.label}"
    out["customer__hours_since_prev"] = (
        f"hours since the card's previous transaction (capped at {HOURS_SINCE_PREV_CAP:g})"
    )
    out[f"customer__known_fraud_count__{longest}"] = (
        f"card's frauds with known labels in the label-delayed {longest} window"
    )
    out["terminal__live_count__1d"] = "terminal's transactions in the last 1d, this one included"
    for w in terminal_windows(cfg):
        out[f"terminal__count__{w.label}"] = (
            f"terminal's transactions in the label-delayed {w.label} window"
        )
        out[f"terminal__fraud_rate__{w.label}"] = "share of those that were fraud (0 when none)"
    return out


def feature_names(cfg: FeatureConfig) -> list[str]:
    return list(describe_features(cfg))
