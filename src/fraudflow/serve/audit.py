"""The audit log: every decision and label, durable before the response is sent.

Storage: one embedded SQLite file in WAL mode with ``synchronous=FULL``, so a commit returns
only after the WAL is fsynced. SQLite rather than an append-only file because the log is also
the idempotency record with SQLite state (a lookup by transaction_id, ``lookup``), it is shared
safely by several worker processes (SQLite's file locks), and a torn last record after a crash
is handled by SQLite's recovery instead of our own framing code.

Group commit: requests do not commit. ``submit`` puts records on a queue and returns a future;
one writer thread takes everything queued, inserts it in one transaction, commits (one fsync)
and then resolves the futures. While one commit waits for the disk, the next group gathers,
so a busy service pays one fsync per group, not per decision, and an idle one adds no delay
(the writer wakes on the first record). ``after_commit`` runs in the writer after the commit,
before the futures resolve: the Redis idempotency records are written there.

A process killed at any moment loses no acknowledged record: a response is sent only after its
future resolved, i.e. after the fsync.

Shards. The log named ``audit.db`` is that file plus shards ``audit.1.db``, ``audit.2.db``, ...
beside it. Each ``AuditLog`` (one per worker process) writes to the first file whose
``.lock`` file no other process holds (``flock``; the lock dies with its process, so a
restarted worker takes its shard back). A single-process server writes ``audit.db`` alone.
Writers sharing one file take turns for its write lock, each holding it through its fsync:
with two workers that serialised every commit and capped single-decision throughput below
what the same service reaches without the fsync. A writer whose shard holds
``max_shard_decisions`` decisions moves on to the next free shard with room, so no file grows
without end (an insert's cost grows with the transaction_id index once it outgrows memory).
``lookup`` searches the other shards too; ``read_decisions``, ``read_labels`` and the export
read them all.

Tables (schema 3; ``labels`` keeps every report, the latest wins when read):

    decision_groups  seq, decisions (how many), fields (JSON object: per field, transaction_id
                     t_us customer_id terminal_id amount score raw_score decision
                     model_version decided_at_us, the list of its values; ``extra`` and
                     ``shadow``, the challengers' verdicts, only when a decision has
                     them), features (each
                     decision's values, float64 little-endian, in the order its model's
                     feature set names, concatenated), responses (each decision's exact body,
                     replayed for duplicates; it holds the reasons), offsets (int64
                     little-endian: decisions + 1 response offsets, then decisions + 1
                     feature offsets)
    decision_ids     transaction_id (the key: unique), group_seq, position: where each id's
                     first decision is
    feature_sets     model_version, features (JSON list of names)
    labels           seq, transaction_id, is_fraud, reported_at_us, received_at_us, applied
    shadow_groups    seq, verdicts (how many), fields (JSON object: per field of
                     ``ShadowRecord``, the list of its values): the verdicts of challengers
                     scored off the answer path, committed in a later group than their
                     decisions (``fraudflow.serve.shadow``); added within schema 3, so older
                     shards lack the table and read as holding none

One row per group commit, in columns, and a narrow key per decision: a row per decision (schema
2) cost SQLite a record of 12 values and its B-tree cell each, much more CPU than a group
row plus the id key (in large groups, as batches make them). A duplicate of
an id already recorded stays in its group's row but is not keyed, and readers skip it: the
first decision of an id is the one recorded. Schema 2 kept a decision at about half the bytes
of schema 1 (features as a JSON object and the reasons a second time beside the response):
every byte is written twice (the WAL, then the checkpoint). Shards of schemas 1 and 2 stay
readable (lookups, export); a writer leaves them as they are and takes the next shard number.

Compaction. A closed shard (no writer holds its lock; the automatic pass after a writer
rotates takes full ones only) of this schema is rewritten as Parquet files
(``fraudflow.serve.compaction``: one row per recorded decision, every field of its groups,
zstd) and its SQLite file is then dropped: ``compact_audit``, run in the background by the
writer that closed a shard, and by ``fraudflow decisions compact``. The compactor holds the
shard's lock throughout, so no writer takes the shard meanwhile, and writers never take a
shard number that has a compacted file. Readers (lookups, ``read_decisions``,
``read_labels``, the console's history follower) read a shard's SQLite file while it exists
and its Parquet files once it is gone; the SQLite file is dropped only after both Parquet
files are durable (temporary file, fsync, rename, the decisions file last), so a crash at any
step leaves each decision readable exactly once, and the next pass finishes the job. A
duplicate of an id that its shard did not key (see above) is not carried: no reader sees it.

Shadow verdicts. A decision records, in its ``shadow`` object, each challenger scored off the
answer path as ``pending``; its verdict arrives later as a ``ShadowRecord`` (keyed by
transaction_id and model_version; the first one of a key counts), possibly in another shard
(the writer may have moved on meanwhile). Readers (``read_decisions``, hence the export, the
shadow report) join the two over all shards: the object they return holds the verdict, as if
it had been recorded with the decision, or ``missing`` where none was recorded (the process
died between the answer and the shadow commit).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import glob
import itertools
import logging
import os
import queue
import sqlite3
import struct
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import orjson
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc

from fraudflow.data.io import write_table
from fraudflow.errors import ArtifactError, ConfigError
from fraudflow.features.online import epoch_us
from fraudflow.serve.cases import read_case_outcomes
from fraudflow.serve.compaction import (
    ROW_GROUP_ROWS,
    CompactedShard,
    compacted_paths,
    open_compacted,
    shadow_path,
    write_compacted,
)
from fraudflow.serve.sqlite import (
    Checkpointer,
    connect_wal,
    execute_waiting,
    hand_over_waits,
    multi_row_inserts,
)

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None  # type: ignore[assignment]

__all__ = [
    "MISSING",
    "PENDING",
    "SHADOW_FIELDS",
    "AfterCommit",
    "AuditLog",
    "DecisionRecord",
    "LabelRecord",
    "ShadowRecord",
    "Shard",
    "compact_audit",
    "export_audit",
    "log_shards",
    "lookup_decision",
    "now_us",
    "pack_features",
    "read_decisions",
    "read_labels",
    "read_shadow_verdicts",
    "shard_files",
]

log = logging.getLogger(__name__)

_SCHEMA_VERSION = 3
_READABLE_VERSIONS = (1, 2, 3)
_SCHEMA = """
CREATE TABLE IF NOT EXISTS decision_groups (
    seq            INTEGER PRIMARY KEY,    -- commit order: rows are never deleted
    decisions      INTEGER NOT NULL,
    fields         BLOB NOT NULL,          -- JSON: {field: [value per decision]}, _GROUP_FIELDS
    features       BLOB NOT NULL,          -- float64 little-endian, feature_sets order
    responses      BLOB NOT NULL,          -- the response bodies, replayed for duplicates
    offsets        BLOB NOT NULL           -- int64 LE: response offsets, then feature offsets
);
CREATE TABLE IF NOT EXISTS decision_ids (
    transaction_id TEXT PRIMARY KEY,       -- unique: an id's first decision
    group_seq      INTEGER NOT NULL,
    position       INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS feature_sets (
    model_version  TEXT PRIMARY KEY,
    features       TEXT NOT NULL           -- JSON list of the model's feature names, in order
);
CREATE TABLE IF NOT EXISTS labels (
    seq            INTEGER PRIMARY KEY AUTOINCREMENT,
    transaction_id TEXT NOT NULL,
    is_fraud       INTEGER NOT NULL,
    reported_at_us INTEGER,                -- when the reporter says it learned the label
    received_at_us INTEGER NOT NULL,
    applied        INTEGER NOT NULL        -- 1 if the feature state held the transaction
);
CREATE INDEX IF NOT EXISTS labels_by_transaction ON labels (transaction_id);
CREATE TABLE IF NOT EXISTS shadow_groups (
    seq            INTEGER PRIMARY KEY,    -- commit order
    verdicts       INTEGER NOT NULL,
    fields         BLOB NOT NULL           -- JSON: {field: [value per verdict]}, SHADOW_FIELDS
);
"""
# DecisionRecord's leading fields, stored per group as JSON lists; their times (epoch
# microseconds, UTC): t_us the transaction's, decided_at_us the decision's. ``score`` is what
# the policy saw (calibrated if the bundle calibrates), ``raw_score`` the model's probability.
_GROUP_FIELDS = (
    "transaction_id", "t_us", "customer_id", "terminal_id", "amount", "score", "raw_score",
    "decision", "model_version", "decided_at_us",
)  # fmt: skip
_N_GROUP_FIELDS = len(_GROUP_FIELDS)
_INSERT_GROUP = (
    "INSERT INTO decision_groups (seq, decisions, fields, features, responses, offsets) "
    "VALUES (?, ?, ?, ?, ?, ?)"
)
_ID_COLUMNS = ("transaction_id", "group_seq", "position")
_LABEL_COLUMNS = ("transaction_id", "is_fraud", "reported_at_us", "received_at_us", "applied")
_STOP = object()
_LOCK_TIMEOUT_SECONDS = 30.0  # several workers take turns committing
# A decision is ~1 KB: 8 KiB pages halve the WAL writes (system calls) of 4 KiB ones, which
# cost less CPU per decision, checkpoints included. 16 KiB gained nothing more.
_PAGE_SIZE = 8192
_WRITER_CACHE_KIB = 64 * 1024
# A writer moves to a new shard after this many decisions (~1 GB of file; its
# transaction_id index, ~40 MB, still fits the writer's cache).
_MAX_SHARD_DECISIONS = 1_000_000


class DecisionRecord(NamedTuple):
    transaction_id: str
    t_us: int
    customer_id: str
    terminal_id: str
    amount: float
    score: float
    raw_score: float
    decision: str
    model_version: str
    decided_at_us: int
    # The values in ``feature_names`` order as float64 little-endian (``pack_features``): the
    # service packs a whole group's rows with one numpy call, not one struct call per row.
    packed_features: bytes
    response: bytes  # the body sent, reasons included
    feature_names: Sequence[str]  # the model's, shared by its records
    # The columns beyond the canonical ones that the model's feature spec reads; None: none.
    extra: Mapping[str, Any] | None = None
    # The challengers' verdicts on it (``fraudflow.serve.shadow``); None: none served.
    shadow: Mapping[str, Any] | None = None


def pack_features(values: Sequence[float]) -> bytes:
    """Feature values as ``DecisionRecord.packed_features`` stores them."""
    return _packer(len(values)).pack(*values)


@functools.lru_cache(maxsize=64)
def _packer(n_features: int) -> struct.Struct:
    return struct.Struct(f"<{n_features}d")


@dataclass(frozen=True, slots=True)
class LabelRecord:
    transaction_id: str
    is_fraud: bool
    reported_at_us: int | None
    received_at_us: int
    applied: bool

    def row(self) -> tuple[Any, ...]:
        flags = (int(self.is_fraud), self.reported_at_us, self.received_at_us, int(self.applied))
        return (self.transaction_id, *flags)


class ShadowRecord(NamedTuple):
    """A challenger's verdict on a decision, recorded after it (``fraudflow.serve.shadow``):
    ``status`` ok (then ``score``, ``raw_score``, ``decision``), error, timed_out or busy."""

    transaction_id: str
    model_version: str
    status: str
    score: float | None
    raw_score: float | None
    decision: str | None
    scored_at_us: int


SHADOW_FIELDS = ShadowRecord._fields
# A challenger's status in a decision's ``shadow`` object while its verdict is to come in a
# ``ShadowRecord``; readers show ``MISSING`` where none came.
PENDING = "pending"
MISSING = "missing"

Record = DecisionRecord | LabelRecord | ShadowRecord
AfterCommit = Callable[[Sequence[DecisionRecord]], None]


def now_us() -> int:
    return epoch_us(datetime.now(UTC))


def shard_files(path: Path) -> list[Path]:
    """The files of the audit log named ``path`` that exist: ``path``, then its shards."""
    path = Path(path)
    shards = []
    for candidate in path.parent.glob(f"{glob.escape(path.stem)}.*{glob.escape(path.suffix)}"):
        number = candidate.name[len(path.stem) + 1 : len(candidate.name) - len(path.suffix)]
        if number.isdigit():
            shards.append((int(number), candidate))
    return [p for p in [path] if p.is_file()] + [p for _, p in sorted(shards)]


def _shard(path: Path, number: int) -> Path:
    return path if number == 0 else path.with_name(f"{path.stem}.{number}{path.suffix}")


class Shard(NamedTuple):
    """One shard of a log: its SQLite file and its compacted files (either may be missing)."""

    number: int
    file: Path
    compacted: Path
    compacted_labels: Path

    def source(self) -> sqlite3.Connection | CompactedShard:
        """What a reader reads: the SQLite file while it exists, else the compacted files.
        Opened without creating anything: a file a compaction just dropped is not made anew."""
        try:
            return _read_only(self.file)
        except ConfigError:  # not there (any more)
            if not self.compacted.is_file():
                raise
        return open_compacted(self.compacted)


def log_shards(path: Path) -> list[Shard]:
    """The shards of the log named ``path`` that exist, in either form, by number."""
    path = Path(path)
    numbers = {0} if path.is_file() else set()
    for suffix in (path.suffix, ".parquet"):
        pattern = f"{glob.escape(path.stem)}.*{glob.escape(suffix)}"
        for candidate in path.parent.glob(pattern):
            number = candidate.name[len(path.stem) + 1 : len(candidate.name) - len(suffix)]
            if number.isdigit():
                numbers.add(int(number))
    return [Shard(n, _shard(path, n), *compacted_paths(path, n)) for n in sorted(numbers)]


def _claim_shard(path: Path, *, max_decisions: int) -> tuple[Path, int | None]:
    """The first shard of ``path`` no other writer holds, of this schema (or new) and with
    fewer than ``max_decisions`` decisions, and the lock's file descriptor. Shards of an
    older schema are left as they are, for reading, and so are full ones."""
    path.parent.mkdir(parents=True, exist_ok=True)
    for number in itertools.count():
        candidate, compacted = _shard(path, number), compacted_paths(path, number)[0]
        if compacted.exists():  # a compacted shard is never written again
            continue
        version, decisions = _shard_state(candidate)
        if version not in (0, _SCHEMA_VERSION) or decisions >= max_decisions:
            continue
        if fcntl is None:  # no flock (Windows): one writer process, as uvicorn runs there
            return candidate, None
        fd = _try_lock(candidate)
        if fd is None:
            continue
        if compacted.exists():  # compacted between the check above and the lock
            os.close(fd)
            continue
        return candidate, fd
    raise AssertionError("unreachable")


def _try_lock(shard: Path) -> int | None:
    """The shard's lock (a file descriptor holding ``flock``), or None if another holds it."""
    fd = os.open(f"{shard}.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def _shard_state(path: Path) -> tuple[int, int]:
    """An audit file's schema version and, for this schema, its number of decisions (a sum
    over its groups: ~1 row per 1,000 decisions); (0, 0) if it does not exist yet."""
    if not path.is_file():
        return 0, 0
    try:
        db = _read_only(path)
    except ConfigError:  # gone since: compacted
        return 0, 0
    with contextlib.closing(db):
        (version,) = db.execute("PRAGMA user_version").fetchone()
        if version != _SCHEMA_VERSION:
            return int(version), 0
        (count,) = db.execute(_COUNT_DECISIONS).fetchone()
    return int(version), int(count)


_COUNT_DECISIONS = "SELECT COALESCE(SUM(decisions), 0) FROM decision_groups"


class AuditLog:
    """The audit log file with its group-commit writer thread (see the module docstring).

    ``path`` names the log; ``file`` is the shard this instance writes.
    """

    def __init__(
        self,
        path: Path,
        *,
        after_commit: AfterCommit | None = None,
        max_group: int = 4096,
        max_shard_decisions: int = _MAX_SHARD_DECISIONS,
        compact_closed: bool = True,
    ) -> None:
        self.path = Path(path)
        self._after_commit = after_commit
        self._max_group = max_group
        self._max_shard = max_shard_decisions
        self._compact_closed = compact_closed
        self._compactor: threading.Thread | None = None  # while one runs
        self._compaction_lock = threading.Lock()  # the two below
        self._compaction_wanted = False
        self._stop_compacting = threading.Event()
        self._read_lock = threading.Lock()  # the reader, and which file it reads
        self._open_shard()
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._closed = False
        self.commits = 0  # groups committed so far (each one fsync)
        self._thread = threading.Thread(target=self._run, name="fraudflow-audit", daemon=True)
        self._thread.start()
        self._request_compaction()  # what an earlier run left: full shards, an interruption

    def submit(self, records: Sequence[Record]) -> Future[None]:
        """Queue ``records``; the future resolves once they are committed (durable).

        The label rows are built here, in the caller's thread, to keep Python work out of the
        writer (see ``_commit``).
        """
        future: Future[None] = Future()
        if self._closed:
            future.set_exception(ArtifactError(f"audit log {self.path} is closed"))
            return future
        decisions = [r for r in records if isinstance(r, DecisionRecord)]
        labels = [r.row() for r in records if isinstance(r, LabelRecord)]
        shadow = [r for r in records if isinstance(r, ShadowRecord)]
        self._queue.put(_Pending(decisions, labels, shadow, future))
        return future

    async def append(self, records: Sequence[Record]) -> None:
        """``submit`` and wait, without blocking the event loop. Shielded: a cancelled request
        still gets its records written, and the writer never resolves a cancelled future."""
        await asyncio.shield(asyncio.wrap_future(self.submit(records)))

    def lookup(self, transaction_id: str) -> bytes | None:
        """The response recorded for ``transaction_id`` in any shard, or None."""
        with self._read_lock:
            found = _lookup(self._reader, _SCHEMA_VERSION, transaction_id)
        # Another worker's shard: only duplicates get here, so opening it each time is fine
        # (a compacted shard's footer is cached).
        return found if found is not None else lookup_decision(self.path, transaction_id, self.file)

    def close(self) -> None:
        """Commit what is queued, stop the writer, close the file."""
        if self._closed:
            return
        self._closed = True
        self._queue.put(_STOP)
        self._thread.join()
        self._close_shard(self._checkpointer, self._reader, self._shard_lock)
        self._stop_compacting.set()  # a stopped compaction leaves its shard as it was
        with self._compaction_lock:
            compactor = self._compactor
        if compactor is not None:
            compactor.join()

    def _open_shard(self) -> None:
        """Claim a shard with room and open it: at start, and when the last one is full."""
        file, shard_lock = _claim_shard(self.path, max_decisions=self._max_shard)
        writer = _connect(file, synchronous="FULL")
        hand_over_waits(writer)  # no checkpoint inside a group commit
        # Transaction ids arrive in no particular order (UUIDs, say), so each insert lands on
        # a random page of the transaction_id index: beyond SQLite's default 2 MB cache every
        # group re-reads those pages from the OS, CPU that this larger cache saves.
        writer.execute(f"PRAGMA cache_size=-{_WRITER_CACHE_KIB}")
        # The model versions whose feature names this shard holds.
        sets = writer.execute("SELECT model_version FROM feature_sets")
        self._feature_sets = {v for (v,) in sets}
        (self._in_shard,) = writer.execute(_COUNT_DECISIONS).fetchone()
        # This writer alone writes the shard (its lock): it numbers the groups itself.
        (self._next_group,) = writer.execute(
            "SELECT COALESCE(MAX(seq), 0) + 1 FROM decision_groups"
        ).fetchone()
        self._writer, self._shard_lock = writer, shard_lock
        self._checkpointer = Checkpointer(file)
        reader = _connect(file, synchronous="FULL")
        with self._read_lock:  # a lookup sees the file and its reader change together
            self.file, self._reader = file, reader

    def _rotate(self) -> None:
        """Move to a new shard: one that grew without end would make every insert slower (a
        random id lands on a random page of an index that no longer fits in memory) and
        every file copy longer. The full one stays for lookups and export."""
        old = (self._writer, self._checkpointer, self._reader, self._shard_lock)
        try:
            self._open_shard()
        except (ConfigError, sqlite3.Error) as exc:  # the full shard still works: keep it
            log.warning("audit log %s: could not open a new shard: %s", self.path, exc)
            return
        old[0].close()
        self._close_shard(*old[1:])
        self._request_compaction()

    def _request_compaction(self) -> None:
        """Compact the full shards no writer holds in a background thread; one that is
        running already makes one more pass (it may have listed the shards before)."""
        if not self._compact_closed or fcntl is None:  # no flock: nothing is compacted
            return
        with self._compaction_lock:
            self._compaction_wanted = True
            if self._compactor is None:
                self._compactor = threading.Thread(
                    target=self._compact, name="fraudflow-audit-compaction", daemon=True
                )
                self._compactor.start()

    def _compact(self) -> None:
        # Linux gives each thread its own nice value: the compaction yields the cores to the
        # decisions. Elsewhere the call names no such process and fails: nothing changes.
        with contextlib.suppress(OSError):
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), _COMPACTION_NICE)
        while True:
            with self._compaction_lock:
                if not self._compaction_wanted or self._stop_compacting.is_set():
                    self._compactor = None
                    return
                self._compaction_wanted = False
            try:
                compact_audit(
                    self.path, full_only=True, max_shard_decisions=self._max_shard,
                    stop=self._stop_compacting,
                )  # fmt: skip
            except Exception:  # the shards stay readable as they are; the next pass retries
                log.exception("audit log %s: compacting closed shards failed", self.path)

    def _close_shard(
        self, checkpointer: Checkpointer, reader: sqlite3.Connection, shard_lock: int | None
    ) -> None:
        checkpointer.close()
        with self._read_lock:
            reader.close()
        if shard_lock is not None:
            os.close(shard_lock)  # the shard is free for the next writer

    def _run(self) -> None:
        stop = False
        while not stop:
            group = [self._queue.get()]
            while len(group) < self._max_group:
                try:
                    group.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            stop = any(item is _STOP for item in group)
            pending = [item for item in group if item is not _STOP]
            if pending:
                self._commit(pending)
        self._writer.close()

    def _commit(self, group: list[_Pending]) -> None:
        """One transaction for the whole group, in as few SQLite calls as possible.

        Each SQLite call releases the GIL and must take it back, and while the event loop is
        busy that waits up to a switch interval: ``executemany`` would pay it per row. So the
        decisions go in one group row and one multi-row INSERT of their ids, labels in
        multi-row INSERTs; a group that needs one statement (labels only) runs it alone in
        autocommit mode, where SQLite begins, inserts and commits (the fsync) in that call.
        """
        decisions = [d for p in group for d in p.decisions]
        new_sets = self._new_feature_sets(decisions)
        statements = multi_row_inserts(
            "INSERT OR IGNORE INTO feature_sets", ("model_version", "features"),
            [(version, orjson.dumps(names).decode()) for version, names in new_sets.items()],
        ) + self._group_statements(decisions) + multi_row_inserts(
            "INSERT INTO labels", _LABEL_COLUMNS, [row for p in group for row in p.label_rows]
        ) + _shadow_statements([r for p in group for r in p.shadow])  # fmt: skip
        try:
            if len(statements) == 1:
                execute_waiting(self._writer, *statements[0], _LOCK_TIMEOUT_SECONDS)
            else:
                self._transaction(statements)
            self.commits += 1
            self._next_group += bool(decisions)
            self._feature_sets.update(new_sets)  # their versions
            if self._after_commit is not None and decisions:
                self._after_commit(decisions)
        except Exception as exc:  # every waiter learns of it; the writer lives on
            for p in group:
                if p.future.set_running_or_notify_cancel():
                    p.future.set_exception(exc)
            return
        self._in_shard += len(decisions)
        if self._in_shard >= self._max_shard:  # before the waiters go: they see the new file
            self._rotate()
        for p in group:
            if p.future.set_running_or_notify_cancel():
                p.future.set_result(None)

    def _group_statements(self, decisions: list[DecisionRecord]) -> list[tuple[str, list[Any]]]:
        """The group row of ``decisions`` (numbered ``_next_group``) and their id keys."""
        if not decisions:
            return []
        seq, columns = self._next_group, list(zip(*decisions, strict=True))
        named = dict(zip(_GROUP_FIELDS, columns[:_N_GROUP_FIELDS], strict=True))
        extra, shadow = columns[_N_GROUP_FIELDS + 3], columns[_N_GROUP_FIELDS + 4]
        if any(x is not None for x in extra):  # a spec's extra columns: kept for replays
            named["extra"] = extra
        if any(x is not None for x in shadow):  # challengers' verdicts: a key, not a column
            named["shadow"] = shadow
        fields = orjson.dumps(named)
        features, responses = columns[_N_GROUP_FIELDS], columns[_N_GROUP_FIELDS + 1]
        offsets = np.concatenate([_offsets(responses), _offsets(features)]).astype("<i8")
        row = [seq, len(decisions), fields, b"".join(features), b"".join(responses)]
        keys = [(tid, seq, k) for k, tid in enumerate(columns[0])]
        ids = multi_row_inserts("INSERT OR IGNORE INTO decision_ids", _ID_COLUMNS, keys)
        return [(_INSERT_GROUP, [*row, offsets.tobytes()]), *ids]

    def _new_feature_sets(self, decisions: list[DecisionRecord]) -> dict[str, tuple[str, ...]]:
        """The feature names of model versions this shard does not hold yet (a reload)."""
        new: dict[str, tuple[str, ...]] = {}
        for d in decisions:
            if d.model_version not in self._feature_sets and d.model_version not in new:
                new[d.model_version] = tuple(d.feature_names)
        return new

    def _transaction(self, statements: list[tuple[str, list[Any]]]) -> None:
        execute_waiting(self._writer, "BEGIN IMMEDIATE", (), _LOCK_TIMEOUT_SECONDS)
        try:
            for sql, values in statements:
                self._writer.execute(sql, values)
            execute_waiting(self._writer, "COMMIT", (), _LOCK_TIMEOUT_SECONDS)
        except BaseException:
            if self._writer.in_transaction:  # some errors end the transaction themselves
                self._writer.execute("ROLLBACK")
            raise


