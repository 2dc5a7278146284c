"""Durable feature state stores for the decision service (``fraudflow.features.online``).

Both implement ``fraudflow.features.online.StateStore``; ``open_store`` picks one from a URL:

    None or sqlite:///<path>    SQLiteStore: one file on disk, the embedded default
    redis://host[:port][/db]    RedisStore: shared by several service replicas
    redis-cluster://host:port[,host:port...]    RedisStore on a Redis Cluster, keys spread
                                by what they belong to (``fraudflow.serve.redis_shards``)

Paths follow the SQLAlchemy convention: ``sqlite:///state.db`` is relative,
``sqlite:////var/lib/fraudflow/state.db`` absolute.

Each store keeps, per entity (customer or terminal), its recent events ordered by (time,
arrival sequence), and per transaction its time, its two entities and its latest label.
SQLite keeps the transactions on disk and answers from an in-memory mirror of them; Redis
keeps per-entity sorted sets of packed events and a per-entity fraud set, so that the
evaluator's label counts are range counts, without a join, and one record per transaction.
"""

from __future__ import annotations

import contextlib
import hashlib
import sqlite3
import struct
import threading
from bisect import bisect_right
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NamedTuple

from fraudflow.errors import ConfigError
from fraudflow.features.online import (
    AnswerLists,
    Answers,
    Event,
    Histories,
    StateStore,
    Window,
)
from fraudflow.serve.redis_shards import URL_FORMS, Command, Shards, is_redis_url, redis_client
from fraudflow.serve.sqlite import (
    Checkpointer,
    connect_wal,
    execute_waiting,
    hand_over_waits,
    multi_row_inserts,
)

__all__ = [
    "SPEC_DONE",
    "RedisStore",
    "SQLiteStore",
    "migrate_state_file",
    "open_store",
    "sqlite_file",
]


def sqlite_file(url: str | None, *, default_path: Path) -> Path | None:
    """The SQLite file a state URL names (None: ``default_path``); None for other schemes."""
    if url is None:
        return default_path
    scheme, sep, rest = url.partition("://")
    if scheme == "sqlite" and sep and len(rest) > 1 and rest.startswith("/"):
        return Path(rest[1:])
    return None


def open_store(url: str | None, *, default_path: Path) -> StateStore:
    """The store a URL names: None or ``sqlite:///<path>``, ``redis://``/``rediss://``, or
    ``redis-cluster://``."""
    path = sqlite_file(url, default_path=default_path)
    if path is not None:
        return SQLiteStore(path)
    assert url is not None  # None names the default file
    scheme, _, rest = url.partition("://")
    if is_redis_url(url):
        return RedisStore(url)
    # Never echo a URL's credentials.
    shown = f"{scheme}://...@{rest.rpartition('@')[2]}" if "@" in rest else url
    raise ConfigError(
        f"state store URL must be sqlite:///<path> or {URL_FORMS}, however got {shown!r}"
    )


# --- SQLite ------------------------------------------------------------------------------

_SCHEMA_VERSION = 3
_SCHEMA = """
CREATE TABLE IF NOT EXISTS transactions (
    seq            INTEGER PRIMARY KEY AUTOINCREMENT,  -- arrival order, never reused
    transaction_id TEXT NOT NULL UNIQUE,
    t_us           INTEGER NOT NULL,
    customer_id    TEXT NOT NULL,
    terminal_id    TEXT NOT NULL,
    amount         REAL NOT NULL,
    is_fraud       INTEGER NOT NULL DEFAULT 0,         -- the latest label
    extra          TEXT                                -- JSON: the spec engine's extra columns
);
CREATE INDEX IF NOT EXISTS transactions_by_time ON transactions (t_us);
CREATE TABLE IF NOT EXISTS label_changes (
    seq            INTEGER PRIMARY KEY AUTOINCREMENT,  -- replayed in this order
    transaction_id TEXT NOT NULL,
    t_us           INTEGER NOT NULL,                   -- the transaction's, for forgetting
    is_fraud       INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS label_changes_by_time ON label_changes (t_us);
"""
# Event's fields, in order.
_TRANSACTION_COLUMNS = ("transaction_id", "t_us", "customer_id", "terminal_id", "amount")
_LOW_US = -(2**62)  # before any event: forget nothing
_LOCK_TIMEOUT_SECONDS = 5.0  # sqlite3's default busy timeout
# The file forgets old transactions when the bound has moved this far (the mirror forgets at
# every call): two DELETEs per call cost more than the rows they rarely find.
_FORGET_STEP_US = 60 * 1_000_000


