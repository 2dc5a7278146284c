"""The online engine of feature specs: any spec's features of one event at a time.

``SpecOnline`` evaluates a ``FeatureSpec`` event by event over a ``SpecStore``, with the batch
engine's rules (``fraudflow.features.spec``): an event sees the events recorded before it and
itself, never later ones, in (time, arrival) order; a label counts once it is recorded and its
transaction is at or before t - delay. For every event, its features equal the batch features
of the log as it stood when the event arrived (the events so far, with the labels reported so
far): a late event (dated before events already seen) sees those older ones, but the events
scored before it arrived did not see it; that difference is the nature of online scoring.

One implementation of each aggregate function and window (``_members``, ``_aggregate``); the
store only keeps events and answers, per event and per key group (the aggregates sharing their
``by`` columns), the key's stored events that any window of the group can reach (``Layout``):
those dated in (t - reach, t] plus, for ``last N`` windows, the last N before the window's end.
Stores: ``MemorySpecStore`` here (tests, notebooks; the durable stores' in-memory mirror), the
durable ones in ``fraudflow.serve.spec_state``. The service serves the default spec through
``fraudflow.features.online`` instead (its speed path), and any other spec through this.

Retention: a store forgets a key's events dated at or before the mark (the ``Watermark``, else
each call's earliest event) minus ``Layout.retention_us`` (the widest duration window, label
delay included), except the last ``Group.keep`` of them (for ``last N`` windows), and forgets a
transaction once no key group holds it; a label for a forgotten transaction is refused.
``reference_engine`` (the reference of the property tests) forgets nothing.
"""

from __future__ import annotations

import math
from bisect import bisect_left, bisect_right
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, NamedTuple, Protocol

import numpy as np

from fraudflow.data.schema import (
    AMOUNT,
    CUSTOMER_ID,
    REQUIRED_COLUMNS,
    TERMINAL_ID,
    TIMESTAMP,
    TRANSACTION_ID,
)
from fraudflow.errors import DataError
from fraudflow.features.expressions import (
    CALENDAR,
    NIGHT_END_HOUR,
    Binary,
    Call,
    Compare,
    Expr,
    Literal,
    Logical,
    Name,
    Not,
    referenced_names,
)
from fraudflow.features.online import FeatureRows, Watermark
from fraudflow.features.spec import (
    KINDS,
    NEEDS_VALUE,
    UNIT_SECONDS,
    Aggregate,
    FeatureSpec,
    Window,
)

__all__ = [
    "Group",
    "Layout",
    "MemorySpecStore",
    "Row",
    "SpecOnline",
    "SpecStore",
    "Stored",
    "evaluate",
    "extra_columns",
    "layout_of",
    "numeric_columns",
    "online_problem",
    "reference_engine",
    "to_row",
]

_US = 1_000_000
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_NEVER = -(2**62)  # before any event
_Key = tuple[str | None, str | None, bool]  # an aggregate's filter, value column, distinct
_Prepared = tuple[list[tuple[bool, Any]], list[int]]  # per row (passes, value); passing rows
_UNFILTERED: _Key = (None, None, False)  # an aggregate reading no column: every row, no value

Value = float | str | bool | None
# The row columns that are not free-form: ids become strings (as the service's events), the
# amount a float.
_IDS = (CUSTOMER_ID, TERMINAL_ID)


class Row(NamedTuple):
    """One transaction, normalised: its id and time (epoch microseconds, UTC), and its columns:
    ``customer_id``, ``terminal_id`` (strings), ``amount`` and the extra columns it carries."""

    transaction_id: str
    t_us: int
    columns: dict[str, Value]


class Stored:
    """A recorded transaction as a store holds it (one object per transaction in memory)."""

    __slots__ = ("columns", "label", "prepared", "refs", "seq", "t_us", "transaction_id")

    def __init__(
        self, t_us: int, seq: int, transaction_id: str, columns: dict[str, Value], label: int = 0
    ) -> None:
        self.t_us = t_us
        self.seq = seq  # arrival order: ties in time keep it
        self.transaction_id = transaction_id
        self.columns = columns
        self.label = label  # the latest label, 0 or 1
        # Per (where, of, distinct): the aggregate's filter and value of this row, computed
        # once (``SpecOnline._prepared``).
        self.prepared: dict[tuple[str | None, str | None, bool], tuple[bool, Any]] = {}
        self.refs = 0  # how many key histories of the store hold it