def _shadow_statements(verdicts: list[ShadowRecord]) -> list[tuple[str, list[Any]]]:
    """The group row of ``verdicts``, in columns as the decisions' (one record per group)."""
    if not verdicts:
        return []
    fields = orjson.dumps(dict(zip(SHADOW_FIELDS, zip(*verdicts, strict=True), strict=True)))
    return [(_INSERT_SHADOW, [len(verdicts), fields])]


_INSERT_SHADOW = "INSERT INTO shadow_groups (verdicts, fields) VALUES (?, ?)"


@dataclass(frozen=True, slots=True)
class _Pending:
    decisions: list[DecisionRecord]
    label_rows: list[tuple[Any, ...]]
    shadow: list[ShadowRecord]
    future: Future[None]


def _offsets(chunks: Sequence[bytes]) -> np.ndarray:
    """Where each chunk starts in their concatenation, and where the last one ends."""
    out = np.zeros(len(chunks) + 1, dtype=np.int64)
    np.cumsum(np.fromiter(map(len, chunks), dtype=np.int64, count=len(chunks)), out=out[1:])
    return out


def _lookup(db: sqlite3.Connection, version: int, transaction_id: str) -> bytes | None:
    """The response recorded for ``transaction_id`` in one shard of schema ``version``."""
    if version in (1, 2):
        sql = "SELECT response FROM decisions WHERE transaction_id = ?"
        found = db.execute(sql, (transaction_id,)).fetchone()
        return None if found is None else bytes(found[0])
    if version != _SCHEMA_VERSION:  # a shard being created (0): nothing in it yet
        return None
    sql = "SELECT group_seq, position FROM decision_ids WHERE transaction_id = ?"
    found = db.execute(sql, (transaction_id,)).fetchone()
    if found is None:
        return None
    seq, position = found
    # Only the bytes of this response: a group's responses are ~1 MB.
    with db.blobopen("decision_groups", "offsets", seq, readonly=True) as blob:
        blob.seek(8 * position)
        start, end = _RANGE.unpack(blob.read(_RANGE.size))
    with db.blobopen("decision_groups", "responses", seq, readonly=True) as blob:
        blob.seek(start)
        return blob.read(end - start)