class _Changes(NamedTuple):
    """Other writers' commits, read from the file for the mirror: transactions (Event
    fields) in seq order; those among them labelled fraud, as (id, t_us, customer_id,
    terminal_id); label changes in seq order, as (id, flag, t_us, customer_id, terminal_id),
    the last four None where the file forgot the transaction since."""

    rows: list[tuple[Any, ...]]
    frauds: list[tuple[str, int, str, str]]
    labels: list[tuple[Any, ...]]


_NO_CHANGES = _Changes([], [], [])


def migrate_state_file(db: sqlite3.Connection, path: Path) -> None:
    """Bring a state file to this schema (or create it); another schema is a ``ConfigError``.

    Schema 3 adds ``transactions.extra``, the columns the spec engine
    (``fraudflow.serve.spec_state``) records besides the canonical ones: both engines share
    one log of transactions, so a reload that changes the spec keeps the history.
    """
    (version,) = db.execute("PRAGMA user_version").fetchone()
    if version == 2:
        columns = {row[1] for row in db.execute("PRAGMA table_info(transactions)")}
        if "extra" not in columns:  # another process may have just added it
            with contextlib.suppress(sqlite3.OperationalError):
                db.execute("ALTER TABLE transactions ADD COLUMN extra TEXT")
    elif version not in (0, _SCHEMA_VERSION):
        db.close()
        raise ConfigError(
            f"state store {path} has schema version {version}, however this "
            f"fraudflow expects {_SCHEMA_VERSION}: point it at a new file"
        )
    db.executescript(_SCHEMA)
    db.execute(f"PRAGMA user_version = {_SCHEMA_VERSION}")


