"""Each entity key's last events, for the models that read a card's history (the sequence
transformer): in process, in SQLite and in Redis.

A key's history is one binary value: its events as fixed-width records in (time, arrival)
order, the batch engine's tie rule (``fraudflow.features.batch``). A record is

    time   8 bytes, big-endian t_us + 2**63 (so byte order is time order, signed times too)
    id     8 bytes, the transaction's hash (``fraudflow.serve.state.tx_hash``)
    body   the caller's payload (the event's model-matrix row, float32), fixed per history

``append`` adds a record to its key and answers the key's records as they stand right after
it, with the record's position: the caller reads the event's window from them. It is
idempotent: a record whose id the key already holds is not added again, and the answer is
the key's records with that record's position, so a replay or a retry (after a crash between
the feature state's commit and this one) appends nothing twice and reads the same window.
A record is inserted after every record of its time or earlier (a late event goes where
the batch order puts it), and the key then keeps its last ``keep`` records: the answer is
taken before that trim, so that the oldest event of a full window still has the event
before it (its gap since the previous event).

Stores: ``MemoryHistory`` (dicts, tests and the benchmark floor), ``SQLiteHistory`` (a file
beside the SQLite feature state, one transaction per group of events), ``RedisHistory``
(one key per entity key, hashed by the entity as the feature state's keys are, so a Redis
Cluster spreads the histories; one Lua script per event, the group pipelined per node by
``fraudflow.serve.redis_shards.Shards``). Keys never expire by time: the sequence models read
a card's last events however old they are, as the batch inputs do.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple, Protocol

from fraudflow.serve.redis_shards import Shards, redis_client
from fraudflow.serve.sqlite import connect_wal

__all__ = [
    "HEAD_BYTES",
    "Appended",
    "HistoryStore",
    "MemoryHistory",
    "RedisHistory",
    "SQLiteHistory",
    "merge",
    "open_history",
    "pack_head",
    "time_of",
]

HEAD_BYTES = 16  # time and id, before the body
_TIME_OFFSET = 2**63


class Appended(NamedTuple):
    """A key's records right after an append (before the trim), and the appended one's
    position among them."""

    records: bytes
    position: int


class HistoryStore(Protocol):
    """Per entity key, its last records (see the module docstring)."""

    def append(
        self, items: Sequence[tuple[str, bytes]], *, width: int, keep: int
    ) -> list[Appended]:
        """Append each (key, record), in order, each record ``width`` bytes; every key keeps
        its last ``keep`` records. One answer per item."""
        ...

    def close(self) -> None: ...


def pack_head(t_us: int, transaction_hash: bytes) -> bytes:
    """A record's first 16 bytes: its time (ordered as bytes) and its transaction's hash."""
    return (t_us + _TIME_OFFSET).to_bytes(8, "big") + transaction_hash


def time_of(records: bytes, position: int, width: int) -> int:
    """The t_us of the record at ``position``."""
    start = position * width
    return int.from_bytes(records[start : start + 8], "big") - _TIME_OFFSET


def merge(records: bytes, record: bytes, width: int, keep: int) -> tuple[bytes, Appended]:
    """(what the key keeps, the answer) after appending ``record`` to ``records``.

    The Python form of ``_APPEND_LUA``; the parity tests hold the stores to one answer.
    """
    count = len(records) // width
    ident = record[8:HEAD_BYTES]
    for k in range(count):
        if records[k * width + 8 : k * width + HEAD_BYTES] == ident:
            return records, Appended(records, k)
    at, t = count, record[:8]
    while at > 0 and records[(at - 1) * width : (at - 1) * width + 8] > t:
        at -= 1
    grown = records[: at * width] + record + records[at * width :]
    extra = count + 1 - keep
    kept = grown[extra * width :] if extra > 0 else grown
    return kept, Appended(grown, at)


class MemoryHistory:
    """Histories in a dict; thread-safe, not durable."""

    def __init__(self) -> None:
        self._keys: dict[str, bytes] = {}
        self._lock = threading.Lock()

    def append(
        self, items: Sequence[tuple[str, bytes]], *, width: int, keep: int
    ) -> list[Appended]:
        out = []
        with self._lock:
            for key, record in items:
                kept, answer = merge(self._keys.get(key, b""), record, width, keep)
                self._keys[key] = kept
                out.append(answer)
        return out

    def close(self) -> None:
        self._keys.clear()


_HISTORY_SCHEMA = """
CREATE TABLE IF NOT EXISTS history (
    key     TEXT PRIMARY KEY,
    records BLOB NOT NULL
) WITHOUT ROWID;
"""


class SQLiteHistory:
    """Histories in a SQLite file; a group of appends is one write transaction, so several
    service workers (processes) on one file append one after the other."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self._db = connect_wal(self.path, synchronous="NORMAL", timeout_seconds=5.0)
        self._db.executescript(_HISTORY_SCHEMA)
        self._lock = threading.Lock()

    def append(
        self, items: Sequence[tuple[str, bytes]], *, width: int, keep: int
    ) -> list[Appended]:
        if not items:
            return []
        with self._lock:
            db = self._db
            db.execute("BEGIN IMMEDIATE")
            try:
                keys = sorted({k for k, _ in items})
                found: dict[str, bytes] = {}
                for start in range(0, len(keys), 500):
                    chunk = keys[start : start + 500]
                    marks = ",".join("?" * len(chunk))
                    query = f"SELECT key, records FROM history WHERE key IN ({marks})"
                    found.update(db.execute(query, chunk).fetchall())
                out = []
                for key, record in items:
                    kept, answer = merge(found.get(key, b""), record, width, keep)
                    found[key] = kept
                    out.append(answer)
                db.executemany(
                    "INSERT OR REPLACE INTO history (key, records) VALUES (?, ?)",
                    [(k, found[k]) for k in {k: None for k, _ in items}],
                )
                db.execute("COMMIT")
            except BaseException:
                if db.in_transaction:
                    db.execute("ROLLBACK")
                raise
        return out

    def close(self) -> None:
        self._db.close()


