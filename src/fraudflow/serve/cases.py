"""The analyst review queue's cases: opened by decisions, worked by analysts, closed by verdicts.

Every ``review`` decision opens a case (``block`` decisions too, as confirm-only cases, when the
service is so configured). A case is in one queue, ordered by priority (policy-set; by default
score x amount), then by age; it is due ``sla_seconds`` after it opened. An analyst works a case
by holding it: ``take_next`` hands the highest-priority case nobody holds to one analyst, and
two analysts asking at once get different cases (the choice and the hold are one write
transaction); a hold lapses ``hold_seconds`` after the analyst's last action on the case, so an
abandoned case goes back to the queue. A verdict (fraud / not fraud, with a note) closes the
case and is returned as the label to record; an escalation hands it to the supervisors.

Every analyst action is appended to ``case_events`` (user, time, action, detail): the audit
trail of the console. Storage (``fraudflow.serve.database``): a SQLite file (WAL) shared by the
service's workers, or a PostgreSQL database shared by several replicas; the SQL is what both
run, with the dialect's row locks where concurrent transactions meet.

Times are integer microseconds since the epoch (UTC), as in the state stores.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, NamedTuple

import polars as pl

from fraudflow.data.io import write_table
from fraudflow.errors import ConfigError, DataError
from fraudflow.serve.database import Connection, Database, is_postgres_url, open_database

__all__ = [
    "Case",
    "CaseFilter",
    "CaseGauges",
    "CaseIn",
    "CaseStore",
    "Decided",
    "Verdict",
    "export_cases",
    "read_case_events",
    "read_case_outcomes",
    "read_cases",
]

Status = Literal["open", "escalated", "closed"]
Outcome = Literal["fraud", "not_fraud"]
_US = 1_000_000

_SCHEMA = """
CREATE TABLE IF NOT EXISTS cases (
    case_id {key},
    transaction_id TEXT NOT NULL UNIQUE,
    customer_id TEXT NOT NULL,
    terminal_id TEXT NOT NULL,
    amount DOUBLE PRECISION NOT NULL,
    score DOUBLE PRECISION NOT NULL,
    decision TEXT NOT NULL,
    confirm_only INTEGER NOT NULL,
    reasons TEXT NOT NULL,
    priority DOUBLE PRECISION NOT NULL,
    queue TEXT NOT NULL,
    opened_us BIGINT NOT NULL,
    due_us BIGINT NOT NULL,
    status TEXT NOT NULL,
    assignee TEXT,
    held_until_us BIGINT,
    outcome TEXT,
    closed_by TEXT,
    closed_us BIGINT,
    note TEXT
);
CREATE INDEX IF NOT EXISTS cases_queue ON cases (status, queue, priority DESC, opened_us);
CREATE INDEX IF NOT EXISTS cases_customer ON cases (customer_id, opened_us);
CREATE TABLE IF NOT EXISTS case_events (
    event_id {key},
    case_id INTEGER,
    at_us BIGINT NOT NULL,
    username TEXT NOT NULL,
    action TEXT NOT NULL,
    detail TEXT NOT NULL
);
"""

_COLUMNS = (
    "case_id", "transaction_id", "customer_id", "terminal_id", "amount", "score", "decision",
    "confirm_only", "reasons", "priority", "queue", "opened_us", "due_us", "status",
    "assignee", "held_until_us", "outcome", "closed_by", "closed_us", "note",
)  # fmt: skip


@dataclass(frozen=True)
class CaseIn:
    """What a decision tells the queue."""

    transaction_id: str
    customer_id: str
    terminal_id: str
    amount: float
    score: float
    decision: str  # review | block
    reasons: tuple[str, ...]
    at_us: int
    priority: float | None = None  # None: score x amount


@dataclass(frozen=True)
class Case:
    case_id: int
    transaction_id: str
    customer_id: str
    terminal_id: str
    amount: float
    score: float
    decision: str
    confirm_only: bool
    reasons: tuple[str, ...]
    priority: float
    queue: str
    opened_us: int
    due_us: int
    status: Status
    assignee: str | None
    held_until_us: int | None
    outcome: Outcome | None
    closed_by: str | None
    closed_us: int | None
    note: str | None

    def overdue(self, now_us: int) -> bool:
        return self.status != "closed" and now_us > self.due_us

    def held_by(self, now_us: int) -> str | None:
        """Who holds the case now (None once the hold lapsed)."""
        if self.assignee is None or self.held_until_us is None or self.held_until_us < now_us:
            return None
        return self.assignee


@dataclass(frozen=True)
class CaseFilter:
    status: Status | None = "open"
    queue: str | None = None
    rule: str | None = None  # a reason containing this text
    min_amount: float | None = None
    max_amount: float | None = None
    opened_before_us: int | None = None  # age filter: opened at or before
    assignee: str | None = None


@dataclass(frozen=True)
class Verdict:
    """A closed case's label, to record as ``POST /v1/labels`` does."""

    transaction_id: str
    is_fraud: bool