@dataclass(frozen=True)
class Group:
    """The aggregates sharing key columns ``by``: what their windows of an event at t reach.

    ``reach_us``: the stored events dated in (t - reach_us, t]; ``last``: (offset_us, n), the
    last n events dated at or before t - offset_us; ``keep``: per key, how many events beyond
    the retention are kept (the largest n).
    """

    by: tuple[str, ...]
    reach_us: int
    last: tuple[tuple[int, int], ...] = ()
    keep: int = 0


@dataclass(frozen=True)
class Layout:
    """What a store keeps for a spec: the key groups, the retention, the row columns."""

    groups: tuple[Group, ...]
    retention_us: int  # a key's events older than the mark minus this can be forgotten
    columns: tuple[str, ...]  # the extra (non-canonical) columns the spec reads


def layout_of(spec: FeatureSpec) -> Layout:
    delay_us = spec.label_delay_seconds * _US
    by_keys: dict[tuple[str, ...], list[Aggregate]] = {}
    for aggregate in spec.aggregates:
        by_keys.setdefault(aggregate.by, []).append(aggregate)
    groups = []
    for by, aggregates in by_keys.items():
        reach, last = 0, set()
        for a in aggregates:
            offset = delay_us if a.delayed else 0
            # count_above: a row of the window reads the typical window before it.
            typical = (a.typical.seconds or 0) * _US if a.typical is not None else 0
            for w in a.windows:
                if w.events is None:
                    reach = max(reach, offset + (w.seconds or 0) * _US + typical)
                elif a.delayed:
                    last.add((offset, w.events))
                elif w.events > 1:  # the row itself and the n - 1 before it
                    last.add((0, w.events - 1))
        keep = max((n for _, n in last), default=0)
        groups.append(Group(by, reach, tuple(sorted(last)), keep))
    # A delayed last-N window ends at t - delay: what it holds must not be forgotten first.
    offsets = [offset for g in groups for offset, _ in g.last]
    retention = max([g.reach_us for g in groups] + offsets + [0])
    return Layout(tuple(groups), retention, extra_columns(spec))


def extra_columns(spec: FeatureSpec) -> tuple[str, ...]:
    """The row columns the spec reads beyond the canonical ones, sorted: what a decision
    request must carry."""
    features, names = set(spec.defined), set()
    for a in spec.aggregates:
        names |= {*a.by, *([a.of] if a.of else [])}
        where = a.where_expr
        names |= referenced_names(where) if where is not None else set()
    for d in spec.derives:
        names |= referenced_names(d.tree) - features
    names |= {c.name for c in spec.columns}
    return tuple(sorted(names - set(CALENDAR) - set(REQUIRED_COLUMNS)))


def numeric_columns(spec: FeatureSpec) -> frozenset[str]:
    """The extra columns whose values must be numbers: summed, averaged, or a numeric
    feature of the row."""
    values = {a.of for a in spec.aggregates if a.fn in NEEDS_VALUE and a.fn != "count_distinct"}
    values |= {c.name for c in spec.columns if c.kind == "numeric"}
    return frozenset(v for v in values if v is not None) - frozenset(REQUIRED_COLUMNS)


def online_problem(spec: FeatureSpec) -> str | None:
    """Why this engine cannot compute ``spec`` online (one line), or None: it computes every
    aggregate, window and expression, and the row's columns. A categorical column's feature
    is NaN here: its value is the row's own, which the model bundle encodes
    (``fraudflow.artifacts.Bundle.model_matrix``; the service: ``serve.scoring``)."""
    for column in spec.columns:
        if column.kind not in KINDS:
            return f"column {column.name!r} is of kind {column.kind!r}, unknown to the engine"
    return None


