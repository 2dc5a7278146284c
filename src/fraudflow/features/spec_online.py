"""The online engine of feature specs: any spec's features of one event at a time.

``SpecFeatures`` evaluates a ``FeatureSpec`` event by event from in-memory histories, with the
batch engine's rules (``fraudflow.features.spec``): an event sees the events recorded before it
and itself, never later ones, in (time, arrival) order; a label counts once it is recorded and
its transaction is at or before t - delay. For every event, its features equal the batch
features of the log as it stood when the event arrived (the events so far, with the labels
reported so far): a late event (dated before events already seen) sees those older ones, but
the events scored before it arrived did not see it; that difference is the nature of online
scoring, not of this engine.

It keeps every event of each key (no retention) and scans a window's events per feature, so it
is the reference for the service's stores, tests and notebooks, not their fast path (the
service still serves the default spec through ``fraudflow.features.online``).
"""

from __future__ import annotations

import math
from bisect import bisect_right
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from fraudflow.data.schema import TIMESTAMP, TRANSACTION_ID
from fraudflow.errors import DataError
from fraudflow.features.expressions import (
    NIGHT_END_HOUR,
    Binary,
    Call,
    Compare,
    Expr,
    Literal,
    Logical,
    Name,
    Not,
)
from fraudflow.features.spec import UNIT_SECONDS, Aggregate, FeatureSpec, Window

__all__ = ["SpecFeatures", "evaluate"]

_US = 1_000_000
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)

Value = float | str | bool | None


@dataclass(order=True)
class _Stored:
    t_us: int
    seq: int
    transaction_id: str = field(compare=False)
    passes: bool = field(compare=False)  # the aggregate's filter, and a present value
    value: Any = field(compare=False)


@dataclass
class _History:
    """One key's events for one aggregate, in (time, arrival) order."""

    events: list[_Stored] = field(default_factory=list)
    times: list[int] = field(default_factory=list)

    def add(self, stored: _Stored) -> None:
        at = bisect_right(self.events, stored)
        self.events.insert(at, stored)
        self.times.insert(at, stored.t_us)

    def upto(self, t_us: int) -> list[_Stored]:
        """The events with time <= t (all recorded before the event asking)."""
        return self.events[: bisect_right(self.times, t_us)]


class SpecFeatures:
    """A spec's features of one event at a time (see the module docstring)."""

    def __init__(self, spec: FeatureSpec) -> None:
        self.spec = spec
        self.names = spec.feature_names
        self._delay_us = spec.label_delay_seconds * _US
        self._wheres = [a.where_expr for a in spec.aggregates]
        self._histories: list[dict[tuple[Any, ...], _History]] = [{} for _ in spec.aggregates]
        self._labels: dict[str, int] = {}
        self._seen: set[str] = set()
        self._seq = 0

    def features(self, tx: Mapping[str, Any]) -> dict[str, float | None]:
        """The features of ``tx``, which it then records: later events see it."""
        tx_id = str(tx[TRANSACTION_ID])
        if tx_id in self._seen:
            raise DataError(f"transaction_id {tx_id!r} was already recorded")
        t_us = _epoch_us(tx[TIMESTAMP])
        env: dict[str, Value] = {**tx, **_calendar(t_us)}
        mine = []
        for index, aggregate in enumerate(self.spec.aggregates):
            stored = self._stored(index, aggregate, tx, env, t_us, tx_id)
            history = self._histories[index].setdefault(
                tuple(tx[c] for c in aggregate.by), _History()
            )
            for window in aggregate.windows:
                env[aggregate.feature_name(window)] = self._aggregate(
                    aggregate, window, history, stored
                )
            mine.append((history, stored))
        for derive in self.spec.derive_order():
            env[derive.name] = _as_float(evaluate(derive.tree, env))
        for history, stored in mine:
            history.add(stored)
        self._seen.add(tx_id)
        self._seq += 1
        return {name: _as_float(env[name]) for name in self.names}

    def record_label(self, transaction_id: str | int, is_fraud: bool | int) -> None:
        """Set (or replace: a retraction) a recorded transaction's label."""
        if str(transaction_id) not in self._seen:
            raise DataError(f"cannot label transaction_id {transaction_id!r}: not recorded")
        self._labels[str(transaction_id)] = int(bool(is_fraud))

    def _stored(
        self,
        index: int,
        aggregate: Aggregate,
        tx: Mapping[str, Any],
        env: Mapping[str, Value],
        t_us: int,
        tx_id: str,
    ) -> _Stored:
        where = self._wheres[index]
        passes = True if where is None else _as_bool(evaluate(where, env)) is True
        value = None
        if aggregate.of is not None:
            value = tx.get(aggregate.of)
            passes = passes and value is not None
            if aggregate.fn != "count_distinct" and value is not None:
                value = float(value)
        return _Stored(t_us, self._seq, tx_id, passes, value)

    def _members(
        self, aggregate: Aggregate, window: Window, history: _History, me: _Stored
    ) -> list[_Stored]:
        """The window's events, the asking one included where the window ends at it."""
        t = me.t_us
        if aggregate.delayed:
            known = history.upto(t - self._delay_us)
            if window.events is not None:
                return known[-window.events :]
            return [e for e in known if e.t_us > t - self._delay_us - (window.seconds or 0) * _US]
        before = history.upto(t)
        if window.events is not None:
            return [*before[max(0, len(before) - (window.events - 1)) :], me]
        return [*(e for e in before if e.t_us > t - (window.seconds or 0) * _US), me]

    def _aggregate(
        self, aggregate: Aggregate, window: Window, history: _History, me: _Stored
    ) -> float | None:
        members = [e for e in self._members(aggregate, window, history, me) if e.passes]
        fn, default = aggregate.fn, aggregate.default
        if fn == "count":
            return float(len(members))
        if fn in ("fraud_count", "fraud_rate"):
            frauds = sum(self._labels.get(e.transaction_id, 0) for e in members)
            if fn == "fraud_count":
                return float(frauds)
            return frauds / len(members) if members else default
        if fn in ("time_since_last", "time_since_first", "time_since_fraud"):
            if fn == "time_since_last":
                found = [e for e in members if e is not me][-1:]
            elif fn == "time_since_first":
                found = members[:1]
            else:
                found = [e for e in members if self._labels.get(e.transaction_id, 0)][-1:]
            if not found:
                return default
            return (me.t_us - found[0].t_us) / (UNIT_SECONDS[aggregate.unit] * _US)
        values = [e.value for e in members]
        if fn == "count_distinct":
            return float(len(set(values)))
        if fn == "sum":
            return float(math.fsum(values))
        if not values:
            return default
        if fn == "mean":
            return math.fsum(values) / len(values)
        if fn == "min":
            return min(values)
        if fn == "max":
            return max(values)
        mean = math.fsum(values) / len(values)  # std: population
        return math.sqrt(math.fsum((v - mean) ** 2 for v in values) / len(values))


