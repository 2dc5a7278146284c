"""The decision service core: ``DecisionService`` and what it needs.

``DecisionService`` owns the long-lived pieces (state store, audit log, idempotency ledgers,
the current ``Engine``, metrics) and runs a request through them:

    features (state apply: atomic, refuses a duplicate) -> model -> policy
    -> audit append (group commit, durable) -> response

Every call that may wait on a disk or on Redis (the state store, ledger lookups, labels, the
audit commit) runs off the event loop, in a thread or the audit writer: a frozen disk or a
dead Redis fails or delays the requests that need them, never ``/healthz``, ``/readyz`` or the
loop. A coalesced group pays one thread hop for its state call, not one per request. The model
and the policy (pure CPU) run on the loop. Model loads (start-up, reload) run in a thread, so
serving goes on meanwhile.

The state update and the decision's audit record are two commits. If the second fails (or the
process dies between them), the transaction is in the state with no decision recorded and no
answer sent; a retry of it finds no record and decides it again from the state
(``_redecide``), so the missing half is always completed by the next retry.

Errors raised here are ``ServeError``s with a fixed detail string; ``fraudflow.serve.app``
turns them into responses. Their causes go to the log, never to the client.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from fraudflow.errors import ConfigError, DataError, RunCheckError, ServeError
from fraudflow.features.online import (
    Answers,
    Event,
    StateStore,
    Watermark,
    Window,
    epoch_us,
)
from fraudflow.features.spec_online import Answer, Layout, Row, SpecStore
from fraudflow.files import write_json_atomic
from fraudflow.serve.audit import AuditLog, DecisionRecord, LabelRecord, ShadowRecord, now_us
from fraudflow.serve.auth import ApiKeys
from fraudflow.serve.cases import CaseIn
from fraudflow.serve.coalesce import Coalescer
from fraudflow.serve.health import AUDIT_LOG, STATE_STORE, FolderProbe, Health, RedisProbe
from fraudflow.serve.history_state import HistoryStore, open_history
from fraudflow.serve.idempotency import (
    AuditLedger,
    DecisionLedger,
    PendingDecisions,
    RedisLedger,
    resolve_duplicate,
)
from fraudflow.serve.metrics import ScoreDrift, ServiceMetrics, observe_many
from fraudflow.serve.redis_shards import is_redis_url
from fraudflow.serve.runcheck import refusal, verify_run
from fraudflow.serve.schemas import LabelIn, TransactionIn
from fraudflow.serve.scoring import Engine, Judgements, Recorded, load_engine
from fraudflow.serve.sequence_scoring import Windows
from fraudflow.serve.settings import ServeSettings, parse_splits
from fraudflow.serve.shadow import (
    DRAIN_SECONDS,
    Challenger,
    Lineup,
    ShadowResult,
    ShadowSink,
    describe,
    load_challenger,
    shadow_entries,
    shares,
    split_rows,
)
from fraudflow.serve.spec_state import open_spec_store
from fraudflow.serve.state import open_store, sqlite_file

__all__ = [
    "ACTIVE_MODEL_FILE",
    "CaseOpener",
    "DecisionService",
    "EngineLoader",
    "TimedSpecStore",
    "TimedStore",
]

log = logging.getLogger(__name__)

# Written by a reload, watched by the other workers of a multi-worker server.
ACTIVE_MODEL_FILE = "active_model.json"

EngineLoader = Callable[[Path, StateStore], Engine]
# Opens the review console's cases of decisions (``CaseStore.open_cases``); returns how many.
CaseOpener = Callable[[Sequence[CaseIn]], int]


# The reload's answer when a challenger cannot be fed by the champion's online features.
CHALLENGER_REFUSED = (
    "reload refused: a challenger reads features the champion's online engine does not compute"
)
# How long a request waits for a worker that is still loading its model before a 503.
READY_WAIT_SECONDS = 10.0


def _not_ready() -> ServeError:
    return ServeError(503, "model not loaded", "not_ready")


def _store_failed() -> ServeError:
    return ServeError(503, "feature state store unavailable", "state_store")


def _audit_failed() -> ServeError:
    return ServeError(503, "audit log unavailable", "audit")


class TimedStore:
    """A ``StateStore`` that reports each call's latency (``fraudflow_state_store_...``)."""

    def __init__(
        self,
        store: StateStore,
        metrics: ServiceMetrics,
        *,
        spec: SpecStore | None = None,
        history: HistoryStore | None = None,
    ) -> None:
        self.inner = store
        # The spec engine's store over the same state (``fraudflow.serve.spec_state``), for
        # bundles of another spec than the default one.
        self.spec = spec
        # The cards' last events, for sequence models (``fraudflow.serve.history_state``).
        self.history = history
        self._apply = metrics.store_latency.labels(operation="apply")
        self._read = metrics.store_latency.labels(operation="read")
        self._label = metrics.store_latency.labels(operation="set_label")
        self._prune = metrics.store_latency.labels(operation="prune")

    def read(self, events: Sequence[Event], windows: Sequence[Window]) -> Answers:
        with self._read.time():
            return self.inner.read(events, windows)

    def apply_many(
        self, events: Sequence[Event], windows: Sequence[Window], *, forget_until_us: int
    ) -> Answers:
        # One call serves a whole batch: its time per event keeps the histogram (and the
        # FraudflowStateStoreSlow alert) about what a decision costs, whatever the batch size.
        started = time.perf_counter()
        try:
            return self.inner.apply_many(events, windows, forget_until_us=forget_until_us)
        finally:
            self._apply.observe((time.perf_counter() - started) / max(1, len(events)))

    def set_label(self, transaction_id: str, is_fraud: bool) -> bool:
        with self._label.time():
            return self.inner.set_label(transaction_id, is_fraud)

    def prune(self, until_us: int) -> int:
        with self._prune.time():
            return self.inner.prune(until_us)

    def close(self) -> None:
        self.inner.close()
        if self.spec is not None:
            self.spec.close()
        if self.history is not None:
            self.history.close()