def to_row(tx: Mapping[str, Any], columns: Sequence[str] = ()) -> Row:
    """A transaction dict (the canonical columns and ``columns``) as a ``Row``.

    An extra column absent from ``tx`` is an error naming it; a null value is kept (null).
    """
    missing = [c for c in (*REQUIRED_COLUMNS, *columns) if c not in tx]
    if missing:
        raise DataError(f"a transaction needs the columns {missing}, however they are missing")
    values: dict[str, Value] = {c: tx[c] for c in columns}
    for column in _IDS:
        values[column] = str(tx[column])
    values[AMOUNT] = float(tx[AMOUNT])
    return Row(str(tx[TRANSACTION_ID]), _epoch_us(tx[TIMESTAMP]), values)


Answer = list[list[Stored]]  # per key group of the layout: the key's events a window may reach


class SpecStore(Protocol):
    """Where the spec engine keeps the recorded transactions and their labels.

    A store holds each transaction (its time, arrival sequence, columns and latest label) and,
    per key group of a ``Layout``, each key's transactions in (time, arrival) order. It answers
    with the events a group's windows may reach (``Group``), as ``Stored`` objects; it computes
    no feature. The layout comes with each call: a store serving a new one (a reload to a
    bundle of another spec) indexes what it holds by the new groups first.
    """

    def prepare(self, layout: Layout) -> None:
        """Index what the store holds by ``layout``'s key groups, before the first call with
        it (an engine's start): later calls need not wait for it."""
        ...

    def apply_many(
        self, rows: Sequence[Row], layout: Layout, *, forget_until_us: int
    ) -> list[Answer | None]:
        """Atomically, row by row in the given order: answer the row, then store it after
        every row stored so far (earlier rows of this call included). A transaction_id
        already stored (or earlier in this call) is not stored again: its answer is None.
        Afterwards the store may forget the touched keys' events dated at or before
        ``forget_until_us`` beyond the last ``Group.keep`` of each key."""
        ...

    def read(self, rows: Sequence[Row], layout: Layout) -> list[Answer]:
        """Each row's answer as if it came next, without storing anything; a row whose
        transaction is stored is left out of its own answer."""
        ...

    def set_label(self, transaction_id: str, is_fraud: bool) -> bool:
        """Set (or replace) a stored transaction's label; False if it is not stored."""
        ...

    def prune(self, layout: Layout, until_us: int) -> int:
        """``apply_many``'s forgetting over every key; return the transactions forgotten."""
        ...

    def close(self) -> None: ...


class _History:
    """One key's events in (time, arrival) order."""

    __slots__ = ("events", "times")

    def __init__(self) -> None:
        self.events: list[Stored] = []
        self.times: list[int] = []

    def add(self, stored: Stored) -> None:
        times = self.times
        if not times or stored.t_us >= times[-1]:  # the usual case: the newest event
            at = len(times)
        else:
            at = bisect_right(times, stored.t_us)
            while at > 0 and times[at - 1] == stored.t_us and self.events[at - 1].seq > stored.seq:
                at -= 1  # an older arrival (a mirror catching up) goes before later ones
        self.events.insert(at, stored)
        times.insert(at, stored.t_us)

    def reach(self, t_us: int, group: Group) -> list[Stored]:
        """The events ``group``'s windows of an event at ``t_us`` may reach."""
        times = self.times
        hi = bisect_right(times, t_us)
        lo = bisect_right(times, t_us - group.reach_us, 0, hi)
        for offset_us, n in group.last:
            lo = min(lo, max(0, bisect_right(times, t_us - offset_us, 0, hi) - n))
        return self.events[lo:hi]

    def forget(self, until_us: int, keep: int) -> list[Stored]:
        """Drop the events dated at or before ``until_us`` but the last ``keep`` of them."""
        times = self.times
        if not times or times[0] > until_us:
            return []
        k = max(0, bisect_right(times, until_us) - keep)
        gone = self.events[:k]
        del self.events[:k], times[:k]
        return gone


