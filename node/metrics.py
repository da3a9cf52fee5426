"""Prometheus metrics at GET /metrics (open, like /health): how long requests take, by route
and status, error answers by their code, streams that failed midway, tokens charged by model, the event loop's lag, and
how each model stands (state, slots in use, restarts), read when scraped.

The duration runs from the request's arrival in the app to its last byte handed to the
server: for a 429 or a non-streaming answer that is the node's whole share of the latency.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from node.errors import ERROR_CODE_KEY
from node.registry import ModelState, Registry

# Fine at the low end: a refusal (401, 429) should take well under 5 ms.
DURATION_BUCKETS = (
    0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
)  # fmt: skip
LAG_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class _ModelCollector(Collector):
    def __init__(self, models: Registry) -> None:
        self.models = models

    def collect(self) -> Iterator[Metric]:
        state = GaugeMetricFamily(
            "staik_model_state", "1 for the state each model is in", labels=["model", "state"]
        )
        total = GaugeMetricFamily(
            "staik_slots", "Concurrent requests a model admits", labels=["model"]
        )
        in_use = GaugeMetricFamily(
            "staik_slots_in_use", "Requests holding a slot of the model now", labels=["model"]
        )
        restarts = CounterMetricFamily(
            "staik_model_restarts", "Engine restarts after a failure", labels=["model"]
        )
        for entry in self.models.entries:
            name = entry.spec.name
            for s in ModelState:
                state.add_metric([name, s.value], 1.0 if entry.state is s else 0.0)
            total.add_metric([name], entry.slots.total)
            in_use.add_metric([name], entry.slots.in_use)
            restarts.add_metric([name], entry.restarts)
        yield from (state, total, in_use, restarts)


class Metrics:
    """One registry per app (tests build several apps in one process)."""

    def __init__(self, models: Registry, route_paths: Iterable[str]) -> None:
        self.registry = CollectorRegistry()
        self.requests = Histogram(
            "staik_request_duration_seconds",
            "From the request's arrival in the app to its last byte, by route and status",
            ["route", "status"],
            buckets=DURATION_BUCKETS,
            registry=self.registry,
        )
        self.errors = Counter(
            "staik_errors",
            "Error answers by route, status and error code: tells a 429 model_busy (all slots "
            "busy) from a 429 insufficient_quota (a key's plan spent)",
            ["route", "status", "code"],
            registry=self.registry,
        )
        self.stream_errors = Counter(
            "staik_stream_errors",
            "Streams that ended in an error event after their 200 went out, by route and code",
            ["route", "code"],
            registry=self.registry,
        )
        self.tokens = Counter(
            "staik_tokens_charged",
            "Tokens charged to keys, by model and type: prompt and completion (chat), input "
            "(embeddings), audio (transcriptions, 100 per second)",
            ["model", "type"],
            registry=self.registry,
        )
        self.loop_lag = Histogram(
            "staik_event_loop_lag_seconds",
            "How late the event loop woke a task due every 0.1 s: latency added to every "
            "request at that moment (work blocking the loop, or the process short of CPU)",
            buckets=LAG_BUCKETS,
            registry=self.registry,
        )
        self.registry.register(_ModelCollector(models))
        self._static_paths = frozenset(p for p in route_paths if "{" not in p)

    def route_of(self, scope: Scope) -> str:
        """The matched route's template; a request refused before routing (401, draining)
        by its path if that is a route's, else "unrouted" (keeps the label set small)."""
        route = scope.get("route")
        if route is not None:
            return str(getattr(route, "path", "unrouted"))
        return scope["path"] if scope["path"] in self._static_paths else "unrouted"

    def stream_error(self, scope: Scope, code: str) -> None:
        """Count a stream that failed after its headers: its duration is recorded under the
        status that went out (200), so this is where such failures show."""
        self.stream_errors.labels(self.route_of(scope), code).inc()

    def charged(self, model: str, **tokens_by_type: int) -> None:
        """Count what a request was charged, e.g. ``charged(name, prompt=12, completion=40)``."""
        for kind, n in tokens_by_type.items():
            if n > 0:
                self.tokens.labels(model, kind).inc(n)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class MetricsMiddleware:
    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500  # what the server answers if nothing else was sent

        async def send_noting_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_noting_status)
        finally:
            route = self.metrics.route_of(scope)
            self.metrics.requests.labels(route, str(status)).observe(time.perf_counter() - start)
            code = scope.get("state", {}).get(ERROR_CODE_KEY)
            if code is not None:  # an error answer (not, say, /health/ready's 503 at start)
                self.metrics.errors.labels(route, str(status), code).inc()


async def metrics(request: Request) -> Response:
    return Response(request.app.state.metrics.render(), media_type=CONTENT_TYPE_LATEST)