_RANGE = struct.Struct("<2q")


def lookup_decision(path: Path, transaction_id: str, skip: Path | None = None) -> bytes | None:
    """The response recorded for ``transaction_id`` in the log named ``path`` (its shards but
    ``skip``, in either form), or None."""
    for shard in log_shards(path):
        if shard.file != skip:
            found = _lookup_in(shard, transaction_id)
            if found is not None:
                return found
    return None


def _lookup_in(shard: Shard, transaction_id: str) -> bytes | None:
    """The response recorded for ``transaction_id`` in ``shard``, in whichever form."""
    source = shard.source()
    if isinstance(source, CompactedShard):
        return source.lookup(transaction_id)
    with contextlib.closing(source) as db:
        (version,) = db.execute("PRAGMA user_version").fetchone()
        return _lookup(db, version, transaction_id)


def _connect(path: Path, *, synchronous: str) -> sqlite3.Connection:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        db = connect_wal(
            path, synchronous=synchronous, timeout_seconds=_LOCK_TIMEOUT_SECONDS,
            page_size=_PAGE_SIZE,
        )  # fmt: skip
        _migrate(db, path)
    except sqlite3.Error as exc:
        raise ConfigError(f"audit log {path} cannot be opened: {exc}") from None
    return db


def _migrate(db: sqlite3.Connection, path: Path) -> None:
    (version,) = db.execute("PRAGMA user_version").fetchone()
    if version not in (0, _SCHEMA_VERSION):
        db.close()
        raise ConfigError(
            f"audit log {path} has schema version {version}, however this fraudflow expects "
            f"{_SCHEMA_VERSION}"
        )
    db.executescript(_SCHEMA)
    db.execute(f"PRAGMA user_version = {_SCHEMA_VERSION}")