class CaseStore:
    """Cases in a SQLite file (a path) or a PostgreSQL database (a ``postgresql://`` URL); safe
    to share between threads, processes and (PostgreSQL) replicas."""

    def __init__(
        self,
        where: Path | str,
        *,
        sla_seconds: int = 24 * 3_600,
        hold_seconds: int = 15 * 60,
        open_block_cases: bool = True,
    ) -> None:
        if sla_seconds <= 0 or hold_seconds <= 0:
            raise ConfigError("case sla_seconds and hold_seconds must be > 0")
        self.sla_us = sla_seconds * _US
        self.hold_us = hold_seconds * _US
        self.open_block_cases = open_block_cases
        self._db: Database = open_database(where)
        self.where = self._db.where
        self._dialect = self._db.dialect
        self._db.create(_SCHEMA.format(key=self._dialect.serial_key))
        self._db.create(";\n".join(_EXTRA_SCHEMA))

    # ---------------------------------------------------------------- opening

    def open_cases(self, decisions: Sequence[CaseIn], *, queue: str = "default") -> int:
        """Open a case per review decision (and block, if so configured); a transaction that
        already has a case opens none. Returns the cases opened."""
        rows = []
        for d in decisions:
            if d.decision == "block" and not self.open_block_cases:
                continue
            if d.decision not in ("review", "block"):
                continue
            priority = d.score * d.amount if d.priority is None else d.priority
            rows.append((
                d.transaction_id, d.customer_id, d.terminal_id, d.amount, d.score, d.decision,
                int(d.decision == "block"), json.dumps(list(d.reasons)), priority, queue,
                d.at_us, d.at_us + self.sla_us, "open",
            ))  # fmt: skip
        with self._write() as db:
            return db.executemany(
                "INSERT INTO cases (transaction_id, customer_id, terminal_id, amount, score, "
                "decision, confirm_only, reasons, priority, queue, opened_us, due_us, status) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
                "ON CONFLICT (transaction_id) DO NOTHING",
                rows,
            ).rowcount

    # ---------------------------------------------------------------- reading

    def get(self, case_id: int) -> Case:
        with self._read() as db:
            sql = f"SELECT {', '.join(_COLUMNS)} FROM cases WHERE case_id = ?"
            row = db.execute(sql, (case_id,)).fetchone()
        if row is None:
            raise DataError(f"case {case_id} does not exist")
        return _case(row)

    def queue(self, where: CaseFilter, *, limit: int = 50, offset: int = 0) -> list[Case]:
        """Cases matching ``where``, highest priority first, then oldest."""
        sql, args = _filter_sql(where)
        with self._read() as db:
            rows = db.execute(
                f"SELECT {', '.join(_COLUMNS)} FROM cases{sql} "
                "ORDER BY priority DESC, opened_us, case_id LIMIT ? OFFSET ?",
                (*args, limit, offset),
            ).fetchall()
        return [_case(row) for row in rows]

    def counts(self, now_us: int) -> dict[str, int]:
        """The queue's headline numbers: open, escalated, overdue, held, closed."""
        with self._read() as db:
            out = dict(db.execute("SELECT status, COUNT(*) FROM cases GROUP BY status").fetchall())
            # Not closed: open or escalated, so that the (status, due_us) index serves the
            # count; the held ones are found by their hold time (cases_held), a few among many.
            overdue = db.execute(
                "SELECT COUNT(*) FROM cases WHERE status IN ('open', 'escalated') AND due_us < ?",
                (now_us,),
            ).fetchone()[0]
            held = db.execute(
                "SELECT COUNT(*) FROM cases WHERE held_until_us >= ? AND status != 'closed'",
                (now_us,),
            ).fetchone()[0]
        return {
            "open": out.get("open", 0), "escalated": out.get("escalated", 0),
            "closed": out.get("closed", 0), "overdue": overdue, "held": held,
        }  # fmt: skip

    def card_cases(self, customer_id: str, *, before_us: int, limit: int = 20) -> list[Case]:
        """Earlier cases of the same card, newest first."""
        with self._read() as db:
            rows = db.execute(
                f"SELECT {', '.join(_COLUMNS)} FROM cases WHERE customer_id = ? AND opened_us < ? "
                "ORDER BY opened_us DESC LIMIT ?",
                (customer_id, before_us, limit),
            ).fetchall()
        return [_case(row) for row in rows]

    def events(self, *, case_id: int | None = None) -> list[dict[str, Any]]:
        """The audit trail of analyst actions, oldest first."""
        sql = "SELECT event_id, case_id, at_us, username, action, detail FROM case_events"
        args: tuple[Any, ...] = ()
        if case_id is not None:
            sql, args = sql + " WHERE case_id = ?", (case_id,)
        with self._read() as db:
            rows = db.execute(sql + " ORDER BY event_id", args).fetchall()
        keys = ("event_id", "case_id", "at_us", "user", "action", "detail")
        return [dict(zip(keys, row, strict=True)) for row in rows]

    # ---------------------------------------------------------------- working

    def take_next(self, user: str, now_us: int, *, queue: str = "default") -> Case | None:
        """Hold the highest-priority open case nobody holds, for ``user``; None if none.

        An analyst holds one case at a time: the case ``user`` held (skipped without a
        verdict) goes back to the queue, and is not the one handed out. The choice and the
        hold are one write transaction, so concurrent callers (threads, processes, replicas)
        each get a different case: in SQLite they take turns for the write lock; in PostgreSQL
        each locks the row it chooses, skipping rows another has locked (so while every free
        case is locked by others' transactions of that instant, the answer is None).

        The case given back is skipped too if another transaction has it locked (it is
        taking, reassigning or closing that case, and so gives it a new holder anyway): two
        analysts whose holds lapsed, each taking the other's old case, would otherwise each
        wait for the other's lock, a deadlock that PostgreSQL breaks by failing one of them.
        """
        skip_locked = self._dialect.skip_locked
        with self._write() as db:
            row = db.execute(
                "SELECT case_id FROM cases WHERE status = 'open' AND queue = ? "
                "AND (held_until_us IS NULL OR held_until_us < ?) "
                "ORDER BY priority DESC, opened_us, case_id LIMIT 1" + skip_locked,
                (queue, now_us),
            ).fetchone()
            db.execute(
                "UPDATE cases SET assignee = NULL, held_until_us = NULL WHERE case_id IN "
                "(SELECT case_id FROM cases WHERE assignee = ? AND status = 'open'"
                + skip_locked
                + ")",
                (user,),
            )
            if row is None:
                return None
            self._hold(db, row[0], user, now_us)
            self._event(db, row[0], now_us, user, "take", "")
        return self.get(row[0])

    def view(self, case_id: int, user: str, now_us: int) -> Case:
        """The case, as ``user`` opens it (recorded; the holder's hold is renewed).

        The renewal is one conditional update, and the case's row is not locked otherwise: a
        supervisor looking at a case never holds up its holder (whose "take next" gives the
        case back only if no other transaction has its row locked).
        """
        with self._write() as db:
            if db.execute("SELECT 1 FROM cases WHERE case_id = ?", (case_id,)).fetchone() is None:
                raise DataError(f"case {case_id} does not exist")
            db.execute(
                "UPDATE cases SET held_until_us = ? "
                "WHERE case_id = ? AND assignee = ? AND held_until_us >= ?",
                (now_us + self.hold_us, case_id, user, now_us),
            )
            self._event(db, case_id, now_us, user, "view", "")
        return self.get(case_id)

    def verdict(self, case_id: int, user: str, outcome: Outcome, note: str, now_us: int) -> Verdict:
        """Close the case with ``outcome``; ``user`` must hold it. The label to record."""
        if outcome not in ("fraud", "not_fraud"):
            raise DataError(f"a verdict is fraud or not_fraud, however got {outcome!r}")
        with self._write() as db:
            case = self._locked(db, case_id)
            _require_note(note)
            if case.status == "closed":
                raise DataError(f"case {case_id} is closed already")
            if case.held_by(now_us) != user:
                raise DataError(f"case {case_id} is not held by {user}: take it first")
            self._close(db, case_id, user, outcome, note, now_us)
            self._event(db, case_id, now_us, user, "verdict", json.dumps([outcome, note]))
        return Verdict(case.transaction_id, outcome == "fraud")

    def escalate(self, case_id: int, user: str, note: str, now_us: int) -> None:
        """Hand the case to the supervisors (status ``escalated``, held by nobody)."""
        _require_note(note)
        with self._write() as db:
            case = self._locked(db, case_id)
            if case.status != "open" or case.held_by(now_us) != user:
                raise DataError(f"case {case_id} is not an open case held by {user}")
            db.execute(
                "UPDATE cases SET status = 'escalated', assignee = NULL, held_until_us = NULL "
                "WHERE case_id = ?",
                (case_id,),
            )
            self._event(db, case_id, now_us, user, "escalate", note)

    def reassign(self, case_id: int, to_user: str, by: str, now_us: int) -> None:
        """A supervisor gives the case to ``to_user`` (an escalated case goes back open)."""
        with self._write() as db:
            case = self._locked(db, case_id)
            if case.status == "closed":
                raise DataError(f"case {case_id} is closed already")
            db.execute("UPDATE cases SET status = 'open' WHERE case_id = ?", (case_id,))
            self._hold(db, case_id, to_user, now_us)
            self._event(db, case_id, now_us, by, "reassign", to_user)

    def bulk_close(
        self, case_ids: Sequence[int], outcome: Outcome, note: str, by: str, now_us: int
    ) -> list[Verdict]:
        """A supervisor closes several cases with one outcome and note; closed ones are
        skipped. The labels to record."""
        _require_note(note)
        verdicts = []
        with self._write() as db:
            for case_id in sorted(set(case_ids)):  # locked in one order: two never deadlock
                case = self._locked(db, case_id)
                if case.status == "closed":
                    continue
                self._close(db, case_id, by, outcome, note, now_us)
                self._event(db, case_id, now_us, by, "bulk_close", json.dumps([outcome, note]))
                verdicts.append(Verdict(case.transaction_id, outcome == "fraud"))
        return verdicts

    def record(self, user: str, action: str, detail: str, now_us: int) -> None:
        """An action outside any case (login, logout, export) for the audit trail."""
        with self._write() as db:
            self._event(db, None, now_us, user, action, detail)

    def close(self) -> None:
        """Close every thread's connection (a later call opens new ones)."""
        self._db.close()

    # ---------------------------------------------------------------- console extras
    # What the console shows beside the queue, and what the service measures of it (issue 15):
    # the scrape-time gauges, the card and terminal history (followed from the audit log by
    # ``fraudflow.serve.history``), the labels still to record, and each case's outcome by
    # transaction for the decisions export. Tables and indexes in ``_EXTRA_SCHEMA``.

    def gauges(self, now_us: int) -> CaseGauges:
        """Open (open or escalated) cases, the age of the oldest, and those past due: from
        the shared file, so every replica reports the same figures (indexed counts)."""
        open_count = overdue = 0
        oldest: int | None = None
        for status in ("open", "escalated"):
            with self._read() as db:
                count, first = db.execute(
                    "SELECT COUNT(*), MIN(opened_us) FROM cases WHERE status = ?", (status,)
                ).fetchone()
                late = db.execute(
                    "SELECT COUNT(*) FROM cases WHERE status = ? AND due_us < ?", (status, now_us)
                ).fetchone()[0]
            open_count, overdue = open_count + count, overdue + late
            if first is not None:
                oldest = first if oldest is None else min(oldest, first)
        age = 0.0 if oldest is None else max(0, now_us - oldest) / _US
        return CaseGauges(open=open_count, oldest_open_age_seconds=age, overdue=overdue)

    def mark_label_pending(self, case_ids: Sequence[int], now_us: int) -> None:
        """Before a verdict: its label is owed until ``label_recorded``. Durable, so a label
        that fails (or a process that dies before recording it) is retried later
        (``pending_labels``); a case that ends up not closed owes nothing."""
        with self._write() as db:
            db.executemany(
                "INSERT INTO pending_labels (case_id, since_us) VALUES (?, ?) "
                "ON CONFLICT (case_id) DO NOTHING",
                [(case_id, now_us) for case_id in case_ids],
            )

    def label_recorded(self, case_id: int) -> None:
        with self._write() as db:
            db.execute("DELETE FROM pending_labels WHERE case_id = ?", (case_id,))

    def pending_labels(self, *, limit: int = 500) -> list[tuple[int, Verdict]]:
        """Closed cases whose label is still owed, oldest first: (case_id, the label)."""
        with self._read() as db:
            rows = db.execute(
                "SELECT p.case_id, c.transaction_id, c.outcome FROM pending_labels p "
                "JOIN cases c ON c.case_id = p.case_id WHERE c.status = 'closed' "
                "ORDER BY p.since_us, p.case_id LIMIT ?",
                (limit,),
            ).fetchall()
        return [(case_id, Verdict(tid, outcome == "fraud")) for case_id, tid, outcome in rows]

    def record_history(self, rows: Sequence[Decided], *, forget_before_us: int) -> None:
        """Add decided transactions to the card and terminal history (a transaction seen
        before is kept as it was); forget those decided before ``forget_before_us``."""
        with self._write() as db:
            db.executemany(
                "INSERT INTO card_history (transaction_id, customer_id, terminal_id, t_us, "
                "amount, score, decision, decided_us, is_fraud) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (transaction_id) DO NOTHING",
                [tuple(r) for r in rows],
            )
            db.execute("DELETE FROM card_history WHERE decided_us < ?", (forget_before_us,))

    def record_history_labels(self, labels: Sequence[tuple[str, bool]]) -> None:
        """The latest label of each transaction, in the order reported."""
        with self._write() as db:
            db.executemany(
                "UPDATE card_history SET is_fraud = ? WHERE transaction_id = ?",
                [(int(flag), tid) for tid, flag in labels],
            )

    def history_cursor(self, source: str) -> int:
        """The last sequence number of ``source`` (an audit shard) in the history; 0: none."""
        with self._read() as db:
            sql = "SELECT seq FROM history_cursors WHERE source = ?"
            row = db.execute(sql, (source,)).fetchone()
        return 0 if row is None else int(row[0])

    def set_history_cursor(self, source: str, seq: int) -> None:
        with self._write() as db:
            db.execute(
                "INSERT INTO history_cursors (source, seq) VALUES (?, ?) "
                # Only forward: a slower follower (another worker) must not move it back.
                "ON CONFLICT (source) DO UPDATE SET seq = excluded.seq "
                "WHERE history_cursors.seq < excluded.seq",
                (source, seq),
            )

    def decided(self, transaction_id: str) -> Decided | None:
        with self._read() as db:
            sql = f"SELECT {_DECIDED} FROM card_history WHERE transaction_id = ?"
            row = db.execute(sql, (transaction_id,)).fetchone()
        return None if row is None else Decided(*row)

    def card_history(self, customer_id: str, *, since_us: int, limit: int = 500) -> list[Decided]:
        """The card's decided transactions from ``since_us`` on, oldest first."""
        with self._read() as db:
            rows = db.execute(
                f"SELECT {_DECIDED} FROM card_history WHERE customer_id = ? AND t_us >= ? "
                "ORDER BY t_us, transaction_id LIMIT ?",
                (customer_id, since_us, limit),
            ).fetchall()
        return [Decided(*row) for row in rows]

    def terminal_frauds(self, terminal_id: str, *, since_us: int, limit: int = 20) -> list[Decided]:
        """The terminal's transactions labelled fraud from ``since_us`` on, newest first."""
        with self._read() as db:
            rows = db.execute(
                f"SELECT {_DECIDED} FROM card_history WHERE terminal_id = ? AND is_fraud = 1 "
                "AND t_us >= ? ORDER BY t_us DESC LIMIT ?",
                (terminal_id, since_us, limit),
            ).fetchall()
        return [Decided(*row) for row in rows]

    # ---------------------------------------------------------------- internals

    def _read(self) -> AbstractContextManager[Connection]:
        return self._db.read()

    def _write(self) -> AbstractContextManager[Connection]:
        return self._db.write()

    def _locked(self, db: Connection, case_id: int) -> Case:
        """The case, read in a write transaction that goes on to change it (row-locked)."""
        sql = f"SELECT {', '.join(_COLUMNS)} FROM cases WHERE case_id = ?"
        row = db.execute(sql + self._dialect.for_update, (case_id,)).fetchone()
        if row is None:
            raise DataError(f"case {case_id} does not exist")
        return _case(row)

    def _hold(self, db: Connection, case_id: int, user: str, now_us: int) -> None:
        db.execute(
            "UPDATE cases SET assignee = ?, held_until_us = ? WHERE case_id = ?",
            (user, now_us + self.hold_us, case_id),
        )

    def _close(
        self, db: Connection, case_id: int, user: str, outcome: str, note: str, now: int
    ) -> None:
        db.execute(
            "UPDATE cases SET status = 'closed', outcome = ?, closed_by = ?, closed_us = ?, "
            "note = ?, held_until_us = NULL WHERE case_id = ?",
            (outcome, user, now, note, case_id),
        )

    @staticmethod
    def _event(
        db: Connection, case_id: int | None, at_us: int, user: str, action: str, detail: str
    ) -> None:
        db.execute(
            "INSERT INTO case_events (case_id, at_us, username, action, detail) "
            "VALUES (?, ?, ?, ?, ?)",
            (case_id, at_us, user, action, detail),
        )


