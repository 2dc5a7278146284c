"""The decision service's ASGI app: ``create_app(settings)``, its lifespan, and ``run_server``.

Start-up order: the app answers ``/healthz`` at once; the lifespan opens the state store and
the audit log and loads the model in a thread, and ``/readyz`` turns 200 when both are done.
Shut-down commits the audit records still queued before closing.

Errors become fixed detail strings at the edge: a ``ServeError`` its status in the POST routes'
one request path (``fraudflow.serve.endpoints.answer``), anything unexpected 500 "internal
error" here (the cause goes to the log). Every error response is counted in
``fraudflow_errors_total`` by kind.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import shutil
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import torch
import uvicorn
from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from fraudflow.serve.auth import load_api_keys
from fraudflow.serve.console import ConsoleStores, build_console_router
from fraudflow.serve.database import open_database
from fraudflow.serve.endpoints import ERROR_KIND_KEY, DirectRoutes, post_routes
from fraudflow.serve.metrics import CaseGaugeCollector, ServiceMetrics
from fraudflow.serve.routes import DECISION_ROUTES, ROUTES, build_router, publish_exact_schemas
from fraudflow.serve.runcheck import verify_run
from fraudflow.serve.service import ACTIVE_MODEL_FILE, DecisionService, EngineLoader
from fraudflow.serve.settings import ServeSettings, load_settings, settings_environment
from fraudflow.serve.shadow import check_challenger

__all__ = ["app_from_environment", "create_app", "run_server", "tune_process"]

log = logging.getLogger("fraudflow.serve")

_ERROR_KIND_BY_STATUS = {
    401: "auth", 403: "auth", 413: "too_large", 415: "validation", 422: "validation"
}  # fmt: skip
_WORKER_HEALTHCHECK_SECONDS = 60
_SWITCH_INTERVAL_SECONDS = 0.0005  # see tune_process
_GC_THRESHOLDS = (50_000, 20, 20)  # larger generations than the default 700, the same rules


def create_app(
    settings: ServeSettings, *, loader: EngineLoader | None = None, freeze_gc: bool = False
) -> FastAPI:
    """The app for ``settings``; ``loader`` replaces how a run becomes an ``Engine`` (tests).

    ``freeze_gc``: once loaded, move what the service holds out of the GC's reach
    (``gc.freeze``), process-wide: for a process that only serves (``run_server``).
    """
    metrics = ServiceMetrics(multiprocess_dir=settings.prometheus_multiproc_dir)
    stores = ConsoleStores(settings) if settings.console else None
    service = DecisionService(
        settings,
        metrics=metrics,
        keys=load_api_keys(settings),
        loader=loader,
        open_cases=None if stores is None else (lambda cases: stores.cases.open_cases(cases)),
    )
    if settings.insecure_no_auth:
        log.warning("--insecure-no-auth: every caller may decide, label and reload models")
    # Its verdicts are labels through the service, as POST /v1/labels.
    console = (
        None if stores is None else build_console_router(stores, labels=service, metrics=metrics)
    )
    if stores is not None:
        metrics.add_scrape_collector(CaseGaugeCollector(stores.gauges))
    app = FastAPI(
        title="fraudflow decisions",
        summary="Real-time fraud decisions: score, policy, reasons.",
        lifespan=_lifespan(service, stores, console, freeze_gc=freeze_gc),
    )
    app.state.service = service
    app.include_router(build_router(settings))
    if console is not None:
        app.include_router(console)
    publish_exact_schemas(app, settings)
    app.add_exception_handler(Exception, _internal_error)
    app.add_middleware(DirectRoutes, service=service, routes=post_routes(settings))
    app.add_middleware(_RequestMetrics, metrics=metrics)  # added last: outermost, sees all
    return app


def app_from_environment() -> FastAPI:
    """The uvicorn factory of multi-worker servers: settings from ``FRAUDFLOW_*``."""
    settings = load_settings()
    _log_to_stderr(settings.log_level)
    if settings.process_tuning:
        tune_process()
    return create_app(settings, freeze_gc=settings.process_tuning)


def _log_to_stderr(level: str) -> None:
    """The service's own log lines (model loads, failures) beside uvicorn's."""
    logger = logging.getLogger("fraudflow")
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s:     [fraudflow] %(message)s"))
        logger.addHandler(handler)
        logger.propagate = False
    logger.setLevel(level.upper())


def _lifespan(
    service: DecisionService,
    stores: ConsoleStores | None,
    console: APIRouter | None,
    *,
    freeze_gc: bool,
) -> Any:
    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        torch.set_num_threads(service.settings.torch_threads)  # one worker per core
        starting = asyncio.create_task(_start(service, freeze_gc=freeze_gc))
        watchers = [asyncio.create_task(service.watch_health())]
        if service.settings.workers > 1:
            watchers.append(asyncio.create_task(service.watch_reloads()))
        if console is not None:  # owed labels, the case pages' history
            watchers.append(asyncio.create_task(console.console.keep_up()))  # type: ignore[attr-defined]
        try:
            yield
        finally:
            for watcher in watchers:
                watcher.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await watcher
            service.stop_opening()
            await starting  # a load in a thread cannot be cancelled; let it end
            service.close()
            if stores is not None:
                stores.close()
            if freeze_gc:
                gc.unfreeze()

    return lifespan


async def _start(service: DecisionService, *, freeze_gc: bool) -> None:
    """Start the service; with ``freeze_gc``, then keep what it loaded out of every later GC
    collection.

    The model and the state mirror are long-lived; scanning them in each full collection
    cost more than the decisions in between (batch throughput, ``benchmarks/serve.py``).
    """
    await service.start()
    if freeze_gc:
        gc.collect()
        gc.freeze()


def tune_process() -> None:
    """Process-wide tuning for a process that serves (``run_server``, its workers); the
    ``process_tuning`` setting (``FRAUDFLOW_PROCESS_TUNING``) turns it off.

    The audit writer thread needs the GIL back after each fsync to release its waiters; with
    the default switch interval a busy event loop makes it wait a whole interval. A batch request
    allocates hundreds of thousands of short-lived objects: with the default thresholds young
    collections ran every few transactions.
    """
    sys.setswitchinterval(_SWITCH_INTERVAL_SECONDS)
    gc.set_threshold(*_GC_THRESHOLDS)


async def _internal_error(request: Request, exc: Exception) -> JSONResponse:
    log.error("unhandled error on %s", request.url.path, exc_info=exc)
    return JSONResponse({"detail": "internal error"}, 500)


class _RequestMetrics:
    """Counts every request by route and status, times the decision routes, counts errors.

    Pure ASGI (no BaseHTTPMiddleware): it adds a few microseconds, not a task per request.
    Unknown paths are one label, ``other``, so a scanner cannot grow the label set.
    """

    def __init__(self, app: ASGIApp, metrics: ServiceMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        route = scope["path"] if scope["path"] in ROUTES else "other"
        status = 500  # if the app raises before starting a response
        started = time.perf_counter()

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            self._count(scope, route, status, time.perf_counter() - started)

    def _count(self, scope: Scope, route: str, status: int, seconds: float) -> None:
        m = self.metrics
        m.requests.labels(route=route, status=str(status)).inc()
        if route in DECISION_ROUTES:
            m.decision_latency.labels(route=route).observe(seconds)
        kind = scope.get("state", {}).get(ERROR_KIND_KEY) or _ERROR_KIND_BY_STATUS.get(status)
        if kind is None and status >= 500:
            kind = "internal"
        if kind is not None:
            m.errors.labels(kind=kind).inc()


# --- running ------------------------------------------------------------------------------


def run_server(settings: ServeSettings) -> None:
    """Serve until interrupted: one process, or uvicorn's workers with an app factory."""
    common: dict[str, Any] = {
        "host": settings.host,
        "port": settings.port,
        "log_level": settings.log_level,
        "access_log": False,  # per-request logging would cost more than a decision
        "server_header": False,
    }
    _log_to_stderr(settings.log_level)
    # Keys, the console's PostgreSQL database (psycopg installed, the server reachable), then
    # the run: a bad one stops the command here (exit 2 with its message), before a port is
    # bound or a worker forked.
    load_api_keys(settings)
    if settings.console and settings.cases is not None:
        open_database(settings.cases).close()
    verify_run(settings.run, timeout_seconds=settings.model_check_timeout_seconds)
    for challenger in settings.challenger_runs:  # verified as the champion, and fed by it
        verify_run(challenger, timeout_seconds=settings.model_check_timeout_seconds)
        check_challenger(settings.run, challenger)
    if settings.workers == 1:
        if settings.prometheus_multiproc_dir is not None:  # set: the client writes files there
            _multiprocess_dir(settings.prometheus_multiproc_dir)
        if settings.process_tuning:
            tune_process()
        uvicorn.run(create_app(settings, freeze_gc=settings.process_tuning), **common)
        return
    # No app here: in prometheus_client's multiprocess mode this process's metrics would count
    # as a live worker's.
    # Reloads announced by a previous server must not choose this one's model.
    (settings.data_folder / ACTIVE_MODEL_FILE).unlink(missing_ok=True)
    metrics_dir = _multiprocess_dir(settings.prometheus_multiproc_dir)
    os.environ.update(settings_environment(settings))
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(metrics_dir)
    try:
        uvicorn.run(
            "fraudflow.serve.app:app_from_environment",
            factory=True,
            workers=settings.workers,
            # A worker importing torch on a busy machine can miss uvicorn's default 5 s
            # health check and be killed mid-start.
            timeout_worker_healthcheck=_WORKER_HEALTHCHECK_SECONDS,
            **common,
        )
    finally:
        if settings.prometheus_multiproc_dir is None:
            shutil.rmtree(metrics_dir, ignore_errors=True)


def _multiprocess_dir(given: Path | None) -> Path:
    """prometheus_client's shared folder, emptied: stale files would add old counts."""
    if given is None:
        return Path(tempfile.mkdtemp(prefix="fraudflow-metrics-"))
    given.mkdir(parents=True, exist_ok=True)
    for stale in given.glob("*.db"):
        stale.unlink()
    return given