# --- reading and export -------------------------------------------------------------------


def _read_only(path: Path) -> sqlite3.Connection:
    """A connection to an existing audit file; never creates one (``mode=rw``): a shard that
    a compaction dropped meanwhile must not come back empty, hiding its compacted files."""
    if not Path(path).is_file():
        raise ConfigError(f"audit log {path} does not exist")
    uri = f"{Path(path).absolute().as_uri()}?mode=rw"
    try:
        db = sqlite3.connect(uri, uri=True, isolation_level=None, timeout=30)
        db.execute("PRAGMA user_version")  # opens the file now
    except sqlite3.Error as exc:
        if not Path(path).is_file():
            raise ConfigError(f"audit log {path} does not exist") from None
        raise ConfigError(f"audit log {path} cannot be opened: {exc}") from None
    return db


def _utc(column: str) -> pl.Expr:
    return pl.from_epoch(pl.col(column), time_unit="us").dt.replace_time_zone("UTC")


def read_decisions(path: Path) -> pl.DataFrame:
    """Every recorded decision of every shard, one row each, in recording order (by decision
    time; one shard's order for equal times), one column per feature."""
    rows = _read_all(path, _decision_rows, _compacted_decision_rows, time_column=9)
    base = pl.DataFrame([r[:-3] for r in rows], schema=_DECISION_SCHEMA, orient="row")
    # Every row's keys: models of different versions may compute different features.
    parsed = [r[-3] for r in rows]
    features = pl.DataFrame(parsed, infer_schema_length=None) if rows else pl.DataFrame()
    # The columns a model's feature spec read beyond the canonical ones, as sent.
    extra = [r[-2] for r in rows]
    parts = [base, features.cast(pl.Float64)]
    if any(extra):
        extras = pl.from_dicts(extra, infer_schema_length=None, strict=False)
        parts.append(extras.select(c for c in extras.columns if c not in features.columns))
    # The challengers' verdicts (fraudflow.serve.shadow), as JSON text; only when any.
    shadow = [r[-1] for r in rows]
    if any(x is not None for x in shadow):
        shadow = _join_verdicts(path, [r[0] for r in rows], shadow)
        texts = [None if x is None else orjson.dumps(x).decode() for x in shadow]
        parts.append(pl.DataFrame({"shadow": texts}, schema={"shadow": pl.String}))
    frame = pl.concat(parts, how="horizontal")
    return frame.with_columns(
        _utc("t_us").alias("timestamp"), _utc("decided_at_us").alias("decided_at")
    ).drop("t_us", "decided_at_us")


