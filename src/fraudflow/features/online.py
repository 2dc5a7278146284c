"""The online feature evaluator: the batch features of one event, computed from a state store.

The real-time service scores one transaction at a time, so it cannot run
``fraudflow.features.batch``. ``OnlineFeatures`` computes the same values (the same specs,
windows and caps, read from ``fraudflow.features.specs``) from each entity's stored history:

* Arrival order is the order of ``features`` calls. An event sees the events stored before it
  and itself, never later ones: the batch tie rule for equal timestamps, since the batch
  pipeline sorts by timestamp and keeps input order within ties.
* Windows are (t - w, t] in integer epoch microseconds, the batch resolution.
* Label delay: a fraud label of a transaction at time s counts for an event at time t iff
  s <= t - delay (``fraudflow.features.specs``), whenever ``record_label`` was called, as long
  as it was called before the event was scored. A label reported later than s + delay thus
  reaches only the events scored after the report; events scored in between saw the
  transaction as not fraud. That is the one unavoidable online/offline difference; replays
  that report each label by s + delay reproduce the batch features exactly.

The store answers range aggregates over each entity's history (``Window``: count, frauds,
amount sum, count below a bound, latest time), as columns for a group of events, and records
events and labels; it never computes a feature, so there is one feature implementation, and
the evaluator turns the columns into features with array arithmetic, once per group. Stores:
``MemoryStore`` here (tests, notebooks), the durable ones in ``fraudflow.serve.state`` (the
SQLite store answers from ``Histories``, the counting part of ``MemoryStore``, as its
in-memory mirror).

Retention: scoring an event at t lets the store forget what is older than t minus
``OnlineFeatures.retention_us`` (the widest window, label-delayed ones shifted by the delay,
or the 30-day gap cap). So an event arriving that much later than newer ones would miss
history, and a label for a forgotten transaction is refused (it could not count any more).
With a ``Watermark`` (the service has one), forgetting follows it instead of t: one event
dated far ahead, however it got in, cannot make the store forget the present.
"""

from __future__ import annotations

import heapq
import math
import time
from bisect import bisect_left, bisect_right, insort
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, NamedTuple, Protocol

import numpy as np

from fraudflow.config import FeatureConfig
from fraudflow.data.schema import (
    AMOUNT,
    CUSTOMER_ID,
    REQUIRED_COLUMNS,
    TERMINAL_ID,
    TIMESTAMP,
    TRANSACTION_ID,
)
from fraudflow.errors import DataError
from fraudflow.features.specs import (
    DAY_SECONDS,
    HOUR_SECONDS,
    HOURS_SINCE_PREV_CAP,
    NIGHT_END_HOUR,
    Entity,
    customer_windows,
    feature_names,
    terminal_windows,
)

__all__ = [
    "AnswerLists",
    "Answers",
    "Event",
    "FeatureRows",
    "Histories",
    "MemoryStore",
    "OnlineFeatures",
    "StateStore",
    "Watermark",
    "Window",
    "duplicate_transaction",
    "epoch_us",
    "to_event",
]

_US = 1_000_000
_HOUR_US = HOUR_SECONDS * _US
_DAY_US = DAY_SECONDS * _US
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_EPOCH_WEEKDAY = 3  # 1970-01-01 was a Thursday (Monday = 0)


class Event(NamedTuple):
    """One transaction, normalised: string ids, time in epoch microseconds (UTC)."""

    transaction_id: str
    t_us: int
    customer_id: str
    terminal_id: str
    amount: float


class Window(NamedTuple):
    """For an event at time t: its entity's stored events with t - after_us < time <= t -
    until_us (the batch windows, in integer microseconds)."""

    entity: Entity
    after_us: int
    until_us: int = 0
    # Also answer the events' amount sum and latest time, and, where ``below`` is set, how
    # many have amount < below. Counts and fraud counts are always answered.
    amounts: bool = False
    below: float | None = None


@dataclass(slots=True)
class Answers:
    """A store's answers for a group of N events and W windows, as columns.

    An event's entries are zero where it was not stored (``fresh`` False) and, for the amount
    columns, where its window does not ask for them; ``latest`` holds only where count > 0.
    """

    fresh: np.ndarray  # (N,) bool: stored by this call; False: its id was stored already
    count: np.ndarray  # (W, N) int64: stored events in the window
    frauds: np.ndarray  # (W, N) int64: those currently labelled fraud
    amount: np.ndarray  # (W, N) float64: their amount sum
    below: np.ndarray  # (W, N) int64: those with amount < ``Window.below``
    latest: np.ndarray  # (W, N) int64: the latest time among them

    def expand(self, n_events: int, at: Sequence[int]) -> Answers:
        """These answers (for a subset of a group) placed at positions ``at`` of a group of
        ``n_events``; the other events count as not stored."""
        fresh = np.zeros(n_events, dtype=bool)
        fresh[at] = self.fresh
        columns = []
        for column in (self.count, self.frauds, self.amount, self.below, self.latest):
            full = np.zeros((column.shape[0], n_events), dtype=column.dtype)
            full[:, at] = column
            columns.append(full)
        return Answers(fresh, *columns)