class MemorySpecStore:
    """A ``SpecStore`` in dicts and sorted lists: the store of tests and notebooks, and the
    in-memory mirror of the SQLite store (which passes the file's sequence numbers).

    Not thread-safe and not durable.
    """

    def __init__(self) -> None:
        self.records: dict[str, Stored] = {}  # the transactions, by id
        self._seq = 0
        self._layout: Layout | None = None
        self._index: list[dict[tuple[Value, ...], _History]] = []

    def prepare(self, layout: Layout) -> None:
        self._use(layout)

    def apply_many(
        self, rows: Sequence[Row], layout: Layout, *, forget_until_us: int
    ) -> list[Answer | None]:
        out: list[Answer | None] = []
        for row in rows:
            out.append(self.apply_one(row, layout, seq=None))
        self.forget(layout, forget_until_us, rows=rows)
        return out

    def apply_one(self, row: Row, layout: Layout, *, seq: int | None) -> Answer | None:
        """``apply_many`` of one row, forgetting nothing; ``seq`` its arrival sequence (None:
        the next one here)."""
        if row.transaction_id in self.records:
            return None
        answer = self._answer(row, layout, None)
        self.add(Stored(row.t_us, self._next_seq(seq), row.transaction_id, row.columns), layout)
        return answer

    def read(self, rows: Sequence[Row], layout: Layout) -> list[Answer]:
        return [self._answer(row, layout, row.transaction_id) for row in rows]

    def add(self, stored: Stored, layout: Layout) -> None:
        """Hold ``stored`` (a new transaction) in the log and every key history."""
        self._use(layout)
        self._seq = max(self._seq, stored.seq)
        self.records[stored.transaction_id] = stored
        self._index_one(stored)

    def set_label(self, transaction_id: str, is_fraud: bool) -> bool:
        stored = self.records.get(transaction_id)
        if stored is None:
            return False
        stored.label = int(is_fraud)
        return True

    def prune(self, layout: Layout, until_us: int) -> int:
        return len(self.forget(layout, until_us, rows=None))

    def forget(self, layout: Layout, until_us: int, *, rows: Sequence[Row] | None) -> list[str]:
        """Forget what the keys of ``rows`` (None: every key) hold dated at or before
        ``until_us`` beyond their ``keep``; return the transactions no history holds now."""
        self._use(layout)
        gone: list[str] = []
        if until_us <= _NEVER:
            return gone
        for group, histories in zip(layout.groups, self._index, strict=True):
            keys = histories.keys() if rows is None else {_key(r.columns, group) for r in rows}
            for key in list(keys):
                history = histories.get(key)
                if history is None:
                    continue
                for stored in history.forget(until_us, group.keep):
                    stored.refs -= 1
                    if stored.refs == 0:
                        gone.append(stored.transaction_id)
                if not history.events:
                    del histories[key]
        if not layout.groups:  # nothing indexes them: they go by time alone
            gone = [tid for tid, s in self.records.items() if s.t_us <= until_us]
        for tid in gone:
            del self.records[tid]
        return gone

    def close(self) -> None:
        """Nothing to release; here for the ``SpecStore`` protocol."""

    def _next_seq(self, seq: int | None) -> int:
        return self._seq + 1 if seq is None else seq

    def _use(self, layout: Layout) -> None:
        """Index the records by ``layout``'s groups, if they are not already."""
        if layout.groups == (self._layout.groups if self._layout else None):
            self._layout = layout
            return
        self._layout = layout
        self._index = [{} for _ in layout.groups]
        for stored in sorted(self.records.values(), key=lambda s: s.seq):
            stored.refs = 0
            self._index_one(stored)

    def _index_one(self, stored: Stored) -> None:
        assert self._layout is not None
        for group, histories in zip(self._layout.groups, self._index, strict=True):
            key = _key(stored.columns, group)
            history = histories.get(key)
            if history is None:
                history = histories[key] = _History()
            history.add(stored)
            stored.refs += 1

    def _answer(self, row: Row, layout: Layout, leave_out: str | None) -> Answer:
        self._use(layout)
        answer = []
        for group, histories in zip(layout.groups, self._index, strict=True):
            history = histories.get(_key(row.columns, group))
            members = [] if history is None else history.reach(row.t_us, group)
            if leave_out is not None:
                members = [m for m in members if m.transaction_id != leave_out]
            answer.append(members)
        return answer


def _key(columns: Mapping[str, Value], group: Group) -> tuple[Value, ...]:
    return tuple(columns.get(c) for c in group.by)


