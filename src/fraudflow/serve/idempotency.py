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
import logging
import time
from collections.abc import Sequence
from typing import Protocol

from fraudflow.serve.audit import AuditLog, DecisionRecord
from fraudflow.serve.redis_shards import Command, Shards, redis_client
from fraudflow.serve.replay_record import COMPACT, Vocabulary, pack_response, unpack_response

__all__ = [
    "AuditLedger",
    "DecisionLedger",
    "PendingDecisions",
    "RedisLedger",
    "resolve_duplicate",
]

log = logging.getLogger(__name__)


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
    slot of the transaction's state record (``fraudflow.serve.state``), packed small
    (``fraudflow.serve.replay_record``: the numbers of the response in binary; what every
    response of a model shares, once per model in ``<prefix>{v:<reference>}``).

    Written with SET NX (the first answer stays) and kept ``ttl_seconds``, the idempotency
    window; a repeat after it finds the state's record (while the state keeps it) but no
    response, and is decided again from the state (``resolve_duplicate``). A vocabulary is
    kept a day longer than the last record written with it.
    """

    def __init__(self, url: str, *, ttl_seconds: int, prefix: str = "fraudflow:") -> None:
        self._client = redis_client(url)
        self._shards = Shards(self._client)
        self._prefix = prefix
        self._ttl = ttl_seconds
        self._read: dict[bytes, Vocabulary] = {}  # by reference: those met reading
        # By model: this process's vocabularies; None where another vocabulary holds the
        # reference (its responses are stored whole then).
        self._written: dict[tuple[str, tuple[str, ...]], Vocabulary | None] = {}

    def key(self, transaction_id: str) -> str:
        return f"{self._prefix}{{t:{transaction_id}}}r"

    def vocabulary_key(self, ref: bytes) -> str:
        return f"{self._prefix}{{v:{ref.hex()}}}"

    def get(self, transaction_id: str) -> bytes | None:
        found = self._client.get(self.key(transaction_id))
        if found is None:
            return None
        body = unpack_response(transaction_id, bytes(found), self._vocabulary)  # type: ignore[arg-type]
        if body is None:
            log.error("the replay record of %r names a vocabulary Redis no longer holds",
                      transaction_id)  # fmt: skip
        return body

    def put(self, records: Sequence[DecisionRecord]) -> None:
        """Record the responses; the audit writer calls it after each commit (one round trip
        per node)."""
        calls: list[Command] = []
        used: dict[bytes, Vocabulary] = {}
        for r in records:
            vocabulary = self._vocabulary_of(r.model_version, r.feature_names)
            packed = pack_response(r.transaction_id, r.response, vocabulary)
            if vocabulary is not None and packed[0] & COMPACT:
                used[vocabulary.ref] = vocabulary
            key = self.key(r.transaction_id)
            calls.append((key, ("SET", key, packed, "NX", "EX", self._ttl)))
        for ref, vocabulary in used.items():  # outlives the records just written
            key = self.vocabulary_key(ref)
            calls.append((key, ("SET", key, vocabulary.content, "EX", self._ttl + _DAY)))
        self._shards.run(calls)

    def close(self) -> None:
        self._client.close()

    def _vocabulary(self, ref: bytes) -> Vocabulary | None:
        found = self._read.get(ref)
        if found is None:
            content = self._client.get(self.vocabulary_key(ref))
            if content is None:
                return None
            found = Vocabulary.parse(bytes(content))  # type: ignore[arg-type]
            if found.ref != ref:
                raise ValueError(f"vocabulary {ref.hex()} in Redis holds another one")
            self._read[ref] = found
        return found

    def _vocabulary_of(self, model_version: str, names: Sequence[str]) -> Vocabulary | None:
        """This model's vocabulary, stored in Redis the first time (SET NX; None if another
        one holds its reference: a hash collision)."""
        model = (model_version, tuple(names))
        if model in self._written:
            return self._written[model]
        vocabulary = Vocabulary(*model)
        key = self.vocabulary_key(vocabulary.ref)
        self._client.set(key, vocabulary.content, nx=True, ex=self._ttl + _DAY)
        kept = vocabulary if self._client.get(key) == vocabulary.content else None
        if kept is None:
            log.warning("vocabulary %s of model %r: the reference is taken; its responses are "
                        "kept whole", key, model_version)  # fmt: skip
        self._written[model] = kept
        return kept


_DAY = 86_400


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
