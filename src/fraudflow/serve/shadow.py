"""Champion and challengers: models scored in shadow on live traffic, beside the one that decides.

The champion's engine computes each decision's feature vector from the state once; every
challenger scores the same vector (its own features picked from it by name) with its own
calibration (its bundle's, through ``BundleScorer``) and its own policy (``policy.yaml`` beside
its run, else the service's ``--policy``, else the default). Only the champion decides, except
for the cards a traffic split hands to a challenger (``--split RUN=5%``): a stable share of
customers, chosen by a salted hash of ``customer_id`` (``split_buckets``), the same in every
process, replica and restart.

A challenger is accepted only if the champion's online engine computes what it reads
(``feature_problem``): every feature it names, defined identically; otherwise start-up or the
reload is refused with one line saying which feature.

Off the answer path. A challenger that only scores in shadow never holds up the champion's
answer: the champion decides, its group is committed and answered, and only then is the group
offered to each challenger's lane (``_ShadowLane``: a thread of its own, so one challenger's
hang leaves the others free). A lane lets groups gather for ``LINGER_SECONDS`` after the first,
takes everything queued at once and scores it as one batch (the rows concatenated: one model
call, one policy pass), then hands the verdicts to the
service's audit writer as ``ShadowRecord``s, committed in a later group of the same durable
log (same shard file, same fsync), keyed by transaction_id and model_version. A lane is
bounded: a group offered to one whose queue holds ``max_queued_rows`` rows, or that has been
scoring one batch for longer than ``max_lag_seconds`` (a hung model), is not queued but
recorded as ``busy`` at once (and counted in the metrics). A challenger that raises is
recorded as ``error``. Closing the service drains the lanes (graceful stop: every queued group
is scored and recorded); what a hung model still holds after ``DRAIN_SECONDS`` is recorded as
``timed_out``.

The trade-off: a decision and its challengers' verdicts are two commits. The decision records
each such challenger as ``pending`` in its ``shadow`` object; readers of the log join the
verdicts to it (``fraudflow.serve.audit.read_decisions``), and a decision whose verdicts were
lost (the process died between the answer and the shadow commit) shows those challengers as
``missing``, which the shadow report counts. Recording them with the decision, in one commit,
would make the champion's answer wait for the slowest challenger (bounded by a budget, but
paid on every group, and the lanes compete with the champion for the CPU while it waits);
losing a few verdicts in a crash costs the comparison nothing that matters, a late answer
costs the caller.

Challengers that decide a split share stay on the answer path: their verdict is the answer for
their cards. They start in their lanes (``_Lane``) before the champion scores, so the two
overlap, and the group waits for them at most ``shadow_budget_seconds`` past the champion's
own judgement. One that raises is recorded as ``error`` and one that is late as
``timed_out``, and the champion decides their cards; one whose lane still holds an earlier
group that has not finished is not given the new one (``busy``), so a hang costs the champion
at most one budget, then nothing. Their verdicts are recorded with the decision.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import lightgbm as lgb
import numpy as np

from fraudflow.artifacts import Bundle, check_run, feature_spec_of, load_bundle
from fraudflow.errors import ConfigError
from fraudflow.features.spec import FeatureSpec
from fraudflow.serve.audit import PENDING, ShadowRecord, now_us
from fraudflow.serve.policy import AMOUNT_FEATURE, check_rule_features, decide_many
from fraudflow.serve.scoring import (
    POLICY_FILE,
    BundleScorer,
    Engine,
    Judgements,
    load_policy_for,
    model_version,
)

__all__ = [
    "DRAIN_SECONDS",
    "STATUSES",
    "Challenger",
    "Lineup",
    "ShadowPredict",
    "ShadowResult",
    "ShadowSink",
    "bundle_predict",
    "check_challenger",
    "describe",
    "feature_problem",
    "load_challenger",
    "shadow_entries",
    "shares",
    "split_buckets",
    "split_rows",
]

log = logging.getLogger(__name__)

# What a challenger's verdict on a decision can be: scored, raised, late, or not asked because
# its lane was full or stuck; ``pending`` while it is to come in a later commit (shadow only).
STATUSES = ("ok", "error", "timed_out", "busy", PENDING)
# Groups a split challenger's lane may hold at once (one scoring, one waiting): more means it
# is stuck.
_MAX_IN_FLIGHT = 2
# A shadow lane's bounds (see the module docstring): rows queued, and how long one batch may
# score before the lane counts as stuck.
MAX_QUEUED_ROWS = 8192
MAX_LAG_SECONDS = 2.0
# How long a lane lets groups gather after the first one queued before it scores them: the
# verdicts are off the answer path, so a short wait costs nothing, and larger batches pay the
# per-call cost (the model call, the policy, the records) on fewer calls, CPU otherwise taken
# from the champion (benchmarks/serve.py --shadow reports the server's CPU per decision).
LINGER_SECONDS = 0.05
# How long closing waits for the shadow lanes to score what they hold.
DRAIN_SECONDS = 10.0


# --- the split ----------------------------------------------------------------------------


def split_buckets(customer_ids: Iterable[str], *, salt: str) -> np.ndarray:
    """Each customer's place in [0, 1): the first 8 bytes of BLAKE2b(salt, customer_id) as a
    fraction. A keyed cryptographic hash, not Python's ``hash`` (randomised per process): the
    same card lands in the same place in every worker, replica and restart, and a new salt
    draws new shares. Shape: N ids -> (N,) float64."""
    key = salt.encode()[:64]
    values = [
        int.from_bytes(hashlib.blake2b(c.encode(), digest_size=8, key=key).digest(), "big")
        for c in customer_ids
    ]
    return np.asarray(values, dtype=np.float64) / 2.0**64


# --- challengers --------------------------------------------------------------------------


# A challenger's scores of rows x (N, F_c) float32 in its feature order: (score the policy
# sees, the model's probability), each (N,).
ShadowPredict = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]


def bundle_predict(bundle: Bundle) -> ShadowPredict:
    """``Bundle.predict_calibrated`` keeping the probability too: the model's forward pass
    alone, without the attributions a decision's reasons need (``BundleScorer``), which cost
    the neural models a backward pass: a shadow verdict has no reasons."""
    calibrator = bundle.calibrator  # parsed once: the property re-reads meta
    booster = bundle.model if isinstance(bundle.model, lgb.Booster) else None

    def predict(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if booster is not None:
            # One thread: LightGBM's default (every core) spins its OpenMP threads on each
            # call, CPU taken from the champion's answers in this and the other workers.
            matrix = bundle.model_matrix(x)
            raw = np.asarray(booster.predict(matrix, num_threads=1), dtype=np.float64)
        else:
            raw = bundle.predict(x)
        return np.asarray(calibrator.apply(raw), dtype=np.float64), raw

    return predict


@dataclass(frozen=True)
class Challenger:
    """A challenger's engine (its scorer and policy, for the cards it decides;
    ``engine.online`` is the champion's and unused), how it scores in shadow, and where its
    features sit in the champion's feature vector."""

    engine: Engine
    predict: ShadowPredict
    columns: np.ndarray  # (F_c,) positions in the champion's features, in the challenger's order
    # The split buckets [low, high) of customers this challenger decides; None: shadow only.
    share: tuple[float, float] | None = None

    @property
    def model_version(self) -> str:
        return self.engine.model_version


