"""Prometheus metrics of the decision service, and the score drift (PSI) they report.

Names are a contract (alert rules use them); base units, counters end in ``_total``, and no
label ever holds an id or a key:

    fraudflow_decision_latency_seconds{route}      histogram, the decision routes end to end
    fraudflow_decisions_total{decision}            counter: approve | review | block
    fraudflow_score                                histogram of the scores returned
    fraudflow_errors_total{kind}                   counter, kinds in ``ERROR_KINDS``
    fraudflow_requests_total{route, status}        counter, every route
    fraudflow_state_store_latency_seconds{operation}  histogram: apply | read | set_label
        (apply: one store transaction per request group, observed as its time per event)
    fraudflow_model_info{model_version}            gauge = 1 for the loaded model
    fraudflow_model_loaded                         gauge 0/1
    fraudflow_score_psi                            gauge, see ``ScoreDrift``
    fraudflow_shadow_score{model_version}          histogram of each challenger's scores
    fraudflow_shadow_decisions_total{model_version, agreement}  counter: agree | disagree,
        a challenger's decision against the champion's on the same transaction
    fraudflow_shadow_errors_total{model_version, kind}  counter: error | timed_out | busy,
        a challenger that raised, was late, or whose lane was full or stuck (its verdicts
        skipped); shadow-only challengers are counted when scored, after the answer
    fraudflow_case_verdicts_total{outcome}         counter: fraud | not_fraud (the console)
    fraudflow_case_time_to_verdict_seconds         histogram: a case's opening to its verdict
    fraudflow_cases_open                           gauge: open or escalated cases
    fraudflow_cases_oldest_open_age_seconds        gauge: age of the oldest of them (0: none)
    fraudflow_cases_overdue                        gauge: those of them past their due time

The ``fraudflow_cases_*`` gauges are read from the shared case store when scraped
(``CaseGaugeCollector``), not kept per process: every worker and replica reports the same
figures, the queue's, so alerts take their ``max``. The verdict counter and histogram count
each process's own verdicts: ``sum`` them.

Each app gets its own ``CollectorRegistry``. With several worker processes, prometheus_client's
multiprocess mode is used (``PROMETHEUS_MULTIPROC_DIR``, set by ``fraudflow serve --workers``
before the workers start): each scrape, whichever worker answers it, sums counters and
histograms over all workers; the gauges say how they combine in ``multiprocess_mode``.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client import multiprocess as prom_multiprocess
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from fraudflow.eval.drift import population_stability_index

if TYPE_CHECKING:  # the service's types, for signatures only: no import at run time
    from fraudflow.serve.scoring import Judgements
    from fraudflow.serve.shadow import Lineup, ShadowResult

__all__ = [
    "CASE_GAUGES",
    "CONTENT_TYPE_LATEST",
    "ERROR_KINDS",
    "CaseGaugeCollector",
    "ScoreDrift",
    "ServiceMetrics",
    "observe_many",
]

ERROR_KINDS = (
    "auth",  # 401 and 403
    "validation",  # 422, and 415 (not JSON)
    "too_large",  # 413
    "not_ready",  # 503 before a model is loaded
    "state_store",  # the feature state store failed
    "audit",  # the audit log failed
    "reload",  # an admin reload failed
    "cases",  # opening the review console's cases failed (the decisions were answered)
    "internal",  # anything else (500)
)
_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.025, 0.05, 0.1, 0.25, 1.0)
_STORE_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.1, 1.0)
# An audit commit waits for its group and an fsync: a few ms when the disk keeps up.
_COMMIT_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)
_SCORE_BUCKETS = tuple(round(0.05 * i, 2) for i in range(1, 20))
# A verdict comes minutes to days after its case opened (the default SLA is 24 h).
_VERDICT_BUCKETS = tuple(
    60.0 * m for m in (1, 5, 15, 30, 60, 120, 240, 480, 720, 1_440, 2_880, 4_320, 10_080)
)
OUTCOMES = ("fraud", "not_fraud")
SHADOW_ERROR_KINDS = ("error", "timed_out", "busy")  # fraudflow.serve.shadow.STATUSES less ok
# The gauges read from the case store at each scrape: name -> help.
CASE_GAUGES = {
    "fraudflow_cases_open": "Review cases waiting for a verdict (open or escalated).",
    "fraudflow_cases_oldest_open_age_seconds": (
        "Age of the oldest review case waiting for a verdict (0 when none waits)."
    ),
    "fraudflow_cases_overdue": "Review cases waiting for a verdict past their due time (SLA).",
}

log = logging.getLogger(__name__)


def observe_many(histogram: Histogram, values: np.ndarray) -> None:
    """``histogram.observe(v)`` for each value, at once: a batch's scores cost one
    ``searchsorted`` and a counter bump per bucket, not a locked Python call per value.

    It reads the histogram's per-bucket counters (``_upper_bounds``, ``_buckets``, ``_sum``,
    each bucket counting the values in (previous bound, bound]), as ``observe`` writes them;
    a test holds the two equal. Not for a histogram with labels (call it on ``.labels(...)``).
    """
    if not len(values):
        return
    bounds: list[float] = histogram._upper_bounds
    # observe puts a value in the first bucket whose bound is >= it: searchsorted "left".
    # A NaN would land past the last bound (observe counts it in no bucket): dropped too.
    at = np.searchsorted(bounds, values, side="left")
    counts = np.bincount(at, minlength=len(bounds))[: len(bounds)]
    for bucket, count in zip(histogram._buckets, counts.tolist(), strict=True):
        if count:
            bucket.inc(count)
    histogram._sum.inc(float(values.sum()))


class ServiceMetrics:
    """The service's metric objects in a registry of their own."""

    def __init__(self, *, multiprocess_dir: Path | None = None) -> None:
        self.multiprocess_dir = multiprocess_dir
        self.registry = registry = CollectorRegistry(auto_describe=True)
        self.decision_latency = Histogram(
            "fraudflow_decision_latency_seconds",
            "Time to answer a decision request, from the first byte read to the response.",
            ["route"], buckets=_LATENCY_BUCKETS, registry=registry,
        )  # fmt: skip
        self.decisions = Counter(
            "fraudflow_decisions", "Decisions returned, by action.", ["decision"], registry=registry
        )
        self.score = Histogram(
            "fraudflow_score", "Fraud scores returned.", buckets=_SCORE_BUCKETS, registry=registry
        )
        self.errors = Counter(
            "fraudflow_errors", "Failed requests, by cause.", ["kind"], registry=registry
        )
        self.requests = Counter(
            "fraudflow_requests", "HTTP requests, by route and status.", ["route", "status"],
            registry=registry,
        )  # fmt: skip
        self.store_latency = Histogram(
            "fraudflow_state_store_latency_seconds", "Feature state store calls.", ["operation"],
            buckets=_STORE_BUCKETS, registry=registry,
        )  # fmt: skip
        self.audit_commit_latency = Histogram(
            "fraudflow_audit_commit_seconds",
            "Time from handing records to the audit log until they are durable (their group "
            "commit, fsync included); every decision waits for it before its answer.",
            buckets=_COMMIT_BUCKETS, registry=registry,
        )  # fmt: skip
        # livemax: a version shows while any live worker serves it (during a rolling reload,
        # both); livemin: loaded only when every worker is.
        self.model_info = Gauge(
            "fraudflow_model_info", "The model being served (value 1).", ["model_version"],
            registry=registry, multiprocess_mode="livemax",
        )  # fmt: skip
        self.model_loaded = Gauge(
            "fraudflow_model_loaded", "1 when a model is loaded and the state store is open.",
            registry=registry, multiprocess_mode="livemin",
        )  # fmt: skip
        self.score_psi = Gauge(
            "fraudflow_score_psi", "Population stability index of recent scores vs validation.",
            registry=registry, multiprocess_mode="livemax",
        )  # fmt: skip
        self.case_verdicts = Counter(
            "fraudflow_case_verdicts", "Review console verdicts, by outcome.", ["outcome"],
            registry=registry,
        )  # fmt: skip
        for outcome in OUTCOMES:  # both series exist from the start, for rate()
            self.case_verdicts.labels(outcome=outcome)
        self.case_time_to_verdict = Histogram(
            "fraudflow_case_time_to_verdict_seconds",
            "Time from a review case's opening to its verdict.",
            buckets=_VERDICT_BUCKETS, registry=registry,
        )  # fmt: skip
        self.shadow_score = Histogram(
            "fraudflow_shadow_score", "Fraud scores of the challengers scored in shadow.",
            ["model_version"], buckets=_SCORE_BUCKETS, registry=registry,
        )  # fmt: skip
        self.shadow_decisions = Counter(
            "fraudflow_shadow_decisions",
            "Challengers' decisions, by whether they agree with the champion's.",
            ["model_version", "agreement"], registry=registry,
        )  # fmt: skip
        self.shadow_errors = Counter(
            "fraudflow_shadow_errors",
            "Challenger verdicts missing: it raised (error), was late (timed_out), or was still "
            "stuck on an earlier group (busy). The champion answered either way.",
            ["model_version", "kind"], registry=registry,
        )  # fmt: skip
        self._scrape_collectors: list[Collector] = []
        self._version: str | None = None
        self._challengers: list[str] = []

    def add_scrape_collector(self, collector: Collector) -> None:
        """A collector read at each scrape, in every mode (``CaseGaugeCollector``)."""
        self._scrape_collectors.append(collector)
        if self.multiprocess_dir is None:
            self.registry.register(collector)

    def model_changed(self, version: str | None) -> None:
        if self._version is not None and self._version != version:
            if self.multiprocess_dir is None:
                self.model_info.remove(self._version)
            else:  # prometheus_client cannot remove labels across processes: zero it instead
                self.model_info.labels(model_version=self._version).set(0)
        self._version = version
        if version is not None:
            self.model_info.labels(model_version=version).set(1)
        self.model_loaded.set(0 if version is None else 1)

    def challengers_changed(self, versions: Sequence[str]) -> None:
        """The challengers served now: their series exist from the start (for rate()), and
        those of challengers gone are removed (single process; in multiprocess mode they stay
        and stop moving)."""
        if self.multiprocess_dir is None:
            for gone in set(self._challengers) - set(versions):
                for metric in (self.shadow_score, self.shadow_decisions, self.shadow_errors):
                    _remove_version(metric, gone)
        for version in versions:
            for kind in SHADOW_ERROR_KINDS:
                self.shadow_errors.labels(model_version=version, kind=kind)
            for agreement in ("agree", "disagree"):
                self.shadow_decisions.labels(model_version=version, agreement=agreement)
        self._challengers = list(versions)

    def observe_shadow(
        self, lineup: Lineup, champion: Judgements, results: Sequence[ShadowResult]
    ) -> None:
        """A group's challenger verdicts given with its answer (``pending`` ones are observed
        when scored, by ``observe_challenger``)."""
        for challenger, result in zip(lineup.challengers, results, strict=True):
            if result.status != "pending":
                self.observe_challenger(challenger.model_version, result, champion.actions)

    def observe_challenger(
        self, version: str, result: ShadowResult, champion: Sequence[str]
    ) -> None:
        """One challenger's verdicts on a group: scores, agreement with the champion's actions
        ``champion``, failures. Thread-safe (a shadow lane's thread calls it)."""
        if result.judged is None:  # counted per decision, as the agreement
            errors = self.shadow_errors.labels(model_version=version, kind=result.status)
            errors.inc(len(champion))
            return
        observe_many(self.shadow_score.labels(model_version=version), result.judged.scores)
        agree = sum(map(str.__eq__, result.judged.actions, champion))
        disagree = len(champion) - agree
        decisions = self.shadow_decisions
        if agree:
            decisions.labels(model_version=version, agreement="agree").inc(agree)
        if disagree:
            decisions.labels(model_version=version, agreement="disagree").inc(disagree)

    def render(self) -> bytes:
        """The text exposition format; in multiprocess mode, of all workers together."""
        if self.multiprocess_dir is None:
            return generate_latest(self.registry)
        merged = CollectorRegistry()
        prom_multiprocess.MultiProcessCollector(merged, path=str(self.multiprocess_dir))
        for collector in self._scrape_collectors:
            merged.register(collector)
        return generate_latest(merged)

    def process_exiting(self) -> None:
        """Drop this worker's live gauges (multiprocess mode), so they stop counting."""
        if self.multiprocess_dir is not None:
            prom_multiprocess.mark_process_dead(os.getpid(), path=str(self.multiprocess_dir))