class AnswerLists:
    """``Answers`` being filled event by event, then turned into arrays once. Rows are plain
    lists (cheaper to write one entry at a time than numpy arrays, then one conversion) for
    a group of ``_LISTS_FROM`` events or more; for fewer, the conversions would cost more than
    the writes, and rows are the arrays' own (views). The amount columns exist only for the
    windows that ask for them (``amount[j]`` for window j), the others stay zero."""

    def __init__(self, windows: Sequence[Window], n_events: int) -> None:
        n, shape = n_events, (len(windows), n_events)
        asked = [j for j, w in enumerate(windows) if w.amounts]
        below = [j for j in asked if windows[j].below is not None]
        self._shape = shape
        self._arrays: list[np.ndarray] | None = None
        self.fresh: list[bool] | np.ndarray
        self.count: list[list[int]] | np.ndarray
        self.frauds: list[list[int]] | np.ndarray
        self.amount: dict[int, Any]
        self.below: dict[int, Any]
        self.latest: dict[int, Any]
        if n < _LISTS_FROM:
            arrays = [np.zeros(n, dtype=bool)] + [
                np.zeros(shape, dtype=dtype)
                for dtype in (np.int64, np.int64, np.float64, np.int64, np.int64)
            ]
            self._arrays = arrays
            self.fresh, self.count, self.frauds = arrays[:3]
            self.amount = {j: arrays[3][j] for j in asked}
            self.below = {j: arrays[4][j] for j in below}
            self.latest = {j: arrays[5][j] for j in asked}
            return
        self.fresh = [False] * n
        self.count = [[0] * n for _ in windows]
        self.frauds = [[0] * n for _ in windows]
        self.amount = {j: [0.0] * n for j in asked}
        self.below = {j: [0] * n for j in below}
        self.latest = {j: [0] * n for j in asked}

    def done(self) -> Answers:
        if self._arrays is not None:
            return Answers(*self._arrays)

        def full(rows: Any, dtype: type) -> np.ndarray:
            if isinstance(rows, list):
                return np.array(rows, dtype=dtype).reshape(self._shape)
            out: np.ndarray = np.zeros(self._shape, dtype=dtype)
            if rows:
                out[list(rows)] = np.array(list(rows.values()), dtype=dtype)
            return out

        return Answers(
            np.array(self.fresh, dtype=bool),
            full(self.count, np.int64),
            full(self.frauds, np.int64),
            full(self.amount, np.float64),
            full(self.below, np.int64),
            full(self.latest, np.int64),
        )


_LISTS_FROM = 16


class StateStore(Protocol):
    """Where the evaluator keeps each customer's and terminal's recent events and the labels.

    A store keeps, per entity, its events in arrival order (time order; ties by arrival), and
    per transaction its time, its two entities, its amount and its latest label. It answers
    range aggregates over windows of each event (count, frauds, amount sum, count below a
    bound, latest time), as columns for a whole group of events; it computes no feature.
    """

    def read(self, events: Sequence[Event], windows: Sequence[Window]) -> Answers:
        """Each event's windows over the stored events, as if it came next (it does not see
        the other events of ``events``); change nothing. ``fresh`` is all True."""
        ...

    def apply_many(
        self, events: Sequence[Event], windows: Sequence[Window], *, forget_until_us: int
    ) -> Answers:
        """Atomically, event by event in the given order: answer the event's windows, then
        store it after every event stored so far (earlier events of this call included).

        Atomic so that concurrent writers (service replicas) each see exactly the events that
        arrived before theirs; one call is one store transaction (one round trip), which is
        what makes batches cheap. An event whose transaction_id is already stored (or earlier
        in this call) is not stored again: ``fresh`` is False for it. Afterwards the store may
        forget the touched entities' events, and any transaction, with t <=
        ``forget_until_us``: no later window reaches them.
        """
        ...

    def set_label(self, transaction_id: str, is_fraud: bool) -> bool:
        """Set (or replace) a stored transaction's label; False if the id is not stored."""
        ...

    def prune(self, until_us: int) -> int:
        """Forget every event and transaction with t <= ``until_us``; return transactions gone.

        ``apply_many`` already prunes the entities it touches; this sweeps idle ones.
        """
        ...

    def close(self) -> None: ...


