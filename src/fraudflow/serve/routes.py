"""The HTTP routes: thin shells over ``DecisionService``.

    POST /v1/decisions         one transaction -> DecisionOut              client key
    POST /v1/decisions/batch   {"transactions": [...]} (<= 10,000)         client key
    POST /v1/labels            a fraud label -> LabelOut                   client key
    POST /v1/admin/reload      {"run": path, "shadow": [path, ...]} (both optional)
                               -> ReloadOut                                admin key
    GET  /healthz              the process is alive
    GET  /readyz               200 once a model, the state store and the audit log are ready;
                               503 while loading, or naming each failing part and its cause
    GET  /metrics              Prometheus text format

Health, readiness and metrics are open: probes and scrapers carry no keys, and they reveal no
transaction data. The POST routes are answered by ``fraudflow.serve.endpoints.answer`` (in
the app, before FastAPI's routing: ``DirectRoutes``); their endpoints here only document them:
the body, the bearer key, and every status they answer with.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Callable
from typing import Any, Literal

from fastapi import APIRouter, Depends, FastAPI, Response, Security
from fastapi.responses import JSONResponse
from fastapi.security import HTTPBearer
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from fraudflow.serve.deps import get_service
from fraudflow.serve.endpoints import (
    BATCH,
    DECISIONS,
    LABELS,
    RELOAD,
    PostRoute,
    answered_by,
    post_routes,
)
from fraudflow.serve.metrics import CONTENT_TYPE_LATEST
from fraudflow.serve.schemas import (
    DecisionBatchOut,
    DecisionOut,
    ErrorOut,
    HealthOut,
    LabelOut,
    ReloadOut,
    ValidationErrorOut,
)
from fraudflow.serve.service import DecisionService
from fraudflow.serve.settings import ServeSettings

__all__ = ["DECISION_ROUTES", "ROUTES", "build_router", "publish_exact_schemas"]

ROUTES = frozenset({DECISIONS, BATCH, LABELS, RELOAD, "/healthz", "/readyz", "/metrics"})
DECISION_ROUTES = frozenset({DECISIONS, BATCH})

_BEARER = HTTPBearer(
    scheme_name="bearer",
    description="An API key: a client key, or an admin key (which is also a client key).",
    auto_error=False,
)
_TEXT = {"schema": {"type": "string"}}


def _error(description: str, **headers: str) -> dict[str, Any]:
    documented = {name: {"description": text} | _TEXT for name, text in headers.items()}
    return {"model": ErrorOut, "description": description, "headers": documented}


Answers = dict[int | str, dict[str, Any]]
_ANSWERS: Answers = {
    400: _error("the body ended early: the client disconnected"),
    401: _error("missing or invalid API key", **{"WWW-Authenticate": "Bearer"}),
    413: _error("the body is larger than the route's limit"),
    415: _error("the Content-Type is not application/json"),
    422: {"model": ValidationErrorOut, "description": "the body is not valid"},
    503: _error(
        "the model, the feature state store or the audit log is unavailable",
        **{"Retry-After": "seconds to wait before retrying"},
    ),
}
_RELOAD: Answers = {
    400: _error("the run cannot be loaded, or the client disconnected"),
    403: _error("the API key is not an admin key"),
}


def build_router(settings: ServeSettings) -> APIRouter:
    """The routes, with the body models and limits of ``settings``."""
    router = APIRouter()
    posts = post_routes(settings)
    documented: list[tuple[str, str, str, type[BaseModel], Answers]] = [
        (DECISIONS, "decide", "Decide one transaction", DecisionOut, _ANSWERS),
        (BATCH, "decide_batch", "Decide transactions in timestamp order", DecisionBatchOut,
         _ANSWERS),
        (LABELS, "label", "Record a fraud label", LabelOut, _ANSWERS),
        (RELOAD, "reload", "Load a run and serve its model", ReloadOut, _ANSWERS | _RELOAD),
    ]  # fmt: skip
    for path, name, summary, out, answers in documented:
        route = posts[path]
        router.add_api_route(
            path, _documentation(route), methods=["POST"], response_model=out,
            responses=answers, route_class_override=answered_by(route), name=name,
            summary=summary, operation_id=name,
        )  # fmt: skip

    @router.get("/healthz", response_model=HealthOut)
    async def healthz() -> Response:
        return Response(b'{"status":"ok"}', media_type="application/json")

    @router.get("/readyz", response_model=HealthOut, responses={503: {"model": HealthOut}})
    async def readyz(service: DecisionService = Depends(get_service)) -> Response:
        status, body = service.readiness()
        return JSONResponse(body, status)

    @router.get(
        "/metrics",
        response_class=Response,
        responses={200: {"content": {CONTENT_TYPE_LATEST.split(";")[0]: _TEXT}}},
    )
    async def metrics(service: DecisionService = Depends(get_service)) -> Response:
        # Multi-worker servers merge the workers' files: a disk read, off the event loop.
        content = await asyncio.to_thread(service.metrics.render)
        return Response(content=content, media_type=CONTENT_TYPE_LATEST)

    return router


def _documentation(route: PostRoute) -> Callable[..., Any]:
    """An endpoint whose signature documents ``route`` (body, key); ``answer`` serves it."""

    async def endpoint(**_: Any) -> None:
        raise AssertionError("answered by fraudflow.serve.endpoints.answer")

    body = inspect.Parameter(
        "body",
        inspect.Parameter.KEYWORD_ONLY,
        annotation=route.model | None if route.body_optional else route.model,
        default=None if route.body_optional else inspect.Parameter.empty,
    )
    key = inspect.Parameter(
        "key", inspect.Parameter.KEYWORD_ONLY, annotation=Any, default=Security(_BEARER)
    )
    endpoint.__signature__ = inspect.Signature([body, key])  # type: ignore[attr-defined]
    return endpoint


def publish_exact_schemas(app: FastAPI, settings: ServeSettings) -> None:
    """The app's OpenAPI document, with the request bodies' schemas as pydantic writes them.

    FastAPI's OpenAPI model reads every numeric bound as a float, so the ids' signed 64-bit
    bounds would be published rounded (2**63 + 1 as 9.223372036854776e+18): clients and
    fuzzers reading the document would be off by up to a thousand at the ends of the range.
    """
    mode: Literal["validation"] = "validation"
    models = [(route.model, mode) for route in post_routes(settings).values()]
    _, exact = models_json_schema(models, ref_template="#/components/schemas/{model}")
    fastapi_document = app.openapi

    def document() -> dict[str, Any]:
        doc = fastapi_document()  # built once, then cached by FastAPI
        doc["components"]["schemas"].update(exact["$defs"])
        return doc

    app.openapi = document  # type: ignore[method-assign]