def feature_problem(champion: FeatureSpec, challenger: FeatureSpec, names: Sequence[str]) -> str:
    """Why the champion's online engine cannot feed a challenger of spec ``challenger`` reading
    features ``names`` (one line), or "" when it can: it must compute each of them, defined
    identically (same spec, or every definition the challenger's spec holds is the champion's
    too, label delay included)."""
    if challenger.hash == champion.hash:
        return ""
    theirs, ours = challenger.to_dict(), champion.to_dict()
    if theirs["label_delay"] != ours["label_delay"]:
        return (
            f"its feature spec's label delay is {theirs['label_delay']}, however the champion's "
            f"is {ours['label_delay']}"
        )
    for section in ("column", "aggregate", "derive"):
        for entry in theirs[section]:
            if entry not in ours[section]:
                return (
                    f"its feature spec's {section} {entry['name']!r} is not defined so by the "
                    "champion's spec, whose online engine computes the features"
                )
    missing = [n for n in names if n not in champion.feature_names]
    if missing:
        return f"it reads features {missing} that the champion's online engine does not output"
    return ""


def check_challenger(champion_run: Path, run: Path) -> None:
    """Raise ``ConfigError`` (one line) if the champion's online engine cannot feed the
    challenger ``run`` (``feature_problem``; categorical features only with the champion's own
    spec and codes). Reads the bundles' meta; run ``verify_run`` on both first."""
    meta, champion_meta = check_run(run), check_run(champion_run)
    spec, champion_spec = feature_spec_of(meta), feature_spec_of(champion_meta)
    problem = feature_problem(champion_spec, spec, list(meta["features"]))
    kind = (meta.get("inputs") or {}).get("kind", "vector")
    if not problem and kind != "vector":
        # A challenger is fed the champion's feature rows only, not a history of its own.
        problem = f"it reads each card's earlier events ({kind} inputs)"
    if not problem and spec.categorical and spec.hash != champion_spec.hash:
        problem = f"its categorical features {spec.categorical} are coded by another spec"
    if not problem and spec.categorical:
        codes = load_bundle(run, completed=True).codes
        if codes != load_bundle(champion_run, completed=True).codes:
            problem = "its categorical features' codes differ from the champion's"
    if problem:
        raise ConfigError(f"challenger {run} cannot be scored beside the champion: {problem}")