class FeatureRows(NamedTuple):
    """Features of a group of N events, in the evaluator's ``names`` order."""

    values: np.ndarray  # (N, F) float64; the rows of events not stored mean nothing
    fresh: np.ndarray  # (N,) bool: the event was stored (False: a repeated transaction_id)


def wall_clock_us() -> int:
    return time.time_ns() // 1_000


class Watermark:
    """The time up to which events are taken to have arrived: what forgetting follows.

    It follows the events' times, but one group of events moves it by at most
    ``max_skew_us``, and never past the clock plus ``max_skew_us``: an event dated far ahead
    (a wrong clock, a bug, an attack that got past validation) moves it a little, where
    following it would forget the whole state. Events dated behind it move nothing.
    Forgetting less than the events' times allow is always safe (their windows never reach
    back that far); only memory grows. Each process keeps its own, from its first event.
    """

    def __init__(self, *, max_skew_us: int, clock_us: Callable[[], int] = wall_clock_us) -> None:
        if max_skew_us <= 0:
            raise ValueError(f"max_skew_us must be > 0, however got {max_skew_us}")
        self.max_skew_us = max_skew_us
        self._clock_us = clock_us
        self.at_us: int | None = None  # None: no event seen yet

    def advance(self, earliest_us: int) -> int:
        """Move the mark towards ``earliest_us`` (a group's earliest time); the mark now."""
        cap = self._clock_us() + self.max_skew_us
        if self.at_us is not None:
            cap = min(cap, self.at_us + self.max_skew_us)
        moved = min(earliest_us, cap)
        if self.at_us is None or moved > self.at_us:
            self.at_us = moved
        return self.at_us