# ---------------------------------------------------------------- console extras (storage)


class CaseGauges(NamedTuple):
    """The queue's gauges at one time (``fraudflow_cases_*``)."""

    open: int  # open or escalated: waiting for a verdict
    oldest_open_age_seconds: float  # 0 when none is open
    overdue: int  # open or escalated past their due time


class Decided(NamedTuple):
    """A decided transaction in the card and terminal history (``card_history``)."""

    transaction_id: str
    customer_id: str
    terminal_id: str
    t_us: int  # the transaction's time
    amount: float
    score: float
    decision: str
    decided_us: int
    is_fraud: int | None  # the latest label: None while none was reported


_DECIDED = ", ".join(Decided._fields)
_EXTRA_SCHEMA = (
    # The gauges' counts and oldest time by status, without reading the rows.
    "CREATE INDEX IF NOT EXISTS cases_status_opened ON cases (status, opened_us)",
    "CREATE INDEX IF NOT EXISTS cases_status_due ON cases (status, due_us)",
    "CREATE INDEX IF NOT EXISTS cases_held ON cases (held_until_us)",
    # The queue page's order over all queues (the console shows them together).
    "CREATE INDEX IF NOT EXISTS cases_status_priority "
    "ON cases (status, priority DESC, opened_us, case_id)",
    "CREATE TABLE IF NOT EXISTS pending_labels ("
    "case_id INTEGER PRIMARY KEY, since_us BIGINT NOT NULL)",
    "CREATE TABLE IF NOT EXISTS card_history ("
    "transaction_id TEXT PRIMARY KEY, customer_id TEXT NOT NULL, terminal_id TEXT NOT NULL, "
    "t_us BIGINT NOT NULL, amount DOUBLE PRECISION NOT NULL, score DOUBLE PRECISION NOT NULL, "
    "decision TEXT NOT NULL, decided_us BIGINT NOT NULL, is_fraud INTEGER)",
    "CREATE INDEX IF NOT EXISTS card_history_card ON card_history (customer_id, t_us)",
    "CREATE INDEX IF NOT EXISTS card_history_frauds ON card_history (terminal_id, t_us) "
    "WHERE is_fraud = 1",
    "CREATE INDEX IF NOT EXISTS card_history_decided ON card_history (decided_us)",
    "CREATE TABLE IF NOT EXISTS history_cursors (source TEXT PRIMARY KEY, seq BIGINT NOT NULL)",
)


