"""Durable feature state stores for the decision service (``fraudflow.features.online``).

Both implement ``fraudflow.features.online.StateStore``; ``open_store`` picks one from a URL:

    None or sqlite:///<path>    SQLiteStore: one file on disk, the embedded default
    redis://host[:port][/db]    RedisStore: shared by several service replicas

Paths follow the SQLAlchemy convention: ``sqlite:///state.db`` is relative,
``sqlite:////var/lib/fraudflow/state.db`` absolute.

Each store keeps, per entity (customer or terminal), its recent events ordered by (time,
arrival sequence), and per transaction its time, its two entities and its latest label.
SQLite keeps the transactions on disk and answers from an in-memory mirror of them; Redis
keeps per-entity sorted sets and a per-entity fraud set, so that the evaluator's label
counts are range counts, without a join.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from fraudflow.errors import ConfigError
from fraudflow.features.online import (
    AnswerLists,
    Answers,
    Event,
    Histories,
    StateStore,
    Window,
)
from fraudflow.serve.sqlite import (
    Checkpointer,
    connect_wal,
    execute_waiting,
    hand_over_waits,
    multi_row_inserts,
)

if TYPE_CHECKING:
    import redis

__all__ = [
    "LABEL_LUA",
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
    """The store a URL names: None or ``sqlite:///<path>``, or ``redis://``/``rediss://``."""
    path = sqlite_file(url, default_path=default_path)
    if path is not None:
        return SQLiteStore(path)
    assert url is not None  # None names the default file
    scheme, sep, rest = url.partition("://")
    if scheme in ("redis", "rediss") and sep:
        return RedisStore(url)
    # Never echo a URL's credentials.
    shown = f"{scheme}://...@{rest.rpartition('@')[2]}" if "@" in rest else url
    raise ConfigError(
        "state store URL must be sqlite:///<path> or redis://<host>[:<port>][/<db>], "
        f"however got {shown!r}"
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
# Keys (all under the prefix, whose hash tag "{fraudflow}" puts them in one cluster slot, as
# the scripts touch keys they compute):
#   seq                          INCR counter: the arrival sequence
#   ev:<entity>:<id>   zset      score t_us, member "<seq, 20 digits>|<t_us>|<repr(amount)>";
#                                equal scores sort by member, so ties keep arrival order
#   fr:<entity>:<id>   zset      score t_us, member transaction_id: the events labelled fraud
#   tx                 hash      transaction_id -> JSON [t_us, customer_id, terminal_id, amount,
#                                seq]: the log the spec engine (``fraudflow.serve.spec_redis``)
#                                indexes its key groups from, and writes too
#   txt                zset      score t_us, member transaction_id: for forgetting old ones
#   label              hash      transaction_id -> "0" | "1", the latest label
# Scores are doubles: integer microsecond times are exact up to 2**53 (the year 2255).

_FORGET_LUA = """
local function forget_transactions(prefix, until_us)
  local old = redis.call('ZRANGEBYSCORE', prefix .. 'txt', '-inf', until_us, 'LIMIT', 0, 500)
  if #old > 0 then
    redis.call('HDEL', prefix .. 'tx', unpack(old))
    redis.call('HDEL', prefix .. 'label', unpack(old))
    redis.call('ZREM', prefix .. 'txt', unpack(old))
  end
  return #old
end
"""

# Answers queries [[entity, id, after_us, until_us, rows], ...] (numbers as strings: Lua
# numbers print as %.14g) as {count, frauds, "<member>|<member>|..."}: one bulk string per
# query parses far faster in Python than nested arrays of members.
_ANSWER_LUA = """
local function answer(prefix, queries)
  local results = {}
  for i, q in ipairs(queries) do
    local entity = q[1] .. ':' .. q[2]
    local after, till = '(' .. q[3], q[4]
    local events = prefix .. 'ev:' .. entity
    local rows = ''
    if q[5] then rows = table.concat(redis.call('ZRANGEBYSCORE', events, after, till), '|') end
    results[i] = {
      redis.call('ZCOUNT', events, after, till),
      redis.call('ZCOUNT', prefix .. 'fr:' .. entity, after, till),
      rows,
    }
  end
  return results
end
"""

# ARGV: prefix, queries as JSON. Returns JSON [[count, frauds, rows], ...].
_READ_LUA = _ANSWER_LUA + "return cjson.encode(answer(ARGV[1], cjson.decode(ARGV[2])))"

# ARGV: prefix, forget_until_us, then the events as JSON [[tx_id, t_us, customer_id,
# terminal_id, amount, queries], ...] (numbers as strings). Returns JSON with, per event,
# its query results, or 0 where its transaction_id is already stored.
_APPLY_MANY_LUA = (
    _FORGET_LUA
    + _ANSWER_LUA
    + """
local prefix, forget = ARGV[1], ARGV[2]
local out, touched = {}, {}
for i, e in ipairs(cjson.decode(ARGV[3])) do
  local tx, t, customer, terminal, amount = e[1], e[2], e[3], e[4], e[5]
  if redis.call('HEXISTS', prefix .. 'tx', tx) == 1 then
    out[i] = 0
  else
    out[i] = answer(prefix, e[6])
    local seq = string.format('%020d', redis.call('INCR', KEYS[1]))
    local member = seq .. '|' .. t .. '|' .. amount
    for _, entity in ipairs({'customer:' .. customer, 'terminal:' .. terminal}) do
      redis.call('ZADD', prefix .. 'ev:' .. entity, t, member)
      touched[entity] = true
    end
    redis.call('HSET', prefix .. 'tx', tx, cjson.encode({t, customer, terminal, amount, seq}))
    redis.call('ZADD', prefix .. 'txt', t, tx)
  end
end
for entity in pairs(touched) do
  redis.call('ZREMRANGEBYSCORE', prefix .. 'ev:' .. entity, '-inf', forget)
  redis.call('ZREMRANGEBYSCORE', prefix .. 'fr:' .. entity, '-inf', forget)
end
forget_transactions(prefix, forget)
return cjson.encode(out)
"""
)

# ARGV: prefix, tx_id, "0" | "1". Returns 1, or 0 when the transaction is not stored.
LABEL_LUA = """
local prefix, tx, flag = ARGV[1], ARGV[2], ARGV[3]
local info = redis.call('HGET', prefix .. 'tx', tx)
if not info then return 0 end
local t, customer, terminal = unpack(cjson.decode(info))
redis.call('HSET', prefix .. 'label', tx, flag)
for _, entity in ipairs({'customer:' .. customer, 'terminal:' .. terminal}) do
  if flag == '1' then
    redis.call('ZADD', prefix .. 'fr:' .. entity, t, tx)
  else
    redis.call('ZREM', prefix .. 'fr:' .. entity, tx)
  end
end
return 1
"""

_PRUNE_LUA = _FORGET_LUA + "return forget_transactions(ARGV[1], ARGV[2])"


class RedisStore:
    """A ``StateStore`` in Redis, shared by service replicas (see the key layout above).

    Each ``apply_many`` and ``set_label`` is one Lua script, so it is atomic and costs one
    round trip; ``apply_many`` may forget at most 500 old transactions per call (``prune``
    sweeps the rest). Thread-safe: redis-py's client draws connections from a pool.
    """

    def __init__(self, url: str, *, prefix: str = "{fraudflow}:") -> None:
        self.prefix = prefix
        self._client = _redis_client(url)
        self._seq = prefix + "seq"  # declared to Redis, so cluster clients route to the slot
        self._read = self._client.register_script(_READ_LUA)
        self._apply_many = self._client.register_script(_APPLY_MANY_LUA)
        self._label = self._client.register_script(LABEL_LUA)
        self._forget = self._client.register_script(_PRUNE_LUA)

    def read(self, events: Sequence[Event], windows: Sequence[Window]) -> Answers:
        queries = [q for e in events for q in _queries(e, windows)]
        reply = json.loads(self._read(keys=[self._seq], args=[self.prefix, json.dumps(queries)]))
        out = AnswerLists(windows, len(events))
        answers = reply if isinstance(reply, list) else []  # cjson writes [] as {}
        for i in range(len(events)):
            out.fresh[i] = True
            _aggregate(out, i, windows, answers[i * len(windows) : (i + 1) * len(windows)])
        return out.done()

    def apply_many(
        self, events: Sequence[Event], windows: Sequence[Window], *, forget_until_us: int
    ) -> Answers:
        out = AnswerLists(windows, len(events))
        if not events:
            return out.done()
        payload = [
            [e.transaction_id, str(e.t_us), e.customer_id, e.terminal_id, repr(e.amount),
             _queries(e, windows)]
            for e in events
        ]  # fmt: skip
        args: list[str | int] = [self.prefix, forget_until_us, json.dumps(payload)]
        reply = self._apply_many(keys=[self._seq], args=args)
        for i, answers in enumerate(json.loads(reply)):
            if answers != 0:
                out.fresh[i] = True
                _aggregate(out, i, windows, answers if isinstance(answers, list) else [])
        return out.done()

    def set_label(self, transaction_id: str, is_fraud: bool) -> bool:
        args = [self.prefix, transaction_id, "1" if is_fraud else "0"]
        return bool(self._label(keys=[self._seq], args=args))

    def prune(self, until_us: int) -> int:
        with self._client.pipeline(transaction=False) as pipe:
            for kind in ("ev:", "fr:"):
                for key in self._client.scan_iter(match=_glob_escape(self.prefix + kind) + "*"):
                    pipe.zremrangebyscore(key, "-inf", until_us)
            pipe.execute()
        gone = 0
        while n := int(self._forget(keys=[self._seq], args=[self.prefix, until_us])):
            gone += n
        return gone

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> RedisStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _redis_client(url: str) -> redis.Redis:
    try:
        import redis
    except ImportError:
        raise ConfigError(
            "a redis:// state store needs the `redis` package, however it is not installed"
        ) from None
    return redis.Redis.from_url(url)


def _queries(event: Event, windows: Sequence[Window]) -> list[list[str | bool]]:
    """The event's windows as the scripts' queries: [entity, id, after_us, until_us, rows]."""
    ids = {"customer": event.customer_id, "terminal": event.terminal_id}
    return [
        [w.entity, ids[w.entity], str(event.t_us - w.after_us), str(event.t_us - w.until_us),
         w.amounts]
        for w in windows
    ]  # fmt: skip


def _aggregate(
    out: AnswerLists, i: int, windows: Sequence[Window], answers: Sequence[list[Any]]
) -> None:
    """Event ``i``'s script answers ``[count, frauds, rows]`` as window aggregates."""
    for j, (w, (count, frauds, rows)) in enumerate(zip(windows, answers, strict=True)):
        out.count[j][i] = count
        out.frauds[j][i] = frauds
        if w.amounts and rows:
            fields = rows.split("|")  # per member: seq, t_us, amount (time order)
            amounts = [float(a) for a in fields[2::3]]
            out.amount[j][i] = sum(amounts)
            out.latest[j][i] = int(fields[-2])
            if w.below is not None:
                out.below[j][i] = sum(1 for a in amounts if a < w.below)


def _glob_escape(text: str) -> str:
    """``text`` as a literal in a Redis SCAN MATCH pattern."""
    return "".join("\\" + c if c in "*?[]\\" else c for c in text)