class OnlineFeatures:
    """The batch features (``fraudflow.features.batch``) of one event at a time.

    Holds no state of its own: it is as thread-safe as its store, and several instances (one
    per service replica) may share one store. Features are computed as columns over a group
    of events (numpy), so a batch costs one pass of array arithmetic, not one per event.
    """

    def __init__(
        self, *, cfg: FeatureConfig, store: StateStore, watermark: Watermark | None = None
    ) -> None:
        self.cfg = cfg
        self.store = store
        # None: each group's earliest time drives forgetting (offline replays of any era).
        self.watermark = watermark
        self.names = feature_names(cfg)
        delay_us = cfg.label_delay_days * _DAY_US
        at = {name: i for i, name in enumerate(self.names)}
        windows: dict[Window, int] = {}

        def window(w: Window) -> int:  # equal windows are asked once
            return windows.setdefault(w, len(windows))

        small = cfg.small_amount
        # Each feature's window and its position in a row (``names`` order), resolved once.
        # The small-amount count rides on the 1d window where there is one.
        customer = [
            (window(Window("customer", w.window_seconds * _US, amounts=True,
                           below=small if w.window_seconds == DAY_SECONDS else None)),
             at[f"customer__count__{w.label}"], at[f"customer__mean_amount__{w.label}"],
             None if w.label == "1h" else at[f"customer__amount_ratio__{w.label}"])
            for w in customer_windows(cfg)
        ]  # fmt: skip
        self._small = (
            window(Window("customer", _DAY_US, amounts=True, below=small)),
            at["customer__small_count__1d"],
        )
        # The gap needs the latest earlier event within the cap (none: the gap is the cap).
        cap_us = int(HOURS_SINCE_PREV_CAP * _HOUR_US)
        self._gap = (
            window(Window("customer", cap_us, amounts=True)),
            at["customer__hours_since_prev"],
        )
        longest_us = customer_windows(cfg)[-1].window_seconds * _US
        self._known = (
            window(Window("customer", delay_us + longest_us, delay_us)),
            at[f"customer__known_fraud_count__{customer_windows(cfg)[-1].label}"],
        )
        self._live = (window(Window("terminal", _DAY_US)), at["terminal__live_count__1d"])
        terminal = [
            (window(Window("terminal", delay_us + w.window_seconds * _US, delay_us)),
             at[f"terminal__count__{w.label}"], at[f"terminal__fraud_rate__{w.label}"])
            for w in terminal_windows(cfg)
        ]  # fmt: skip
        self._calendar = tuple(at[n] for n in _CALENDAR_NAMES)
        self.windows = tuple(windows)
        # Customer and terminal windows stacked: _compute does each formula once over all
        # windows of its kind.
        ratios = [(k, r) for k, (_, _, _, r) in enumerate(customer) if r is not None]

        def index(values: list[int]) -> np.ndarray:  # arrays: cheaper to index with
            return np.array(values, dtype=np.int64)

        self._stacked = _Stacked(
            customer=index([j for j, *_ in customer]),
            customer_counts=index([c for _, c, _, _ in customer]),
            customer_means=index([m for _, _, m, _ in customer]),
            ratio_rows=index([k for k, _ in ratios]),
            ratio_slots=index([r for _, r in ratios]),
            terminal=index([j for j, *_ in terminal]),
            terminal_counts=index([c for _, c, _ in terminal]),
            terminal_rates=index([r for _, _, r in terminal]),
        )
        # Events older than this are outside every window, delayed ones included.
        self.retention_us = max(w.after_us for w in self.windows)

    def features(self, tx: Mapping[str, Any]) -> dict[str, float]:
        """The features of ``tx``, which it then records: later events see it.

        Raises ``DataError`` if its transaction_id is already recorded.
        """
        event = to_event(tx)
        (values,), (fresh,) = self.record_events([event])
        if not fresh:
            raise duplicate_transaction(event.transaction_id)
        return dict(zip(self.names, values.tolist(), strict=True))

    def features_many(self, txs: Sequence[Mapping[str, Any]]) -> list[dict[str, float] | None]:
        """``features`` of each transaction in order, in one store transaction.

        Each sees the ones before it, as one-by-one calls would. A transaction_id already
        recorded (or earlier in ``txs``) gets None and changes nothing.
        """
        values, fresh = self.record_events([to_event(tx) for tx in txs])
        return [
            dict(zip(self.names, row, strict=True)) if new else None
            for row, new in zip(values.tolist(), fresh.tolist(), strict=True)
        ]

    def record_events(self, events: Sequence[Event]) -> FeatureRows:
        """``features_many`` of events already normalised (``to_event``), as one (N, F) array
        (what a model takes) instead of dicts."""
        if not events:
            return FeatureRows(np.zeros((0, len(self.names))), np.zeros(0, dtype=bool))
        # Forgetting less than each event alone would allow is always safe.
        earliest = min(e.t_us for e in events)
        if self.watermark is not None:
            earliest = self.watermark.advance(earliest)
        forget = earliest - self.retention_us
        answers = self.store.apply_many(events, self.windows, forget_until_us=forget)
        return FeatureRows(self._compute(events, answers), answers.fresh)

    def peek(self, tx: Mapping[str, Any]) -> dict[str, float]:
        """The features ``features(tx)`` would return now, recording nothing."""
        event = to_event(tx)
        (values,) = self._compute([event], self.store.read([event], self.windows))
        return dict(zip(self.names, values.tolist(), strict=True))

    def stored_features(self, events: Sequence[Event]) -> np.ndarray:
        """Feature rows (N, F) of events the store already holds, recomputed from it now.

        Each event is answered as if it came next after the stored events dated before it:
        itself (and others of its very microsecond) left out, which is what it saw when it
        was stored, except that events stored after it but dated before it count, and so do
        labels reported since. For the service to decide again a transaction whose decision
        was lost (its record never committed); nothing changes in the store.
        """
        before = [e._replace(t_us=e.t_us - 1) for e in events]
        return self._compute(events, self.store.read(before, self.windows))

    def record_label(self, transaction_id: str | int, is_fraud: bool | int) -> None:
        """Set the label of a scored transaction; the latest call wins.

        It counts for events at t >= s + delay scored after this call (module docstring).
        """
        flag = _label_flag(is_fraud)
        if not self.store.set_label(str(transaction_id), flag):
            days = self.retention_us // _DAY_US
            raise DataError(
                f"cannot label transaction_id {transaction_id!r}: expected a transaction "
                f"scored in the last {days} days (the feature state retention), however it "
                "is not in the state store"
            )

    def prune(self, now: datetime | str) -> int:
        """Forget everything no event at or after ``now`` can see; return transactions gone."""
        return self.store.prune(_epoch_us(now) - self.retention_us)

    def _compute(self, events: Sequence[Event], a: Answers) -> np.ndarray:
        """The events' rows (N, F) from their answers: the batch formulas, as columns.

        Each window's answer covers the stored events before the event; the live windows
        (ending at t) then add the event itself, as batch rows count themselves. Each formula
        runs once over all windows of its kind (arrays (K, N)): a single event costs the
        same number of numpy calls as a batch.
        """
        n, st = len(events), self._stacked
        t = np.fromiter((e.t_us for e in events), dtype=np.int64, count=n)  # (N,)
        amount = np.fromiter((e.amount for e in events), dtype=np.float64, count=n)  # (N,)
        x = np.empty((n, len(self.names)), dtype=np.float64)  # (N, F)
        log_slot, weekend_slot, night_slot, hour_slot = self._calendar
        days, rest = np.divmod(t, _DAY_US)
        hour = rest // _HOUR_US
        x[:, log_slot] = np.log1p(amount)
        x[:, weekend_slot] = (days + _EPOCH_WEEKDAY) % 7 >= 5  # Saturday, Sunday
        x[:, night_slot] = hour < NIGHT_END_HOUR
        x[:, hour_slot] = hour
        count = a.count[st.customer] + 1  # (K, N)
        mean = (a.amount[st.customer] + amount) / count  # (K, N)
        x[:, st.customer_counts] = count.T
        x[:, st.customer_means] = mean.T
        # As in batch: a zero mean (only zero amounts, this one too) gives a ratio of 1:
        # (0 + 1) / (0 + 1). Otherwise amount / mean exactly (adding 0.0 changes nothing).
        # Plain arithmetic, not divide(where=...): each numpy call has a fixed cost whatever
        # the size, and a single decision pays every one.
        means = mean[st.ratio_rows]  # (R, N)
        zero = means == 0
        x[:, st.ratio_slots] = ((amount + zero) / (means + zero)).T
        j, slot = self._small
        x[:, slot] = a.below[j] + (amount < self.cfg.small_amount)
        j, slot = self._gap
        gap = np.where(a.count[j] > 0, (t - a.latest[j]) / _HOUR_US, HOURS_SINCE_PREV_CAP)
        x[:, slot] = np.minimum(gap, HOURS_SINCE_PREV_CAP)
        j, slot = self._known
        x[:, slot] = a.frauds[j]
        j, slot = self._live
        x[:, slot] = a.count[j] + 1  # this event included
        counts, frauds = a.count[st.terminal], a.frauds[st.terminal]  # (K, N)
        x[:, st.terminal_counts] = counts.T
        # No events, no frauds: 0 / 1 = 0, as batch's rate of an empty window.
        x[:, st.terminal_rates] = (frauds / np.maximum(counts, 1)).T
        return x


