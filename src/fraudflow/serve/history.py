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
A compacted shard (``fraudflow.serve.compaction``) is followed under the cursors of the SQLite
file it replaced (its path and inode are in its metadata): what was copied before the
compaction is not copied again, and what was not (a console that was not running) is.
"""

from __future__ import annotations

import contextlib
import socket
import sqlite3
import threading
from pathlib import Path

import orjson
import pyarrow as pa
import pyarrow.compute as pc

from fraudflow.errors import ConfigError
from fraudflow.serve.audit import log_shards
from fraudflow.serve.cases import CaseStore, Decided
from fraudflow.serve.compaction import CompactedShard

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
        for shard in log_shards(audit_path):
            try:  # never creates a file: a shard compacted meanwhile is read compacted
                opened = shard.source()
            except ConfigError:  # gone: the next call sees its compacted files
                continue
            if isinstance(opened, CompactedShard):
                copied += _copy_compacted(opened, cases, now_us=now_us)
                continue
            with contextlib.closing(opened) as db:
                (version,) = db.execute("PRAGMA user_version").fetchone()
                try:
                    source = _source(shard.file, shard.file.stat().st_ino)
                except FileNotFoundError:  # compacted since it was opened: next call
                    continue
                if version != _SCHEMA_VERSION:
                    continue
                copied += _copy_decisions(db, cases, source, now_us=now_us)
                _copy_labels(db, cases, source)
    return copied


def _source(file: Path | str, inode: int) -> str:
    return f"{socket.gethostname()}:{Path(file).resolve()}:{inode}"


# The columns of a compacted shard that make a ``Decided`` row (its label comes later).
_DECIDED = (
    "transaction_id", "customer_id", "terminal_id", "t_us", "amount", "score", "decision",
    "decided_at_us",
)  # fmt: skip
_ROWS_PER_COPY = 50_000


def _copy_compacted(shard: CompactedShard, cases: CaseStore, *, now_us: int) -> int:
    """What a compacted shard holds past the cursors of the SQLite file it replaced."""
    meta = shard.metadata
    source = _source(meta["source"]["path"], meta["source"]["inode"])
    copied = 0
    after = _cursor_at(cases, source + ":decisions", meta["max_group_seq"])
    if after < meta["max_group_seq"]:
        table = shard.decisions().filter(pc.field("group_seq") > after)
        for start in range(0, len(table), _ROWS_PER_COPY):
            rows = _decided_rows(table.slice(start, _ROWS_PER_COPY))
            cases.record_history(rows, forget_before_us=now_us - RETENTION_DAYS * _DAY_US)
            copied += len(rows)
        cases.set_history_cursor(source + ":decisions", meta["max_group_seq"])
    after = _cursor_at(cases, source + ":labels", meta["max_label_seq"])
    if after < meta["max_label_seq"]:
        labels = shard.labels().filter(pc.field("seq") > after).sort_by("seq")
        flags = zip(
            labels["transaction_id"].to_pylist(), labels["is_fraud"].to_pylist(), strict=True
        )
        cases.record_history_labels([(tid, bool(flag)) for tid, flag in flags])
        cases.set_history_cursor(source + ":labels", meta["max_label_seq"])
    return copied


def _decided_rows(table: pa.Table) -> list[Decided]:
    columns = [table[name].to_pylist() for name in _DECIDED]
    return [Decided._make((*row, None)) for row in zip(*columns, strict=True)]


def _cursor_at(cases: CaseStore, key: str, last: int) -> int:
    """The stored cursor, or 0 past ``last`` (the ``_cursor`` rule, for a compacted shard)."""
    after = cases.history_cursor(key)
    return 0 if last < after else after


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
