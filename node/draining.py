"""Graceful stop: count requests in flight; once draining, refuse new ones with 503.

On SIGTERM the node stops admitting (503 ``shutting_down``, so a gateway retries elsewhere),
lets what is in flight finish up to the drain timeout, then lets uvicorn exit, which stops
the engines (no child process left behind).
"""

from __future__ import annotations

import asyncio
import logging
import time

import uvicorn
from starlette.types import ASGIApp, Receive, Scope, Send

from node.errors import Unavailable, error_response

log = logging.getLogger(__name__)


class Drain:
    def __init__(self) -> None:
        self.in_flight = 0
        self.draining = False
        self._idle = asyncio.Event()
        self._idle.set()

    def enter(self) -> None:
        self.in_flight += 1
        self._idle.clear()

    def leave(self) -> None:
        self.in_flight -= 1
        if self.in_flight == 0:
            self._idle.set()

    async def drain(self, timeout_s: float) -> bool:
        """Stop admitting; True if everything in flight finished within ``timeout_s``."""
        self.draining = True
        started = time.monotonic()
        log.info("draining: %d requests in flight, up to %.0f s", self.in_flight, timeout_s)
        try:
            await asyncio.wait_for(self._idle.wait(), timeout_s)
        except TimeoutError:
            log.warning("drain timeout: %d requests still in flight", self.in_flight)
            return False
        log.info("drained in %.1f s", time.monotonic() - started)
        return True


class DrainMiddleware:
    """Counts /v1 requests (streams until their last byte); refuses new ones while draining."""

    def __init__(self, app: ASGIApp, drain: Drain, prefix: str = "/v1/") -> None:
        self.app = app
        self.drain = drain
        self.prefix = prefix

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith(self.prefix):
            await self.app(scope, receive, send)
            return
        if self.drain.draining:
            err = Unavailable(
                "The node is shutting down; send the request to another node or retry.",
                code="shutting_down",
                retry_after_s=5,
                should_retry=True,
            )
            await error_response(err)(scope, receive, send)
            return
        self.drain.enter()
        try:
            await self.app(scope, receive, send)
        finally:
            self.drain.leave()


class DrainingServer(uvicorn.Server):
    """uvicorn, but the first SIGTERM/SIGINT drains (503 to new requests, in-flight ones
    finish) before the usual shutdown; a second signal exits at once."""

    def __init__(self, config: uvicorn.Config, drain: Drain, timeout_s: float) -> None:
        super().__init__(config)
        self.drain = drain
        self.timeout_s = timeout_s
        self._loop: asyncio.AbstractEventLoop | None = None

    async def serve(self, sockets: list | None = None) -> None:  # type: ignore[override]
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def handle_exit(self, sig: int, frame: object) -> None:
        if self.drain.draining or self.should_exit or self._loop is None:
            super().handle_exit(sig, frame)
            return
        self.drain.draining = True
        self._loop.call_soon_threadsafe(lambda: self._loop.create_task(self._drain_then_exit()))  # type: ignore[union-attr]

    async def _drain_then_exit(self) -> None:
        await self.drain.drain(self.timeout_s)
        self.should_exit = True