def read_case_outcomes(where: Path | str) -> pl.DataFrame:
    """Per transaction with a case: its case's id, status, outcome, analyst and times (the
    columns ``fraudflow decisions export`` adds), from the store at ``where`` (a file or a
    URL); empty if there is no such file."""
    schema = {"transaction_id": pl.String, "case_id": pl.Int64, "case_status": pl.String,
              "case_outcome": pl.String, "case_analyst": pl.String, "case_opened_us": pl.Int64,
              "case_closed_us": pl.Int64}  # fmt: skip
    rows: list[Any] = []
    if is_postgres_url(where) or Path(where).is_file():
        rows = _read_all(
            where,
            "SELECT transaction_id, case_id, status, outcome, closed_by, opened_us, "
            "closed_us FROM cases ORDER BY case_id",
        )
    frame = pl.DataFrame(rows, schema=schema, orient="row")
    return frame.with_columns(_datetime("case_opened_us"), _datetime("case_closed_us")).rename(
        {"case_opened_us": "case_opened_at", "case_closed_us": "case_closed_at"}
    )


def _require_note(note: str) -> None:
    if not note or not note.strip():
        raise DataError("a note is required to close or escalate a case")


def _filter_sql(where: CaseFilter) -> tuple[str, list[Any]]:
    parts, args = [], []
    checks: list[tuple[Any, str]] = [
        (where.status, "status = ?"),
        (where.queue, "queue = ?"),
        # lower() on both sides: SQLite's LIKE ignores ASCII case, PostgreSQL's does not.
        (None if where.rule is None else f"%{where.rule.lower()}%", "lower(reasons) LIKE ?"),
        (where.min_amount, "amount >= ?"),
        (where.max_amount, "amount <= ?"),
        (where.opened_before_us, "opened_us <= ?"),
        (where.assignee, "assignee = ?"),
    ]
    for value, clause in checks:
        if value is not None:
            parts.append(clause)
            args.append(value)
    return (" WHERE " + " AND ".join(parts) if parts else ""), args


