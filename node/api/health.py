"""Health routes, open without a key: live (the process serves) and ready (every model is)."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from node.registry import Registry


def _models(registry: Registry) -> dict[str, dict]:
    return {e.spec.name: e.describe() for e in registry.entries}


async def live(request: Request) -> Response:
    return JSONResponse({"status": "live"})


async def ready(request: Request) -> Response:
    registry: Registry = request.app.state.registry
    ok = registry.all_ready and not request.app.state.drain.draining
    body = {"status": "ready" if ok else "not_ready", "models": _models(registry)}
    return JSONResponse(body, status_code=200 if ok else 503)


async def health(request: Request) -> Response:
    """200 while the process serves; the body says how each model stands."""
    registry: Registry = request.app.state.registry
    status = "ok" if registry.all_ready else "degraded"
    return JSONResponse({"status": status, "models": _models(registry)})
