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

The store answers range queries over an entity's history (``RangeQuery``) and records events
and labels; it never computes a feature, so there is one feature implementation. Stores:
``MemoryStore`` here (tests, per-request scratch), the durable ones in
``fraudflow.serve.state``.

Retention: scoring an event at t lets the store forget what is older than t minus
``OnlineFeatures.retention_us`` (the widest window, label-delayed ones shifted by the delay,
or the 30-day gap cap). So an event arriving that much later than newer ones would miss
history, and a label for a forgotten transaction is refused (it could not count any more).
"""

from __future__ import annotations

import heapq
import math
from bisect import bisect_left, bisect_right, insort
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, NamedTuple, Protocol

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
    "Event",
    "MemoryStore",
    "OnlineFeatures",
    "RangeQuery",
    "RangeResult",
    "StateStore",
    "duplicate_transaction",
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


class RangeQuery(NamedTuple):
    """The stored events of one entity with ``after_us < t <= until_us``."""

    entity: Entity
    entity_id: str
    after_us: int
    until_us: int
    rows: bool = False  # also return the events' times and amounts, not only counts


@dataclass(slots=True)
class RangeResult:
    count: int  # stored events in the range
    frauds: int  # those currently labelled fraud
    # With ``RangeQuery.rows``: times and amounts of those events, in arrival order (which is
    # time order, ties by arrival). Empty otherwise: shared empty tuples, since a service
    # builds six results per decision.
    times: Sequence[int] = ()
    amounts: Sequence[float] = ()


class StateStore(Protocol):
    """Where the evaluator keeps each customer's and terminal's recent events and the labels.

    A store keeps, per entity, its events in arrival order (time order; ties by arrival), and
    per transaction its time, its two entities and its latest label. It answers counts (and
    optionally rows) over time ranges; it computes no feature.
    """

    def read(self, queries: Sequence[RangeQuery]) -> list[RangeResult]:
        """Answer the queries from one consistent snapshot; change nothing."""
        ...

    def apply_many(
        self,
        events: Sequence[Event],
        queries: Sequence[Sequence[RangeQuery]],
        *,
        forget_until_us: int,
    ) -> list[list[RangeResult] | None]:
        """Atomically, event by event in the given order: answer the event's queries, then
        store it after every event stored so far (earlier events of this call included).

        Atomic so that concurrent writers (service replicas) each see exactly the events that
        arrived before theirs; one call is one store transaction (one round trip), which is
        what makes batches cheap. An event whose transaction_id is already stored (or earlier
        in this call) is not stored again: its entry is None. Afterwards the store may forget
        the touched entities' events, and any transaction, with t <= ``forget_until_us``: no
        later query reaches them.
        """
        ...

    def set_label(self, transaction_id: str, is_fraud: bool) -> bool:
        """Set (or replace) a stored transaction's label; False if the id is not stored."""
        ...

    def prune(self, until_us: int) -> int:
        """Forget every event and transaction with t <= ``until_us``; return transactions gone.

        ``apply`` already prunes the entities it touches; this sweeps idle ones (maintenance).
        """
        ...

    def close(self) -> None: ...