# KEYS[1]: the history; ARGV: the record, its width, how many records the key keeps. Returns
# {records before the trim, position}. The same steps as ``merge``; times compare byte by byte
# (string.byte gives unsigned bytes: no locale collation, unlike Lua's string comparison).
_APPEND_LUA = """
local records = redis.call('GET', KEYS[1]) or ''
local record, width, keep = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local count = #records / width
local ident = string.sub(record, 9, 16)
for k = 0, count - 1 do
  if string.sub(records, k * width + 9, k * width + 16) == ident then
    return {records, k}
  end
end
local function later(at)
  for b = 1, 8 do
    local x, y = string.byte(records, at * width + b), string.byte(record, b)
    if x ~= y then return x > y end
  end
  return false
end
local at = count
while at > 0 and later(at - 1) do at = at - 1 end
local grown = string.sub(records, 1, at * width) .. record .. string.sub(records, at * width + 1)
local extra = count + 1 - keep
if extra > 0 then
  redis.call('SET', KEYS[1], string.sub(grown, extra * width + 1))
else
  redis.call('SET', KEYS[1], grown)
end
return {grown, at}
"""


class RedisHistory:
    """Histories in Redis or a Redis Cluster: ``<prefix>{c:<id>}s<tag>``, in the slot of the
    feature state's key of the same entity (``fraudflow.serve.state.RedisStore``)."""

    def __init__(self, url: str, *, prefix: str = "fraudflow:") -> None:
        self.prefix = prefix
        self._client = redis_client(url)
        self._shards = Shards(self._client, _APPEND_LUA)

    def append(
        self, items: Sequence[tuple[str, bytes]], *, width: int, keep: int
    ) -> list[Appended]:
        calls = []
        for key, record in items:
            entity, _, rest = key.partition(":")
            name, _, tag = rest.rpartition("/")
            full = f"{self.prefix}{{{entity}:{name}}}s{tag}"
            calls.append(self._shards.script(0, [full], [record, width, keep]))
        return [Appended(bytes(r[0]), int(r[1])) for r in self._shards.run(calls)]

    def close(self) -> None:
        self._client.close()


def open_history(url: str | None, *, sqlite_path: Path | None) -> HistoryStore:
    """The history store beside a feature state: Redis for a redis URL, else a SQLite file
    ``sqlite_path`` (the state file's sibling)."""
    if sqlite_path is None:
        assert url is not None
        return RedisHistory(url)
    return SQLiteHistory(sqlite_path)