def _join_verdicts(path: Path, ids: Sequence[str], entries: list[Any]) -> list[Any]:
    """The decisions' ``shadow`` objects with each ``pending`` challenger replaced by its
    verdict recorded later (``read_shadow_verdicts``), or by ``missing`` where none was."""
    if not any(_pending(e) for e in entries):
        return entries
    verdicts = read_shadow_verdicts(path)
    out: list[Any] = []
    for tid, entry in zip(ids, entries, strict=True):
        if _pending(entry):
            challengers = [
                c if c["status"] != PENDING
                else verdicts.get((tid, c["model_version"]))
                or {"model_version": c["model_version"], "status": MISSING}
                for c in entry["challengers"]
            ]  # fmt: skip
            entry = {**entry, "challengers": challengers}
        out.append(entry)
    return out


def _pending(entry: Any) -> bool:
    """Whether a decision's ``shadow`` object awaits a verdict recorded apart."""
    if not isinstance(entry, dict):
        return False
    return any(c.get("status") == PENDING for c in entry.get("challengers", ()))


def read_shadow_verdicts(path: Path) -> dict[tuple[str, str], dict[str, Any]]:
    """Every challenger verdict recorded apart from its decision, in any shard of the log
    named ``path``: (transaction_id, model_version) -> the verdict as a decision's ``shadow``
    object holds it (``model_version``, ``status``, and when ok ``score``, ``raw_score``,
    ``decision``). The first one recorded of a key counts."""
    rows = _read_all(path, _shadow_rows, _compacted_shadow_rows, time_column=6)
    out: dict[tuple[str, str], dict[str, Any]] = {}
    for tid, version, status, score, raw, decision, _ in rows:
        if (tid, version) in out:
            continue
        verdict: dict[str, Any] = {"model_version": version, "status": status}
        if status == "ok":
            verdict |= {"score": score, "raw_score": raw, "decision": decision}
        out[tid, version] = verdict
    return out


