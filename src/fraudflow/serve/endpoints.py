"""The POST routes, answered by one implementation: ``answer``.

    API key (401, 403) -> Content-Type (415) -> the body within its limit (413)
    -> one pydantic-core validation of the raw bytes, with the request's clock (422)
    -> the service -> the answer (its ``ServeError``s: 503, ...)

A request reaches ``answer`` one of two ways, and gets the same bytes back either way:

- ``DirectRoutes``, plain ASGI in front of FastAPI, is how the app serves these routes. For a
  call this cheap, FastAPI's and Starlette's layers (routing, the middleware stack, request and
  response objects) are a sizeable share of its CPU (``benchmarks/serve.py`` measures the
  service), and none of them is needed here.
- ``answered_by`` makes the router's routes (``fraudflow.serve.routes``) call ``answer`` in
  place of FastAPI's own parsing: the router alone answers the same way, and its endpoints'
  signatures still document the bodies in OpenAPI.

The key is checked before the body is read, so a caller without one learns nothing about the
body's rules. Answers carry fixed detail strings: a ``ServeError`` its own (with
``Retry-After`` on a 503), a validation failure each problem's place (``["body", field,
...]``), type and message, never the input it was given. Errors that are none of these
propagate, so the app's 500 handler and the request metrics see them.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Coroutine, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
from fastapi import Request, Response
from fastapi.routing import APIRoute
from pydantic import BaseModel, ValidationError
from starlette.types import ASGIApp, Receive, Scope, Send

from fraudflow.errors import ServeError
from fraudflow.serve.auth import NO_VALID_KEY
from fraudflow.serve.schemas import (
    LabelIn,
    ReloadIn,
    RequestClock,
    batch_model,
    transaction_model,
)
from fraudflow.serve.service import DecisionService
from fraudflow.serve.settings import ServeSettings, parse_splits, split_text

__all__ = [
    "ADMIN_ONLY",
    "BATCH",
    "DECISIONS",
    "ERROR_KIND_KEY",
    "LABELS",
    "NOT_JSON",
    "RELOAD",
    "Answer",
    "DirectRoutes",
    "PostRoute",
    "answer",
    "answered_by",
    "post_routes",
]

DECISIONS, BATCH, LABELS, RELOAD = (
    "/v1/decisions",
    "/v1/decisions/batch",
    "/v1/labels",
    "/v1/admin/reload",
)
# scope["state"][ERROR_KIND_KEY]: the metric kind of a ServeError, for the request metrics.
ERROR_KIND_KEY = "fraudflow_error_kind"
NOT_JSON = "Content-Type must be application/json"
ADMIN_ONLY = "this API key may not use admin routes"

Handle = Callable[[DecisionService, Any], Awaitable[bytes]]
Headers = list[tuple[bytes, bytes]]


@dataclass(frozen=True)
class PostRoute:
    """What one POST route takes: its body's model, its handler, its body limit, its role."""

    model: type[BaseModel]
    handle: Handle
    limit: int  # body bytes; 413 beyond
    admin: bool = False  # an admin key is required (403 for a client key)
    # No body (which needs no Content-Type) or JSON null is read as ``model()``.
    body_optional: bool = False


@dataclass(frozen=True)
class Answer:
    status: int
    body: bytes
    headers: Headers  # besides Content-Type and Content-Length
    error_kind: str | None = None  # a ServeError's metric kind

    def raw_headers(self) -> Headers:
        length = (b"content-length", str(len(self.body)).encode())
        return [(b"content-type", b"application/json"), length, *self.headers]


class _Refused(Exception):
    """A request answered before the service sees it."""

    def __init__(self, status: int, detail: object, headers: Headers | None = None) -> None:
        self.answer = Answer(status, orjson.dumps({"detail": detail}), headers or [])


async def answer(
    service: DecisionService, route: PostRoute, headers: Mapping[bytes, bytes], receive: Receive
) -> Answer:
    """The answer to one POST request (module docstring); ``headers`` lower-case, as ASGI's."""
    try:
        parsed = await _accept(service, route, headers, receive)
        return Answer(200, await route.handle(service, parsed), [])
    except _Refused as refused:
        return refused.answer
    except ServeError as exc:
        # A 503 says when to retry: the state store or the model may be back in a moment.
        retry = [(b"retry-after", b"1")] if exc.status == 503 else []
        return Answer(exc.status, orjson.dumps({"detail": exc.detail}), retry, exc.kind)