def _case(row: Sequence[Any]) -> Case:
    raw = dict(zip(_COLUMNS, row, strict=True))
    raw["confirm_only"] = bool(raw["confirm_only"])
    raw["reasons"] = tuple(json.loads(raw["reasons"]))
    return Case(**raw)


# ---------------------------------------------------------------- export


def read_cases(where: Path | str) -> pl.DataFrame:
    """Every case of the store at ``where`` (a file or a URL), oldest first; times as UTC
    datetimes."""
    rows = _read_all(where, f"SELECT {', '.join(_COLUMNS)} FROM cases ORDER BY case_id")
    frame = pl.DataFrame(rows, schema=_CASE_SCHEMA, orient="row")
    return frame.with_columns(
        pl.col("confirm_only").cast(pl.Boolean),
        *(_datetime(c) for c in ("opened_us", "due_us", "held_until_us", "closed_us")),
    ).rename({"opened_us": "opened_at", "due_us": "due_at", "held_until_us": "held_until",
              "closed_us": "closed_at"})  # fmt: skip


def read_case_events(where: Path | str) -> pl.DataFrame:
    """The audit trail of analyst actions (user, time, action, detail), oldest first."""
    rows = _read_all(
        where,
        "SELECT event_id, case_id, at_us, username, action, detail FROM case_events "
        "ORDER BY event_id",
    )
    schema = {"event_id": pl.Int64, "case_id": pl.Int64, "at_us": pl.Int64, "user": pl.String,
              "action": pl.String, "detail": pl.String}  # fmt: skip
    frame = pl.DataFrame(rows, schema=schema, orient="row")
    return frame.with_columns(_datetime("at_us")).rename({"at_us": "at"})