def load_challenger(
    run_dir: Path,
    champion: Engine,
    *,
    policy_path: Path | None,
    share: tuple[float, float] | None = None,
) -> Challenger:
    """Load a challenger fully, to be scored beside ``champion`` (``check_challenger`` first;
    verify the run before, with ``fraudflow.serve.runcheck.verify_run``, as the champion's).
    Its policy: ``policy.yaml`` beside it, else ``policy_path``, else the default."""
    run_dir = Path(run_dir)
    check_challenger(champion.run_dir, run_dir)
    bundle = load_bundle(run_dir, completed=True)
    names = list(bundle.features)
    scorer = BundleScorer(bundle, version=model_version(run_dir, bundle))
    beside = run_dir / POLICY_FILE
    policy, source = load_policy_for(run_dir, None if beside.is_file() else policy_path)
    check_rule_features(policy, names, source=source)
    online_names = list(champion.scorer.features)
    columns = np.asarray([online_names.index(n) for n in names], dtype=np.int64)
    engine = Engine(run_dir, scorer, champion.online, policy, source, None)
    return Challenger(engine, bundle_predict(bundle), columns, share)


class ShadowResult(NamedTuple):
    """A challenger's verdicts on one group: ``status`` in ``STATUSES``; ``judged`` when ok."""

    status: str
    judged: Judgements | None = None


def _judge(
    challenger: Challenger, x: np.ndarray, amounts: Sequence[float], full: bool
) -> Judgements:
    """The challenger's scores and actions on the champion's rows x (N, F); with ``full``,
    also the reasons (it decides some of them: the split), else none (shadow only)."""
    xs = x[:, challenger.columns]  # (N, F) -> (N, F_c)
    if full:
        return challenger.engine.judge(xs, amounts)
    return _judge_rows(challenger, xs, np.asarray(amounts, dtype=np.float64))


def _judge_rows(challenger: Challenger, xs: np.ndarray, amount: np.ndarray) -> Judgements:
    """Scores and actions, no reasons, of rows xs (N, F_c) in the challenger's feature order."""
    engine = challenger.engine
    score, raw = challenger.predict(xs.astype(np.float32))  # float32, as Engine.judge
    names = list(engine.scorer.features)

    def column(name: str) -> np.ndarray:
        return amount if name == AMOUNT_FEATURE else xs[:, names.index(name)]

    decisions = decide_many(engine.policy, scores=score, column=column)
    return Judgements(score, raw, [d.action for d in decisions], [])


class ShadowSink(NamedTuple):
    """Where a shadow lane's verdicts go: ``record`` queues them for the audit writer (without
    waiting for the commit); ``observe`` counts a group's verdicts in the metrics, given the
    challenger's version, its result and the champion's actions on the same rows."""

    record: Callable[[Sequence[ShadowRecord]], object]
    observe: Callable[[str, ShadowResult, Sequence[str]], None]


def _no_sink() -> ShadowSink:
    return ShadowSink(lambda records: None, lambda version, result, actions: None)


class _Group(NamedTuple):
    """One answered group, offered to a shadow lane."""

    xs: np.ndarray  # (N, F_c) float64, the challenger's features
    amounts: np.ndarray  # (N,)
    ids: list[str]  # transaction ids
    champion: Sequence[str]  # the champion's actions, for the agreement metric


def _records(version: str, group: _Group, result: ShadowResult, at_us: int) -> list[ShadowRecord]:
    n = len(group.ids)
    if result.judged is None:
        return [ShadowRecord(t, version, result.status, None, None, None, at_us) for t in group.ids]
    j = result.judged
    return list(
        map(ShadowRecord._make, zip(
            group.ids, [version] * n, ["ok"] * n, j.scores.tolist(), j.raw_scores.tolist(),
            j.actions, [at_us] * n, strict=True,
        ))
    )  # fmt: skip


