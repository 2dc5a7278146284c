"""How the service's SQLite files (state store, audit log) wait for locks and checkpoint.

Lock waits. Several worker processes share each file, and a writer must wait while another
holds the write lock (a transaction of a fraction of a millisecond, plus an fsync for the
audit log). SQLite's own busy handler sleeps 1, 2, 5, 10, ... ms between tries: on a loaded
two-worker service that turned sub-millisecond waits into stalls of milliseconds, the bulk
of the p99 latency (two workers against one, in the open loop of ``benchmarks/serve.py``).
So the writing connections run with ``busy_timeout=0`` and ``execute_waiting`` retries a
statement that found the file busy every ``_RETRY_SECONDS``, up to a deadline.

Checkpoints. In WAL mode SQLite by default checkpoints inside the COMMIT that pushes the WAL past
``wal_autocheckpoint`` pages: that commit copies megabytes into the database file and fsyncs
it, and every request waiting on it (an audit group commit, a state transaction) waits too:
a tail-latency spike every few thousand decisions. The connections that write set
``wal_autocheckpoint=0``; a ``Checkpointer`` runs ``PRAGMA wal_checkpoint(PASSIVE)`` on its
own connection every ``interval_seconds``. PASSIVE never waits for readers or writers: it
copies what it can, and the next writer restarts the WAL from its start once all of it was
copied. Several processes may each run one on the same file; one that finds the checkpoint
lock taken just tries again later.

Per-thread connections. The review console's stores (cases, accounts) are called from a pool
of threads; ``ThreadConnections`` gives each thread its own connection to the file and closes
them all at shut-down.
"""

from __future__ import annotations

import functools
import itertools
import logging
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

__all__ = [
    "Checkpointer",
    "ThreadConnections",
    "connect_wal",
    "execute_waiting",
    "hand_over_waits",
    "multi_row_inserts",
]

log = logging.getLogger(__name__)

_RETRY_SECONDS = 50e-6
# SQLite's default limit on ? per statement: 32,766 since 3.32, 999 before.
_MAX_VARIABLES = 32_766 if sqlite3.sqlite_version_info >= (3, 32, 0) else 999


def connect_wal(
    path: Path, *, synchronous: str, timeout_seconds: float, page_size: int | None = None
) -> sqlite3.Connection:
    """A connection to ``path`` in WAL mode and autocommit mode (transactions are explicit),
    usable from any thread; ``timeout_seconds`` is SQLite's own busy timeout. ``page_size``
    applies to a new file only (SQLite fixes it with the first table, and in WAL mode)."""
    db = sqlite3.connect(
        path, isolation_level=None, check_same_thread=False, timeout=timeout_seconds
    )
    if page_size is not None:
        db.execute(f"PRAGMA page_size={int(page_size)}")
    db.execute("PRAGMA journal_mode=WAL")  # readers do not block the writer
    db.execute(f"PRAGMA synchronous={synchronous}")
    return db


def hand_over_waits(db: sqlite3.Connection) -> None:
    """A writing connection leaves checkpoints to a ``Checkpointer`` and lock waits to
    ``execute_waiting`` (module docstring); set once its start-up statements have run."""
    db.execute("PRAGMA wal_autocheckpoint=0")
    db.execute("PRAGMA busy_timeout=0")


def execute_waiting(
    db: sqlite3.Connection, sql: str, params: Sequence[Any], timeout_seconds: float
) -> None:
    """``db.execute(sql, params)``, retried while the file is busy (locked elsewhere).

    For a connection with ``PRAGMA busy_timeout=0`` (module docstring). Raises the last
    ``sqlite3.OperationalError`` if the file is still busy after ``timeout_seconds``.
    """
    deadline = time.monotonic() + timeout_seconds
    while True:
        try:
            db.execute(sql, params)
            return
        except sqlite3.OperationalError as exc:
            if exc.sqlite_errorcode != sqlite3.SQLITE_BUSY or time.monotonic() > deadline:
                raise
        time.sleep(_RETRY_SECONDS)


def multi_row_inserts(
    insert: str, columns: tuple[str, ...], rows: Sequence[Sequence[Any]]
) -> list[tuple[str, list[Any]]]:
    """(sql, parameters) statements that ``insert`` every row, as few as SQLite's variable
    limit allows: one statement of many rows is one call into SQLite (one GIL hand-off) and
    one statement compilation, against one per row with ``executemany``."""
    per_statement = _MAX_VARIABLES // len(columns)
    statements = []
    for start in range(0, len(rows), per_statement):
        chunk = rows[start : start + per_statement]
        values = list(itertools.chain.from_iterable(chunk))
        statements.append((_insert_sql(insert, columns, len(chunk)), values))
    return statements


@functools.lru_cache(maxsize=256)
def _insert_sql(insert: str, columns: tuple[str, ...], n_rows: int) -> str:
    row = "(" + ", ".join("?" * len(columns)) + ")"
    return f"{insert} ({', '.join(columns)}) VALUES " + ", ".join([row] * n_rows)


class Checkpointer:
    def __init__(self, path: Path, *, interval_seconds: float = 1.0) -> None:
        self.path = Path(path)
        self.interval_seconds = interval_seconds
        self.checkpoints = 0  # completed PASSIVE checkpoints, for tests and curiosity
        self._stop = threading.Event()
        self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        self._thread = threading.Thread(
            target=self._run, name=f"fraudflow-checkpoint-{self.path.name}", daemon=True
        )
        self._thread.start()

    def close(self) -> None:
        """Stop the thread, then one last checkpoint (the writers have closed or will)."""
        self._stop.set()
        self._thread.join()
        self._checkpoint()
        self._db.close()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_seconds):
            self._checkpoint()

    def _checkpoint(self) -> None:
        try:
            busy, _, _ = self._db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        except sqlite3.Error as exc:  # a full disk, a removed file: the writers will say so
            log.warning("WAL checkpoint of %s failed: %s", self.path, exc)
            return
        if not busy:
            self.checkpoints += 1


class ThreadConnections:
    """One connection per thread to the SQLite file at ``path`` (WAL, autocommit: transactions
    are explicit, through ``transaction``); ``close`` ends every thread's connection.

    A connection is used by its own thread only, but made with ``check_same_thread=False`` so
    that ``close`` may end it from another. ``timeout_seconds`` is SQLite's busy timeout: the
    console's writes are few and short, so they wait the plain way.
    """

    def __init__(self, path: Path, *, timeout_seconds: float = 30.0) -> None:
        self.path = Path(path)
        self.timeout_seconds = timeout_seconds
        self._local = threading.local()
        self._connections: list[sqlite3.Connection] = []
        self._lock = threading.Lock()

    def get(self) -> sqlite3.Connection:
        """This thread's connection (opened, and the file's folder made, on first use)."""
        db: sqlite3.Connection | None = getattr(self._local, "db", None)
        if db is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            db = connect_wal(self.path, synchronous="FULL", timeout_seconds=self.timeout_seconds)
            self._local.db = db
            with self._lock:
                self._connections.append(db)
        return db

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """A write transaction on this thread's connection, committed at the end (rolled back
        on an exception). It takes the write lock first, so reads inside it are consistent
        with its writes: two of them, in threads or processes, run one after the other."""
        db = self.get()
        db.execute("BEGIN IMMEDIATE")
        try:
            yield db
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")

    def close(self) -> None:
        """Close every thread's connection (a later ``get`` opens a new one)."""
        with self._lock:
            connections, self._connections = self._connections, []
            self._local = threading.local()
        for db in connections:
            db.close()
