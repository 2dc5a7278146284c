"""What the routes depend on: the service of the app.

The service core itself lives in ``fraudflow.serve.service``; the POST routes' key checks and
body handling in ``fraudflow.serve.endpoints``.
"""

from __future__ import annotations

from fastapi import Request

from fraudflow.serve.service import DecisionService

__all__ = ["get_service", "service_of"]

# The dependencies are ``async def``: FastAPI runs a plain ``def`` dependency in its thread
# pool, two thread hops per request that cost more than the decision itself.


async def get_service(request: Request) -> DecisionService:
    return service_of(request)


def service_of(request: Request) -> DecisionService:
    service: DecisionService = request.app.state.service
    return service
