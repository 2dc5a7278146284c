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

The decision and label routes are ``_direct`` routes: their handler checks the key, then
validates the raw body with pydantic-core in one call (``model_validate_json``) and calls the
service, instead of FastAPI's dependency solving and JSON-then-model parsing, which showed up
in profiles of the single-decision route as a visible share of its CPU. The endpoint
functions still document the routes in OpenAPI (and do the same if called), and errors keep
FastAPI's shapes (401 from the key check, 422 with ``["body", field, ...]`` locations).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

from fastapi import APIRouter, Depends, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from pydantic import BaseModel, ValidationError

from fraudflow.serve.deps import (
    DecisionService,
    authorise,
    get_service,
    require_admin,
    require_client,
    service_of,
)
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
from fraudflow.serve.settings import ServeSettings

__all__ = ["DECISION_ROUTES", "ROUTES", "build_router"]

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


def build_router(settings: ServeSettings) -> APIRouter:
    """The routes, with the body size limits of ``settings`` (413 beyond them)."""
    router = APIRouter()
    client, admin = [Depends(require_client)], [Depends(require_admin)]
    single, batch = settings.max_body_bytes, settings.max_batch_body_bytes

    async def decide(
        tx: TransactionIn, service: DecisionService = Depends(get_service)
    ) -> Response:
        return _json(await _decide(service, tx))

    async def decide_batch(
        body: DecisionBatchIn, service: DecisionService = Depends(get_service)
    ) -> Response:
        return _json(await _decide_batch(service, body))

    async def label(label: LabelIn, service: DecisionService = Depends(get_service)) -> Response:
        return _json(await _label(service, label))

    direct: list[tuple[str, Callable[..., Any], type[Any], int, type[APIRoute]]] = [
        (DECISIONS, decide, DecisionOut, single, _direct(TransactionIn, _decide)),
        (BATCH, decide_batch, DecisionBatchOut, batch, _direct(DecisionBatchIn, _decide_batch)),
        (LABELS, label, LabelOut, single, _direct(LabelIn, _label)),
    ]
    for path, endpoint, out, limit, route_class in direct:
        router.add_api_route(
            path, endpoint, methods=["POST"], response_model=out, dependencies=client,
            max_body_size=limit, route_class_override=route_class,
        )  # fmt: skip

    @router.post(RELOAD, response_model=ReloadOut, dependencies=admin, max_body_size=single)
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
        engine = service.engine
        if service.ready and engine is not None:
            return JSONResponse({"status": "ready", "model_version": engine.model_version})
        return JSONResponse({"status": "failed" if service.failed else "loading"}, 503)

    @router.get("/metrics")
    async def metrics(service: DecisionService = Depends(get_service)) -> Response:
        return Response(content=service.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    return router


def _decide(service: DecisionService, tx: TransactionIn) -> Awaitable[bytes]:
    return service.decide(tx)


def _decide_batch(service: DecisionService, body: DecisionBatchIn) -> Awaitable[bytes]:
    return service.decide_batch(body.transactions)


def _label(service: DecisionService, label: LabelIn) -> Awaitable[bytes]:
    return service.label(label)


M = TypeVar("M", bound=BaseModel)


def _direct(
    model: type[M], handle: Callable[[DecisionService, M], Awaitable[bytes]]
) -> type[APIRoute]:
    """An ``APIRoute`` whose request handler is: key check, ``model`` from the raw body,
    ``handle`` (see the module docstring). The endpoint function only documents the route."""

    class DirectRoute(APIRoute):
        def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
            async def handler(request: Request) -> Response:
                authorise(request, admin=False)
                body = await request.body()
                try:
                    parsed = model.model_validate_json(body)
                except ValidationError as exc:
                    errors = exc.errors(include_url=False)
                    for error in errors:
                        error["loc"] = ("body", *error["loc"])
                    raise RequestValidationError(errors, body=body) from None
                return _json(await handle(service_of(request), parsed))

            return handler

    return DirectRoute