class SQLiteStore:
    """A ``StateStore`` in one SQLite file (WAL mode); reopening it gives the same state.

    The file is the durable, shared truth: every transaction (time, entities, amount, latest
    label) in arrival order, and a log of label changes. Queries are answered from a
    ``Histories`` mirror of it (O(log n) per count, against a range scan per count in SQL,
    a large share of a decision's time), which each call first brings up to date with what
    other writers (processes sharing the file) committed since: the transactions and label
    changes past the last sequence numbers it has seen. A call that fails rebuilds the mirror
    from the file on the next call.

    Thread-safe: one connection guarded by a lock, which also serialises ``apply_many``.
    Several processes may share the file: ``apply_many`` and ``set_label`` run in a
    ``BEGIN IMMEDIATE`` transaction, which takes SQLite's write lock before reading what
    others stored, so each event sees all events stored before it. ``apply_many`` releases
    the file's lock once its events are committed and then brings the mirror up to date
    (others' events, then its own, in the file's order) and answers: the mirror's work, most
    of a call, does not hold up the other processes (with two service workers on batches,
    the cores stay busier than with the lock held through it). Should the mirror fail then,
    the events stay stored, as a crash there would leave them, and the mirror is rebuilt.
    """

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        # NORMAL, not FULL: in WAL mode a commit survives a process crash and the file stays
        # consistent; only a power loss or OS crash can drop the last commits. Losing a few
        # ms of feature state shifts a few counts by one; an fsync per event (FULL) would
        # cost more than the whole feature computation.
        self._db = connect_wal(
            self.path, synchronous="NORMAL", timeout_seconds=_LOCK_TIMEOUT_SECONDS
        )
        self._migrate()
        hand_over_waits(self._db)
        self._checkpointer = Checkpointer(self.path)
        self._mirror = Histories()  # ids are the file's business (its UNIQUE key)
        self._seen_seq = 0  # the last transaction seq in the mirror
        self._seen_label = 0  # the last label change applied to the mirror
        self._stale = True  # rebuild the mirror from the file before the next answer
        self._data_version: int | None = None  # PRAGMA data_version when last caught up
        self._forgot_until = _LOW_US  # the last bound applied to the file
        with self._locked_transaction("BEGIN"):
            self._catch_up()

    def read(self, events: Sequence[Event], windows: Sequence[Window]) -> Answers:
        with self._locked_transaction("BEGIN"):  # one snapshot to catch up from
            self._catch_up()
            return self._mirror.read(events, windows)

    def apply_many(
        self, events: Sequence[Event], windows: Sequence[Window], *, forget_until_us: int
    ) -> Answers:
        # One transaction for the whole call: BEGIN and COMMIT cost more than an event's
        # statements, and the write lock is taken once. The mirror is brought up to date
        # after the COMMIT, under this store's own lock only: the file's write lock is held
        # for the reads and inserts alone, not for the mirror's work (most of a call), so
        # other processes sharing the file wait less (see _apply_after_commit).
        with self._lock:
            with self._transaction("BEGIN IMMEDIATE"):
                changes = self._changes()
                new = self._insert(events)  # the file decides what is a duplicate
                if forget_until_us - self._forgot_until >= _FORGET_STEP_US:
                    self._forget_in_file(forget_until_us)
            return self._apply_after_commit(changes, events, new, windows, forget_until_us)

    def _apply_after_commit(
        self,
        changes: _Changes,
        events: Sequence[Event],
        new: list[int] | None,
        windows: Sequence[Window],
        forget_until_us: int,
    ) -> Answers:
        """The mirror, in the file's order: other writers' changes read before the insert,
        then the events this call stored. The file holds them all already, so a failure here
        leaves the mirror stale (rebuilt from the file by the next call), not the file."""
        try:
            self._apply_changes(changes)
            if new is None:
                answers = self._mirror.apply_many(events, windows, forget_until_us=forget_until_us)
            else:
                answers = self._mirror.apply_many(
                    [events[i] for i in new], windows, forget_until_us=forget_until_us
                ).expand(len(events), new)
        except BaseException:
            self._stale = True
            raise
        return answers

    def set_label(self, transaction_id: str, is_fraud: bool) -> bool:
        with self._locked_transaction("BEGIN IMMEDIATE"):
            self._catch_up()
            found = self._db.execute(
                "SELECT t_us, customer_id, terminal_id FROM transactions WHERE transaction_id = ?",
                (transaction_id,),
            ).fetchone()
            if found is None:  # not stored, or forgotten by the file
                return False
            t_us, customer_id, terminal_id = found
            # One the mirror forgot (the file lags it: it forgets in steps) could no longer
            # count: refused, as the file would have been soon.
            if not self._mirror.label(transaction_id, t_us, customer_id, terminal_id, is_fraud):
                return False
            flag = int(is_fraud)
            self._db.execute(
                "UPDATE transactions SET is_fraud = ? WHERE transaction_id = ?",
                (flag, transaction_id),
            )
            change = self._db.execute(
                "INSERT INTO label_changes (transaction_id, t_us, is_fraud) VALUES (?, ?, ?)",
                (transaction_id, t_us, flag),
            )
            self._seen_label = change.lastrowid or self._seen_label
            return True

    def prune(self, until_us: int) -> int:
        with self._locked_transaction("BEGIN IMMEDIATE"):
            self._catch_up()
            gone = self._forget_in_file(until_us)
            self._mirror.prune(until_us)
            return gone

    def close(self) -> None:
        with self._lock:
            self._db.close()
        self._checkpointer.close()

    def __enter__(self) -> SQLiteStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _migrate(self) -> None:
        migrate_state_file(self._db, self.path)

    @contextmanager
    def _locked_transaction(self, begin: str) -> Iterator[None]:
        with self._lock, self._transaction(begin):
            yield

    @contextmanager
    def _transaction(self, begin: str) -> Iterator[None]:
        """A file transaction; the caller holds ``_lock``."""
        execute_waiting(self._db, begin, (), _LOCK_TIMEOUT_SECONDS)
        try:
            yield
            execute_waiting(self._db, "COMMIT", (), _LOCK_TIMEOUT_SECONDS)
        except BaseException:
            self._stale = True  # the mirror may hold what the rollback undoes
            if self._db.in_transaction:  # some errors end the transaction themselves
                self._db.execute("ROLLBACK")
            raise

    def _catch_up(self) -> None:
        """Bring the mirror up to what the file holds (inside a transaction)."""
        self._apply_changes(self._changes())

    def _changes(self) -> _Changes:
        """What other writers committed since the mirror last caught up (inside a
        transaction), for ``_apply_changes``; a stale mirror is replaced by an empty one
        first, and then everything in the file is a change."""
        # data_version changes only when another connection committed: otherwise there is
        # nothing to read, and the queries below are skipped.
        (version,) = self._db.execute("PRAGMA data_version").fetchone()
        if version == self._data_version and not self._stale:
            return _NO_CHANGES
        self._data_version = version
        if self._stale:
            (last_label,) = self._db.execute(
                "SELECT COALESCE(MAX(seq), 0) FROM label_changes"
            ).fetchone()
            # Labels up to here are in transactions.is_fraud already.
            self._mirror, self._seen_seq, self._seen_label = Histories(), 0, last_label
            self._stale = False
        after = self._seen_seq
        rows = self._db.execute(
            f"SELECT {', '.join(_TRANSACTION_COLUMNS)} FROM transactions WHERE seq > ? "
            "ORDER BY seq",
            (after,),
        ).fetchall()
        frauds = []
        if rows:
            frauds = self._db.execute(
                "SELECT transaction_id, t_us, customer_id, terminal_id FROM transactions "
                "WHERE seq > ? AND is_fraud",
                (after,),
            ).fetchall()
            (self._seen_seq,) = self._db.execute("SELECT MAX(seq) FROM transactions").fetchone()
        labels = self._db.execute(
            "SELECT c.seq, c.transaction_id, c.is_fraud, t.t_us, t.customer_id, t.terminal_id "
            "FROM label_changes AS c LEFT JOIN transactions AS t USING (transaction_id) "
            "WHERE c.seq > ? ORDER BY c.seq",
            (self._seen_label,),
        ).fetchall()
        if labels:
            self._seen_label = labels[-1][0]
        return _Changes(rows, frauds, [row[1:] for row in labels])

    def _apply_changes(self, changes: _Changes) -> None:
        rows, frauds, labels = changes
        mirror = self._mirror
        if rows:  # rows as the Event tuples they are (no per-row Python)
            mirror.apply_many(list(map(Event._make, rows)), (), forget_until_us=_LOW_US)
        for tid, t_us, customer_id, terminal_id in frauds:
            mirror.label(tid, t_us, customer_id, terminal_id, True)
        for tid, is_fraud, t_us, customer_id, terminal_id in labels:
            if t_us is not None:  # else the file forgot it: so does the mirror
                mirror.label(tid, t_us, customer_id, terminal_id, bool(is_fraud))

    def _insert(self, events: Sequence[Event]) -> list[int] | None:
        """Store the transactions new to the file (inside a caught-up write transaction);
        return the positions in ``events`` of those stored, or None if all were (the usual
        case). Multi-row statements: one SQLite call per ~6,500 events instead of one per
        event; no RETURNING (per-row results cost more than the check below)."""
        before = self._db.total_changes
        last = self._seen_seq  # caught up under the write lock: every seq above is ours
        cursor = None
        for sql, values in multi_row_inserts(
            "INSERT OR IGNORE INTO transactions", _TRANSACTION_COLUMNS, events
        ):
            cursor = self._db.execute(sql, values)
        if cursor is None:
            return None
        if self._db.total_changes - before == len(events):
            # Every row went in, the last one last. (Only then: after an insert that stored
            # nothing, lastrowid is the connection's last insert in any table.)
            self._seen_seq = cursor.lastrowid or self._seen_seq
            return None
        # Some were stored already (or repeated in ``events``): the file says which went in;
        # a repeated id was inserted once, its first occurrence counts.
        seq_of = dict(
            self._db.execute(
                "SELECT transaction_id, seq FROM transactions WHERE seq > ?", (last,)
            ).fetchall()
        )
        self._seen_seq = max(seq_of.values(), default=last)
        return [i for i, e in enumerate(events) if seq_of.pop(e.transaction_id, None) is not None]

    def _forget_in_file(self, until_us: int) -> int:
        self._forgot_until = max(self._forgot_until, until_us)
        self._db.execute("DELETE FROM label_changes WHERE t_us <= ?", (until_us,))
        return self._db.execute("DELETE FROM transactions WHERE t_us <= ?", (until_us,)).rowcount