class TimedSpecStore:
    """A ``SpecStore`` that reports each call's latency as ``TimedStore`` does (the same
    histogram and operations), for runs served by the spec engine."""

    def __init__(self, store: SpecStore, metrics: ServiceMetrics) -> None:
        self.inner = store
        self._apply = metrics.store_latency.labels(operation="apply")
        self._read = metrics.store_latency.labels(operation="read")
        self._label = metrics.store_latency.labels(operation="set_label")
        self._prune = metrics.store_latency.labels(operation="prune")

    def prepare(self, layout: Layout) -> None:
        self.inner.prepare(layout)

    def apply_many(
        self, rows: Sequence[Row], layout: Layout, *, forget_until_us: int
    ) -> list[Answer | None]:
        started = time.perf_counter()  # per event, as TimedStore.apply_many
        try:
            return self.inner.apply_many(rows, layout, forget_until_us=forget_until_us)
        finally:
            self._apply.observe((time.perf_counter() - started) / max(1, len(rows)))

    def read(self, rows: Sequence[Row], layout: Layout) -> list[Answer]:
        with self._read.time():
            return self.inner.read(rows, layout)

    def set_label(self, transaction_id: str, is_fraud: bool) -> bool:
        with self._label.time():
            return self.inner.set_label(transaction_id, is_fraud)

    def prune(self, layout: Layout, until_us: int) -> int:
        with self._prune.time():
            return self.inner.prune(layout, until_us)

    def close(self) -> None:
        self.inner.close()


@dataclass
class _Resources:
    store: TimedStore
    audit: AuditLog
    ledgers: list[DecisionLedger]
    redis_ledger: RedisLedger | None


def default_loader(settings: ServeSettings) -> EngineLoader:
    # One watermark for every engine loaded: a reload does not restart it.
    watermark = Watermark(max_skew_us=round(settings.max_clock_skew_seconds * 1e6))

    def load(run_dir: Path, store: StateStore) -> Engine:
        spec_store = store.spec if isinstance(store, TimedStore) else None
        history = store.history if isinstance(store, TimedStore) else None
        return load_engine(
            run_dir, store=store, policy_path=settings.policy, watermark=watermark,
            spec_store=spec_store, history_store=history,
        )  # fmt: skip

    return load


