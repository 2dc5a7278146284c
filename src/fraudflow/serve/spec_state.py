"""Durable stores of the spec engine (``fraudflow.features.spec_online.SpecStore``).

``open_spec_store`` picks one from the service's state URL, beside the fast path's store of
``fraudflow.serve.state`` (the same file, or the same Redis key space):

    None or sqlite:///<path>    SpecSQLiteStore: the state file's ``transactions`` log
    redis://host[:port][/db]    SpecRedisStore: Lua scripts, one round trip per call (and
    redis-cluster://...         the fast path's per-transaction records and entity sets)

Both engines record into one log of transactions (SQLite: the ``transactions`` table, whose
``extra`` column holds the columns beyond the canonical ones; Redis: the ``tx`` hash), so a
reload that changes the spec, the default one included, keeps the history: the new spec's key
groups are indexed from what the log holds (the transactions the retention of the spec served
until then kept). A column the new spec reads that older transactions did not carry is null in
them, as it would be in a log where the column was added later.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from fraudflow.data.schema import AMOUNT, CUSTOMER_ID, TERMINAL_ID
from fraudflow.errors import ConfigError
from fraudflow.features.spec_online import (
    Answer,
    Layout,
    MemorySpecStore,
    Row,
    SpecStore,
    Stored,
)
from fraudflow.serve.redis_shards import URL_FORMS, is_redis_url
from fraudflow.serve.spec_redis import SpecRedisStore
from fraudflow.serve.sqlite import connect_wal
from fraudflow.serve.state import migrate_state_file, sqlite_file

__all__ = ["SpecSQLiteStore", "open_spec_store"]

_CANONICAL = (CUSTOMER_ID, TERMINAL_ID, AMOUNT)
_LOCK_TIMEOUT_SECONDS = 5.0
_DELETE_CHUNK = 500  # ids per DELETE statement


def open_spec_store(url: str | None, *, default_path: Path) -> SpecStore:
    """The spec engine's store for the service's state URL (``fraudflow.serve.state``)."""
    path = sqlite_file(url, default_path=default_path)
    if path is not None:
        return SpecSQLiteStore(path)
    assert url is not None  # None names the default file
    if is_redis_url(url):
        return SpecRedisStore(url)
    raise ConfigError(f"state store URL must be sqlite:///<path> or {URL_FORMS}")


class SpecSQLiteStore:
    """A ``SpecStore`` in the state file; reopening it gives the same state.

    The file is the durable, shared truth: the log of transactions (``transactions``, with the
    extra columns as JSON) and of label changes, shared with the fast path's ``SQLiteStore``.
    Calls are answered from a ``MemorySpecStore`` mirror, which each call first brings up to
    date with what other writers (processes sharing the file) committed since (the rows past
    the last sequence numbers it has seen); the mirror is built at the first call, so a service
    serving the default spec never holds it. A call that fails rebuilds it from the file on the
    next call. ``apply_many`` runs in one ``BEGIN IMMEDIATE`` transaction (SQLite's write lock
    taken before reading what others stored), so each row sees every row stored before it. The
    file forgets exactly the transactions the mirror forgets.

    Thread-safe: one connection guarded by a lock.
    """

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        # NORMAL: as SQLiteStore (a process crash loses no commit; a power loss may lose the
        # last few).
        self._db = connect_wal(
            self.path, synchronous="NORMAL", timeout_seconds=_LOCK_TIMEOUT_SECONDS
        )
        migrate_state_file(self._db, self.path)
        self._mirror = MemorySpecStore()
        self._layout: Layout | None = None  # the last layout asked: the mirror's index
        self._seen_seq = 0
        self._seen_label = 0
        self._stale = True
        self._data_version: int | None = None

    def prepare(self, layout: Layout) -> None:
        with self._transaction("BEGIN"):
            self._catch_up(layout)
            self._mirror.prepare(layout)

    def apply_many(
        self, rows: Sequence[Row], layout: Layout, *, forget_until_us: int
    ) -> list[Answer | None]:
        with self._transaction("BEGIN IMMEDIATE"):
            self._catch_up(layout)
            out: list[Answer | None] = []
            for row in rows:
                out.append(self._apply_one(row, layout))
            gone = self._mirror.forget(layout, forget_until_us, rows=rows)
            self._delete(gone)
            return out

    def read(self, rows: Sequence[Row], layout: Layout) -> list[Answer]:
        with self._transaction("BEGIN"):  # one snapshot to catch up from
            self._catch_up(layout)
            return self._mirror.read(rows, layout)

    def set_label(self, transaction_id: str, is_fraud: bool) -> bool:
        with self._transaction("BEGIN IMMEDIATE"):
            if self._layout is not None:
                self._catch_up(self._layout)
                if transaction_id not in self._mirror.records:  # forgotten, or never stored
                    return False
            found = self._db.execute(
                "SELECT t_us FROM transactions WHERE transaction_id = ?", (transaction_id,)
            ).fetchone()
            if found is None:
                return False
            flag = int(is_fraud)
            self._db.execute(
                "UPDATE transactions SET is_fraud = ? WHERE transaction_id = ?",
                (flag, transaction_id),
            )
            change = self._db.execute(
                "INSERT INTO label_changes (transaction_id, t_us, is_fraud) VALUES (?, ?, ?)",
                (transaction_id, found[0], flag),
            )
            self._seen_label = change.lastrowid or self._seen_label
            stored = self._mirror.records.get(transaction_id)
            if stored is not None:
                stored.label = flag
            return True

    def prune(self, layout: Layout, until_us: int) -> int:
        with self._transaction("BEGIN IMMEDIATE"):
            self._catch_up(layout)
            gone = self._mirror.forget(layout, until_us, rows=None)
            self._delete(gone)
            return len(gone)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self) -> SpecSQLiteStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def _transaction(self, begin: str) -> Iterator[None]:
        with self._lock:
            self._db.execute(begin)
            try:
                yield
                self._db.execute("COMMIT")
            except BaseException:
                self._stale = True  # the mirror may hold what the rollback undoes
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                raise

    def _apply_one(self, row: Row, layout: Layout) -> Answer | None:
        if row.transaction_id in self._mirror.records:
            return None
        columns = row.columns
        extra = {k: v for k, v in columns.items() if k not in _CANONICAL}
        cursor = self._db.execute(
            "INSERT OR IGNORE INTO transactions "
            "(transaction_id, t_us, customer_id, terminal_id, amount, extra) "
            "VALUES (?, ?, ?, ?, ?, ?)",
            (row.transaction_id, row.t_us, columns[CUSTOMER_ID], columns[TERMINAL_ID],
             columns[AMOUNT], json.dumps(extra) if extra else None),
        )  # fmt: skip
        if cursor.rowcount == 0:  # the file holds it (the mirror forgot it)
            return None
        seq = int(cursor.lastrowid or 0)
        self._seen_seq = max(self._seen_seq, seq)
        return self._mirror.apply_one(row, layout, seq=seq)

    def _catch_up(self, layout: Layout) -> None:
        """Bring the mirror up to what the file holds (inside a transaction)."""
        self._layout = layout
        (version,) = self._db.execute("PRAGMA data_version").fetchone()
        if version == self._data_version and not self._stale:
            return
        self._data_version = version
        if self._stale:
            (last_label,) = self._db.execute(
                "SELECT COALESCE(MAX(seq), 0) FROM label_changes"
            ).fetchone()
            # Labels up to here are in transactions.is_fraud already.
            self._mirror, self._seen_seq, self._seen_label = MemorySpecStore(), 0, last_label
            self._stale = False
        rows = self._db.execute(
            "SELECT seq, transaction_id, t_us, customer_id, terminal_id, amount, extra, "
            "is_fraud FROM transactions WHERE seq > ? ORDER BY seq",
            (self._seen_seq,),
        ).fetchall()
        for seq, tid, t_us, customer_id, terminal_id, amount, extra, is_fraud in rows:
            columns: dict[str, Any] = json.loads(extra) if extra else {}
            columns.update({CUSTOMER_ID: customer_id, TERMINAL_ID: terminal_id, AMOUNT: amount})
            self._mirror.add(Stored(t_us, seq, tid, columns, label=int(is_fraud)), layout)
            self._seen_seq = seq
        labels = self._db.execute(
            "SELECT seq, transaction_id, is_fraud FROM label_changes WHERE seq > ? ORDER BY seq",
            (self._seen_label,),
        ).fetchall()
        for seq, tid, is_fraud in labels:
            stored = self._mirror.records.get(tid)
            if stored is not None:
                stored.label = int(is_fraud)
            self._seen_label = seq

    def _delete(self, transaction_ids: Sequence[str]) -> None:
        for start in range(0, len(transaction_ids), _DELETE_CHUNK):
            chunk = list(transaction_ids[start : start + _DELETE_CHUNK])
            marks = ", ".join("?" * len(chunk))
            for table in ("transactions", "label_changes"):
                self._db.execute(f"DELETE FROM {table} WHERE transaction_id IN ({marks})", chunk)