# --- Redis -------------------------------------------------------------------------------
#
# Keys, each under a hash tag naming what it belongs to, so a Redis Cluster spreads them
# (``fraudflow.serve.redis_shards``); <p> is the prefix:
#   <p>{c:<customer_id>}   zset  the customer's events: score t_us, member the 24 bytes
#   <p>{m:<terminal_id>}   zset  <8-byte hash of transaction_id><amount float64><t_us int64>
#                                (little-endian); the hash makes the member deterministic
#                                (re-applying adds nothing), amount and time are what amount
#                                windows sum and take the latest of
#   <p>{c:<id>}f, {m:<id>}f zset the entity's events labelled fraud: score t_us, member the
#                                8-byte hash
#   <p>{t:<transaction_id>} hash the transaction's record: e = <t_us int64><amount float64>
#                                <len(customer_id) uint16><customer_id><terminal_id>; d = the
#                                writes done (bit 1: customer, 2: terminal, 4: the spec
#                                engine's); l = the latest label
#   <p>{w}                 string the highest forgetting bound seen: older transactions are
#                                forgotten, a label for one is refused
# Entity sets and records expire when no window can reach them any more (a key idle that long
# holds only forgotten events), so idle keys need no sweep. Scores are doubles: integer
# microsecond times are exact up to 2**53 (the year 2255); bounds are computed in Python and sent
# as text: Lua's numbers are doubles, printed with %.14g.
#
# apply_many, per group of events: (1) claim each transaction's record (one script per
# record: created if absent, else its done bits answer); (2) per entity key one script that,
# event by event in call order, answers the windows and adds the event; (3) mark the records
# done. An event whose record exists but is not done (a crash or a node error between the
# phases) is written again by whoever meets it next: the writes are idempotent, and a script
# that finds the event already in its set answers without it, so the first writer's answers
# stay those of the events stored before it.