@dataclass(frozen=True)
class _Stacked:
    """``OnlineFeatures``' customer and terminal windows, as index arrays: window rows of the
    answers, and the feature slots their values go to, in the same order."""

    customer: np.ndarray  # (K,) customer windows
    customer_counts: np.ndarray  # (K,)
    customer_means: np.ndarray  # (K,)
    ratio_rows: np.ndarray  # (R,) positions in ``customer`` of the windows with a ratio
    ratio_slots: np.ndarray  # (R,)
    terminal: np.ndarray  # (K,) label-delayed terminal windows
    terminal_counts: np.ndarray  # (K,)
    terminal_rates: np.ndarray  # (K,)


_CALENDAR_NAMES = ("tx__log_amount", "tx__is_weekend", "tx__is_night", "tx__hour")


def to_event(tx: Mapping[str, Any]) -> Event:
    """A canonical transaction dict (``fraudflow.data.schema``) as an ``Event``."""
    missing = [c for c in REQUIRED_COLUMNS if c not in tx or tx[c] is None]
    if missing:
        raise DataError(
            f"a transaction needs {list(REQUIRED_COLUMNS)}, however {missing} are missing"
        )
    return Event(
        transaction_id=str(tx[TRANSACTION_ID]),
        t_us=_epoch_us(tx[TIMESTAMP]),
        customer_id=str(tx[CUSTOMER_ID]),
        terminal_id=str(tx[TERMINAL_ID]),
        amount=_amount(tx[AMOUNT]),
    )


def _epoch_us(value: Any) -> int:
    """Microseconds since the epoch of a datetime or ISO 8601 string; naive means UTC.

    Naive as UTC, like ``fraudflow.data.ingest``, so a log line gets the same time online.
    """
    if isinstance(value, str):
        try:
            value = datetime.fromisoformat(value)
        except ValueError:
            raise DataError(
                f"`{TIMESTAMP}` must be an ISO 8601 date-time, however got {value!r}"
            ) from None
    if not isinstance(value, datetime):
        raise DataError(
            f"`{TIMESTAMP}` must be a datetime or ISO 8601 string, however got "
            f"{type(value).__name__} {value!r}"
        )
    return epoch_us(value)


