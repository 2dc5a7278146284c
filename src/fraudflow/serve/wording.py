"""Decision reasons in words, for the review console.

The service's reasons are exact and terse ("customer__amount_ratio__30d = 5.2 raised the fraud
log-odds by 1.234", ``fraudflow.serve.scoring``); an analyst reads "amount 5.2x the card's
30-day mean". Feature names follow ``<entity>__<aggregate>__<window>``
(``fraudflow.features.specs``); a reason this module does not know is shown as it came.
"""

from __future__ import annotations

import re
from collections.abc import Callable

__all__ = ["in_words"]

_FEATURE = re.compile(
    r"^(?P<name>[a-z_]+__[a-z_]+(?:__[0-9]+[hd])?) = (?P<value>\S+) "
    r"(?P<way>raised|lowered) the fraud log-odds by (?P<by>\S+)$"
)
_THRESHOLD = re.compile(r"^score (?P<score>\S+) >= (?P<name>\w+) threshold (?P<at>\S+)$")


def in_words(detail: str) -> str:
    """``detail`` (a reason's text as the service recorded it) in an analyst's words."""
    found = _THRESHOLD.match(detail)
    if found:
        score, name, at = float(found["score"]), found["name"], found["at"]
        return f"score {score:.3f}, at or over the {name} threshold {at}"
    found = _FEATURE.match(detail)
    if found is None:
        return detail
    try:
        value = float(found["value"])
    except ValueError:
        return detail
    phrase = _feature_phrase(found["name"], value)
    if phrase is None:
        return detail
    return f"{phrase} ({'raises' if found['way'] == 'raised' else 'lowers'} the risk)"


def _window(label: str) -> str:
    """ "30d" -> "30-day", "1h" -> "1-hour"."""
    return f"{label[:-1]}-{'day' if label.endswith('d') else 'hour'}"


def _last(label: str) -> str:
    """ "30d" -> "the last 30 days", "1h" -> "the last hour"."""
    n, unit = int(label[:-1]), "day" if label.endswith("d") else "hour"
    return f"the last {unit}" if n == 1 else f"the last {n} {unit}s"


def _count(n: float, thing: str) -> str:
    whole = round(n)
    return f"{whole:g} {thing}{'' if whole == 1 else 's'}"


def _feature_phrase(name: str, v: float) -> str | None:
    entity, _, rest = name.partition("__")
    aggregate, _, label = rest.partition("__")
    who = {"customer": "the card", "terminal": "the terminal"}.get(entity)
    if entity == "tx":
        return _transaction_phrase(aggregate, v)
    if who is None:
        return None
    phrase = _PHRASES.get(aggregate)
    return None if phrase is None else phrase(who, label, v)


def _counted(who: str, label: str, v: float) -> str:
    if who == "the card":
        return f"{_count(v, 'transaction')} on the card in {_last(label)}"
    return f"{_count(v, 'transaction')} on the terminal in its labelled {_window(label)} window"


# Per aggregate: its phrase from the entity ("the card"), the window label ("30d") and value.
_PHRASES: dict[str, Callable[[str, str, float], str]] = {
    "amount_ratio": lambda who, label, v: f"amount {v:.1f}x {who}'s {_window(label)} mean",
    "mean_amount": lambda who, label, v: f"{who}'s {_window(label)} mean amount is {v:,.2f}",
    "count": _counted,
    "live_count": lambda who, _, v: f"{_count(v, 'transaction')} on {who} in the last day",
    "small_count": lambda who, _, v: f"{_count(v, 'small transaction')} on {who} in the last day",
    "known_fraud_count": (
        lambda who, label, v: f"{who} had {_count(v, 'known fraud')} in its {_window(label)} window"
    ),
    "fraud_rate": (
        lambda who, label, v: f"{v:.0%} of {who}'s labelled {_window(label)} window was fraud"
    ),
    "hours_since_prev": lambda who, _, v: f"{_duration(v)} since {who}'s previous transaction",
}


def _transaction_phrase(aggregate: str, v: float) -> str | None:
    if aggregate == "log_amount":
        return "the amount itself"
    if aggregate == "is_night":
        return "at night (00:00-06:00 UTC)" if v >= 0.5 else "in the daytime"
    if aggregate == "is_weekend":
        return "on a weekend" if v >= 0.5 else "on a weekday"
    if aggregate == "hour":
        return f"at {int(v):02d}h UTC"
    return None


def _duration(hours: float) -> str:
    if hours < 1:
        return f"{hours * 60:.0f} min"
    return f"{hours:.1f} h" if hours < 48 else f"{hours / 24:.0f} days"
