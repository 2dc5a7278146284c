"""The card and terminal history of the review console, followed from the audit log.

A case page shows the card's last 30 days of transactions with their decisions and the
terminal's recent known fraud. The audit log holds every decision and label, but by commit
group (``fraudflow.serve.audit``): finding one card's transactions there means reading every
group. So the console keeps a narrow copy, ``card_history`` in the case store (indexed by card,
and by terminal for the frauds), and follows the audit log into it: the decision groups and
labels committed since the last sequence number it copied, per shard. The decision path is
untouched (no second write per decision); the copy runs in the background every few seconds
and before a case page is read.

With several replicas sharing the case store, each follows its own audit log into the shared
table, so a case page shows the decisions of every replica. Cursors are keyed by host, file
and inode: two replicas whose audit logs have the same path do not share one, and a log
deleted and made anew starts from its beginning. A label reported before its transaction's
decision was copied (another replica's, not yet followed) does not reach the copy.

Only schema-3 shards are followed (the current one); older shards stay readable by export.
"""

from __future__ import annotations

import contextlib
import socket
import sqlite3
import threading
from pathlib import Path

import orjson

from fraudflow.serve.audit import shard_files
from fraudflow.serve.cases import CaseStore, Decided

__all__ = ["HISTORY_DAYS", "RETENTION_DAYS", "follow_audit"]

HISTORY_DAYS = 30  # a case page shows the card's transactions of this many days
RETENTION_DAYS = 90  # the copy forgets transactions decided longer ago
_US = 1_000_000
_DAY_US = 86_400 * _US
_SCHEMA_VERSION = 3  # fraudflow.serve.audit's
_GROUPS_PER_READ = 64  # each up to a few thousand decisions
_LABELS_PER_READ = 10_000
_lock = threading.Lock()  # one follower at a time per process: the others would redo its work


def follow_audit(audit_path: Path, cases: CaseStore, *, now_us: int) -> int:
    """Copy what the audit log at ``audit_path`` committed since the last call into the case
    store's history; returns the decisions copied. A missing log copies nothing."""
    copied = 0
    with _lock:
        for file in shard_files(audit_path):
            with contextlib.closing(sqlite3.connect(file, timeout=30)) as db:
                (version,) = db.execute("PRAGMA user_version").fetchone()
                if version != _SCHEMA_VERSION:
                    continue
                source = _source(file)
                copied += _copy_decisions(db, cases, source, now_us=now_us)
                _copy_labels(db, cases, source)
    return copied


def _source(file: Path) -> str:
    return f"{socket.gethostname()}:{file.resolve()}:{file.stat().st_ino}"


def _copy_decisions(db: sqlite3.Connection, cases: CaseStore, source: str, *, now_us: int) -> int:
    key = source + ":decisions"
    after = _cursor(db, cases, key, "decision_groups")
    copied = 0
    while True:
        groups = db.execute(
            "SELECT seq, fields FROM decision_groups WHERE seq > ? ORDER BY seq LIMIT ?",
            (after, _GROUPS_PER_READ),
        ).fetchall()
        if not groups:
            return copied
        rows = [row for _, fields in groups for row in _decided(fields)]
        cases.record_history(rows, forget_before_us=now_us - RETENTION_DAYS * _DAY_US)
        after = groups[-1][0]
        cases.set_history_cursor(key, after)
        copied += len(rows)


def _decided(fields: bytes) -> list[Decided]:
    """The decisions of one group row (its ``fields``: a JSON list per field)."""
    c = orjson.loads(fields)
    return [
        Decided._make((*row, None))
        for row in zip(
            c["transaction_id"], c["customer_id"], c["terminal_id"], c["t_us"], c["amount"],
            c["score"], c["decision"], c["decided_at_us"], strict=True,
        )
    ]  # fmt: skip


def _copy_labels(db: sqlite3.Connection, cases: CaseStore, source: str) -> None:
    key = source + ":labels"
    after = _cursor(db, cases, key, "labels")
    while True:
        labels = db.execute(
            "SELECT seq, transaction_id, is_fraud FROM labels WHERE seq > ? ORDER BY seq LIMIT ?",
            (after, _LABELS_PER_READ),
        ).fetchall()
        if not labels:
            return
        cases.record_history_labels([(tid, bool(flag)) for _, tid, flag in labels])
        after = labels[-1][0]
        cases.set_history_cursor(key, after)


def _cursor(db: sqlite3.Connection, cases: CaseStore, key: str, table: str) -> int:
    """Where to go on in ``table``: the stored cursor, or 0 if the table has fewer rows than
    that (a log made anew whose inode was reused)."""
    after = cases.history_cursor(key)
    (last,) = db.execute(f"SELECT COALESCE(MAX(seq), 0) FROM {table}").fetchone()
    return 0 if last < after else after