def epoch_us(when: datetime) -> int:
    """Microseconds since the epoch, exactly (no float); a naive datetime is UTC."""
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    delta = when - _EPOCH  # exact integer arithmetic, unlike .timestamp()
    return (delta.days * DAY_SECONDS + delta.seconds) * _US + delta.microseconds


def _amount(value: Any) -> float:
    try:
        amount = float(value)
    except (TypeError, ValueError):
        raise DataError(f"`{AMOUNT}` must be a number, however got {value!r}") from None
    if not math.isfinite(amount) or amount < 0:
        raise DataError(f"`{AMOUNT}` must be finite and >= 0, however got {amount!r}")
    return amount


def _label_flag(is_fraud: Any) -> bool:
    if isinstance(is_fraud, bool) or (isinstance(is_fraud, int) and is_fraud in (0, 1)):
        return bool(is_fraud)
    raise DataError(f"is_fraud must be 0 or 1, however got {is_fraud!r}")


class _History:
    """One entity's events in arrival order (time order; ties by arrival), with running amount
    sums, and the times of those labelled fraud."""

    __slots__ = ("amounts", "cum", "fraud_times", "times")

    def __init__(self) -> None:
        self.times: list[int] = []
        self.amounts: list[float] = []
        # cum[i]: the amount sum of the events before position i, plus a base (what the
        # forgotten ones summed to): a range's sum is a difference, O(1) per window. Brought
        # up to date only when asked (``sums``): terminals, say, are never asked.
        self.cum: list[float] = [0.0]
        self.fraud_times: list[int] = []  # sorted; a multiset

    def add(self, t_us: int, amount: float) -> None:
        times = self.times
        if not times or t_us >= times[-1]:  # the usual case: the newest event
            times.append(t_us)
            self.amounts.append(amount)
            return
        i = bisect_right(times, t_us)  # after equal times: arrival order within ties
        times.insert(i, t_us)
        self.amounts.insert(i, amount)
        del self.cum[i + 1 :]  # sums past the insertion are stale

    def sums(self) -> list[float]:
        """``cum``, up to date."""
        cum, amounts = self.cum, self.amounts
        if len(cum) <= len(amounts):
            total = cum[-1]
            for value in amounts[len(cum) - 1 :]:
                total += value
                cum.append(total)
        return cum

    def set_fraud(self, t_us: int, was: bool, now: bool) -> None:
        if now and not was:
            insort(self.fraud_times, t_us)
        elif was and not now:
            del self.fraud_times[bisect_left(self.fraud_times, t_us)]

    def forget(self, until_us: int) -> None:
        times = self.times
        if times and times[0] <= until_us:  # most calls find nothing to forget
            k = bisect_right(times, until_us)
            del times[:k], self.amounts[:k]
            if len(self.cum) > k:
                del self.cum[:k]  # cum[0]: what the forgotten events summed to
                if abs(self.cum[0]) > _REBASE_ABOVE:  # keep the sums' rounding at their scale
                    base = self.cum[0]
                    self.cum = [c - base for c in self.cum]
            else:  # the sums had not reached the new first event: start them afresh there
                self.cum = [0.0]
        if self.fraud_times and self.fraud_times[0] <= until_us:
            del self.fraud_times[: bisect_right(self.fraud_times, until_us)]


_REBASE_ABOVE = 2.0**24
# Histories are swept for old events every this many applied events: each sweep visits every
# history touched since, about one per entity of a busy service, so rarer sweeps cost less per
# event (benchmarks/serve.py's server CPU per decision compared this against 4,096); the old
# events kept in between are memory only, no window reaches them.
_SWEEP_EVERY = 65_536
_EMPTY = _History()  # the history of an entity never seen; never written


# One window of a call, bound to its output rows: (after_us, count, frauds, amount (None: not
# asked), below, below count, latest).
_Bound = tuple[int, list[int], list[int], list[float] | None, float | None, list[int], list[int]]
# An entity's windows that end at the same until_us, which they share one search for.
_Group = tuple[int, list[_Bound]]


def _bind(windows: Sequence[Window], out: AnswerLists) -> tuple[list[_Group], list[_Group]]:
    """The windows split by entity (customer, terminal) and grouped by ``until_us``, each
    with its rows of ``out``."""
    split: dict[Entity, dict[int, list[_Bound]]] = {"customer": {}, "terminal": {}}
    unused: list[int] = []  # the rows of what a window does not ask: never written
    for j, w in enumerate(windows):
        split[w.entity].setdefault(w.until_us, []).append(
            (w.after_us, out.count[j], out.frauds[j], out.amount.get(j), w.below,
             out.below.get(j, unused), out.latest.get(j, unused))
        )  # fmt: skip
    return list(split["customer"].items()), list(split["terminal"].items())