def _shadow_rows(db: sqlite3.Connection, version: int) -> list[tuple[Any, ...]]:
    """One shard's shadow verdicts (``ShadowRecord`` fields), in recording order."""
    if version != _SCHEMA_VERSION or not _has_shadow_table(db):
        return []
    out: list[tuple[Any, ...]] = []
    for (fields,) in db.execute("SELECT fields FROM shadow_groups ORDER BY seq"):
        columns = orjson.loads(fields)
        out += zip(*(columns[f] for f in SHADOW_FIELDS), strict=True)
    return out


def _has_shadow_table(db: sqlite3.Connection) -> bool:
    sql = "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'shadow_groups'"
    return db.execute(sql).fetchone() is not None


def _compacted_shadow_rows(shard: CompactedShard) -> list[tuple[Any, ...]]:
    table = shard.shadow()
    if table is None:
        return []
    return list(zip(*(table[f].to_pylist() for f in SHADOW_FIELDS), strict=True))


_DECISION_FIELDS = (
    "transaction_id, t_us, customer_id, terminal_id, amount, score, raw_score, decision, "
    "model_version, decided_at_us"
)


def _decision_rows(db: sqlite3.Connection, version: int) -> list[tuple[Any, ...]]:
    """One shard's decisions: the ``_DECISION_SCHEMA`` fields, then a dict of features, then
    a dict of the extra columns the model's feature spec read and the challengers' verdicts
    (schema 3; None where none)."""
    if version == 1:  # features as a JSON object, reasons in a column of their own
        sql = f"SELECT {_DECISION_FIELDS}, reasons, features FROM decisions ORDER BY seq"
        return [(*r[:-1], orjson.loads(r[-1]), {}, None) for r in db.execute(sql)]
    names = {v: orjson.loads(n) for v, n in db.execute("SELECT * FROM feature_sets")}
    if version == 2:  # a row per decision
        sql = f"SELECT {_DECISION_FIELDS}, response, features FROM decisions ORDER BY seq"
        return [
            (*_decision_row(fields, response, values, names), {}, None)
            for *fields, response, values in db.execute(sql)
        ]
    out = []
    recorded: set[str] = set()  # a repeated id: its first decision is the recorded one
    sql = "SELECT decisions, fields, features, responses, offsets FROM decision_groups ORDER BY seq"
    for n, fields, features, responses, offsets in db.execute(sql):
        bounds = np.frombuffer(offsets, dtype="<i8").tolist()
        at_response, at_features = bounds[: n + 1], bounds[n + 1 :]
        out += _rows_of_columns(
            orjson.loads(fields),
            [features[a:b] for a, b in itertools.pairwise(at_features)],
            [responses[a:b] for a, b in itertools.pairwise(at_response)],
            names,
            recorded,
        )
    return out


def _compacted_decision_rows(shard: CompactedShard) -> list[tuple[Any, ...]]:
    """A compacted shard's decisions as ``_decision_rows`` gives them (schema 3)."""
    table = shard.decisions()
    if table.num_rows == 0:  # a shard of labels only: no fields recorded
        return []
    json_fields = set(shard.metadata["json_fields"])
    columns = {
        name: [None if v is None else orjson.loads(v) for v in table[name].to_pylist()]
        if name in json_fields
        else table[name].to_pylist()
        for name in shard.fields()
    }
    names = shard.metadata["feature_sets"]
    features, responses = table["features"].to_pylist(), table["response"].to_pylist()
    return _rows_of_columns(columns, features, responses, names, set())


def _rows_of_columns(
    columns: dict[str, list[Any]],
    features: Sequence[bytes],
    responses: Sequence[bytes],
    names: dict[str, list[str]],
    recorded: set[str],
) -> list[tuple[Any, ...]]:
    """The rows of decisions given as columns (a group's JSON lists, or a compacted shard's
    columns), each id's first one only (``recorded``: the ids seen before)."""
    n = len(responses)
    extra = columns.get("extra") or [None] * n
    shadow = columns.get("shadow") or [None] * n
    out = []
    for k, row in enumerate(zip(*(columns[f] for f in _GROUP_FIELDS), strict=True)):
        if row[0] in recorded:
            continue
        recorded.add(row[0])
        decision = _decision_row(row, responses[k], features[k], names)
        out.append((*decision, extra[k] or {}, shadow[k]))
    return out


def _decision_row(
    fields: Sequence[Any], response: bytes, values: bytes, names: dict[str, list[str]]
) -> tuple[Any, ...]:
    """A decision's ``_DECISION_SCHEMA`` fields, its reasons, and its features as a dict."""
    reasons = orjson.dumps(orjson.loads(response)["reasons"]).decode()
    names_of = names[fields[8]]  # by model_version
    unpacked = _packer(len(names_of)).unpack(values)
    return (*fields, reasons, dict(zip(names_of, unpacked, strict=True)))


def _read_all(
    path: Path,
    read: Callable[[sqlite3.Connection, int], list[tuple[Any, ...]]],
    read_compacted: Callable[[CompactedShard], list[tuple[Any, ...]]],
    *,
    time_column: int,
) -> list[tuple[Any, ...]]:
    """``read``'s rows (given a SQLite shard and its schema version), or ``read_compacted``'s
    (given a compacted one), from every shard of the log named ``path``. One shard: in its
    order; several: merged by ``time_column`` (stable, so each shard's order holds within
    ties)."""
    shards = log_shards(path)
    if not shards:
        raise ConfigError(f"audit log {path} does not exist")
    rows: list[tuple[Any, ...]] = []
    for shard in shards:
        source = shard.source()
        if isinstance(source, CompactedShard):
            rows += read_compacted(source)
            continue
        with contextlib.closing(source) as db:
            (version,) = db.execute("PRAGMA user_version").fetchone()
            if version not in _READABLE_VERSIONS:
                raise ConfigError(
                    f"audit log shard {shard.file} has schema version {version}, however "
                    f"this fraudflow reads versions {list(_READABLE_VERSIONS)}"
                )
            rows += read(db, version)
    if len(shards) > 1:
        rows.sort(key=lambda r: r[time_column])
    return rows


_DECISION_SCHEMA = {
    "transaction_id": pl.String,
    "t_us": pl.Int64,
    "customer_id": pl.String,
    "terminal_id": pl.String,
    "amount": pl.Float64,
    "score": pl.Float64,
    "raw_score": pl.Float64,
    "decision": pl.String,
    "model_version": pl.String,
    "decided_at_us": pl.Int64,
    "reasons": pl.String,
}


def read_labels(path: Path) -> pl.DataFrame:
    """Every label report of every shard in arrival order (by receipt time; the latest per
    transaction is the current one)."""
    sql = (
        "SELECT transaction_id, is_fraud, reported_at_us, received_at_us, applied "
        "FROM labels ORDER BY seq"
    )
    rows = _read_all(
        path,
        lambda db, _: db.execute(sql).fetchall(),
        lambda shard: _compacted_label_rows(shard.labels()),
        time_column=3,
    )
    schema = {
        "transaction_id": pl.String,
        "is_fraud": pl.Int8,
        "reported_at_us": pl.Int64,
        "received_at_us": pl.Int64,
        "applied": pl.Boolean,
    }
    frame = pl.DataFrame(rows, schema=schema, orient="row")
    return frame.with_columns(
        _utc("reported_at_us").alias("reported_at"), _utc("received_at_us").alias("received_at")
    ).drop("reported_at_us", "received_at_us")