_CLAIM_LUA = """
local d = redis.call('HGET', KEYS[1], 'd')
if d then return tonumber(d) end
redis.call('HSET', KEYS[1], 'e', ARGV[1], 'd', 0)
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return -1
"""

# KEYS: events, frauds. ARGV: forget ('' for none), ttl ms, n windows, per window amounts
# (0|1), then per event t, member, write (0|1), the range (lo, hi] spanning its amount windows
# ('' '' if none) and per window its bounds (lo, hi] (all computed by the caller: Lua's
# doubles are not exact past 2**53). Returns per event, per window its count (0 for amount
# windows: the caller counts their members) and frauds, then the members in the span (one
# string, time order).
_ENTITY_LUA = """
local ev, fr = KEYS[1], KEYS[2]
local forget, ttl, nw = ARGV[1], ARGV[2], tonumber(ARGV[3])
local amounts = {}
for j = 1, nw do amounts[j] = ARGV[3 + j] == '1' end
local out = {}
local wrote = false
local step = 5 + 2 * nw
for k = 4 + nw, #ARGV, step do
  local t, m, write = ARGV[k], ARGV[k + 1], ARGV[k + 2] == '1'
  local own = redis.call('ZSCORE', ev, m)
  local hash = string.sub(m, 1, 8)
  local own_fraud = nil
  if own then
    -- Stored already (a retry completing it, or another writer did): answer without it.
    redis.call('ZREM', ev, m)
    own_fraud = redis.call('ZSCORE', fr, hash)
    if own_fraud then redis.call('ZREM', fr, hash) end
  end
  for j = 1, nw do
    local lo, hi = '(' .. ARGV[k + 3 + 2 * j], ARGV[k + 4 + 2 * j]
    if amounts[j] then out[#out + 1] = 0 else out[#out + 1] = redis.call('ZCOUNT', ev, lo, hi) end
    out[#out + 1] = redis.call('ZCOUNT', fr, lo, hi)
  end
  if ARGV[k + 3] ~= '' then
    out[#out + 1] = table.concat(redis.call('ZRANGEBYSCORE', ev, '(' .. ARGV[k + 3], ARGV[k + 4]))
  else
    out[#out + 1] = ''
  end
  if own then redis.call('ZADD', ev, own, m) end
  if own_fraud then redis.call('ZADD', fr, own_fraud, hash) end
  if write then
    redis.call('ZADD', ev, t, m)
    wrote = true
  end
end
if forget ~= '' then
  redis.call('ZREMRANGEBYSCORE', ev, '-inf', forget)
  redis.call('ZREMRANGEBYSCORE', fr, '-inf', forget)
end
if wrote then
  redis.call('PEXPIRE', ev, ttl)
  if redis.call('EXISTS', fr) == 1 then redis.call('PEXPIRE', fr, ttl) end
end
return out
"""

# KEYS: the watermark. ARGV: a bound. Keeps the highest; returns it.
_WATERMARK_LUA = """
local now = tonumber(redis.call('GET', KEYS[1]) or '-1e300')
if tonumber(ARGV[1]) > now then
  redis.call('SET', KEYS[1], ARGV[1])
  return ARGV[1]
end
return redis.call('GET', KEYS[1])
"""

_CLAIM, _ENTITY, _WATERMARK = 0, 1, 2
_CUSTOMER_DONE, _TERMINAL_DONE = 1, 2
SPEC_DONE = 4  # the spec engine's own sets (fraudflow.serve.spec_redis)
_ENTITY_TAG = {"customer": "c", "terminal": "m"}
_MIN_TTL_MS = 60_000
_SCAN_CHUNK = 1_000


