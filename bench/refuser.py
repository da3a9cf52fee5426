"""The overload section's floor: a bare Starlette app that answers every chat request with the
node's 429 model_busy body at once, served by uvicorn as the node is (no access log).

It does nothing else: no key, no store, no engine. Driven by the same client in the same
process while the node's engine is as busy as in the overload run, its 429 latency is what
any Python server gets on this machine under that load; the node's own is compared with it.
``REFUSER_RETRY_MS`` is the mean retry-after-ms it tells, spread as the node spreads its own.
"""

from __future__ import annotations

import os
import random

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

RETRY_MS = float(os.environ.get("REFUSER_RETRY_MS", "350"))
BODY = {
    "error": {
        "message": "All slots are busy; retry shortly.",
        "type": "rate_limit_error",
        "param": None,
        "code": "model_busy",
    }
}


async def refuse(request: Request) -> Response:
    await request.body()
    retry_ms = RETRY_MS * random.uniform(0.5, 1.5)
    return JSONResponse(
        BODY,
        status_code=429,
        headers={"retry-after-ms": str(round(retry_ms)), "retry-after": "1"},
    )


async def ready(request: Request) -> Response:
    return Response(status_code=200)


app = Starlette(
    routes=[
        Route("/v1/chat/completions", refuse, methods=["POST"]),
        Route("/health/ready", ready, methods=["GET"]),
    ]
)