def export_audit(
    path: Path, out: Path, *, labels: bool = False, cases: Path | str | None = None
) -> int:
    """Write the decisions (or the labels) to ``out`` (.parquet, atomically); return rows.

    ``cases``: the review console's case store (a file or a URL); each decision then carries
    its case's id, status, outcome, analyst and times (``case_*`` columns, null where it
    opened no case).
    """
    if Path(out).suffix.lower() != ".parquet":
        raise ConfigError(f"--out must be a .parquet file, however got {out}")
    frame = read_labels(path) if labels else read_decisions(path)
    if cases is not None and not labels:
        frame = frame.join(
            read_case_outcomes(cases), on="transaction_id", how="left", maintain_order="left"
        )
    write_table(frame, out)
    return frame.height


def _compacted_label_rows(table: pa.Table) -> list[tuple[Any, ...]]:
    table = table.sort_by("seq")
    return list(zip(*(table[c].to_pylist() for c in _LABEL_COLUMNS), strict=True))


# --- compaction ------------------------------------------------------------------------------

# A pass holds this many decisions in memory (each its response, features and fields), sorts
# and writes them: a full shard is rewritten in a few passes, each over one range of ids, so
# a compaction in a serving worker's background holds a bounded share of a shard.
_ROWS_PER_PASS = 200_000
_COMPACTION_NICE = 10  # the background compaction's scheduling priority, as `nice -n`
_ARROW_TYPES = {"INTEGER": pa.int64(), "REAL": pa.float64(), "TEXT": pa.string()}


class _Stopped(Exception):
    """The log is closing: a compaction in progress gives up, leaving its shard as it was."""


def compact_audit(
    path: Path,
    *,
    full_only: bool = False,
    max_shard_decisions: int = _MAX_SHARD_DECISIONS,
    stop: threading.Event | None = None,
) -> list[Path]:
    """Compact the closed shards of the log named ``path`` (see the module docstring): every
    shard of this schema no writer holds, or with ``full_only`` the full ones only, and any
    whose compaction was interrupted. Returns the compacted files written."""
    if fcntl is None:
        raise ConfigError("compacting the audit log needs file locks (flock), absent here")
    done = []
    for shard in log_shards(Path(path)):
        if stop is not None and stop.is_set():
            break
        if not shard.file.exists():  # compacted before: what an interruption may have left
            _remove_leftovers(shard)
            continue
        version, decisions = _shard_state(shard.file)
        unfinished = shard.compacted.exists()
        # Checked before locking too: a writer starting meanwhile finds only shards it
        # would skip anyway locked, not one it could take.
        if version != _SCHEMA_VERSION or (
            full_only and decisions < max_shard_decisions and not unfinished
        ):
            continue
        fd = _try_lock(shard.file)
        if fd is None:  # a writer holds it
            continue
        try:
            if _compact_shard(shard, full_only, max_shard_decisions, stop):
                done.append(shard.compacted)
        except _Stopped:
            break
        finally:
            os.close(fd)
    return done


def _compaction_step(name: str) -> None:
    """Called after each durable step of a compaction; the crash tests stop there."""


def _compact_shard(
    shard: Shard, full_only: bool, max_decisions: int, stop: threading.Event | None
) -> bool:
    """Compact one shard whose lock the caller holds; False if it is not to be compacted."""
    version, decisions = _shard_state(shard.file)
    if version != _SCHEMA_VERSION:  # gone meanwhile (0), or an older schema: left as it is
        return False
    with contextlib.closing(_read_only(shard.file)) as db:
        db.execute("BEGIN")  # one snapshot of the shard
        (labels,) = db.execute("SELECT COUNT(*) FROM labels").fetchone()
        resumed = shard.compacted.exists()  # an interrupted compaction: finish it
        empty = decisions + labels + _shadow_count(db) == 0
        if not resumed and (empty or (full_only and decisions < max_decisions)):
            return False
        schema, json_fields = _decisions_schema(db)
        write_compacted(
            _sorted_batches(db, schema, json_fields, stop),
            _labels_table(db),
            schema=schema,
            metadata=_compacted_metadata(db, shard, json_fields),
            paths=(shard.compacted, shard.compacted_labels),
            step=lambda name: _compaction_step(name),
            shadow=_shadow_table(db),
        )
    _check_compacted(shard)
    shard.file.unlink()  # from here on readers read the compacted files
    _fsync_folder(shard.file.parent)
    _compaction_step("sqlite-dropped")
    _remove_leftovers(shard)
    return True


def _remove_leftovers(shard: Shard) -> None:
    """What a compacted shard's SQLite file left: its WAL, shared memory and lock files, and
    temporary files of an interrupted write."""
    for suffix in ("-wal", "-shm", ".lock"):
        Path(f"{shard.file}{suffix}").unlink(missing_ok=True)
    for target in (shard.compacted, shard.compacted_labels, shadow_path(shard.compacted)):
        for tmp in target.parent.glob(f".{glob.escape(target.name)}.*.tmp"):
            tmp.unlink(missing_ok=True)