class RedisStore:
    """A ``StateStore`` in Redis or a Redis Cluster, shared by service replicas (see the key
    layout above).

    ``apply_many`` is three pipelined rounds (claim, entity scripts, done marks), each one
    round trip per node; every entity key's events are answered and added atomically, in call
    order, by one script. Transactions and entity keys expire once forgotten; ``prune``
    sweeps the rest (one SCAN, in chunks: rare). Thread-safe: redis-py's clients draw
    connections from a pool.
    """

    def __init__(self, url: str, *, prefix: str = "fraudflow:") -> None:
        self.prefix = prefix
        self._client = redis_client(url)
        self._shards = Shards(self._client, _CLAIM_LUA, _ENTITY_LUA, _WATERMARK_LUA)
        self._watermark = prefix + "{w}"

    # Keys.
    def entity_key(self, entity: str, entity_id: str) -> str:
        return f"{self.prefix}{{{_ENTITY_TAG[entity]}:{entity_id}}}"

    def record_key(self, transaction_id: str) -> str:
        return f"{self.prefix}{{t:{transaction_id}}}"

    def read(self, events: Sequence[Event], windows: Sequence[Window]) -> Answers:
        out = AnswerLists(windows, len(events))
        for i in range(len(events)):
            out.fresh[i] = True
        self._entities(events, [False] * len(events), windows, out, forget=None, ttl_ms=0)
        return out.done()

    def apply_many(
        self, events: Sequence[Event], windows: Sequence[Window], *, forget_until_us: int
    ) -> Answers:
        out = AnswerLists(windows, len(events))
        if events:
            self.apply_claimed(events, windows, out, forget_until_us=forget_until_us)
        return out.done()

    def apply_claimed(
        self,
        events: Sequence[Event],
        windows: Sequence[Window],
        out: AnswerLists,
        *,
        forget_until_us: int,
        also_done: int = 0,
    ) -> tuple[list[bool], list[bool]]:
        """``apply_many`` into ``out``; returns, per event, whether this call stored it
        (fresh) and whether its record lacked the ``also_done`` bits (a caller's own writes,
        which it completes and then marks with ``mark_done``)."""
        ttl_ms = self._ttl_ms(events, forget_until_us)
        claims = self._claim(events, ttl_ms)
        fresh = [c == -1 for c in claims]
        write = [(c != -1 and c & 3 != 3) or c == -1 for c in claims]
        for i, f in enumerate(fresh):
            if f:
                out.fresh[i] = True
        wanted = [c == -1 or (c & also_done) != also_done for c in claims] if also_done else []
        self._entities(events, write, windows, out, forget=forget_until_us, ttl_ms=ttl_ms)
        self._done(events, write, _CUSTOMER_DONE | _TERMINAL_DONE)
        return fresh, wanted

    def mark_done(self, transaction_ids: Sequence[str], bits: int) -> None:
        with self._client.pipeline(transaction=False) as pipe:
            for tid in transaction_ids:
                key = self.record_key(tid)
                pipe.hget(key, "d")
            found = pipe.execute()
        with self._client.pipeline(transaction=False) as pipe:
            for tid, d in zip(transaction_ids, found, strict=True):
                if d is not None:
                    pipe.hset(self.record_key(tid), "d", int(d) | bits)
            pipe.execute()

    def records(self) -> Iterator[tuple[str, bytes, str]]:
        """Every transaction's (id, packed ``e``, label "0" | "1"), in no order (a SCAN)."""
        head = len(self.prefix) + len("{t:")
        keys = [k for k in self._scan(_glob_escape(self.prefix + "{t:") + "*") if k[-1:] == b"}"]
        for start in range(0, len(keys), _SCAN_CHUNK):
            chunk = keys[start : start + _SCAN_CHUNK]
            with self._client.pipeline(transaction=False) as pipe:
                for k in chunk:
                    pipe.hmget(k, "e", "l")
                found = pipe.execute()
            for k, (packed, label) in zip(chunk, found, strict=True):
                if packed is not None:
                    yield k[head:-1].decode(), packed, (label or b"0").decode()

    def set_label(self, transaction_id: str, is_fraud: bool) -> bool:
        key = self.record_key(transaction_id)
        with self._client.pipeline(transaction=False) as pipe:
            pipe.hget(key, "e")
            pipe.get(self._watermark)
            packed, mark = pipe.execute()
        if packed is None:
            return False
        t_us, _, customer_id, terminal_id = unpack_record(packed)
        if mark is not None and t_us <= float(mark):
            return False
        hashed = tx_hash(transaction_id)
        with self._client.pipeline(transaction=False) as pipe:
            for entity, entity_id in (("customer", customer_id), ("terminal", terminal_id)):
                frauds = self.entity_key(entity, entity_id) + "f"
                if is_fraud:
                    pipe.zadd(frauds, {hashed: t_us})
                    pipe.pexpire(frauds, max(_MIN_TTL_MS, self._client.pttl(key)))
                else:
                    pipe.zrem(frauds, hashed)
            pipe.hset(key, "l", int(is_fraud))
            pipe.execute()
        return True

    def prune(self, until_us: int) -> int:
        """Move the watermark to ``until_us`` and forget what is older in every key: one SCAN
        of this store's keys (per master on a cluster), handled a chunk at a time as it comes,
        so memory stays bounded however many keys there are. Writes already forget in the
        keys they touch, and idle keys expire: this sweep is for the rest, and rare."""
        self._shards.run([self._shards.script(_WATERMARK, [self._watermark], [until_us])])
        gone = 0
        chunk: list[bytes] = []
        for key in self._scan(_glob_escape(self.prefix + "{") + "*"):
            chunk.append(key)
            if len(chunk) == _SCAN_CHUNK:
                gone += self._prune_keys(chunk, until_us)
                chunk = []
        return gone + self._prune_keys(chunk, until_us)

    def _prune_keys(self, keys: Sequence[bytes], until_us: int) -> int:
        """Forget what is older than ``until_us`` in ``keys``: events and frauds in entity
        sets, whole transaction records; return the records deleted."""
        head = len(self.prefix)
        sets = [k for k in keys if k[head : head + 3] in (b"{c:", b"{m:")]
        records = [k for k in keys if k[head : head + 3] == b"{t:" and k[-1:] == b"}"]
        with self._client.pipeline(transaction=False) as pipe:
            for k in sets:
                pipe.zremrangebyscore(k, "-inf", until_us)
            for k in records:
                pipe.hget(k, "e")
            found = pipe.execute()[len(sets) :]
        old = [k for k, e in zip(records, found, strict=True)
               if e is not None and unpack_record(e)[0] <= until_us]  # fmt: skip
        if not old:
            return 0
        with self._client.pipeline(transaction=False) as pipe:
            for k in old:
                pipe.delete(k)
            return sum(pipe.execute())

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> RedisStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _scan(self, pattern: str) -> Iterator[bytes]:
        yield from self._client.scan_iter(match=pattern, count=_SCAN_CHUNK)

    def _ttl_ms(self, events: Sequence[Event], forget_until_us: int) -> int:
        """How long this group's keys must live: until the bound passes its latest event."""
        newest = max(e.t_us for e in events)
        return max(_MIN_TTL_MS, (newest - forget_until_us) // 1_000)

    def _claim(self, events: Sequence[Event], ttl_ms: int) -> list[int]:
        """Per event: -1 if this call created its record; else the record's done bits (-2
        for a repeat of an earlier event of the call, which it never writes)."""
        calls: list[Command] = []
        seen: dict[str, int] = {}
        positions = []
        for i, e in enumerate(events):
            if e.transaction_id in seen:
                continue
            seen[e.transaction_id] = i
            positions.append(i)
            key = self.record_key(e.transaction_id)
            calls.append(self._shards.script(_CLAIM, [key], [pack_record(e), ttl_ms]))
        claims = [3 | 4 | 8] * len(events)  # repeats: done, not written, not fresh
        claims_of = self._shards.run(calls)
        for i, c in zip(positions, claims_of, strict=True):
            claims[i] = int(c)
        return claims

    def _entities(
        self,
        events: Sequence[Event],
        write: Sequence[bool],
        windows: Sequence[Window],
        out: AnswerLists,
        *,
        forget: int | None,
        ttl_ms: int,
    ) -> None:
        """Per entity key one script: answers for events that asked (fresh ones, or all when
        reading) and writes those in ``write``."""
        by_entity: dict[str, list[int]] = {"customer": [], "terminal": []}
        for j, w in enumerate(windows):
            by_entity[w.entity].append(j)
        reading = forget is None
        calls: list[Command] = []
        asked: list[tuple[list[int], list[int]]] = []  # per call: events, windows
        for entity in ("customer", "terminal"):
            js = by_entity[entity]
            groups: dict[str, list[int]] = {}
            for i, e in enumerate(events):
                if write[i] or ((reading or out.fresh[i]) and js):
                    entity_id = e.customer_id if entity == "customer" else e.terminal_id
                    groups.setdefault(entity_id, []).append(i)
            head: list[Any] = ["" if forget is None else forget, ttl_ms, len(js)]
            head += [1 if windows[j].amounts else 0 for j in js]
            spans = [(windows[j].after_us, windows[j].until_us) for j in js]
            asked_amounts = [spans[k] for k, j in enumerate(js) if windows[j].amounts]
            reach = max((a for a, _ in asked_amounts), default=0)
            near = min((u for _, u in asked_amounts), default=0)
            for entity_id, idx in groups.items():
                args = list(head)
                for i in idx:
                    e = events[i]
                    t = e.t_us
                    args += [t, event_member(e), 1 if write[i] else 0]
                    args += [t - reach, t - near] if asked_amounts else ["", ""]
                    for after_us, until_us in spans:
                        args += [t - after_us, t - until_us]
                key = self.entity_key(entity, entity_id)
                calls.append(self._shards.script(_ENTITY, [key, key + "f"], args))
                asked.append((idx, js))
        if forget is not None and events:
            calls.append(self._shards.script(_WATERMARK, [self._watermark], [forget]))
        replies = self._shards.run(calls)
        for (idx, js), reply in zip(asked, replies, strict=False):
            _fill(out, windows, events, idx, js, reply, only_fresh=not reading)

    def _done(self, events: Sequence[Event], write: Sequence[bool], bits: int) -> None:
        calls: list[Command] = []
        for e, w in zip(events, write, strict=True):
            if w:
                key = self.record_key(e.transaction_id)
                calls.append((key, ("HSET", key, "d", bits)))
        self._shards.run(calls)


def tx_hash(transaction_id: str) -> bytes:
    """8 bytes naming a transaction within an entity's set (collisions need the same entity)."""
    return hashlib.blake2b(transaction_id.encode(), digest_size=8).digest()


def event_member(e: Event) -> bytes:
    """A transaction's member in its entities' sets: hash, amount (float64), time (int64)."""
    return tx_hash(e.transaction_id) + _AMOUNT_TIME.pack(e.amount, e.t_us)


def pack_record(e: Event) -> bytes:
    customer = e.customer_id.encode()
    return _RECORD.pack(e.t_us, e.amount, len(customer)) + customer + e.terminal_id.encode()


def unpack_record(packed: bytes) -> tuple[int, float, str, str]:
    """(t_us, amount, customer_id, terminal_id) of a record's ``e``."""
    t_us, amount, n = _RECORD.unpack_from(packed)
    rest = packed[_RECORD.size :]
    return t_us, amount, rest[:n].decode(), rest[n:].decode()


_AMOUNT_TIME = struct.Struct("<dq")
_RECORD = struct.Struct("<qdH")


def _fill(
    out: AnswerLists,
    windows: Sequence[Window],
    events: Sequence[Event],
    idx: Sequence[int],
    js: Sequence[int],
    reply: list[Any],
    *,
    only_fresh: bool,
) -> None:
    """One entity script's answers into ``out``, for events ``idx`` and windows ``js``: the
    counts it made, and the amount windows counted here from the members it sent (one range
    per event, searched per window)."""
    k = 0
    for i in idx:
        use = not only_fresh or out.fresh[i]
        counts = reply[k : k + 2 * len(js) : 2]
        frauds = reply[k + 1 : k + 2 * len(js) : 2]
        members = reply[k + 2 * len(js)]
        k += 2 * len(js) + 1
        if not use:
            continue
        times: list[int] = []
        amounts: list[float] = []
        if members:
            for amount, t_us in _MEMBER_TAIL.iter_unpack(members):
                amounts.append(amount)
                times.append(t_us)
        t = events[i].t_us
        for j, count, fraud in zip(js, counts, frauds, strict=True):
            w = windows[j]
            out.frauds[j][i] = fraud
            if not w.amounts:
                out.count[j][i] = count
                continue
            lo = bisect_right(times, t - w.after_us)
            hi = bisect_right(times, t - w.until_us)
            out.count[j][i] = hi - lo
            if hi > lo:
                out.amount[j][i] = sum(amounts[lo:hi])
                out.latest[j][i] = times[hi - 1]
                if w.below is not None:
                    out.below[j][i] = sum(1 for a in amounts[lo:hi] if a < w.below)


_MEMBER_TAIL = struct.Struct("<8xdq")  # a member's amount and time, past its hash


def _glob_escape(text: str) -> str:
    """``text`` as a literal in a Redis SCAN MATCH pattern."""
    return "".join("\\" + c if c in "*?[]\\" else c for c in text)
