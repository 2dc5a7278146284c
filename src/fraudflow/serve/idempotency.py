"""Idempotent decisions: a transaction_id sent again gets the recorded answer.

The state store is the arbiter: ``StateStore.apply`` stores each transaction_id once and
raises on a duplicate, atomically, across replicas. A request whose apply was refused answers
with the decision recorded for the first one, looked up in this order:

1. ``PendingDecisions``: the first request is in this process, between its apply and its audit
   commit; wait for it.
2. The ledgers: with SQLite state, the audit log (its ``decision_ids`` are unique by
   transaction_id; every process sharing the state shares it); with Redis state, Redis
   (``RedisLedger``, written right after each audit commit with SET NX and kept for the
   idempotency window), so replicas on other hosts find it; then this replica's own audit log.
3. Not yet there: another process may be committing it; poll for ``wait_seconds``. Not when
   this process itself failed to record it (``PendingDecisions.failed``): nobody else will.

None found: the first request's decision was lost between its apply and its commit (a failed
audit commit, a crash); no answer of it was sent. ``resolve_duplicate`` returns None and the
service decides it again (``DecisionService``), so the retry completes the missing half.
Each request resolves its own duplicates, outside the coalesced group: a wait here holds up
no other request. One race is left: should another process's first request still commit
after ``wait_seconds`` (a disk stalled that long), both decisions are recorded; the audit
log's first one per id wins on lookups in its shard, Redis's SET NX across replicas.
"""

from __future__ import annotations

import asyncio
import collections
import time
import zlib
from collections.abc import Sequence
from typing import Protocol

from fraudflow.serve.audit import AuditLog, DecisionRecord
from fraudflow.serve.redis_shards import Command, Shards, redis_client

__all__ = [
    "AuditLedger",
    "DecisionLedger",
    "PendingDecisions",
    "RedisLedger",
    "pack_response",
    "resolve_duplicate",
    "unpack_response",
]


class DecisionLedger(Protocol):
    """Where recorded responses are found by transaction_id."""

    def get(self, transaction_id: str) -> bytes | None: ...


class AuditLedger:
    """The audit log itself as the ledger (SQLite state: same host, same files)."""

    def __init__(self, audit: AuditLog) -> None:
        self._audit = audit

    def get(self, transaction_id: str) -> bytes | None:
        return self._audit.lookup(transaction_id)


class RedisLedger:
    """Responses in Redis or a Redis Cluster, shared by replicas: ``<prefix>{t:<id>}r``, in the
    slot of the transaction's state record (``fraudflow.serve.state``), compressed
    (``pack_response``).

    Written with SET NX (the first answer stays) and kept ``ttl_seconds``, the idempotency
    window; a repeat after it finds the state's record (while the state keeps it) but no
    response, and is decided again from the state (``resolve_duplicate``).
    """

    def __init__(self, url: str, *, ttl_seconds: int, prefix: str = "fraudflow:") -> None:
        self._client = redis_client(url)
        self._shards = Shards(self._client)
        self._prefix = prefix
        self._ttl = ttl_seconds

    def key(self, transaction_id: str) -> str:
        return f"{self._prefix}{{t:{transaction_id}}}r"

    def get(self, transaction_id: str) -> bytes | None:
        found = self._client.get(self.key(transaction_id))
        return None if found is None else unpack_response(bytes(found))  # type: ignore[arg-type]

    def put(self, records: Sequence[DecisionRecord]) -> None:
        """Record the responses; the audit writer calls it after each commit (one round trip
        per node)."""
        calls: list[Command] = []
        for r in records:
            key = self.key(r.transaction_id)
            calls.append((key, ("SET", key, pack_response(r.response), "NX", "EX", self._ttl)))
        self._shards.run(calls)

    def close(self) -> None:
        self._client.close()


# What responses are made of (DecisionOut's keys and usual values), as a preset dictionary:
# a response then compresses to its numbers and names. Changing it needs a new format byte.
_RESPONSE_WORDS = (
    b'"model_version":"","kind":"rule","kind":"threshold","detail":"score above the review '
    b'threshold","decision":"review","decision":"block","reasons":[],'
    b'terminal__fraud_rate__1d","terminal__fraud_rate__7d","terminal__fraud_rate__30d",'
    b'"customer__small_count__1d","customer__mean_amount__1h","customer__count__1h",'
    b'"customer__count__7d","customer__mean_amount__7d","customer__count__1d",'
    b'"customer__hours_since_prev","customer__amount_ratio__30d","tx__log_amount","tx__hour",'
    b' lowered the fraud log-odds by 0.","value":1.0,"contribution":-0.'
    b'},{"kind":"feature","name":"customer__mean_amount__1d","detail":"customer__mean_amount__'
    b' raised the fraud log-odds by 1.","value":3.0,"contribution":1.'
    b'},{"kind":"feature","name":"customer__count__30d","detail":"customer__count__30d = '
    b'"decision":"approve","reasons":[{"kind":"feature","name":"customer__mean_amount__30d",'
    b'"detail":"customer__mean_amount__30d = '
    b'{"transaction_id":"","score":0.00'
)
_FORMAT = b"\x02"  # raw DEFLATE with _RESPONSE_WORDS