class DecisionService:
    """The decision service's state and request handling (see the module docstring)."""

    def __init__(
        self,
        settings: ServeSettings,
        *,
        metrics: ServiceMetrics,
        keys: ApiKeys,
        loader: EngineLoader | None = None,
        open_cases: CaseOpener | None = None,
    ) -> None:
        self.settings = settings
        self._open_cases = open_cases  # the review console's cases; None: no console
        self.metrics = metrics
        self.keys = keys
        self.engine: Engine | None = None  # swapped whole on reload; read once per request
        # The challengers scored beside ``engine`` (fraudflow.serve.shadow); swapped with it.
        self.lineup: Lineup | None = None
        # Lineups swapped out whose shadow lanes may still be recording: drained on close.
        self._retired: list[Lineup] = []
        # The split shares served (run -> share of cards): --split, then as a reload sets it.
        self._splits = parse_splits(settings.split)
        self.failed = False  # the start-up load failed: /readyz says so
        self._loader = loader or default_loader(settings)
        self._resources: _Resources | None = None
        self._pending = PendingDecisions()
        self._coalescer: Coalescer[TransactionIn, bytes | _Duplicate] = Coalescer(
            self._decide_coalesced
        )
        self._drift: ScoreDrift | None = None
        self._reload_lock = asyncio.Lock()
        self._loaded = asyncio.Event()  # set once start() has finished, loaded or failed
        self._control = settings.data_folder / ACTIVE_MODEL_FILE
        self._control_seen = _mtime(self._control)
        self._closing = False
        # Set while the store or the audit log cannot be opened: the error requests get.
        self._unopened: ServeError | None = None
        state_file = sqlite_file(settings.state, default_path=settings.state_default_path)
        self._state_folder = None if state_file is None else state_file.parent
        self._audit_folder = settings.audit_path.parent
        state_probe: FolderProbe | RedisProbe
        if state_file is None:
            assert settings.state is not None  # a redis URL: anything else names a file
            state_probe = RedisProbe(settings.state)
        else:
            state_probe = FolderProbe(state_file.parent)
        self.health = Health(
            {STATE_STORE: [state_probe], AUDIT_LOG: [FolderProbe(self._audit_folder)]},
            stall_seconds=settings.health_stall_seconds,
        )

    # --- life cycle -----------------------------------------------------------------------

    async def start(self) -> None:
        """Open the store and the audit log, trying again while they fail (a read-only or
        full disk, Redis down), then load the model; each in a thread."""
        try:
            resources = await self._open_when_possible()
            if resources is None:  # closed meanwhile
                return
            self._resources = resources
            announced = await asyncio.to_thread(self._announced_run)
            s = self.settings
            run, challengers, splits = announced or (s.run, s.challenger_runs, self._splits)
            engine = await asyncio.to_thread(self._load, run)
            # Verified by run_server before the workers start, as the champion.
            lineup = await asyncio.to_thread(
                self._load_lineup, engine, challengers, splits, verify=False
            )
            self._swap(engine, lineup, splits)
        except Exception:
            self.failed = True
            self.metrics.errors.labels(kind="reload").inc()
            log.exception("the decision service could not start")
        finally:
            self._loaded.set()

    async def _open_when_possible(self) -> _Resources | None:
        every = self.settings.health_probe_seconds
        while not self._closing:
            try:
                resources = await asyncio.to_thread(self._open)
            except Exception:
                failing = self.health.problems()
                self._unopened = _store_failed() if STATE_STORE in failing else _audit_failed()
                if not self._loaded.is_set():  # once: then every try would log it
                    log.exception("the state store or the audit log cannot be opened (%s); "
                                  "trying again every %s s", failing, every)  # fmt: skip
                    self._loaded.set()  # requests need not wait: they get _unopened
                await asyncio.sleep(every)
                continue
            self._unopened = None
            return resources
        return None

    async def watch_health(self) -> None:
        """Probe the store and the audit log every ``health_probe_seconds`` (``Health``)."""
        while True:
            await asyncio.sleep(self.settings.health_probe_seconds)
            try:
                await asyncio.to_thread(self.health.probe_once)
            except Exception:  # a probe's own bug must not end the probing
                log.exception("the health probe failed")

    def readiness(self) -> tuple[int, dict[str, Any]]:
        """``/readyz``: status code and body, from memory only (never waits on a disk)."""
        problems = self.health.problems()
        if problems:
            return 503, {"status": "unavailable", "problems": problems}
        engine = self.engine
        if self.ready and engine is not None:
            return 200, {"status": "ready", "model_version": engine.model_version}
        return 503, {"status": "failed" if self.failed else "loading"}

    def stop_opening(self) -> None:
        """Shutting down: ``start`` stops trying to open the store and the audit log."""
        self._closing = True

    def close(self) -> None:
        self._closing = True
        self.metrics.model_changed(None)
        for lineup in [*self._retired, self.lineup]:  # their verdicts, before the audit closes
            if lineup is not None:
                lineup.close(DRAIN_SECONDS)
        self.health.close()
        if self._resources is not None:
            self._resources.audit.close()  # commits what is queued first
            self._resources.store.close()
            if self._resources.redis_ledger is not None:
                self._resources.redis_ledger.close()
        self.metrics.process_exiting()

    @property
    def ready(self) -> bool:
        return self.engine is not None and self._resources is not None

    def _open(self) -> _Resources:
        s = self.settings
        with self.health.watch(STATE_STORE, self._state_folder):
            opened = open_store(s.state, default_path=s.state_default_path)
            try:
                spec_store = open_spec_store(s.state, default_path=s.state_default_path)
            except BaseException:
                opened.close()
                raise
            try:
                history = open_history(s.state, sqlite_path=self._history_file())
            except BaseException:
                opened.close()
                spec_store.close()
                raise
        store = TimedStore(
            opened, self.metrics, spec=TimedSpecStore(spec_store, self.metrics), history=history
        )
        redis_ledger = None
        if s.state is not None and is_redis_url(s.state):
            redis_ledger = RedisLedger(s.state, ttl_seconds=s.idempotency_ttl_seconds)
        after_commit = redis_ledger.put if redis_ledger is not None else None
        try:
            with self.health.watch(AUDIT_LOG, self._audit_folder):
                audit = AuditLog(s.audit_path, after_commit=after_commit)
        except BaseException:
            store.close()
            if redis_ledger is not None:
                redis_ledger.close()
            raise
        ledgers: list[DecisionLedger] = [AuditLedger(audit)]
        if redis_ledger is not None:
            ledgers.insert(0, redis_ledger)
        return _Resources(store, audit, ledgers, redis_ledger)

    def _history_file(self) -> Path | None:
        """The SQLite file of the cards' histories, beside a SQLite state (None: Redis)."""
        s = self.settings
        state_file = sqlite_file(s.state, default_path=s.state_default_path)
        return None if state_file is None else state_file.with_name(state_file.stem + "-history.db")

    def _verify(self, run_dir: Path) -> None:
        verify_run(run_dir, timeout_seconds=self.settings.model_check_timeout_seconds)

    def _load(self, run_dir: Path) -> Engine:
        assert self._resources is not None
        return self._loader(Path(run_dir), self._resources.store)

    def _load_lineup(
        self,
        champion: Engine,
        runs: Sequence[Path],
        splits: Mapping[Path, float],
        *,
        verify: bool = True,
    ) -> Lineup | None:
        """The challengers of ``runs`` (those in ``splits`` deciding that share of cards),
        each verified as the champion is (``verify``), then loaded to score beside
        ``champion``; None without any."""
        if not runs:
            return None
        challengers: list[Challenger] = []
        for run, share in zip(runs, shares(runs, splits), strict=True):
            if verify:
                self._verify(run)
            policy = self.settings.policy
            challengers.append(load_challenger(run, champion, policy_path=policy, share=share))
        s = self.settings
        sink = ShadowSink(self._record_shadow, self.metrics.observe_challenger)
        return Lineup(champion, tuple(challengers), s.shadow_budget_seconds, s.split_salt, sink)

    def _record_shadow(self, records: Sequence[ShadowRecord]) -> None:
        """A shadow lane's verdicts to the audit writer, not waited for (a lane's thread or the
        event loop calls it); a failed commit leaves them ``missing`` and is logged."""
        resources = self._resources
        if resources is None or not records:
            return
        future = resources.audit.submit(records)
        future.add_done_callback(_log_shadow_failure)

    def _swap(self, engine: Engine, lineup: Lineup | None, splits: Mapping[Path, float]) -> None:
        # Two reference assignments with no await between: no request sees one without the
        # other; a request still on the old engine finds no lineup of its own (``_lineup_of``).
        self.engine = engine
        old, self.lineup, self._splits = self.lineup, lineup, dict(splits)
        if old is not None:
            old.close()  # its shadow lanes record what they hold, in the background
            self._retired = [r for r in self._retired if r.busy()] + [old]
        self.metrics.model_changed(engine.model_version)
        self.metrics.challengers_changed([c["model_version"] for c in describe(lineup)])
        s = self.settings
        self._drift = None
        if engine.reference is not None:  # scores of the old model are not this one's drift
            window, every = s.psi_window, s.psi_interval_seconds
            self._drift = ScoreDrift(engine.reference, window=window, interval_seconds=every)
        log.info("serving %s from %s (policy: %s)", engine.model_version, engine.run_dir,
                 engine.policy_source)  # fmt: skip
        for c in describe(lineup):
            log.info("challenger %s from %s (split share: %s)", c["model_version"], c["run"],
                     c["split"])  # fmt: skip

    # --- decisions ------------------------------------------------------------------------

    async def decide(self, tx: TransactionIn) -> bytes:
        """The response body for one transaction.

        Requests that arrive together are decided together (``_Coalescer``): one store
        transaction, one model call and one audit commit for all of them, each with its own
        answer or error, as if sent one by one in timestamp order. A duplicate is resolved by
        its own request, after the group: its wait holds up nobody else.
        """
        engine, resources = await self._ready_soon()
        answer = await self._coalescer.submit(tx)
        if isinstance(answer, _Duplicate):
            return await self._replay(engine, resources, answer)
        return answer

    async def decide_batch(self, txs: Sequence[TransactionIn]) -> bytes:
        """The batch response body: one decision per transaction, in request order.

        Transactions go through the state in timestamp order (stable for equal times), as
        one-by-one requests would, in one store transaction; the model scores them all in one
        call. If the store fails, nothing is applied and the request fails with 503.
        """
        engine, resources = await self._ready_soon()
        if engine.online.columns:  # the whole batch is refused before any of it is applied
            for k, tx in enumerate(txs):
                problem = engine.online.problem(tx.model_extra)
                if problem is not None:
                    raise ServeError(422, f"transactions[{k}]: {problem}", "validation")
        answers = await self._decide_many(engine, resources, txs)
        duplicates = {id(a): a for a in answers if isinstance(a, _Duplicate)}
        replayed: dict[int, bytes | ServeError] = {}
        if duplicates:  # concurrently: each may wait for another process's commit
            settled = await asyncio.gather(
                *(self._replay_or_error(engine, resources, d) for d in duplicates.values())
            )
            replayed = dict(zip(duplicates, settled, strict=True))
        bodies: list[bytes] = []
        for answer in answers:
            body = replayed[id(answer)] if isinstance(answer, _Duplicate) else answer
            if isinstance(body, ServeError):
                raise body
            bodies.append(body)
        return b'{"decisions":[' + b",".join(bodies) + b"]}"

    async def _decide_coalesced(
        self, txs: Sequence[TransactionIn]
    ) -> list[bytes | _Duplicate | ServeError]:
        engine, resources = self._ready()
        return await self._decide_many(engine, resources, txs)

    async def _decide_many(
        self, engine: Engine, resources: _Resources, txs: Sequence[TransactionIn]
    ) -> list[bytes | _Duplicate | ServeError]:
        """Per transaction, in request order: its response body, its error, or, for one the
        state already held, a ``_Duplicate`` for the caller to resolve (``_replay``)."""
        if engine.online.columns:
            problems = [engine.online.problem(tx.model_extra) for tx in txs]
            if any(p is not None for p in problems):
                return await self._decide_valid(engine, resources, txs, problems)
        events = [tx.event() for tx in txs]  # all valid (pydantic) before any is applied
        times = [e.t_us for e in events]
        order = sorted(range(len(txs)), key=times.__getitem__)  # stable: ties keep order
        tids = [events[i].transaction_id for i in order]
        # Each id's first occurrence in the order applied: built from the end, the first
        # assignment of an id is the one that stays.
        first_of = dict(zip(reversed(tids), reversed(order), strict=True))
        repeats = len(first_of) < len(txs)
        unique = order  # the first occurrences, in the order applied: all, the usual case
        if repeats:
            unique = [i for i, tid in zip(order, tids, strict=True) if first_of[tid] == i]
        extras = None
        if engine.online.columns:
            extras = [txs[i].model_extra for i in unique]
        features = await self._record(engine, [events[i] for i in unique], extras)
        answers: list[bytes | _Duplicate | ServeError | None] = [None] * len(txs)
        stored = features.fresh.tolist()
        fresh = [i for i, new in zip(unique, stored, strict=True) if new]
        if fresh:
            values = features.values if len(fresh) == len(unique) else features.values[stored]
            batch = _Fresh(
                fresh, [events[i] for i in fresh], [txs[i] for i in fresh], values,
                features.context,
            )  # fmt: skip
            await self._decide_fresh(engine, resources, batch, answers)
        if len(fresh) < len(unique):
            for i, new in zip(unique, stored, strict=True):
                if not new:  # already applied, by an earlier request
                    answers[i] = _Duplicate(events[i], txs[i])
        if repeats:  # a repeat within the request gets its first occurrence's answer
            answers = [answers[first_of[e.transaction_id]] for e in events]
        out = [a for a in answers if a is not None]
        assert len(out) == len(txs)  # every first occurrence was answered above
        return out

    async def _decide_valid(
        self,
        engine: Engine,
        resources: _Resources,
        txs: Sequence[TransactionIn],
        problems: Sequence[str | None],
    ) -> list[bytes | _Duplicate | ServeError]:
        """``_decide_many`` of the transactions whose extra columns are valid; the others
        (requests coalesced with them) get their 422."""
        valid = [i for i, p in enumerate(problems) if p is None]
        decided = (
            await self._decide_many(engine, resources, [txs[i] for i in valid]) if valid else []
        )
        out: list[bytes | _Duplicate | ServeError] = [
            ServeError(422, p, "validation") for p in problems if p is not None
        ]
        answers = dict(zip(valid, decided, strict=True))
        invalid = iter(out)
        return [answers[i] if i in answers else next(invalid) for i in range(len(txs))]

    async def _decide_fresh(
        self,
        engine: Engine,
        resources: _Resources,
        batch: _Fresh,
        answers: list[Any],
        *,
        pending: asyncio.Future[dict[str, bytes]] | None = None,
    ) -> None:
        """Score the applied transactions at once, record them, fill in their answers.

        ``pending``: the ids' ``PendingDecisions`` future if the caller made it already.
        """
        tids = [e.transaction_id for e in batch.events]
        if pending is None:
            pending = self._pending.add(tids)
        try:
            amounts = [e.amount for e in batch.events]
            lineup = self._lineup_of(engine)
            if lineup is None:
                judged = engine_judged = engine.judge(batch.values, amounts, batch.context)
                shadow = None
            else:
                judged, engine_judged, shadow = await self._judge_with_challengers(
                    lineup, batch, amounts
                )
            # One clock read for the group, decided together.
            decided_at_us = now_us()
            records = _records(engine, batch, judged, decided_at_us=decided_at_us)
            if lineup is not None and shadow is not None:
                records = _with_shadow(records, batch, shadow, lineup)
            await self._commit(resources, records)
        except BaseException as exc:
            self._pending.fail(pending, tids, exc)
            raise
        bodies = [record.response for record in records]
        self._pending.resolve(pending, tids, bodies)
        if lineup is not None:  # committed: the shadow verdicts come in a later commit
            lineup.score_in_shadow(batch.values, amounts, tids, engine_judged.actions)
        await self._open_review_cases(batch, judged, decided_at_us)
        for i, body in zip(batch.indices, bodies, strict=True):
            answers[i] = body
        self._observe(judged)

    def _lineup_of(self, engine: Engine) -> Lineup | None:
        lineup = self.lineup
        return lineup if lineup is not None and lineup.champion is engine else None

    async def _judge_with_challengers(
        self, lineup: Lineup, batch: _Fresh, amounts: list[float]
    ) -> tuple[Judgements, Judgements, list[dict[str, Any]]]:
        """The judgements answered (the champion's, with the rows a challenger's split share
        holds decided by that challenger), the champion's own, and each decision's shadow
        entry. The split challengers start first, in their lanes, and are waited for at most
        the budget after the champion is done; the others score after the commit."""
        deciders = lineup.deciders([e.customer_id for e in batch.events])
        futures = lineup.submit(batch.values, amounts, deciders)
        judged = engine_judged = lineup.champion.judge(batch.values, amounts, batch.context)
        results = await lineup.collect(futures)
        entries = shadow_entries(lineup, engine_judged, results, deciders)
        for k, rows in split_rows(deciders, results).items():
            judged = _replace_rows(judged, results[k], rows)
        self.metrics.observe_shadow(lineup, engine_judged, results)
        return judged, engine_judged, entries

    async def _open_review_cases(self, batch: _Fresh, judged: Judgements, at_us: int) -> None:
        """Open the review console's cases of the group's review and block decisions: one
        write for the group, off the loop, after the decisions' audit commit.

        The decisions are recorded and answered either way: a case store that fails is
        logged and counted (``fraudflow_errors_total{kind="cases"}``), the request is not.
        """
        if self._open_cases is None:
            return
        wanted = [i for i, action in enumerate(judged.actions) if action != "approve"]
        if not wanted:
            return
        events, scores = batch.events, judged.scores
        cases = [
            CaseIn(
                transaction_id=events[i].transaction_id, customer_id=events[i].customer_id,
                terminal_id=events[i].terminal_id, amount=events[i].amount,
                score=float(scores[i]), decision=judged.actions[i],
                reasons=tuple(str(r["detail"]) for r in judged.reasons[i]), at_us=at_us,
            )
            for i in wanted
        ]  # fmt: skip
        try:
            await asyncio.to_thread(self._open_cases, cases)
        except Exception:
            log.exception("opening the review cases of %d decisions failed", len(cases))
            self.metrics.errors.labels(kind="cases").inc()

    async def _record(
        self, engine: Engine, events: list[Event], extras: list[Any] | None
    ) -> Recorded:
        """Apply the events to the state, in a thread: the store may wait on a disk or on
        Redis, and the event loop must not (``/healthz``, other requests' answers)."""
        try:
            with self.health.watch(STATE_STORE, self._state_folder, ignore=(DataError,)):
                return await asyncio.to_thread(engine.record, events, extras)
        except DataError:
            raise ServeError(422, "invalid transaction", "validation") from None
        except Exception:
            log.exception("the feature state store failed")
            raise _store_failed() from None

    async def _replay_or_error(
        self, engine: Engine, resources: _Resources, duplicate: _Duplicate
    ) -> bytes | ServeError:
        try:
            return await self._replay(engine, resources, duplicate)
        except ServeError as exc:
            return exc

    async def _replay(self, engine: Engine, resources: _Resources, duplicate: _Duplicate) -> bytes:
        """The recorded answer of a transaction the state already holds; if its decision was
        lost (never recorded), it is decided again now and recorded (``_redecide``)."""
        tid = duplicate.event.transaction_id
        try:
            body = await resolve_duplicate(
                tid,
                pending=self._pending,
                ledgers=resources.ledgers,
                wait_seconds=self.settings.duplicate_wait_seconds,
            )
        except ServeError:  # the first request's, which it waited for
            raise
        except Exception:  # a ledger failed (the audit log, Redis), or the first request
            log.exception("looking up the decision of %r failed", tid)
            raise _audit_failed() from None
        if body is None:
            body = await self._redecide(engine, resources, duplicate)
        return body

    async def _redecide(
        self, engine: Engine, resources: _Resources, duplicate: _Duplicate
    ) -> bytes:
        """Decide again a transaction in the state whose decision was never recorded.

        Its first request got an error or no answer (a failed audit commit, a crash between
        apply and commit), so no decision of it was ever sent. Its features are recomputed
        from the state as of its time (``OnlineFeatures.stored_features``), then it is
        scored, recorded and answered like a fresh one; concurrent retries wait for this one
        (``PendingDecisions``).
        """
        event, tid = duplicate.event, duplicate.event.transaction_id
        running = self._pending.get(tid)
        if running is not None:  # another retry is deciding it
            return (await asyncio.shield(running))[tid]
        log.warning("transaction %r is in the feature state without a recorded decision: "
                    "deciding it again from the state", tid)  # fmt: skip
        pending = self._pending.add([tid])
        try:
            with self.health.watch(STATE_STORE, self._state_folder):
                extras = [duplicate.tx.model_extra or {}] if engine.online.columns else None
                values = await asyncio.to_thread(engine.online.stored, [event], extras)
                context = await asyncio.to_thread(engine.windows, [event], values)
        except Exception as exc:
            log.exception("the feature state store failed")
            self._pending.fail(pending, [tid], _store_failed())
            raise _store_failed() from exc
        answers: list[Any] = [None]
        batch = _Fresh([0], [event], [duplicate.tx], values, context)
        await self._decide_fresh(engine, resources, batch, answers, pending=pending)
        body: bytes = answers[0]
        return body

    async def _commit(
        self, resources: _Resources, records: Sequence[DecisionRecord | LabelRecord]
    ) -> None:
        started = time.perf_counter()
        try:
            with self.health.watch(AUDIT_LOG, self._audit_folder):
                await resources.audit.append(records)
        except Exception:
            log.exception("the audit log failed")
            raise _audit_failed() from None
        # A slow disk shows here first: every decision waits for its commit.
        self.metrics.audit_commit_latency.observe(time.perf_counter() - started)

    def _observe(self, judged: Judgements) -> None:
        m = self.metrics
        for action, count in collections.Counter(judged.actions).items():
            m.decisions.labels(decision=action).inc(count)
        scores = judged.scores
        observe_many(m.score, scores)
        drift = self._drift
        if drift is not None:
            drift.add(scores)
            if drift.due():
                m.score_psi.set(drift.psi())

    async def _ready_soon(self) -> tuple[Engine, _Resources]:
        """The engine, waiting a little while it is still loading.

        Several uvicorn workers share one socket, and a worker accepts connections while its
        model is still loading; the pod is already ready through its other worker. Waiting
        briefly turns that warm-up into latency instead of 503s.
        """
        if not self.ready and not self.failed and self._unopened is None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._loaded.wait(), READY_WAIT_SECONDS)
        return self._ready()

    def _ready(self) -> tuple[Engine, _Resources]:
        engine, resources = self.engine, self._resources
        if engine is None or resources is None:
            raise self._unopened or _not_ready()
        return engine, resources

    # --- labels ---------------------------------------------------------------------------

    async def label(self, label: LabelIn) -> bytes:
        """Apply a label to the feature state (if it holds the transaction) and record it."""
        engine, resources = await self._ready_soon()
        tid, flag = str(label.transaction_id), bool(label.is_fraud)
        try:
            with self.health.watch(STATE_STORE, self._state_folder, ignore=(DataError,)):
                await asyncio.to_thread(engine.online.record_label, tid, flag)
            applied = True
        except DataError:  # not in the state: unknown, or older than the retention
            applied = False
        except Exception:
            log.exception("the feature state store failed")
            raise _store_failed() from None
        reported = None if label.reported_at is None else epoch_us(label.reported_at)
        await self._commit(resources, [LabelRecord(tid, flag, reported, now_us(), applied)])
        out = {"transaction_id": label.transaction_id, "is_fraud": flag, "applied": applied}
        return orjson.dumps(out)

    # --- reload ---------------------------------------------------------------------------

    async def reload(
        self,
        run: Path | None,
        *,
        shadow: Sequence[Path] | None = None,
        split: Mapping[Path, float] | None = None,
        announce: bool = True,
    ) -> dict[str, Any]:
        """Verify ``run`` (default: the one served; ``fraudflow.serve.runcheck``), build its
        engine fully, then the challengers' (``shadow``; None: the ones served now, less the
        new champion; the runs of ``split`` join them), then swap them in; on any failure the
        old ones keep serving. ``split``: the share of cards each challenger it names decides
        (``parse_splits``'s form); None: the shares served now.

        In-flight requests finish on the engine they started with; new ones get the new one.
        Promoting a challenger is a reload naming it as ``run``.
        """
        async with self._reload_lock:
            current = self.engine
            target = Path(run) if run is not None else self.settings.run
            if current is None or self._resources is None:
                raise _not_ready()
            if shadow is None:
                shadow = [Path(c["run"]) for c in describe(self.lineup)]
                shadow = [r for r in shadow if r.resolve() != target.resolve()]
            splits = dict(self._splits if split is None else split)
            named = {Path(r).resolve() for r in shadow}
            shadow = [*shadow, *(r for r in splits if r not in named)]
            try:
                # Verified first (DONE, hashes, features; the model in a child process): a
                # model that would crash a library takes the child down, not this server.
                await asyncio.to_thread(self._verify, target)
                engine = await asyncio.to_thread(self._load, target)
                lineup = await asyncio.to_thread(self._load_lineup, engine, shadow, splits)
            except RunCheckError as exc:
                log.error("reload of %s refused: %s", target, exc)
                raise ServeError(400, refusal(exc.check), "reload") from None
            except ConfigError as exc:  # a challenger the champion's features cannot feed
                log.error("reload of %s refused: %s", target, exc)
                raise ServeError(400, CHALLENGER_REFUSED, "reload") from None
            except Exception:
                log.exception("reload of %s failed", target)
                raise ServeError(400, refusal(""), "reload") from None
            self._swap(engine, lineup, splits)
            if announce:
                await asyncio.to_thread(self._announce, engine, lineup)
        return {
            "model_version": engine.model_version,
            "previous_model_version": current.model_version,
            "run": str(engine.run_dir),
            "shadow": describe(lineup),
        }

    def _announced_run(self) -> tuple[Path, list[Path], dict[Path, float]] | None:
        """A worker (re)started after a reload serves what the other workers serve: the run
        and its challengers.

        ``run_server`` deletes the file before the workers start, so it only ever names a run
        reloaded during this server's life.
        """
        if self.settings.workers == 1:
            return None
        self._control_seen = _mtime(self._control)
        try:
            wanted = orjson.loads(self._control.read_bytes())
            splits = {Path(r): float(v) for r, v in wanted.get("split", {}).items()}
            return Path(wanted["run"]), [Path(r) for r in wanted.get("shadow", [])], splits
        except (OSError, orjson.JSONDecodeError, KeyError, TypeError, ValueError):
            return None

    def _announce(self, engine: Engine, lineup: Lineup | None) -> None:
        """Tell the other workers (``watch_reloads``) which runs to serve now."""
        if self.settings.workers > 1:
            challengers = describe(lineup)
            body = {
                "run": str(engine.run_dir), "model_version": engine.model_version,
                "shadow": [c["run"] for c in challengers],
                "shadow_versions": [c["model_version"] for c in challengers],
                "split": {str(r): share for r, share in self._splits.items()},
            }  # fmt: skip
            write_json_atomic(self._control, body)
            self._control_seen = _mtime(self._control)

    async def watch_reloads(self) -> None:
        """Multi-worker servers: follow reloads made by another worker (polls a small file)."""
        while True:
            await asyncio.sleep(self.settings.reload_poll_seconds)
            seen = await asyncio.to_thread(_mtime, self._control)  # off the loop: a disk
            if seen == self._control_seen or self.engine is None:
                continue
            self._control_seen = seen
            try:
                wanted = orjson.loads(await asyncio.to_thread(self._control.read_bytes))
            except (OSError, orjson.JSONDecodeError):
                continue
            served = [c["model_version"] for c in describe(self.lineup)]
            split = {str(r): share for r, share in self._splits.items()}
            wants = (wanted.get("model_version"), wanted.get("shadow_versions", []))
            if (*wants, wanted.get("split", {})) != (self.engine.model_version, served, split):
                shadow = [Path(r) for r in wanted.get("shadow", [])]
                splits = {Path(r): float(v) for r, v in wanted.get("split", {}).items()}
                with contextlib.suppress(ServeError):  # logged by reload
                    await self.reload(
                        Path(wanted["run"]), shadow=shadow, split=splits, announce=False
                    )


