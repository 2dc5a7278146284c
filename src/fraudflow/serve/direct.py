"""The hot routes (decisions, batch, labels) served as plain ASGI, in front of FastAPI.

A single-decision request costs the service ~0.5 ms of CPU, and FastAPI's and Starlette's
layers (routing, the exception, body-limit and exit-stack middleware, request and response
objects) were a fifth of it in profiles at 1,500 requests/s. ``DirectRoutes`` answers the
three POST routes itself: key check, body read within the size limit, one pydantic-core
validation of the raw body, the service call, one response. Everything else (other routes,
other methods, the OpenAPI documents, which still describe these routes) goes to FastAPI.

The answers are FastAPI's, byte for byte where clients look: 401 with ``WWW-Authenticate``
and the same detail, 413 "Content Too Large", 422 with FastAPI's error list (``["body",
field, ...]`` locations), ``ServeError``s as the app's handler maps them. Errors that are
none of these propagate, so the app's 500 handler and the request metrics see them as before.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from fastapi.encoders import jsonable_encoder
from pydantic import BaseModel, ValidationError
from starlette.types import ASGIApp, Receive, Scope, Send

from fraudflow.errors import ServeError
from fraudflow.serve.auth import NO_VALID_KEY
from fraudflow.serve.routes import BATCH, DECISIONS, LABELS, body_limits
from fraudflow.serve.schemas import DecisionBatchIn, LabelIn, TransactionIn
from fraudflow.serve.service import DecisionService
from fraudflow.serve.settings import ServeSettings

__all__ = ["ERROR_KIND_KEY", "DirectRoutes", "direct_routes", "serve_error_headers"]

# scope["state"][ERROR_KIND_KEY]: the metric kind of a ServeError, for the request metrics.
ERROR_KIND_KEY = "fraudflow_error_kind"

Handle = Callable[[DecisionService, Any], Awaitable[bytes]]
_JSON = [(b"content-type", b"application/json")]


class _Reject(Exception):
    """An answer other than 200, with FastAPI's body."""

    def __init__(self, status: int, body: bytes, headers: list[tuple[bytes, bytes]]) -> None:
        self.status, self.body, self.headers = status, body, headers


class DirectRoutes:
    """ASGI middleware answering the POST routes of ``routes`` (module docstring)."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        service: DecisionService,
        routes: dict[str, tuple[type[BaseModel], Handle, int]],
    ) -> None:
        self.app = app
        self.service = service
        self.routes = routes  # path -> (request model, handler, body limit in bytes)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        route = self.routes.get(scope["path"]) if scope["type"] == "http" else None
        if route is None or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        model, handle, limit = route
        try:
            headers = dict(scope["headers"])
            self._authorise(headers.get(b"authorization"))
            parsed = _validate(model, await _read_body(headers, receive, limit))
            status, body, extra = 200, await handle(self.service, parsed), []
        except _Reject as reject:
            status, body, extra = reject.status, reject.body, reject.headers
        except ServeError as exc:
            scope.setdefault("state", {})[ERROR_KIND_KEY] = exc.kind
            status, body = exc.status, orjson.dumps({"detail": exc.detail})
            extra = serve_error_headers(exc)
        start = {"type": "http.response.start", "status": status}
        length = [(b"content-length", str(len(body)).encode())]
        await send(start | {"headers": _JSON + length + extra})
        await send({"type": "http.response.body", "body": body})

    def _authorise(self, authorization: bytes | None) -> None:
        header = None if authorization is None else authorization.decode("latin-1")
        if self.service.keys.role_of_header(header) is None:
            body = orjson.dumps({"detail": NO_VALID_KEY})
            raise _Reject(401, body, [(b"www-authenticate", b"Bearer")])


def serve_error_headers(exc: ServeError) -> list[tuple[bytes, bytes]]:
    """A 503 says when to retry: the state store or the model may be back in a moment."""
    return [(b"retry-after", b"1")] if exc.status == 503 else []


async def _read_body(headers: dict[bytes, bytes], receive: Receive, limit: int) -> bytes:
    """The request body, or 413 once it is known to exceed ``limit`` (declared or read)."""
    declared = headers.get(b"content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise _too_large()
    chunks: list[bytes] = []
    size, more = 0, True
    while more:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise _Reject(400, b'{"detail":"client disconnected"}', [])
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise _too_large()
        chunks.append(chunk)
        more = message.get("more_body", False)
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def _too_large() -> _Reject:
    return _Reject(413, b'{"detail":"Content Too Large"}', [])


def _validate(model: type[BaseModel], body: bytes) -> BaseModel:
    try:
        return model.model_validate_json(body)
    except ValidationError as exc:
        errors = exc.errors(include_url=False)
        for error in errors:
            error["loc"] = ("body", *error["loc"])
        raise _Reject(422, orjson.dumps({"detail": jsonable_encoder(errors)}), []) from None


def direct_routes(settings: ServeSettings) -> dict[str, tuple[type[BaseModel], Handle, int]]:
    """The routes ``DirectRoutes`` answers, with their models, handlers and body limits (the
    router's, ``fraudflow.serve.routes.body_limits``)."""
    limits = body_limits(settings)
    return {
        DECISIONS: (TransactionIn, _decide, limits[DECISIONS]),
        BATCH: (DecisionBatchIn, _decide_batch, limits[BATCH]),
        LABELS: (LabelIn, _label, limits[LABELS]),
    }


def _decide(service: DecisionService, tx: TransactionIn) -> Awaitable[bytes]:
    return service.decide(tx)


def _decide_batch(service: DecisionService, body: DecisionBatchIn) -> Awaitable[bytes]:
    return service.decide_batch(body.transactions)


def _label(service: DecisionService, label: LabelIn) -> Awaitable[bytes]:
    return service.label(label)