class _ShadowLane:
    """A shadow-only challenger's scoring thread and its bounded queue of answered groups.

    A daemon thread, so a hung model never holds up the process's exit. Groups are claimed
    under one lock, by the thread (to score them) or by ``close`` (a hung model's, recorded as
    timed out): each is recorded exactly once.
    """

    def __init__(
        self,
        challenger: Challenger,
        sink: ShadowSink,
        *,
        max_rows: int,
        max_lag_seconds: float,
        linger_seconds: float,
    ) -> None:
        self._challenger, self._sink = challenger, sink
        self._max_rows, self._max_lag, self._linger = max_rows, max_lag_seconds, linger_seconds
        self._first_at = 0.0  # when the oldest group queued was (time.monotonic)
        self._cond = threading.Condition()
        self._queued: list[_Group] = []
        self._rows = 0
        self._scoring: list[_Group] = []  # the batch being scored
        self._since = 0.0  # when it started (time.monotonic)
        self._closing = self._abandoned = False
        name = f"fraudflow-shadow-{challenger.model_version}"
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def offer(self, group: _Group) -> bool:
        """Queue ``group``; False (not queued) if the lane is full, stuck or closing."""
        with self._cond:
            stuck = bool(self._scoring) and time.monotonic() - self._since > self._max_lag
            if self._closing or stuck or self._rows + len(group.ids) > self._max_rows:
                return False
            if not self._queued:
                self._first_at = time.monotonic()
            self._queued.append(group)
            self._rows += len(group.ids)
            self._cond.notify()
        return True

    def close(self, wait_seconds: float | None) -> None:
        """Score what is queued, then stop; with ``wait_seconds``, wait for that, and record
        what a hung model still holds then as ``timed_out``."""
        with self._cond:
            self._closing = True
            self._cond.notify()
        if wait_seconds is None:
            return
        self._thread.join(wait_seconds)
        with self._cond:
            left, self._abandoned = self._scoring + self._queued, True
            self._scoring, self._queued = [], []
        if left:
            log.error("challenger %s did not finish %d groups on closing: recorded as timed "
                      "out", self._challenger.model_version, len(left))  # fmt: skip
            self._record(left, ShadowResult("timed_out"))

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._queued and not self._closing:
                    self._cond.wait()
                due = self._first_at + self._linger  # more groups may join the batch
                while not self._closing and (wait := due - time.monotonic()) > 0:
                    self._cond.wait(wait)
                if not self._queued or self._abandoned:
                    return
                batch, self._queued, self._rows = self._queued, [], 0
                self._scoring, self._since = batch, time.monotonic()
            result = self._score(batch)
            with self._cond:
                if self._abandoned:  # close recorded the batch already
                    return
                self._scoring = []
            try:
                self._record(batch, result)
            except Exception:  # a sink's own bug: the lane goes on
                log.exception("recording challenger %s's verdicts failed",
                              self._challenger.model_version)  # fmt: skip

    def _score(self, batch: list[_Group]) -> ShadowResult:
        """The batch's rows scored in one call: fewer, larger calls cost less per row."""
        xs = batch[0].xs if len(batch) == 1 else np.concatenate([g.xs for g in batch])
        amounts = (
            batch[0].amounts if len(batch) == 1 else np.concatenate([g.amounts for g in batch])
        )
        try:
            return ShadowResult("ok", _judge_rows(self._challenger, xs, amounts))
        except Exception:
            log.exception("challenger %s failed", self._challenger.model_version)
            return ShadowResult("error")

    def _record(self, batch: list[_Group], result: ShadowResult) -> None:
        """Each group's verdicts: to the audit writer, and counted."""
        version, at_us, start = self._challenger.model_version, now_us(), 0
        records: list[ShadowRecord] = []
        for group in batch:
            part = result
            if result.judged is not None:  # the group's rows of the batch's judgements
                j, end = result.judged, start + len(group.ids)
                part = ShadowResult("ok", Judgements(
                    j.scores[start:end], j.raw_scores[start:end], j.actions[start:end], [],
                ))  # fmt: skip
                start = end
            records += _records(version, group, part, at_us)
            self._sink.observe(version, part, group.champion)
        self._sink.record(records)