def _read_all(where: Path | str, sql: str) -> list[Any]:
    if not is_postgres_url(where) and not Path(where).is_file():
        raise ConfigError(f"no case store at {where}: has the console opened any case?")
    db = open_database(where)
    try:
        db.create(_SCHEMA.format(key=db.dialect.serial_key))  # a database the console never used
        with db.read() as conn:
            return conn.execute(sql).fetchall()
    finally:
        db.close()


def export_cases(where: Path | str, out: Path, *, events: bool = False) -> int:
    """Write the cases (or the audit trail of analyst actions) of the store at ``where`` (a
    file or a URL) to ``out`` (.parquet, atomically); return the rows written."""
    if Path(out).suffix.lower() != ".parquet":
        raise ConfigError(f"--out must be a .parquet file, however got {out}")
    frame = read_case_events(where) if events else read_cases(where)
    write_table(frame, out)
    return frame.height


def _datetime(column: str) -> pl.Expr:
    return pl.col(column).cast(pl.Datetime("us", "UTC"))


_CASE_SCHEMA = {
    "case_id": pl.Int64, "transaction_id": pl.String, "customer_id": pl.String,
    "terminal_id": pl.String, "amount": pl.Float64, "score": pl.Float64,
    "decision": pl.String, "confirm_only": pl.Int64, "reasons": pl.String,
    "priority": pl.Float64, "queue": pl.String, "opened_us": pl.Int64, "due_us": pl.Int64,
    "status": pl.String, "assignee": pl.String, "held_until_us": pl.Int64,
    "outcome": pl.String, "closed_by": pl.String, "closed_us": pl.Int64, "note": pl.String,
}  # fmt: skip
