"""What the routes depend on: the service of the app, and the API-key checks.

The service core itself lives in ``fraudflow.serve.service``.
"""

from __future__ import annotations

from fastapi import HTTPException, Request

from fraudflow.serve.auth import NO_VALID_KEY
from fraudflow.serve.service import DecisionService

__all__ = ["authorise", "get_service", "require_admin", "require_client", "service_of"]

# The dependencies are ``async def``: FastAPI runs a plain ``def`` dependency in its thread
# pool, two thread hops per request that cost more than the decision itself.


async def get_service(request: Request) -> DecisionService:
    return service_of(request)


def service_of(request: Request) -> DecisionService:
    service: DecisionService = request.app.state.service
    return service


def authorise(request: Request, *, admin: bool) -> None:
    service = service_of(request)
    role = service.keys.role_of_header(request.headers.get("authorization"))
    if role is None:
        raise HTTPException(401, NO_VALID_KEY, {"WWW-Authenticate": "Bearer"})
    if admin and role != "admin":
        raise HTTPException(403, "this API key may not use admin routes")


async def require_client(request: Request) -> None:
    authorise(request, admin=False)


async def require_admin(request: Request) -> None:
    authorise(request, admin=True)