def pack_response(body: bytes) -> bytes:
    """A response body, compressed for Redis."""
    packer = zlib.compressobj(9, zlib.DEFLATED, -15, 9, zdict=_RESPONSE_WORDS)
    return _FORMAT + packer.compress(body) + packer.flush()


def unpack_response(packed: bytes) -> bytes:
    if packed[:1] != _FORMAT:  # written by another version: not a response this one reads
        raise ValueError(f"unknown response format {packed[:1]!r} in Redis")
    unpacker = zlib.decompressobj(-15, zdict=_RESPONSE_WORDS)
    return unpacker.decompress(packed[1:]) + unpacker.flush()


class PendingDecisions:
    """Decisions of this process applied to the state but not yet committed to the audit.

    One future per group decided together (a batch: thousands of transactions), whose result
    maps each of its transaction_ids to its response body: a future per transaction, made
    and resolved for each, would cost a noticeable share of a batched decision.
    """

    def __init__(self, *, remember_failed: int = 100_000) -> None:
        self._groups: dict[str, asyncio.Future[dict[str, bytes]]] = {}
        # Ids whose record this process failed to commit, the latest ones: their retries
        # need not wait for another process to record them.
        self._failed: collections.OrderedDict[str, None] = collections.OrderedDict()
        self._remember_failed = remember_failed

    def add(self, transaction_ids: Sequence[str]) -> asyncio.Future[dict[str, bytes]]:
        """Mark the ids pending; pass the returned future to ``resolve`` or ``fail``."""
        future: asyncio.Future[dict[str, bytes]] = asyncio.get_running_loop().create_future()
        self._groups.update(dict.fromkeys(transaction_ids, future))
        return future

    def get(self, transaction_id: str) -> asyncio.Future[dict[str, bytes]] | None:
        """The future of the group that holds the id; its result is indexed by id."""
        return self._groups.get(transaction_id)

    def resolve(
        self,
        future: asyncio.Future[dict[str, bytes]],
        transaction_ids: Sequence[str],
        bodies: Sequence[bytes],
    ) -> None:
        self._forget(transaction_ids)
        for tid in transaction_ids if self._failed else ():
            self._failed.pop(tid, None)
        future.set_result(dict(zip(transaction_ids, bodies, strict=True)))

    def fail(
        self,
        future: asyncio.Future[dict[str, bytes]],
        transaction_ids: Sequence[str],
        error: BaseException,
    ) -> None:
        self._forget(transaction_ids)
        future.set_exception(error)
        future.exception()  # retrieved: waiters re-raise it; nobody waiting is fine too
        failed = self._failed
        failed.update(dict.fromkeys(transaction_ids))
        while len(failed) > self._remember_failed:
            failed.popitem(last=False)

    def failed(self, transaction_id: str) -> bool:
        """This process applied the id but failed to record its decision (recently)."""
        return transaction_id in self._failed

    def _forget(self, transaction_ids: Sequence[str]) -> None:
        groups = self._groups
        for tid in transaction_ids:
            del groups[tid]


async def resolve_duplicate(
    transaction_id: str,
    *,
    pending: PendingDecisions,
    ledgers: Sequence[DecisionLedger],
    wait_seconds: float,
) -> bytes | None:
    """The recorded response for a refused duplicate, or None if none appears in time.

    Raises what the pending first request raised, if it fails.
    """
    future = pending.get(transaction_id)
    if future is not None:
        return (await asyncio.shield(future))[transaction_id]
    if pending.failed(transaction_id):
        wait_seconds = 0.0
    deadline = time.monotonic() + wait_seconds
    delay = 0.002
    while True:
        for ledger in ledgers:  # in a thread: a disk or Redis may be slow
            found = await asyncio.to_thread(ledger.get, transaction_id)
            if found is not None:
                return found
        if time.monotonic() >= deadline:
            return None
        await asyncio.sleep(delay)
        delay = min(2 * delay, 0.1)
