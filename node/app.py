"""The node as a Starlette app. A request flows top to bottom:

    CORSMiddleware: browsers' preflights answered, the headers they may read exposed
    -> AudioHeadersMiddleware: X-Audio-* on every answer of the transcription route
    -> MetricsMiddleware: times every request by route and status (GET /metrics)
    -> DrainMiddleware: 503 shutting_down once SIGTERM came; counts requests in flight
    -> AccountMiddleware: key (401), X-RateLimit-* headers on whatever goes out
    -> route -> handler (api/*) -> registry.resolve (404/400) -> require_ready (503)
    -> admit a slot (429 model_busy) -> reserve the estimate (429 insufficient_quota)
    -> engine -> settle what was used -> response (slot released in every outcome)

Models load in the background from the lifespan, so the server answers from its first moment.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from node import metrics
from node.accounts import Store
from node.api import audio, chat, embeddings, health, models
from node.billing import AccountMiddleware, flush_settles
from node.config import ModelSpec, Settings
from node.draining import Drain, DrainMiddleware
from node.engines.factory import make_engine
from node.errors import (
    EngineError,
    MethodNotAllowed,
    NodeError,
    NotFound,
    error_response,
)
from node.images import ImagePolicy
from node.loop_lag import watch_loop_lag
from node.metrics import Metrics, MetricsMiddleware
from node.registry import EngineFactory, Registry

log = logging.getLogger(__name__)

ROUTES = [
    Route("/v1/chat/completions", chat.chat_completions, methods=["POST"]),
    Route("/v1/completions", chat.completions, methods=["POST"]),
    Route("/v1/embeddings", embeddings.embeddings, methods=["POST"]),
    Route(audio.PATH, audio.transcriptions, methods=["POST"]),
    Route("/v1/models", models.list_models, methods=["GET"]),
    Route("/v1/models/{model:path}", models.get_model, methods=["GET"]),
    Route("/health", health.health, methods=["GET"]),
    Route("/health/live", health.live, methods=["GET"]),
    Route("/health/ready", health.ready, methods=["GET"]),
    Route("/metrics", metrics.metrics, methods=["GET"]),
]


async def _node_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, NodeError)
    return error_response(exc)


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    if exc.status_code == 405:
        err = MethodNotAllowed(f"{request.method} is not allowed on this route.")
        err.extra_headers.update(exc.headers or {})  # Allow: the methods the route takes
        return error_response(err)
    if exc.status_code == 404:
        return error_response(NotFound(f"No route {request.method} {request.url.path}."))
    return error_response(NodeError(str(exc.detail), status=exc.status_code, code="http_error"))


async def _unexpected(request: Request, exc: Exception) -> Response:
    log.exception("unhandled error on %s", request.url.path, exc_info=exc)
    return error_response(EngineError("The node failed to handle the request."))


# What a browser script may read of an answer, besides the basic headers.
EXPOSED_HEADERS = [
    "X-RateLimit-Limit-Tokens",
    "X-RateLimit-Used-Tokens",
    "X-RateLimit-Remaining-Tokens",
    "X-Audio-Duration-Seconds",
    "X-Audio-Tokens-Charged",
    "Retry-After",
    "retry-after-ms",
    "x-should-retry",
]


def _cors(origins: list[str]) -> list[Middleware]:
    """Preflights answered before any key is asked for; none of it without an Origin."""
    if not origins:
        return []
    return [
        Middleware(
            CORSMiddleware,
            allow_origins=origins,
            allow_methods=["GET", "POST"],
            allow_headers=["*"],
            expose_headers=EXPOSED_HEADERS,
            max_age=3600,
        )
    ]


def create_app(
    settings: Settings,
    specs: list[ModelSpec],
    store: Store,
    factory: EngineFactory = make_engine,
) -> Starlette:
    registry = Registry(specs, factory)
    drain = Drain()
    meters = Metrics(registry, [route.path for route in ROUTES])

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        registry.start()
        lag_watch = asyncio.create_task(watch_loop_lag(meters.loop_lag.observe))
        try:
            yield
        finally:
            lag_watch.cancel()
            drain.draining = True
            await registry.stop()
            await flush_settles()
            await store.close()

    app = Starlette(
        routes=ROUTES,
        lifespan=lifespan,
        middleware=[
            *_cors(settings.cors_origins),
            Middleware(audio.AudioHeadersMiddleware),
            Middleware(MetricsMiddleware, metrics=meters),
            Middleware(DrainMiddleware, drain=drain),
            Middleware(AccountMiddleware, store=store),
        ],
        exception_handlers={
            NodeError: _node_error,
            HTTPException: _http_error,
            Exception: _unexpected,
        },
    )
    # A trailing slash is a 404, not a redirect: Starlette's would name this host over plain
    # http, wrong behind a TLS gateway.
    app.router.redirect_slashes = False
    app.state.settings = settings
    app.state.registry = registry
    app.state.started_at = int(time.time())
    app.state.drain = drain
    app.state.metrics = meters
    app.state.image_policy = ImagePolicy(allowed_hosts=frozenset(settings.image_allowed_hosts))
    return app