class OnlineFeatures:
    """The batch features (``fraudflow.features.batch``) of one event at a time.

    Holds no state of its own: it is as thread-safe as its store, and several instances (one
    per service replica) may share one store.
    """

    def __init__(self, *, cfg: FeatureConfig, store: StateStore) -> None:
        self.cfg = cfg
        self.store = store
        self.names = feature_names(cfg)
        self._delay_us = cfg.label_delay_days * _DAY_US
        self._customer = [(w.label, w.window_seconds * _US) for w in customer_windows(cfg)]
        self._terminal = [(w.label, w.window_seconds * _US) for w in terminal_windows(cfg)]
        longest = customer_windows(cfg)[-1]
        self._longest_us = longest.window_seconds * _US
        # Each value's position in a row (``names`` order), resolved once: per event, name
        # lookups would cost more than the arithmetic. Customer windows come narrowest first
        # (``customer_windows`` sorts them), as ``_customer_features`` needs.
        at = {name: i for i, name in enumerate(self.names)}
        self._customer_slots = [
            (w, at[f"customer__count__{label}"], at[f"customer__mean_amount__{label}"],
             None if label == "1h" else at[f"customer__amount_ratio__{label}"])
            for label, w in self._customer
        ]  # fmt: skip
        self._terminal_slots = [
            (at[f"terminal__count__{label}"], at[f"terminal__fraud_rate__{label}"])
            for label, _ in self._terminal
        ]
        self._known_slot = at[f"customer__known_fraud_count__{longest.label}"]
        self._tx_slots = tuple(at[n] for n in _CALENDAR_NAMES)
        self._small_slot = at["customer__small_count__1d"]
        self._gap_slot = at["customer__hours_since_prev"]
        self._live_slot = at["terminal__live_count__1d"]
        # The customer history read per event must cover every customer window, the 1d
        # small-amount window, and the gap cap (no earlier event: the gap is the cap anyway).
        cap_us = int(HOURS_SINCE_PREV_CAP * _HOUR_US)
        self._history_us = max(self._customer[-1][1], cap_us, _DAY_US)
        # Events older than this are outside every window, delayed ones included.
        widest_delayed_us = max(self._customer[-1][1], *(w for _, w in self._terminal))
        self.retention_us = max(self._history_us, self._delay_us + widest_delayed_us)

    def features(self, tx: Mapping[str, Any]) -> dict[str, float]:
        """The features of ``tx``, which it then records: later events see it.

        Raises ``DataError`` if its transaction_id is already recorded.
        """
        event = to_event(tx)
        (row,) = self.record_events([event])
        if row is None:
            raise duplicate_transaction(event.transaction_id)
        return dict(zip(self.names, row, strict=True))

    def features_many(self, txs: Sequence[Mapping[str, Any]]) -> list[dict[str, float] | None]:
        """``features`` of each transaction in order, in one store transaction.

        Each sees the ones before it, as one-by-one calls would. A transaction_id already
        recorded (or earlier in ``txs``) gets None and changes nothing.
        """
        rows = self.record_events([to_event(tx) for tx in txs])
        return [None if r is None else dict(zip(self.names, r, strict=True)) for r in rows]

    def record_events(self, events: Sequence[Event]) -> list[list[float] | None]:
        """``features_many`` of events already normalised (``to_event``), each as a row of
        values in ``names`` order (what a model takes) instead of a dict."""
        if not events:
            return []
        # Forgetting less than each event alone would allow is always safe.
        forget = min(e.t_us for e in events) - self.retention_us
        queries = [self._queries(e) for e in events]
        results = self.store.apply_many(events, queries, forget_until_us=forget)
        pairs = zip(events, results, strict=True)
        return [None if r is None else self._compute(e, r) for e, r in pairs]

    def peek(self, tx: Mapping[str, Any]) -> dict[str, float]:
        """The features ``features(tx)`` would return now, recording nothing."""
        event = to_event(tx)
        row = self._compute(event, self.store.read(self._queries(event)))
        return dict(zip(self.names, row, strict=True))

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

    def _queries(self, e: Event) -> list[RangeQuery]:
        """[customer history with rows, customer known frauds, terminal live 1d, *delayed]."""
        t, known = e.t_us, e.t_us - self._delay_us
        cust, term = e.customer_id, e.terminal_id
        queries = [
            RangeQuery("customer", cust, t - self._history_us, t, True),
            RangeQuery("customer", cust, known - self._longest_us, known),
            RangeQuery("terminal", term, t - _DAY_US, t),
        ]
        for _, w in self._terminal:
            queries.append(RangeQuery("terminal", term, known - w, known))
        return queries

    def _compute(self, e: Event, results: list[RangeResult]) -> list[float]:
        """The event's row, values in ``names`` order (slots resolved in ``__init__``)."""
        history, known, live, *delayed = results
        row = [0.0] * len(self.names)
        for slot, value in zip(self._tx_slots, _calendar(e), strict=True):
            row[slot] = value
        self._customer_features(e, history, row)
        row[self._known_slot] = float(known.frauds)
        row[self._live_slot] = float(live.count + 1)  # this event included
        for (count_slot, rate_slot), r in zip(self._terminal_slots, delayed, strict=True):
            row[count_slot] = float(r.count)
            row[rate_slot] = r.frauds / r.count if r.count else 0.0
        return row

    def _customer_features(self, e: Event, history: RangeResult, row: list[float]) -> None:
        times, amounts = history.times, history.amounts
        # The windows are nested suffixes of the history (narrowest first): each one's sum is
        # the previous one's plus the events only it holds, one pass over the history.
        total, end = e.amount, len(amounts)
        for w, count_slot, mean_slot, ratio_slot in self._customer_slots:
            start = bisect_right(times, e.t_us - w, 0, end)
            total += sum(amounts[start:end])
            end = start
            n = len(amounts) - start + 1
            mean = total / n
            row[count_slot] = float(n)
            row[mean_slot] = mean
            if ratio_slot is not None:
                # As in batch: a zero mean (only zero amounts) gives a ratio of 1.
                row[ratio_slot] = e.amount / mean if mean > 0 else 1.0
        small_amount = self.cfg.small_amount
        day_start = bisect_right(times, e.t_us - _DAY_US)
        small = sum(1 for a in amounts[day_start:] if a < small_amount)
        row[self._small_slot] = float(small + (e.amount < small_amount))
        gap = (e.t_us - times[-1]) / _HOUR_US if times else HOURS_SINCE_PREV_CAP
        row[self._gap_slot] = min(gap, HOURS_SINCE_PREV_CAP)