def _answer(i: int, t_us: int, h: _History, groups: list[_Group]) -> None:
    """Event ``i``'s windows (at time ``t_us``) over one entity's history: the hot loop of a
    service, hence the flat tuples and the searches shared by windows with one end."""
    times, fraud_times = h.times, h.fraud_times
    n = len(times)
    top = n if not n or times[-1] <= t_us else bisect_right(times, t_us)
    fraud_hi = 0
    cum: list[float] = []  # the running sums, fetched by the first window that asks
    for until_us, windows in groups:
        end = t_us - until_us
        hi = bisect_right(times, end, 0, top) if until_us else top
        if fraud_times:
            fraud_hi = bisect_right(fraud_times, end)
        for after_us, counts, frauds, amounts, below, belows, latests in windows:
            start = t_us - after_us
            lo = bisect_right(times, start, 0, hi)
            counts[i] = hi - lo
            if fraud_times:
                frauds[i] = fraud_hi - bisect_right(fraud_times, start)
            if amounts is not None and hi > lo:
                cum = cum or h.sums()
                amounts[i] = cum[hi] - cum[lo]
                latests[i] = times[hi - 1]
                if below is not None:
                    belows[i] = sum(1 for v in h.amounts[lo:hi] if v < below)


class Histories:
    """Each customer's and terminal's recent events, answering windows over them, and the
    transactions labelled fraud: the part of a store that counts, without transaction ids.

    Every event given to ``apply_many`` is stored: the caller keeps ids unique (``MemoryStore``
    by its id index; the SQLite store's mirror by its file, which already decided what is
    new, so the mirror keeps no index of its own: measured, ~1.2 us less per event). Not
    thread-safe. A window costs O(log n) (a below-count: plus the events in it).
    """

    def __init__(self) -> None:
        self._customers: dict[str, _History] = {}
        self._terminals: dict[str, _History] = {}
        # The transactions labelled fraud now, with their time: what ``label`` changes.
        self._frauds: dict[str, int] = {}
        # Histories touched since they were last swept for old events: swept every
        # _SWEEP_EVERY applied events, not per call, so a busy terminal drops its old events
        # in one slice instead of one per call.
        self._touched: set[_History] = set()  # by identity
        self._unswept = 0
        # The highest bound forgotten: a label of an older transaction is refused.
        self._forgot_until_us = _NEVER

    def read(self, events: Sequence[Event], windows: Sequence[Window]) -> Answers:
        out = AnswerLists(windows, len(events))
        by_customer, by_terminal = _bind(windows, out)
        customers, terminals = self._customers, self._terminals
        for i, e in enumerate(events):
            out.fresh[i] = True
            _answer(i, e.t_us, customers.get(e.customer_id, _EMPTY), by_customer)
            _answer(i, e.t_us, terminals.get(e.terminal_id, _EMPTY), by_terminal)
        return out.done()

    def apply_many(
        self, events: Sequence[Event], windows: Sequence[Window], *, forget_until_us: int
    ) -> Answers:
        """``StateStore.apply_many`` of events that are all new (``fresh`` is all True)."""
        out = AnswerLists(windows, len(events))
        by_customer, by_terminal = _bind(windows, out)
        # The hot loop of a service: everything it touches bound to locals.
        customers, terminals = self._customers, self._terminals
        fresh, touched = out.fresh, self._touched
        for i, (_, t_us, customer_id, terminal_id, amount) in enumerate(events):
            fresh[i] = True
            customer = customers.get(customer_id)
            if customer is None:  # not setdefault: it would build a _History every call
                customer = customers[customer_id] = _History()
            terminal = terminals.get(terminal_id)
            if terminal is None:
                terminal = terminals[terminal_id] = _History()
            if windows:
                _answer(i, t_us, customer, by_customer)
                _answer(i, t_us, terminal, by_terminal)
            customer.add(t_us, amount)
            terminal.add(t_us, amount)
            touched.add(customer)
            touched.add(terminal)
        self._forgot_until_us = max(self._forgot_until_us, forget_until_us)
        self._unswept += len(events)
        if self._unswept >= _SWEEP_EVERY:
            for history in touched:
                history.forget(forget_until_us)
            touched.clear()
            self._unswept = 0
            self._forget_frauds(self._forgot_until_us)
        return out.done()

    def label(
        self, transaction_id: str, t_us: int, customer_id: str, terminal_id: str, is_fraud: bool
    ) -> bool:
        """Set the label of a stored transaction (its time and entities as stored); False,
        changing nothing, if it is forgotten (at or before the highest bound forgotten)."""
        customer, terminal = self._customers.get(customer_id), self._terminals.get(terminal_id)
        if t_us <= self._forgot_until_us or customer is None or terminal is None:
            return False
        was = transaction_id in self._frauds
        customer.set_fraud(t_us, was=was, now=is_fraud)
        terminal.set_fraud(t_us, was=was, now=is_fraud)
        if is_fraud:
            self._frauds[transaction_id] = t_us
        elif was:
            del self._frauds[transaction_id]
        return True

    def prune(self, until_us: int) -> None:
        """Forget every event and label with t <= ``until_us``."""
        self._forgot_until_us = max(self._forgot_until_us, until_us)
        self._touched.clear()  # all are swept now
        for histories in (self._customers, self._terminals):
            for key, history in list(histories.items()):
                history.forget(until_us)
                if not history.times:
                    del histories[key]
        self._forget_frauds(until_us)

    def _forget_frauds(self, until_us: int) -> None:
        # Their fraud times may still be in a history (swept later): no window reaches them.
        if any(t <= until_us for t in self._frauds.values()):
            self._frauds = {tid: t for tid, t in self._frauds.items() if t > until_us}