class _Lane:
    """One challenger's scoring thread: a daemon, so a hung model never holds up the
    process's exit, and its own, so one challenger's hang leaves the others' lanes free."""

    def __init__(self, name: str) -> None:
        self._jobs: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._in_flight: list[Future[Judgements]] = []
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def submit(self, job: Callable[[], Judgements]) -> Future[Judgements] | None:
        """Queue ``job``; None (not queued) while the lane holds too many unfinished jobs.
        Called from the event loop only."""
        self._in_flight = [f for f in self._in_flight if not f.done()]
        if len(self._in_flight) >= _MAX_IN_FLIGHT:
            return None
        future: Future[Judgements] = Future()
        self._in_flight.append(future)
        self._jobs.put((job, future))
        return future

    def close(self) -> None:
        self._jobs.put(None)

    def _run(self) -> None:
        while (item := self._jobs.get()) is not None:
            job, future = item
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(job())
            except BaseException as exc:  # recorded as the challenger's error
                future.set_exception(exc)


@dataclass
class Lineup:
    """The champion with its challengers and their lanes: swapped whole on reload.

    A challenger with a split share scores on the answer path (``submit``, ``collect``); the
    others score in shadow lanes after the answer (``score_in_shadow``), their verdicts going
    to ``sink``.
    """

    champion: Engine
    challengers: tuple[Challenger, ...]
    budget_seconds: float
    salt: str
    sink: ShadowSink = field(default_factory=_no_sink)
    max_queued_rows: int = MAX_QUEUED_ROWS
    max_lag_seconds: float = MAX_LAG_SECONDS
    linger_seconds: float = LINGER_SECONDS
    # Per challenger, its lane: a _Lane (split: on the answer path) or a _ShadowLane.
    _lanes: list[_Lane | _ShadowLane] = field(init=False)

    def __post_init__(self) -> None:
        self._lanes = [
            _Lane(f"fraudflow-shadow-{k}") if c.share is not None
            else _ShadowLane(c, self.sink, max_rows=self.max_queued_rows,
                             max_lag_seconds=self.max_lag_seconds,
                             linger_seconds=self.linger_seconds)
            for k, c in enumerate(self.challengers)
        ]  # fmt: skip

    def close(self, wait_seconds: float | None = None) -> None:
        """Stop the lanes; the shadow lanes score and record what they hold first (waited
        for with ``wait_seconds``; None: in the background)."""
        for lane in self._lanes:
            if isinstance(lane, _ShadowLane):
                lane.close(None)  # every lane starts draining at once
        for lane in self._lanes:
            if isinstance(lane, _ShadowLane):
                lane.close(wait_seconds)
            else:
                lane.close()

    def busy(self) -> bool:
        """Whether a shadow lane is still scoring or recording (after ``close``: draining)."""
        return any(isinstance(lane, _ShadowLane) and lane.alive for lane in self._lanes)

    def deciders(self, customer_ids: Sequence[str]) -> list[int | None]:
        """Per row, the challenger (its index) whose split share holds the card, or None: the
        champion decides."""
        splits = [(k, c.share) for k, c in enumerate(self.challengers) if c.share is not None]
        if not splits:
            return [None] * len(customer_ids)
        out: list[int | None] = []
        for bucket in split_buckets(customer_ids, salt=self.salt).tolist():
            out.append(next((k for k, (lo, hi) in splits if lo <= bucket < hi), None))
        return out

    def submit(
        self, x: np.ndarray, amounts: Sequence[float], deciders: Sequence[int | None]
    ) -> list[Future[Judgements] | None]:
        """Start the split challengers on the group (rows x (N, F) of the champion's
        features); None for the others (and for a stuck one)."""
        out: list[Future[Judgements] | None] = []
        for k, (challenger, lane) in enumerate(zip(self.challengers, self._lanes, strict=True)):
            if not isinstance(lane, _Lane):
                out.append(None)
                continue
            full = k in deciders
            out.append(lane.submit(lambda c=challenger, f=full: _judge(c, x, amounts, f)))  # type: ignore[misc]
        return out

    async def collect(self, futures: Sequence[Future[Judgements] | None]) -> list[ShadowResult]:
        """Each challenger's result: the split ones', waiting at most ``budget_seconds`` for
        all of them; ``pending`` for the others (scored after the answer)."""
        waiting = {asyncio.wrap_future(f): k for k, f in enumerate(futures) if f is not None}
        if waiting:
            await asyncio.wait(waiting, timeout=self.budget_seconds)
        out = [ShadowResult("busy" if isinstance(lane, _Lane) else PENDING) for lane in self._lanes]
        for wrapped, k in waiting.items():
            if not wrapped.done():
                # Not cancelled: the job stays in its lane's count until it ends, so a hung
                # model's lane fills up and later groups skip it (busy) instead of waiting.
                out[k] = ShadowResult("timed_out")
            elif wrapped.exception() is not None:
                log.error("challenger %s failed", self.challengers[k].model_version,
                          exc_info=wrapped.exception())  # fmt: skip
                out[k] = ShadowResult("error")
            else:
                out[k] = ShadowResult("ok", wrapped.result())
        return out

    def score_in_shadow(
        self, x: np.ndarray, amounts: Sequence[float], ids: list[str], champion: Sequence[str]
    ) -> None:
        """Offer an answered group (rows x (N, F) of the champion's features, the champion's
        actions) to each shadow lane; a lane that cannot take it records it as ``busy``."""
        amount = np.asarray(amounts, dtype=np.float64)
        for challenger, lane in zip(self.challengers, self._lanes, strict=True):
            if not isinstance(lane, _ShadowLane):
                continue
            group = _Group(x[:, challenger.columns], amount, ids, champion)
            if not lane.offer(group):
                busy = ShadowResult("busy")
                self.sink.observe(challenger.model_version, busy, champion)
                self.sink.record(_records(challenger.model_version, group, busy, now_us()))