_CALENDAR_NAMES = ("tx__log_amount", "tx__is_weekend", "tx__is_night", "tx__hour")


def _calendar(e: Event) -> tuple[float, float, float, float]:
    """``_CALENDAR_NAMES`` from the integer time: UTC, as in batch (Saturday, Sunday =
    weekend)."""
    hour = (e.t_us // _HOUR_US) % 24
    weekday = (e.t_us // _DAY_US + _EPOCH_WEEKDAY) % 7
    return (
        math.log1p(e.amount),
        float(weekday >= 5),
        float(hour < NIGHT_END_HOUR),
        float(hour),
    )


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
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    delta = value - _EPOCH  # exact integer arithmetic, unlike .timestamp()
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


@dataclass
class _History:
    """One entity's events in arrival order, and the times of those labelled fraud."""

    times: list[int] = field(default_factory=list)
    amounts: list[float] = field(default_factory=list)
    fraud_times: list[int] = field(default_factory=list)  # sorted; a multiset

    def add(self, t_us: int, amount: float) -> None:
        i = bisect_right(self.times, t_us)  # after equal times: arrival order within ties
        self.times.insert(i, t_us)
        self.amounts.insert(i, amount)

    def answer(self, q: RangeQuery) -> RangeResult:
        lo, hi = bisect_right(self.times, q.after_us), bisect_right(self.times, q.until_us)
        fr = self.fraud_times
        frauds = bisect_right(fr, q.until_us) - bisect_right(fr, q.after_us) if fr else 0
        if not q.rows:
            return RangeResult(hi - lo, frauds)
        return RangeResult(hi - lo, frauds, self.times[lo:hi], self.amounts[lo:hi])

    def set_fraud(self, t_us: int, was: bool, now: bool) -> None:
        if now and not was:
            insort(self.fraud_times, t_us)
        elif was and not now:
            del self.fraud_times[bisect_left(self.fraud_times, t_us)]

    def forget(self, until_us: int) -> None:
        k = bisect_right(self.times, until_us)
        del self.times[:k], self.amounts[:k]
        del self.fraud_times[: bisect_right(self.fraud_times, until_us)]


# A stored transaction: (t_us, customer_id, terminal_id, is_fraud). A plain tuple of atoms,
# which Python's cyclic GC stops tracking: a service's mirror holds millions of them, and a
# tracked object each made every full collection scan them all (measured: batch throughput
# divided by ~2.5).
_Transaction = tuple[int, str, str, bool]


class MemoryStore:
    """A ``StateStore`` in plain dicts and sorted lists: for tests and per-request scratch.

    Not thread-safe and not durable: use one per thread, or a store of
    ``fraudflow.serve.state`` in the service. Queries cost O(log n) plus the rows returned.
    """

    def __init__(self) -> None:
        self._entities: dict[tuple[Entity, str], _History] = {}
        self._transactions: dict[str, _Transaction] = {}
        self._by_time: list[tuple[int, str]] = []  # heap of (t_us, transaction_id)
        self._empty = _History()  # the answer source for an entity never seen; never written

    def read(self, queries: Sequence[RangeQuery]) -> list[RangeResult]:
        get, empty = self._entities.get, self._empty
        return [get((q.entity, q.entity_id), empty).answer(q) for q in queries]

    def apply_many(
        self,
        events: Sequence[Event],
        queries: Sequence[Sequence[RangeQuery]],
        *,
        forget_until_us: int,
    ) -> list[list[RangeResult] | None]:
        out: list[list[RangeResult] | None] = []
        touched: set[tuple[Entity, str]] = set()
        entities, transactions, empty = self._entities, self._transactions, self._empty
        for event, event_queries in zip(events, queries, strict=True):
            if event.transaction_id in transactions:
                out.append(None)
                continue
            # The hot loop of a service: the reads inlined rather than through ``read``.
            out.append([
                entities.get((q.entity, q.entity_id), empty).answer(q) for q in event_queries
            ])  # fmt: skip
            for key in (("customer", event.customer_id), ("terminal", event.terminal_id)):
                history = entities.get(key)
                if history is None:  # not setdefault: it would build a _History every call
                    history = entities[key] = _History()
                history.add(event.t_us, event.amount)
                touched.add(key)
            tx = (event.t_us, event.customer_id, event.terminal_id, False)
            transactions[event.transaction_id] = tx
            heapq.heappush(self._by_time, (event.t_us, event.transaction_id))
        for key in touched:
            entities[key].forget(forget_until_us)
        self._forget_transactions(forget_until_us)
        return out

    def set_label(self, transaction_id: str, is_fraud: bool) -> bool:
        tx = self._transactions.get(transaction_id)
        if tx is None:
            return False
        t_us, customer_id, terminal_id, was = tx
        for key in self._keys(customer_id, terminal_id):
            self._entities[key].set_fraud(t_us, was=was, now=is_fraud)
        self._transactions[transaction_id] = (t_us, customer_id, terminal_id, is_fraud)
        return True

    def prune(self, until_us: int) -> int:
        for key, history in list(self._entities.items()):
            history.forget(until_us)
            if not history.times:
                del self._entities[key]
        return self._forget_transactions(until_us)

    def close(self) -> None:
        """Nothing to release; here for the ``StateStore`` protocol."""

    @staticmethod
    def _keys(customer_id: str, terminal_id: str) -> list[tuple[Entity, str]]:
        return [("customer", customer_id), ("terminal", terminal_id)]

    def _forget_transactions(self, until_us: int) -> int:
        gone = 0
        while self._by_time and self._by_time[0][0] <= until_us:
            del self._transactions[heapq.heappop(self._by_time)[1]]
            gone += 1
        return gone


def duplicate_transaction(transaction_id: str) -> DataError:
    """The error every store raises when ``apply`` gets a transaction_id it already holds."""
    return DataError(
        f"transaction_id {transaction_id!r} is already in the state store: expected each "
        "transaction to be scored once (ids are unique, see fraudflow.data.schema)"
    )