class CaseGaugeCollector(Collector):
    """The ``CASE_GAUGES``, from ``read()`` at each scrape (name -> value; None: no case
    store yet, no series). A failing read is logged and leaves the gauges out of that
    scrape rather than failing it."""

    def __init__(self, read: Callable[[], dict[str, float] | None]) -> None:
        self._read = read

    def describe(self) -> Iterator[Metric]:  # without reading: registering opens nothing
        for name, text in CASE_GAUGES.items():
            yield GaugeMetricFamily(name, text)

    def collect(self) -> Iterator[Metric]:
        try:
            values = self._read()
        except Exception:
            log.exception("reading the review cases' gauges failed")
            return
        for name, text in CASE_GAUGES.items():
            if values is not None:
                yield GaugeMetricFamily(name, text, value=values[name])


class ScoreDrift:
    """The last ``window`` served scores, and their PSI against the run's validation scores.

    Both sides are the served (calibrated) score; as the bins are quantiles, the PSI is the
    same on raw scores, since calibration is increasing.

    ``add`` is cheap (a copy into a ring buffer); the PSI is recomputed at most every
    ``interval_seconds``, from at least ``min_scores`` scores. Not thread-safe: the service
    calls it from its event loop only.
    """

    def __init__(
        self,
        reference: np.ndarray,
        *,
        window: int,
        interval_seconds: float,
        min_scores: int = 100,
        bins: int = 10,
    ) -> None:
        reference = np.asarray(reference, dtype=np.float64)
        self.reference = reference[~np.isnan(reference)]
        self._ring = np.zeros(window, dtype=np.float64)
        self._next = 0
        self._filled = 0
        self._interval = interval_seconds
        self._min = min_scores
        self._bins = bins
        self._last = time.monotonic()

    def add(self, scores: np.ndarray) -> None:
        scores = scores[-len(self._ring) :]
        n, size = len(scores), len(self._ring)
        end = self._next + n
        if end <= size:
            self._ring[self._next : end] = scores
        else:
            split = size - self._next
            self._ring[self._next :] = scores[:split]
            self._ring[: n - split] = scores[split:]
        self._next = end % size
        self._filled = min(self._filled + n, size)

    def due(self) -> bool:
        return self._filled >= self._min and time.monotonic() - self._last >= self._interval

    def psi(self) -> float:
        """``fraudflow.eval.drift.population_stability_index`` of the window (its tie rule:
        bins right-closed at the reference's merged quantiles); NaN while no score is a number.
        """
        self._last = time.monotonic()
        recent = self._ring[: self._filled]
        recent = recent[~np.isnan(recent)]  # a NaN score must not fail the request it rode on
        if recent.size == 0 or self.reference.size == 0:
            return float("nan")
        return population_stability_index(self.reference, recent, bins=self._bins)


def _remove_version(metric: Histogram | Counter, version: str) -> None:
    """Remove every series of ``metric`` whose model_version is ``version``."""
    at = metric._labelnames.index("model_version")
    with metric._lock:
        keys = [key for key in metric._metrics if key[at] == version]
    for key in keys:
        metric.remove(*key)