def _fsync_folder(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _check_compacted(shard: Shard) -> None:
    """The compacted files hold as many decisions and labels as the shard: else the SQLite
    file stays (an error here is raised before anything is dropped)."""
    with contextlib.closing(_read_only(shard.file)) as db:
        (decisions,) = db.execute("SELECT COUNT(*) FROM decision_ids").fetchone()
        (labels,) = db.execute("SELECT COUNT(*) FROM labels").fetchone()
        verdicts = _shadow_count(db)
    compacted = open_compacted(shard.compacted)
    shadow = compacted.shadow()
    found = (compacted.rows(), compacted.labels().num_rows, 0 if shadow is None else len(shadow))
    if found != (decisions, labels, verdicts):
        raise ConfigError(
            f"compacting {shard.file}: expected {decisions} decisions, {labels} labels and "
            f"{verdicts} shadow verdicts in {shard.compacted}, however found {found[0]}, "
            f"{found[1]} and {found[2]}"
        )


def _compacted_metadata(
    db: sqlite3.Connection, shard: Shard, json_fields: list[str]
) -> dict[str, Any]:
    sets = {v: orjson.loads(n) for v, n in db.execute("SELECT * FROM feature_sets")}
    (decisions,) = db.execute("SELECT COUNT(*) FROM decision_ids").fetchone()
    (max_group,) = db.execute("SELECT COALESCE(MAX(seq), 0) FROM decision_groups").fetchone()
    labels, max_label = db.execute("SELECT COUNT(*), COALESCE(MAX(seq), 0) FROM labels").fetchone()
    source = {"path": str(shard.file.resolve()), "inode": shard.file.stat().st_ino}
    return {
        "json_fields": json_fields, "feature_sets": sets, "decisions": decisions,
        "labels": labels, "max_group_seq": max_group, "max_label_seq": max_label,
        "shadow_verdicts": _shadow_count(db), "source": source,
    }  # fmt: skip


def _shadow_count(db: sqlite3.Connection) -> int:
    if not _has_shadow_table(db):
        return 0
    (count,) = db.execute("SELECT COALESCE(SUM(verdicts), 0) FROM shadow_groups").fetchone()
    return int(count)


_SHADOW_TYPES = (pa.string(), pa.string(), pa.string(), pa.float64(), pa.float64(), pa.string(),
                 pa.int64())  # fmt: skip


def _shadow_table(db: sqlite3.Connection) -> pa.Table:
    """The shard's shadow verdicts, a row each in recording order (``SHADOW_FIELDS``)."""
    rows = _shadow_rows(db, _SCHEMA_VERSION)
    columns = list(zip(*rows, strict=True)) if rows else [() for _ in SHADOW_FIELDS]
    return pa.table({
        name: pa.array(list(values), type=kind)
        for name, values, kind in zip(SHADOW_FIELDS, columns, _SHADOW_TYPES, strict=True)
    })  # fmt: skip


def _decisions_schema(db: sqlite3.Connection) -> tuple[pa.Schema, list[str]]:
    """The compacted decisions' columns: the id, every field any group recorded (its type
    unified over the groups; objects as JSON text), the order and the two blobs; and the
    fields kept as JSON."""
    json_fields: set[str] = set()
    schemas = [
        pa.table(_field_arrays(orjson.loads(fields), json_fields)).schema
        for (fields,) in db.execute("SELECT fields FROM decision_groups ORDER BY seq")
    ]
    unified = pa.unify_schemas(schemas, promote_options="permissive") if schemas else pa.schema([])
    fields = [f if not pa.types.is_null(f.type) else pa.field(f.name, pa.string()) for f in unified]
    fields.sort(key=lambda f: f.name != "transaction_id")  # first (a stable sort)
    schema = pa.schema([
        *(fields or [pa.field("transaction_id", pa.string())]),
        pa.field("group_seq", pa.int64()), pa.field("position", pa.int64()),
        pa.field("features", pa.large_binary()), pa.field("response", pa.large_binary()),
    ])  # fmt: skip
    return schema, sorted(json_fields)


def _field_arrays(columns: dict[str, list[Any]], json_fields: set[str]) -> dict[str, pa.Array]:
    """A group's fields as arrays; a field holding objects (in any group) as JSON text."""
    out = {}
    for name, values in columns.items():
        first = next((v for v in values if v is not None), None)  # a field's values: one kind
        if name in json_fields or isinstance(first, dict | list):
            json_fields.add(name)
            values = [None if v is None else orjson.dumps(v).decode() for v in values]
        out[name] = pa.array(values)
    return out


def _sorted_batches(
    db: sqlite3.Connection, schema: pa.Schema, json_fields: list[str], stop: threading.Event | None
) -> Iterator[pa.Table]:
    """The shard's recorded decisions sorted by transaction_id, in row groups' worth, read a
    range of ids per pass."""
    as_json = set(json_fields)
    bounds = _id_bounds(db)
    for low, high in itertools.pairwise(bounds):
        keys = db.execute(
            "SELECT group_seq, position FROM decision_ids WHERE transaction_id >= ? "
            "AND (? IS NULL OR transaction_id < ?) ORDER BY group_seq, position",
            (low, high, high),
        ).fetchall()
        tables = []
        for seq, rows in itertools.groupby(keys, key=lambda k: k[0]):
            if stop is not None and stop.is_set():
                raise _Stopped
            n, fields, features, responses, offsets = db.execute(_READ_GROUP, (seq,)).fetchone()
            table = _group_table(seq, n, fields, features, responses, offsets, as_json)
            positions = [position for _, position in rows]
            tables.append(table if len(positions) == n else table.take(pa.array(positions)))
        if tables:  # sorted a row group at a time: one copy of the pass at most in memory
            table = _conform(pa.concat_tables(tables, promote_options="permissive"), schema)
            # One chunk: a take over a group's chunk each resolves every index's chunk.
            tables, table = [], table.combine_chunks()
            order = pc.sort_indices(table["transaction_id"])
            for start in range(0, len(order), ROW_GROUP_ROWS):
                yield table.take(order[start : start + ROW_GROUP_ROWS])


_READ_GROUP = (
    "SELECT decisions, fields, features, responses, offsets FROM decision_groups WHERE seq = ?"
)


def _id_bounds(db: sqlite3.Connection) -> list[str | None]:
    """Where the passes split the ids: '' (below every id), every ``_ROWS_PER_PASS``-th id,
    then None (no upper bound)."""
    ids = db.execute("SELECT transaction_id FROM decision_ids ORDER BY transaction_id")
    inner = [tid for k, (tid,) in enumerate(ids) if k and k % _ROWS_PER_PASS == 0]
    return ["", *inner, None]


def _group_table(
    seq: int, n: int, fields: bytes, features: bytes, responses: bytes, offsets: bytes,
    json_fields: set[str],
) -> pa.Table:  # fmt: skip
    """One group row as a table, a row per decision (the blobs sliced without copies)."""
    arrays = _field_arrays(orjson.loads(fields), json_fields)
    bounds = np.frombuffer(offsets, dtype="<i8")
    arrays["group_seq"] = pa.array(np.full(n, seq, dtype=np.int64))
    arrays["position"] = pa.array(np.arange(n, dtype=np.int64))
    arrays["features"] = _binary(n, bounds[n + 1 :], features)
    arrays["response"] = _binary(n, bounds[: n + 1], responses)
    return pa.table(arrays)


def _binary(n: int, offsets: np.ndarray, data: bytes) -> pa.Array:
    """``n`` byte strings: ``data[offsets[k]:offsets[k + 1]]``."""
    buffers = [None, pa.py_buffer(offsets.astype("<i8").tobytes()), pa.py_buffer(data)]
    return pa.Array.from_buffers(pa.large_binary(), n, buffers)


def _conform(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """``table`` with ``schema``'s columns and types (nulls for a field its groups lack)."""
    columns = [
        table[f.name].cast(f.type) if f.name in table.column_names else pa.nulls(len(table), f.type)
        for f in schema
    ]
    return pa.Table.from_arrays(columns, schema=schema)


def _labels_table(db: sqlite3.Connection) -> pa.Table:
    """The labels table as it is, every column, typed from its declaration."""
    info = db.execute("PRAGMA table_info(labels)").fetchall()  # cid, name, type, ...
    rows = db.execute("SELECT * FROM labels ORDER BY seq").fetchall()
    values = list(zip(*rows, strict=True)) if rows else [() for _ in info]
    return pa.table({
        name: pa.array(list(column), type=_ARROW_TYPES.get(kind.upper(), pa.binary()))
        for (_, name, kind, *_), column in zip(info, values, strict=True)
    })  # fmt: skip