def evaluate(expr: Expr, env: Mapping[str, Value]) -> Value:
    """``expr`` over one row (``fraudflow.features.expressions``: its null rules)."""
    if isinstance(expr, Literal):
        return expr.value
    if isinstance(expr, Name):
        return env.get(expr.name)
    if isinstance(expr, Binary):
        left, right = _as_float(evaluate(expr.left, env)), _as_float(evaluate(expr.right, env))
        if left is None or right is None:
            return None
        if expr.op == "/":
            return None if right == 0 else left / right
        return {"+": left + right, "-": left - right, "*": left * right}[expr.op]
    if isinstance(expr, Compare):
        return _compare(expr, evaluate(expr.left, env), evaluate(expr.right, env))
    if isinstance(expr, Logical):
        return _logical(
            expr.op, _as_bool(evaluate(expr.left, env)), _as_bool(evaluate(expr.right, env))
        )
    if isinstance(expr, Not):
        value = _as_bool(evaluate(expr.operand, env))
        return None if value is None else not value
    return _call(expr, [evaluate(arg, env) for arg in expr.args])


def _compare(expr: Compare, left: Value, right: Value) -> bool | None:
    if left is None or right is None:
        return None
    if not (isinstance(left, str) or isinstance(right, str)):
        left, right = _as_float(left), _as_float(right)
    ops = {
        "<": lambda a, b: a < b, "<=": lambda a, b: a <= b, ">": lambda a, b: a > b,
        ">=": lambda a, b: a >= b, "==": lambda a, b: a == b, "!=": lambda a, b: a != b,
    }  # fmt: skip
    return bool(ops[expr.op](left, right))


def _logical(op: str, left: bool | None, right: bool | None) -> bool | None:
    """Kleene logic, as Polars: false and null is false, true or null is true."""
    if op == "and":
        if left is False or right is False:
            return False
        return None if left is None or right is None else True
    if left is True or right is True:
        return True
    return None if left is None or right is None else False


def _call(expr: Call, args: list[Value]) -> Value:
    if expr.function == "where":
        condition = _as_bool(args[0])
        return _as_float(args[1] if condition else args[2])
    values = [_as_float(arg) for arg in args]
    if expr.function == "coalesce":
        return values[0] if values[0] is not None else values[1]
    if expr.function in ("min", "max"):
        present = [v for v in values if v is not None]
        if not present:
            return None
        return min(present) if expr.function == "min" else max(present)
    if any(v is None for v in values):
        return None
    x = float(values[0])  # type: ignore[arg-type]
    if expr.function == "log1p":
        return math.log1p(x)
    if expr.function == "abs":
        return abs(x)
    low, high = float(values[1]), float(values[2])  # type: ignore[arg-type]  # clip
    return min(max(x, low), high)


def _as_float(value: Value) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool):
        return 1.0 if value else 0.0
    if isinstance(value, float) and math.isnan(value):
        return None
    return float(value)


def _as_bool(value: Value) -> bool | None:
    if value is None or isinstance(value, bool):
        return value
    return float(value) != 0.0


def _calendar(t_us: int) -> dict[str, Value]:
    moment = _EPOCH + timedelta(microseconds=t_us)
    return {
        "hour": float(moment.hour),
        "weekday": float(moment.isoweekday()),  # 1 Monday ... 7 Sunday
        "is_weekend": moment.isoweekday() >= 6,
        "is_night": moment.hour < NIGHT_END_HOUR,
    }


def _epoch_us(value: Any) -> int:
    if isinstance(value, str):
        value = datetime.fromisoformat(value.replace("Z", "+00:00"))
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    delta = value - _EPOCH
    return (delta.days * 86_400 + delta.seconds) * _US + delta.microseconds