class SpecOnline:
    """A spec's features of one event at a time over a ``SpecStore`` (module docstring).

    Holds no state of its own: several instances (service replicas) may share one store,
    which it prepares for its spec's key groups when made (``SpecStore.prepare``: it may
    read the whole store). ``forget=False`` keeps everything (the reference of the tests).
    """

    def __init__(
        self,
        spec: FeatureSpec,
        *,
        store: SpecStore,
        watermark: Watermark | None = None,
        forget: bool = True,
    ) -> None:
        self.spec = spec
        self.store = store
        self.watermark = watermark
        self.names = spec.feature_names
        self.layout = layout_of(spec)
        self.columns = self.layout.columns  # the extra columns a row must carry
        self._numeric = numeric_columns(spec)
        self._categorical = frozenset(spec.categorical)
        self._forget = forget
        self._delay_us = spec.label_delay_seconds * _US
        self._group_of = [[g.by for g in self.layout.groups].index(a.by) for a in spec.aggregates]
        self._wheres = [a.where_expr for a in spec.aggregates]
        # What a row's filter and value are cached under (``Stored.prepared``).
        self._keys: list[_Key] = [
            (a.where, a.of, a.fn == "count_distinct") for a in spec.aggregates
        ]
        self._calendar_wheres = [
            w is not None and bool(referenced_names(w) & set(CALENDAR)) for w in self._wheres
        ]
        self._derives = [(d.name, d.tree) for d in spec.derive_order()]
        store.prepare(self.layout)

    def features(self, tx: Mapping[str, Any]) -> dict[str, float | None]:
        """The features of ``tx``, which it then records: later events see it.

        Raises ``DataError`` if its transaction_id is already recorded.
        """
        row = self.row(tx)
        (values,), (fresh,) = self.record_rows([row])
        if not fresh:
            raise DataError(f"transaction_id {row.transaction_id!r} was already recorded")
        named = zip(self.names, values.tolist(), strict=True)
        return {name: None if math.isnan(v) else v for name, v in named}

    def row(self, tx: Mapping[str, Any]) -> Row:
        """``tx`` as a ``Row`` carrying the extra columns of the spec (``to_row``)."""
        row = to_row(tx, self.columns)
        self.check(row)
        return row

    def check(self, row: Row) -> None:
        """A ``DataError`` naming the first numeric column whose value is not a number."""
        for column in self._numeric:
            value = row.columns.get(column)
            if value is not None and (isinstance(value, str | bool) or not _finite(value)):
                raise DataError(
                    f"`{column}` must be a finite number or null, however got {value!r}"
                )

    def record_rows(self, rows: Sequence[Row]) -> FeatureRows:
        """The features of each row in order (N, F), NaN for null, in one store call; each
        sees the ones before it. ``fresh`` False: the transaction_id was recorded already."""
        if not rows:
            return FeatureRows(np.zeros((0, len(self.names))), np.zeros(0, dtype=bool))
        forget = _NEVER
        if self._forget:
            earliest = min(r.t_us for r in rows)
            if self.watermark is not None:
                earliest = self.watermark.advance(earliest)
            forget = earliest - self.layout.retention_us
        answers = self.store.apply_many(rows, self.layout, forget_until_us=forget)
        values = np.full((len(rows), len(self.names)), np.nan)
        for i, (row, answer) in enumerate(zip(rows, answers, strict=True)):
            if answer is not None:
                values[i] = self._row_features(row, answer)
        fresh = np.array([a is not None for a in answers], dtype=bool)
        return FeatureRows(values, fresh)

    def stored_features(self, rows: Sequence[Row]) -> np.ndarray:
        """Feature rows (N, F) of rows the store already holds, recomputed from it now, each
        as if it came next after the stored events (itself left out): for the service to
        decide again a transaction whose decision was lost. Changes nothing."""
        answers = self.store.read(rows, self.layout)
        values = np.full((len(rows), len(self.names)), np.nan)
        for i, (row, answer) in enumerate(zip(rows, answers, strict=True)):
            values[i] = self._row_features(row, answer)
        return values

    def record_label(self, transaction_id: str | int, is_fraud: bool | int) -> None:
        """Set (or replace: a retraction) a recorded transaction's label."""
        if isinstance(is_fraud, bool) or is_fraud in (0, 1):
            if self.store.set_label(str(transaction_id), bool(is_fraud)):
                return
            raise DataError(
                f"cannot label transaction_id {transaction_id!r}: it is not recorded (unknown, "
                "or older than the feature state retention)"
            )
        raise DataError(f"is_fraud must be 0 or 1, however got {is_fraud!r}")

    def prune(self, now: datetime | str) -> int:
        """Forget everything no event at or after ``now`` can see; return transactions gone."""
        return self.store.prune(self.layout, _epoch_us(now) - self.layout.retention_us)

    def _row_features(self, row: Row, answer: Answer) -> list[float]:
        env: dict[str, Value] = {
            **row.columns,
            TRANSACTION_ID: row.transaction_id,
            **_calendar(row.t_us),
        }
        me = Stored(row.t_us, 2**62, row.transaction_id, row.columns)
        # Per key group, shared by its aggregates: the stored events up to this one's time,
        # then itself (the order its windows see), and their times.
        ordered: list[tuple[list[Stored], list[int]] | None] = [None] * len(answer)
        # Per (key group, filter and value): its rows prepared, shared by the aggregates alike.
        shared: dict[tuple[int, _Key], _Prepared] = {}
        for index, aggregate in enumerate(self.spec.aggregates):
            group = self._group_of[index]
            events = ordered[group]
            if events is None:
                members = answer[group]
                times = [m.t_us for m in members]
                hi = bisect_right(times, row.t_us)
                events = ordered[group] = ([*members[:hi], me], [*times[:hi], row.t_us])
            key = (group, self._keys[index])
            prepared = shared.get(key)
            if prepared is None:
                prepared = shared[key] = self._prepare_all(index, aggregate, events[0])
            values = self._aggregate(aggregate, *events, *prepared)
            for window, value in zip(aggregate.windows, values, strict=True):
                env[aggregate.feature_name(window)] = value
        for name, tree in self._derives:
            env[name] = _as_float(evaluate(tree, env))
        out = []
        for name in self.names:
            value = None if name in self._categorical else _as_float(env.get(name))
            out.append(math.nan if value is None else value)
        return out

    def _prepared(self, index: int, aggregate: Aggregate, stored: Stored) -> tuple[bool, Any]:
        """The aggregate's filter (and a present value) and value for one row, once."""
        key = self._keys[index]
        done = stored.prepared.get(key)
        if done is not None:
            return done
        where = self._wheres[index]
        passes = True
        if where is not None:
            env: Mapping[str, Value] = stored.columns
            if self._calendar_wheres[index]:
                env = {**stored.columns, **_calendar(stored.t_us)}
            passes = _as_bool(evaluate(where, env)) is True
        value = None
        if aggregate.of is not None:
            value = stored.columns.get(aggregate.of)
            passes = passes and value is not None
            if not key[2] and value is not None:
                value = float(value)
        done = stored.prepared[key] = (passes, value)
        return done

    def _range(self, aggregate: Aggregate, window: Window, times: list[int]) -> tuple[int, int]:
        """The window as positions [lo, hi) of the asking event's ``ordered`` (its ``times``,
        the asking event last): live windows end at it, delayed ones at t - delay."""
        n, t = len(times), times[-1]
        if aggregate.delayed:  # the asking event (at t > t - delay) is never in it
            hi = bisect_right(times, t - self._delay_us, 0, n - 1)
            if window.events is not None:
                return max(0, hi - window.events), hi
            start = t - self._delay_us - (window.seconds or 0) * _US
            return bisect_right(times, start, 0, hi), hi
        if window.events is not None:
            return max(0, n - window.events), n
        return bisect_right(times, t - (window.seconds or 0) * _US, 0, n - 1), n

    def _prepare_all(self, index: int, aggregate: Aggregate, ordered: list[Stored]) -> _Prepared:
        """The aggregate's filter and value for each of ``ordered``, and the positions of the
        rows passing the filter."""
        if self._keys[index] == _UNFILTERED:
            return [(True, None)] * len(ordered), list(range(len(ordered)))
        prepared = [self._prepared(index, aggregate, e) for e in ordered]
        return prepared, [i for i, (passes, _) in enumerate(prepared) if passes]

    def _aggregate(
        self,
        aggregate: Aggregate,
        ordered: list[Stored],
        times: list[int],
        prepared: list[tuple[bool, Any]],
        passing: list[int],
    ) -> list[float | None]:
        """The aggregate over each of its windows of the asking event, the last of
        ``ordered``: the key's events up to it in (time, arrival) order, all recorded before
        it, and ``times`` theirs, with their filter and value (``_prepare_all``). Each window
        is a range of them (``_range``)."""
        above = None  # count_above: its rows' verdicts, shared by the windows
        if aggregate.fn == "count_above":
            above = _Above(
                aggregate, [times[i] for i in passing], [prepared[i][1] for i in passing]
            )
        out: list[float | None] = []
        for window in aggregate.windows:
            lo, hi = self._range(aggregate, window, times)
            first, last = bisect_left(passing, lo), bisect_left(passing, hi)
            if above is not None:
                out.append(float(sum(above.verdict(rank) for rank in range(first, last))))
            else:
                out.append(self._value(aggregate, passing[first:last], ordered, prepared))
        return out

    def _value(
        self,
        aggregate: Aggregate,
        chosen: list[int],
        ordered: list[Stored],
        prepared: list[tuple[bool, Any]],
    ) -> float | None:
        """One window's value: ``chosen``, the positions in ``ordered`` of its rows."""
        fn, default = aggregate.fn, aggregate.default
        if fn == "count":
            return float(len(chosen))
        if fn in ("fraud_count", "fraud_rate"):
            frauds = sum(ordered[i].label for i in chosen)
            if fn == "fraud_count":
                return float(frauds)
            return frauds / len(chosen) if chosen else default
        if fn in ("time_since_last", "time_since_first", "time_since_fraud"):
            me = len(ordered) - 1
            if fn == "time_since_last":
                found = [i for i in chosen if i != me][-1:]
            elif fn == "time_since_first":
                found = chosen[:1]
            else:
                found = [i for i in chosen if ordered[i].label][-1:]
            if not found:
                return default
            elapsed = ordered[me].t_us - ordered[found[0]].t_us
            return elapsed / (UNIT_SECONDS[aggregate.unit] * _US)
        values = [prepared[i][1] for i in chosen]
        if fn == "count_distinct":
            return float(len(set(values)))
        if fn == "sum":
            return float(math.fsum(values))
        if not values:
            return default
        if fn == "mean":
            return math.fsum(values) / len(values)
        if fn == "min":
            return float(min(values))
        if fn == "max":
            return float(max(values))
        mean = math.fsum(values) / len(values)  # std: population
        return math.sqrt(math.fsum((v - mean) ** 2 for v in values) / len(values))