def _log_shadow_failure(future: Future[None]) -> None:
    exc = future.exception()
    if exc is not None:
        log.error("recording shadow verdicts failed: they show as missing", exc_info=exc)


def _mtime(path: Path) -> int | None:
    try:
        return path.stat().st_mtime_ns
    except OSError:
        return None


@dataclass(frozen=True)
class _Duplicate:
    """A transaction the state already held when its request applied it."""

    event: Event
    tx: TransactionIn


@dataclass(frozen=True)
class _Fresh:
    """The transactions of a batch that were new to the state, in the order applied."""

    indices: list[int]  # positions in the request
    events: list[Event]
    txs: list[TransactionIn]
    values: np.ndarray  # (N, F) feature values, in the model's feature order
    context: Windows | None = None  # a sequence model's windows of the events (Engine.record)


def _replace_rows(judged: Judgements, result: ShadowResult, rows: list[int]) -> Judgements:
    """``judged`` with ``rows`` taken from a challenger's judgements (its split share)."""
    theirs = result.judged
    assert theirs is not None  # split_rows keeps the challengers that scored
    scores, raw = judged.scores.copy(), judged.raw_scores.copy()
    scores[rows], raw[rows] = theirs.scores[rows], theirs.raw_scores[rows]
    actions, reasons = list(judged.actions), list(judged.reasons)
    for i in rows:
        actions[i], reasons[i] = theirs.actions[i], theirs.reasons[i]
    return Judgements(scores, raw, actions, reasons)


