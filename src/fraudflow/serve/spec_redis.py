"""The spec engine's store in Redis (``fraudflow.features.spec_online.SpecStore``).

Each transaction goes first through the fast path's store (``fraudflow.serve.state.RedisStore``:
its per-transaction record decides what is new, its per-entity sets are written, so either
engine can take over after a reload), then into this store's own keys, one key space under the
hash tag ``{spec}`` (one cluster slot: the script below reads any key group's set):

    <p>{spec}:sg:<by JSON>:<key JSON>  zset  a key group's events: score t_us, member
                                   "<seq, 20 digits><len(id), 4 digits><id><t_us>|<columns>",
                                   columns as sorted JSON; equal scores sort by member, so
                                   ties keep arrival order
    <p>{spec}:log              hash  transaction_id -> JSON [t_us, customer_id, terminal_id,
                                   amount, seq, columns JSON]: what a new layout is indexed from
    <p>{spec}:rc               hash  transaction_id -> how many sg: sets hold it; at 0 it is
                                   forgotten (log, lb)
    <p>{spec}:lb               hash  transaction_id -> "0" | "1", the latest label
    <p>{spec}:seq              INCR counter: the arrival sequence

The record's done bit ``SPEC_DONE`` says this store holds the transaction: a call that failed
between the fast path's writes and this store's script is completed by the next call that
meets the transaction. ``apply_many``'s script is atomic; per row and key group it answers the
members of one rank range (``Group``: the events dated in (t - reach, t] and the last N before
a window's end are one contiguous range of the key's set) and, for groups that read labels,
their labels. A new layout (``prepare``, at engine load) indexes the log by its groups first,
after adding to it the transactions the fast path recorded while it served alone.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from typing import Any

from fraudflow.data.schema import AMOUNT, CUSTOMER_ID, TERMINAL_ID
from fraudflow.features.online import AnswerLists, Event
from fraudflow.features.spec_online import Answer, Group, Layout, Row, Stored
from fraudflow.serve.redis_shards import redis_client
from fraudflow.serve.state import SPEC_DONE, RedisStore, unpack_record

__all__ = ["SpecRedisStore"]

_BACKFILL_CHUNK = 500  # transactions per backfill script call

# Answers a query {key, hi_t, reach_t, {{end_t, n}, ...}, labels (0|1)} with {members, labels}.
# Times come as strings: Lua numbers print as %.14g, too few digits for epoch microseconds.
_ANSWER_LUA = """
local function id_of(m)
  local n = tonumber(string.sub(m, 21, 24))
  return string.sub(m, 25, 24 + n)