_NEVER = -(2**62)  # before any event


# A stored transaction: (t_us, customer_id, terminal_id). A plain tuple of atoms, which
# Python's cyclic GC stops tracking: a store holds millions of them, and a tracked object each
# made every full collection scan them all (measured: batch throughput divided by ~2.5).
_Transaction = tuple[int, str, str]


class MemoryStore:
    """A ``StateStore`` in plain dicts and sorted lists: ``Histories`` plus an index of the
    stored transactions by id (duplicates, labels); the store of tests and notebooks.

    Not thread-safe and not durable: use one per thread, or a store of
    ``fraudflow.serve.state`` in the service.
    """

    def __init__(self) -> None:
        self._histories = Histories()
        self._transactions: dict[str, _Transaction] = {}
        # The transactions by time, to forget: those that arrive in time order (nearly all)
        # in a deque, O(1) each, a late one (older than the newest before it) in a heap.
        self._in_order: deque[tuple[int, str]] = deque()
        self._late: list[tuple[int, str]] = []  # heap of (t_us, transaction_id)

    def read(self, events: Sequence[Event], windows: Sequence[Window]) -> Answers:
        return self._histories.read(events, windows)

    def apply_many(
        self, events: Sequence[Event], windows: Sequence[Window], *, forget_until_us: int
    ) -> Answers:
        transactions, in_order = self._transactions, self._in_order
        stored = []  # positions of the events new to the store (first occurrences)
        for i, (tid, t_us, customer_id, terminal_id, _) in enumerate(events):
            if tid in transactions:
                continue
            stored.append(i)
            transactions[tid] = (t_us, customer_id, terminal_id)
            if not in_order or t_us >= in_order[-1][0]:
                in_order.append((t_us, tid))
            else:
                heapq.heappush(self._late, (t_us, tid))
        if len(stored) == len(events):
            answers = self._histories.apply_many(events, windows, forget_until_us=forget_until_us)
        else:
            answers = self._histories.apply_many(
                [events[i] for i in stored], windows, forget_until_us=forget_until_us
            ).expand(len(events), stored)
        self._forget_transactions(forget_until_us)
        return answers

    def set_label(self, transaction_id: str, is_fraud: bool) -> bool:
        tx = self._transactions.get(transaction_id)
        return tx is not None and self._histories.label(transaction_id, *tx, is_fraud)

    def prune(self, until_us: int) -> int:
        self._histories.prune(until_us)
        return self._forget_transactions(until_us)

    def close(self) -> None:
        """Nothing to release; here for the ``StateStore`` protocol."""

    def _forget_transactions(self, until_us: int) -> int:
        transactions, in_order, late = self._transactions, self._in_order, self._late
        gone = 0
        while in_order and in_order[0][0] <= until_us:
            del transactions[in_order.popleft()[1]]
            gone += 1
        while late and late[0][0] <= until_us:
            del transactions[heapq.heappop(late)[1]]
            gone += 1
        return gone


def duplicate_transaction(transaction_id: str) -> DataError:
    """The error every store raises when ``apply`` gets a transaction_id it already holds."""
    return DataError(
        f"transaction_id {transaction_id!r} is already in the state store: expected each "
        "transaction to be scored once (ids are unique, see fraudflow.data.schema)"
    )