def _with_shadow(
    records: list[DecisionRecord],
    batch: _Fresh,
    entries: list[dict[str, Any]],
    lineup: Lineup,
) -> list[DecisionRecord]:
    """The records with their shadow entries; a decision a challenger made (its split share)
    is recorded as that model's: its version, its features (a subset of the champion's, in its
    order, so the log's feature sets stay per version) and its answer."""
    by_version = {c.model_version: c for c in lineup.challengers}
    out = []
    for k, (record, entry) in enumerate(zip(records, entries, strict=True)):
        decider = by_version.get(entry["decided_by"])
        if decider is None:
            out.append(record._replace(shadow=entry))
            continue
        version = decider.model_version
        body = orjson.loads(record.response) | {"model_version": version}
        values = batch.values[k, decider.columns].astype("<f8").tobytes()
        out.append(
            record._replace(
                model_version=version, packed_features=values, response=orjson.dumps(body),
                feature_names=tuple(decider.engine.scorer.features), shadow=entry,
            )
        )  # fmt: skip
    return out


def _records(
    engine: Engine, batch: _Fresh, judged: Judgements, *, decided_at_us: int
) -> list[DecisionRecord]:
    """Each decided transaction's audit record, its response body included."""
    version, names, n = engine.model_version, engine.scorer.features, len(batch.events)
    # The spec's extra columns of each transaction, kept so that the log can be replayed.
    columns = engine.online.columns
    extra: Any = itertools.repeat(None, n)
    if columns:
        extra = [{c: (tx.model_extra or {}).get(c) for c in columns} for tx in batch.txs]
    scores = judged.scores.tolist()
    # The audit log stores each row's values as float64 little-endian bytes.
    packed = batch.values.astype("<f8", copy=False).tobytes()
    width = 8 * batch.values.shape[1]
    responses = [
        orjson.dumps(
            {"transaction_id": tx.transaction_id, "score": score, "decision": action,
             "reasons": reasons, "model_version": version}
        )
        for tx, score, action, reasons in zip(
            batch.txs, scores, judged.actions, judged.reasons, strict=True
        )
    ]  # fmt: skip
    events = batch.events
    # Records made by zip and NamedTuple._make (C loops) rather than by the class's own
    # constructor, a Python function of 13 arguments called once per decision.
    return list(
        map(
            DecisionRecord._make,
            zip(
                [e.transaction_id for e in events], [e.t_us for e in events],
                [e.customer_id for e in events], [e.terminal_id for e in events],
                [e.amount for e in events], scores, judged.raw_scores.tolist(), judged.actions,
                itertools.repeat(version, n), itertools.repeat(decided_at_us, n),
                [packed[k * width : (k + 1) * width] for k in range(n)], responses,
                itertools.repeat(names, n), extra, itertools.repeat(None, n), strict=True,
            ),
        )
    )  # fmt: skip