async def _accept(
    service: DecisionService, route: PostRoute, headers: Mapping[bytes, bytes], receive: Receive
) -> BaseModel:
    """The request's body as ``route.model``, once the caller may send it; or ``_Refused``."""
    authorization = headers.get(b"authorization")
    header = None if authorization is None else authorization.decode("latin-1")
    role = service.keys.role_of_header(header)
    if role is None:
        raise _Refused(401, NO_VALID_KEY, [(b"www-authenticate", b"Bearer")])
    if route.admin and role != "admin":
        raise _Refused(403, ADMIN_ONLY)
    is_json = _is_json(headers.get(b"content-type"))
    if not is_json and not route.body_optional:
        raise _Refused(415, NOT_JSON)
    body = await _read_body(headers, receive, route.limit)
    if route.body_optional and (not body or body.strip() == b"null"):
        return route.model()
    if not is_json:
        raise _Refused(415, NOT_JSON)
    return _validate(route.model, body, RequestClock.read(service.settings.max_clock_skew_seconds))


def _is_json(content_type: bytes | None) -> bool:
    """``application/json``, parameters (``; charset=utf-8``) allowed, any letter case."""
    if content_type is None:
        return False
    return content_type.partition(b";")[0].strip().lower() == b"application/json"


async def _read_body(headers: Mapping[bytes, bytes], receive: Receive, limit: int) -> bytes:
    """The request body, or 413 once it is known to exceed ``limit`` (declared or read)."""
    declared = headers.get(b"content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise _Refused(413, "Content Too Large")
    chunks: list[bytes] = []
    size, more = 0, True
    while more:
        message = await receive()
        if message["type"] == "http.disconnect":  # nobody reads this answer
            raise _Refused(400, "client disconnected")
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise _Refused(413, "Content Too Large")
        chunks.append(chunk)
        more = message.get("more_body", False)
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def _validate(model: type[BaseModel], body: bytes, clock: RequestClock) -> BaseModel:
    """The body parsed and validated in one pass; invalid JSON and invalid UTF-8 are 422s.

    The errors leave out the input: it may be the whole body, or bytes that are not UTF-8.
    """
    try:
        return model.model_validate_json(body, context=clock)
    except ValidationError as exc:
        problems = exc.errors(include_url=False, include_context=False, include_input=False)
        for problem in problems:
            problem["loc"] = ("body", *problem["loc"])
        raise _Refused(422, problems) from None


class DirectRoutes:
    """ASGI middleware answering the POST routes of ``routes`` (module docstring)."""

    def __init__(
        self, app: ASGIApp, *, service: DecisionService, routes: dict[str, PostRoute]
    ) -> None:
        self.app = app
        self.service = service
        self.routes = routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        route = self.routes.get(scope["path"]) if scope["type"] == "http" else None
        if route is None or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        result = await answer(self.service, route, dict(scope["headers"]), receive)
        if result.error_kind is not None:
            scope.setdefault("state", {})[ERROR_KIND_KEY] = result.error_kind
        start = {"type": "http.response.start", "status": result.status}
        await send(start | {"headers": result.raw_headers()})
        await send({"type": "http.response.body", "body": result.body})


def answered_by(route: PostRoute) -> type[APIRoute]:
    """A FastAPI route class whose requests ``answer`` handles (the endpoint only documents)."""

    async def handle(request: Request) -> Response:
        service: DecisionService = request.app.state.service
        scope = request.scope
        result = await answer(service, route, dict(scope["headers"]), request.receive)
        if result.error_kind is not None:
            scope.setdefault("state", {})[ERROR_KIND_KEY] = result.error_kind
        response = Response(result.body, result.status)
        response.raw_headers = result.raw_headers()  # as DirectRoutes sends them
        return response

    class AnsweredRoute(APIRoute):
        def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
            return handle

    return AnsweredRoute


def post_routes(settings: ServeSettings) -> dict[str, PostRoute]:
    """The POST routes for ``settings``: body models (with ``--max-amount``) and limits."""
    single, batch = settings.max_body_bytes, settings.max_batch_body_bytes
    return {
        DECISIONS: PostRoute(transaction_model(settings.max_amount), _decide, single),
        BATCH: PostRoute(batch_model(settings.max_amount), _decide_batch, batch),
        LABELS: PostRoute(LabelIn, _label, single),
        RELOAD: PostRoute(ReloadIn, _reload, single, admin=True, body_optional=True),
    }


def _decide(service: DecisionService, tx: Any) -> Awaitable[bytes]:
    return service.decide(tx)


def _decide_batch(service: DecisionService, body: Any) -> Awaitable[bytes]:
    return service.decide_batch(body.transactions)


def _label(service: DecisionService, label: Any) -> Awaitable[bytes]:
    return service.label(label)


async def _reload(service: DecisionService, body: Any) -> bytes:
    run = None if body.run is None else Path(body.run)
    shadow = None if body.shadow is None else [Path(r) for r in body.shadow]
    split = None if body.split is None else parse_splits(split_text(body.split))
    return orjson.dumps(await service.reload(run, shadow=shadow, split=split))