def shadow_entries(
    lineup: Lineup,
    champion: Judgements,
    results: Sequence[ShadowResult],
    deciders: Sequence[int | None],
) -> list[dict[str, Any]]:
    """Each decision's ``DecisionRecord.shadow`` object: the champion's verdict, each
    challenger's (``model_version``, ``status``, and when ok ``score``, ``raw_score``,
    ``decision``; ``pending`` for one scored after the answer, whose verdict is recorded
    apart), and ``decided_by``, the model version whose verdict was answered."""
    version = lineup.champion.model_version
    scores, actions = champion.scores.tolist(), champion.actions
    columns = [
        (c.model_version, r.status, None if r.judged is None else r.judged)
        for c, r in zip(lineup.challengers, results, strict=True)
    ]
    lists = [
        (j.scores.tolist(), j.raw_scores.tolist(), j.actions) if j is not None else None
        for _, _, j in columns
    ]
    out = []
    for i, decider in enumerate(deciders):
        challengers = []
        for (v, status, _), values in zip(columns, lists, strict=True):
            entry: dict[str, Any] = {"model_version": v, "status": status}
            if values is not None:
                score, raw, decision = values[0][i], values[1][i], values[2][i]
                entry |= {"score": score, "raw_score": raw, "decision": decision}
            challengers.append(entry)
        decided_by = version
        if decider is not None and results[decider].status == "ok":
            decided_by = lineup.challengers[decider].model_version
        out.append({
            "champion": {"model_version": version, "score": scores[i], "decision": actions[i]},
            "challengers": challengers, "decided_by": decided_by,
        })  # fmt: skip
    return out


def split_rows(
    deciders: Sequence[int | None], results: Sequence[ShadowResult]
) -> dict[int, list[int]]:
    """Per challenger that decides some rows of the group (and scored them): those rows. A
    challenger that failed or was late leaves its rows to the champion."""
    out: dict[int, list[int]] = {}
    for i, k in enumerate(deciders):
        if k is not None and results[k].status == "ok":
            out.setdefault(k, []).append(i)
    return out


def describe(lineup: Lineup | None) -> list[dict[str, Any]]:
    """The challengers for the reload answer and the log: run, model version, split share."""
    if lineup is None:
        return []
    return [
        {"run": str(c.engine.run_dir), "model_version": c.model_version,
         "split": None if c.share is None else round(c.share[1] - c.share[0], 6)}
        for c in lineup.challengers
    ]  # fmt: skip


def shares(runs: Sequence[Path], splits: Mapping[Path, float]) -> list[tuple[float, float] | None]:
    """Each run's split buckets [low, high): consecutive ranges from 0 in the order given, so
    adding a challenger after the others moves no card of theirs."""
    out: list[tuple[float, float] | None] = []
    at = 0.0
    for run in runs:
        share = splits.get(Path(run).resolve())
        if share is None:
            out.append(None)
            continue
        out.append((at, at + share))
        at += share
    return out