end
local function answer(prefix, q)
  local key = prefix .. 'sg:' .. q[1]
  local hi = redis.call('ZCOUNT', key, '-inf', q[2])
  if hi == 0 then return {{}, {}} end
  local lo = redis.call('ZCOUNT', key, '-inf', q[3])
  for _, l in ipairs(q[4]) do
    local start = redis.call('ZCOUNT', key, '-inf', l[1]) - l[2]
    if start < 0 then start = 0 end
    if start < lo then lo = start end
  end
  if lo >= hi then return {{}, {}} end
  local members = redis.call('ZRANGE', key, lo, hi - 1)
  local labels = {}
  if q[5] == 1 then
    for i = 1, #members, 1000 do
      local ids = {}
      for j = i, math.min(i + 999, #members) do ids[#ids + 1] = id_of(members[j]) end
      for _, flag in ipairs(redis.call('HMGET', prefix .. 'lb', unpack(ids))) do
        labels[#labels + 1] = flag
      end
    end
  end
  return {members, labels}
end
local function forget_member(prefix, m)
  local id = id_of(m)
  if redis.call('HINCRBY', prefix .. 'rc', id, -1) <= 0 then
    redis.call('HDEL', prefix .. 'rc', id)
    redis.call('HDEL', prefix .. 'log', id)
    redis.call('HDEL', prefix .. 'lb', id)
    return 1
  end
  return 0
end
local function forget_key(prefix, key, until_t, keep)
  local old = redis.call('ZCOUNT', key, '-inf', until_t)
  local gone = 0
  if old > keep then
    for _, m in ipairs(redis.call('ZRANGE', key, 0, old - keep - 1)) do
      gone = gone + forget_member(prefix, m)
    end
    redis.call('ZREMRANGEBYRANK', key, 0, old - keep - 1)
  end
  return gone
end
"""

# ARGV: prefix, queries JSON [[query per group], ...] per row. Returns JSON answers.
_READ_LUA = (
    _ANSWER_LUA
    + """
local out = {}
for i, qs in ipairs(cjson.decode(ARGV[2])) do
  local res = {}
  for g, q in ipairs(qs) do res[g] = answer(ARGV[1], q) end
  out[i] = res
end
return cjson.encode(out)
"""
)

# ARGV: prefix, forget_until_us, rows JSON [[id, t, customer, terminal, amount, member tail,
# columns JSON, [query per group], [keep per group]], ...]. Returns JSON: per row its answer,
# or 0 where its id is in the log already.
_APPLY_LUA = (
    _ANSWER_LUA
    + """
local prefix, forget = ARGV[1], ARGV[2]
local out, touched = {}, {}
for i, r in ipairs(cjson.decode(ARGV[3])) do
  local id, t = r[1], r[2]
  if redis.call('HEXISTS', prefix .. 'log', id) == 1 then
    out[i] = 0
  else
    local res = {}
    for g, q in ipairs(r[8]) do res[g] = answer(prefix, q) end
    out[i] = res
    local seq = string.format('%020d', redis.call('INCR', KEYS[1]))
    for g, q in ipairs(r[8]) do
      redis.call('ZADD', prefix .. 'sg:' .. q[1], t, seq .. r[6])
      touched[q[1]] = r[9][g]
    end
    redis.call('HSET', prefix .. 'rc', id, #r[8])
    redis.call('HSET', prefix .. 'log', id, cjson.encode({t, r[3], r[4], r[5], seq, r[7]}))
  end
end
for key, keep in pairs(touched) do forget_key(prefix, prefix .. 'sg:' .. key, forget, keep) end
return cjson.encode(out)
"""
)

# ARGV: prefix, entries JSON [[id, t, customer, terminal, amount, label], ...] in time order:
# the fast path's transactions, added to the log where absent.
_LOG_LUA = """
for _, e in ipairs(cjson.decode(ARGV[2])) do
  local log = ARGV[1] .. 'log'
  if redis.call('HEXISTS', log, e[1]) == 0 then
    local seq = string.format('%020d', redis.call('INCR', KEYS[1]))
    redis.call('HSET', log, e[1], cjson.encode({e[2], e[3], e[4], e[5], seq}))
    redis.call('HSET', ARGV[1] .. 'lb', e[1], e[6])
  end
end
return 0
"""

# ARGV: prefix, entries JSON [[key, t, member, id], ...]: index logged transactions.
_BACKFILL_LUA = """
for _, e in ipairs(cjson.decode(ARGV[2])) do
  if redis.call('ZADD', ARGV[1] .. 'sg:' .. e[1], e[2], e[3]) == 1 then
    redis.call('HINCRBY', ARGV[1] .. 'rc', e[4], 1)
  end
end
return 0
"""

# ARGV: prefix, until_us, [[key, keep], ...]. Returns how many transactions were forgotten.
_PRUNE_LUA = (
    _ANSWER_LUA
    + """
local gone = 0
for _, k in ipairs(cjson.decode(ARGV[3])) do
  gone = gone + forget_key(ARGV[1], k[1], ARGV[2], k[2])
end
return gone
"""
)


class SpecRedisStore:
    """A ``SpecStore`` in Redis or a Redis Cluster, shared by service replicas (module
    docstring).

    Thread-safe: redis-py's clients draw connections from a pool.
    """

    def __init__(self, url: str, *, prefix: str = "fraudflow:") -> None:
        self.prefix = prefix + "{spec}:"
        self._fast = RedisStore(url, prefix=prefix)
        self._client = redis_client(url)
        self._seq = self.prefix + "seq"  # declared to Redis, so cluster clients route to the slot
        self._read = self._client.register_script(_READ_LUA)
        self._apply = self._client.register_script(_APPLY_LUA)
        self._backfill = self._client.register_script(_BACKFILL_LUA)
        self._log = self._client.register_script(_LOG_LUA)
        self._prune = self._client.register_script(_PRUNE_LUA)

    def prepare(self, layout: Layout) -> None:
        """Index every transaction of the log by ``layout``'s key groups (idempotent)."""
        self._log_fast_path()
        entries: list[list[Any]] = []
        for tid, logged in self._logged():
            row = _logged_row(tid, logged)
            if row is None:  # logged before the log kept amounts: it cannot be indexed
                continue
            seq, tail = row
            for group in layout.groups:
                entries.append([_group_key(group, tail[1]), tail[0], seq + tail[2], tid])
            if len(entries) >= _BACKFILL_CHUNK:
                self._backfill(keys=[self._seq], args=[self.prefix, json.dumps(entries)])
                entries = []
        if entries:
            self._backfill(keys=[self._seq], args=[self.prefix, json.dumps(entries)])

    def apply_many(
        self, rows: Sequence[Row], layout: Layout, *, forget_until_us: int
    ) -> list[Answer | None]:
        if not rows:
            return []
        events = [_event(row) for row in rows]
        fresh, wanted = self._fast.apply_claimed(
            events, (), AnswerLists((), len(rows)), forget_until_us=forget_until_us,
            also_done=SPEC_DONE,
        )  # fmt: skip
        payload, at = [], []
        for i, row in enumerate(rows):
            if not wanted[i]:
                continue
            columns = _columns_json(row.columns)
            e = events[i]
            payload.append([
                row.transaction_id, str(row.t_us), e.customer_id, e.terminal_id, repr(e.amount),
                _member_tail(row.transaction_id, row.t_us, columns), columns,
                _queries(row, layout), [g.keep for g in layout.groups],
            ])  # fmt: skip
            at.append(i)
        out: list[Answer | None] = [None] * len(rows)
        if payload:
            args = [self.prefix, str(forget_until_us), json.dumps(payload)]
            reply = _listed(json.loads(self._apply(keys=[self._seq], args=args)))
            for i, a in zip(at, reply, strict=True):
                if fresh[i] and a != 0:
                    out[i] = _answer(a, None)
            self._fast.mark_done([rows[i].transaction_id for i in at], SPEC_DONE)
        return out

    def read(self, rows: Sequence[Row], layout: Layout) -> list[Answer]:
        queries = [_queries(row, layout) for row in rows]
        reply = json.loads(self._read(keys=[self._seq], args=[self.prefix, json.dumps(queries)]))
        return [_answer(a, row.transaction_id) for a, row in zip(_listed(reply), rows, strict=True)]

    def set_label(self, transaction_id: str, is_fraud: bool) -> bool:
        # The log may keep a transaction the fast path forgot (among a key's last N).
        fast = self._fast.set_label(transaction_id, is_fraud)
        if not self._client.hexists(self.prefix + "log", transaction_id):
            return fast
        self._client.hset(self.prefix + "lb", transaction_id, "1" if is_fraud else "0")
        return True

    def prune(self, layout: Layout, until_us: int) -> int:
        gone = 0
        for group in layout.groups:
            pattern = _glob_escape(f"{self.prefix}sg:{json.dumps(list(group.by))}:") + "*"
            keys = [[k.decode(), group.keep] for k in self._client.scan_iter(match=pattern)]
            for start in range(0, len(keys), _BACKFILL_CHUNK):
                chunk = json.dumps(keys[start : start + _BACKFILL_CHUNK])
                gone += int(self._prune(keys=[self._seq], args=[self.prefix, until_us, chunk]))
        return gone

    def close(self) -> None:
        self._fast.close()
        self._client.close()

    def __enter__(self) -> SpecRedisStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _logged(self) -> Iterator[tuple[str, str]]:
        for tid, logged in self._client.hscan_iter(self.prefix + "log", count=1000):
            yield tid.decode(), logged.decode()

    def _log_fast_path(self) -> None:
        """Add to the log the transactions the fast path's records hold (time order)."""
        found = []
        for tid, packed, label in self._fast.records():
            t_us, amount, customer_id, terminal_id = unpack_record(packed)
            found.append([tid, str(t_us), customer_id, terminal_id, repr(amount), label])
        found.sort(key=lambda e: int(e[1]))
        for start in range(0, len(found), _BACKFILL_CHUNK):
            chunk = json.dumps(found[start : start + _BACKFILL_CHUNK])
            self._log(keys=[self._seq], args=[self.prefix, chunk])


def _event(row: Row) -> Event:
    c = row.columns
    amount = float(c[AMOUNT])  # type: ignore[arg-type]
    return Event(row.transaction_id, row.t_us, str(c[CUSTOMER_ID]), str(c[TERMINAL_ID]), amount)


def _columns_json(columns: dict[str, Any]) -> str:
    return json.dumps(columns, sort_keys=True, separators=(",", ":"))


def _member_tail(tid: str, t_us: int, columns: str) -> str:
    """A member of a key group's set, but its leading sequence number."""
    return f"{len(tid):04d}{tid}{t_us}|{columns}"


def _group_key(group: Group, columns: dict[str, Any]) -> str:
    key = [columns.get(c) for c in group.by]
    return f"{json.dumps(list(group.by))}:{json.dumps(key)}"


def _logged_row(tid: str, logged: str) -> tuple[str, tuple[str, dict[str, Any], str]] | None:
    """(seq, (t_us, columns, member tail)) of a ``tx`` log entry; None if it has no amount."""
    entry = json.loads(logged)
    if len(entry) < 5:
        return None
    t, customer, terminal, amount, seq = entry[:5]
    if len(entry) > 5:
        text = entry[5]
        columns = json.loads(text)
    else:  # recorded by the fast path: the canonical columns only
        columns = {CUSTOMER_ID: customer, TERMINAL_ID: terminal, AMOUNT: float(amount)}
        text = _columns_json(columns)
    return seq, (str(t), columns, _member_tail(tid, int(t), text))


def _queries(row: Row, layout: Layout) -> list[list[Any]]:
    t = row.t_us
    return [
        [_group_key(g, row.columns), str(t), str(t - g.reach_us),
         [[str(t - offset), n] for offset, n in g.last], 1]
        for g in layout.groups
    ]  # fmt: skip


def _listed(reply: Any) -> list[Any]:
    return reply if isinstance(reply, list) else []  # cjson writes [] as {}


def _answer(groups: Any, leave_out: str | None) -> Answer:
    out = []
    for members, labels in _listed(groups):
        flags = _listed(labels)
        stored = []
        for k, member in enumerate(_listed(members)):
            n = int(member[20:24])
            tid = member[24 : 24 + n]
            if tid == leave_out:
                continue
            t, _, columns = member[24 + n :].partition("|")
            label = 1 if k < len(flags) and flags[k] == "1" else 0
            stored.append(Stored(int(t), int(member[:20]), tid, json.loads(columns), label))
        out.append(stored)
    return out


def _glob_escape(text: str) -> str:
    """``text`` as a literal in a Redis SCAN MATCH pattern."""
    return "".join("\\" + c if c in "*?[]\\" else c for c in text)
