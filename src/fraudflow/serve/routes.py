"""The HTTP routes: thin shells over ``DecisionService``.

    POST /v1/decisions         one transaction -> DecisionOut              client key
    POST /v1/decisions/batch   {"transactions": [...]} (<= 10,000)         client key
    POST /v1/labels            a fraud label -> LabelOut                   client key
    POST /v1/admin/reload      {"run": path} (optional) -> ReloadOut       admin key
    GET  /healthz              the process is alive
    GET  /readyz               200 once a model and the state store are ready, else 503
    GET  /metrics              Prometheus text format

Health, readiness and metrics are open: probes and scrapers carry no keys, and they reveal no
transaction data. Responses are serialised with orjson once (and stored for idempotent
replays); the ``response_model``s document them.

In the app, the decision and label routes are answered before FastAPI by
``fraudflow.serve.direct.DirectRoutes`` (their CPU cost per request); the endpoints here
document them in OpenAPI and answer the same way when the router is used on its own.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Depends, Response
from fastapi.responses import JSONResponse

from fraudflow.serve.deps import get_service, require_admin, require_client
from fraudflow.serve.metrics import CONTENT_TYPE_LATEST
from fraudflow.serve.schemas import (
    DecisionBatchIn,
    DecisionBatchOut,
    DecisionOut,
    HealthOut,
    LabelIn,
    LabelOut,
    ReloadIn,
    ReloadOut,
    TransactionIn,
)
from fraudflow.serve.service import DecisionService
from fraudflow.serve.settings import ServeSettings

__all__ = [
    "BATCH",
    "DECISIONS",
    "DECISION_ROUTES",
    "LABELS",
    "RELOAD",
    "ROUTES",
    "body_limits",
    "build_router",
]

DECISIONS, BATCH, LABELS, RELOAD = (
    "/v1/decisions",
    "/v1/decisions/batch",
    "/v1/labels",
    "/v1/admin/reload",
)
ROUTES = frozenset({DECISIONS, BATCH, LABELS, RELOAD, "/healthz", "/readyz", "/metrics"})
DECISION_ROUTES = frozenset({DECISIONS, BATCH})
_JSON = "application/json"


def _json(body: bytes) -> Response:
    return Response(content=body, media_type=_JSON)


def body_limits(settings: ServeSettings) -> dict[str, int]:
    """Each POST route's body size limit in bytes (413 beyond it)."""
    single = settings.max_body_bytes
    return {DECISIONS: single, BATCH: settings.max_batch_body_bytes, LABELS: single, RELOAD: single}


def build_router(settings: ServeSettings) -> APIRouter:
    """The routes, with the body size limits of ``settings`` (413 beyond them)."""
    router = APIRouter()
    client, admin = [Depends(require_client)], [Depends(require_admin)]
    limits = body_limits(settings)

    async def decide(
        tx: TransactionIn, service: DecisionService = Depends(get_service)
    ) -> Response:
        return _json(await service.decide(tx))

    async def decide_batch(
        body: DecisionBatchIn, service: DecisionService = Depends(get_service)
    ) -> Response:
        return _json(await service.decide_batch(body.transactions))

    async def label(label: LabelIn, service: DecisionService = Depends(get_service)) -> Response:
        return _json(await service.label(label))

    documented: list[tuple[str, Callable[..., Any], type[Any]]] = [
        (DECISIONS, decide, DecisionOut),
        (BATCH, decide_batch, DecisionBatchOut),
        (LABELS, label, LabelOut),
    ]
    for path, endpoint, out in documented:
        router.add_api_route(
            path, endpoint, methods=["POST"], response_model=out, dependencies=client,
            max_body_size=limits[path],
        )  # fmt: skip

    @router.post(RELOAD, response_model=ReloadOut, dependencies=admin, max_body_size=limits[RELOAD])
    async def reload(
        body: ReloadIn | None = None, service: DecisionService = Depends(get_service)
    ) -> ReloadOut:
        run = None if body is None or body.run is None else Path(body.run)
        return ReloadOut(**await service.reload(run))

    @router.get("/healthz", response_model=HealthOut)
    async def healthz() -> Response:
        return _json(b'{"status":"ok"}')

    @router.get("/readyz", response_model=HealthOut, responses={503: {"model": HealthOut}})
    async def readyz(service: DecisionService = Depends(get_service)) -> Response:
        status, body = service.readiness()
        return JSONResponse(body, status)

    @router.get("/metrics")
    async def metrics(service: DecisionService = Depends(get_service)) -> Response:
        return Response(content=service.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    return router