class _Above:
    """count_above's verdicts for one asking event: whether each matching row's value is above
    k times the mean over the key's matching rows before it in the typical window. Matching
    rows are in (time, arrival) order, so a row's typical rows are the ranks just before its
    own, found by bisection and summed exactly (fsum); each verdict is worked out once."""

    __slots__ = ("_k", "_known", "_times", "_typical_us", "_values")

    def __init__(self, aggregate: Aggregate, times: list[int], values: list[Any]) -> None:
        assert aggregate.k is not None and aggregate.typical is not None  # the spec checks
        self._k = aggregate.k
        self._typical_us = (aggregate.typical.seconds or 0) * _US
        self._times, self._values = times, values
        self._known: dict[int, bool] = {}

    def verdict(self, rank: int) -> bool:
        known = self._known.get(rank)
        if known is None:
            times, values = self._times, self._values
            lo = bisect_right(times, times[rank] - self._typical_us, 0, rank)
            typical = values[lo:rank]
            known = self._known[rank] = bool(typical) and values[rank] > self._k * (
                math.fsum(typical) / len(typical)
            )
        return known


def reference_engine(spec: FeatureSpec) -> SpecOnline:
    """The reference engine of the tests: ``SpecOnline`` in memory, forgetting nothing."""
    return SpecOnline(spec, store=MemorySpecStore(), forget=False)


def _finite(value: Any) -> bool:
    try:
        return math.isfinite(float(value))
    except (TypeError, ValueError):
        return False


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
