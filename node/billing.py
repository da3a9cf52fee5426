"""Request-level accounting: who is calling, what they hold, and the headers that say so.

``AccountMiddleware`` authenticates every /v1 request (401 otherwise) and puts a ``Bill`` in the
request's state; handlers ``reserve`` an estimate before running a model and ``settle`` the real
count after. The middleware writes the X-RateLimit-* headers into whatever response goes out,
errors and streams included, from the bill as it stands when the headers leave.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from node.accounts import (
    KeyNotFound,
    KeyRecord,
    QuotaExceeded,
    Reservation,
    ReservationNotFound,
    Store,
    StoreUnavailable,
    Usage,
    Window,
)
from node.errors import (
    EngineError,
    InsufficientQuota,
    NodeError,
    Unauthorized,
    Unavailable,
    error_response,
)

log = logging.getLogger(__name__)

SHOULD_RETRY_MAX_S = 120  # openai-python waits at most this long; beyond it, tell it not to
IN_FLIGHT_RETRY_S = 2.0
"""Retry hint when only the key's own requests in flight block a reservation: how soon they
settle is unknown (a chat of a few tokens or a long reply), so the client is asked to try
again shortly rather than told a wait."""
SETTLE_RETRY_S = 300.0  # how long a settle is retried while the store is unreachable
SETTLE_FIRST_RETRY_S = 0.5  # the first pause between tries; it doubles, up to 10 s
SHUTDOWN_SETTLE_WAIT_S = 15.0  # how long shutdown waits for settles still retrying
_pending_settles: set[asyncio.Future[Any]] = set()


def store_down(exc: Exception) -> Unavailable:
    log.error("accounting store unreachable: %s", exc)
    return Unavailable(
        "The accounting store is unreachable; requests are refused until it is back.",
        code="store_unavailable",
        retry_after_s=5,
        should_retry=True,
    )


class ShrinkingHolds:
    """Tokens held by this node's requests in flight that will likely settle to less than they
    hold (a chat holds prompt + max_tokens and pays what it produced), by key. An embeddings
    or audio hold settles to itself, so waiting for it frees nothing."""

    def __init__(self) -> None:
        self._by_key: dict[str, int] = {}

    def add(self, key_id: str, tokens: int) -> None:
        self._by_key[key_id] = self._by_key.get(key_id, 0) + tokens

    def remove(self, key_id: str, tokens: int) -> None:
        left = self._by_key.get(key_id, 0) - tokens
        if left > 0:
            self._by_key[key_id] = left
        else:
            self._by_key.pop(key_id, None)

    def of(self, key_id: str) -> int:
        return self._by_key.get(key_id, 0)


@dataclass
class Bill:
    store: Store
    key: KeyRecord
    usage: Usage
    clock: Callable[[], float] = time.time
    reservation: Reservation | None = None
    settled: bool = field(default=False)
    shrinking: ShrinkingHolds = field(default_factory=ShrinkingHolds)
    """Shared by every bill of the node (the middleware's): see ``_quota_refusal``."""
    _may_shrink: bool = field(default=False, init=False, repr=False)

    def headers(self) -> dict[str, str]:
        return {
            "X-RateLimit-Limit-Tokens": str(self.usage.limit),
            "X-RateLimit-Used-Tokens": str(self.usage.used),
            "X-RateLimit-Remaining-Tokens": str(self.usage.remaining),
        }

    async def reserve(self, tokens: int, *, may_shrink: bool = False) -> None:
        """Hold ``tokens`` before the work; 429 insufficient_quota if the window can't fit it.
        ``may_shrink``: the request will likely use less than it holds (chat)."""
        reserving = asyncio.ensure_future(self.store.reserve(self.key.id, tokens, self.clock()))
        try:
            self.reservation, self.usage = await asyncio.shield(reserving)
        except asyncio.CancelledError:
            reserving.add_done_callback(self._release_orphan)
            _wait_at_shutdown(reserving)  # for it, and then for its release
            raise
        except QuotaExceeded as exc:
            self.usage = exc.usage
            raise _quota_refusal(exc, self.key.window, self.shrinking.of(self.key.id)) from None
        except KeyNotFound:
            raise Unauthorized("The API key was revoked.") from None
        except StoreUnavailable as exc:
            raise store_down(exc) from None
        if may_shrink:
            self._may_shrink = True
            self.shrinking.add(self.key.id, tokens)

    def refuse_hopeless(self, tokens: int) -> None:
        """429 at once, before the request takes a slot, if at least ``tokens`` is more than the
        plan's whole limit (a balance: all it was ever granted): no wait makes that fit, and a
        key that cannot pay must not hold slots others could use. What merely does not fit
        now is the store's to judge, with the holds of the key's requests in flight."""
        usage = self.usage
        if tokens > usage.limit:
            raise InsufficientQuota(
                _quota_message(tokens, usage, self.key.window, None),
                retry_after_s=None,
                should_retry=False,
            )

    async def settle(self, actual_tokens: int) -> int:
        """Replace the hold by what was really used; returns the tokens charged (0 if nothing
        was held, or it was settled before).

        The headers follow at once (the hold swapped for the actual count). When the count
        equals the hold (embeddings, audio), the store's view does not change either, so the
        write goes on in the background, off the response's path; otherwise it is awaited, so
        the caller's next request sees it. Either way the write runs to the end even if the
        request is cancelled (client gone), and ``flush_settles`` waits for it at shutdown.
        """
        if self.reservation is None or self.settled:
            return 0
        self.settled = True
        if self._may_shrink:
            self.shrinking.remove(self.key.id, self.reservation.tokens)
        tokens = max(0, actual_tokens)
        self.usage = Usage.of(self.usage.limit, self.usage.used - self.reservation.tokens + tokens)
        first_try = _write_settle(self.store, self.reservation, tokens, self.clock)
        if tokens != self.reservation.tokens:
            await asyncio.shield(first_try)
        return tokens

    def _release_orphan(self, reserving: asyncio.Future[tuple[Reservation, Usage]]) -> None:
        """A reservation whose request was cancelled while the store wrote it (the client
        left): nothing ran for it, so it is settled to 0 rather than held for its TTL."""
        if reserving.cancelled() or reserving.exception() is not None:
            return
        reservation, _ = reserving.result()
        _write_settle(self.store, reservation, 0, self.clock)


def _write_settle(
    store: Store, reservation: Reservation, tokens: int, clock: Callable[[], float]
) -> asyncio.Future[None]:
    """Write a settle in a task of its own, which runs to the end even if the request is
    cancelled and which ``flush_settles`` waits for; returns a future done after the first
    try, so a caller can wait for that and not for the retries."""
    first_try = asyncio.get_running_loop().create_future()
    _wait_at_shutdown(
        asyncio.ensure_future(_settle_with_retries(store, reservation, tokens, clock, first_try))
    )
    return first_try


def _wait_at_shutdown(future: asyncio.Future[Any]) -> None:
    """Keep ``future`` in what ``flush_settles`` waits for, until it is done."""
    _pending_settles.add(future)
    future.add_done_callback(_pending_settles.discard)


async def _settle_with_retries(
    store: Store,
    reservation: Reservation,
    tokens: int,
    clock: Callable[[], float],
    first_try: asyncio.Future[None],
) -> None:
    """Until a settle is written its hold stands in for the charge, but a hold counts only for
    its TTL (an hour), while a charge of a day or balance key counts till midnight or for good:
    so a store that is down is retried, for ``SETTLE_RETRY_S``. A settle still unwritten then
    (or at shutdown) is logged with its reservation and tokens, to be charged by hand."""
    delay, deadline = SETTLE_FIRST_RETRY_S, time.monotonic() + SETTLE_RETRY_S
    try:
        while True:
            try:
                await store.settle(reservation.id, tokens, clock())
                return
            except ReservationNotFound as exc:
                log.error("settle of %s (%d tokens) failed: %s", reservation.id, tokens, exc)
                return
            except StoreUnavailable as exc:
                if not first_try.done():
                    first_try.set_result(None)
                if time.monotonic() + delay > deadline:
                    _log_unwritten(reservation, tokens, f"the store stayed unreachable: {exc}")
                    return
                log.warning("settle of %s failed, retrying in %g s: %s", reservation.id, delay, exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10.0)
            except Exception as exc:  # e.g. the store closed under it: nothing to retry
                _log_unwritten(reservation, tokens, f"{type(exc).__name__}: {exc}")
                return
    except asyncio.CancelledError:
        _log_unwritten(reservation, tokens, "given up at shutdown")
        raise
    finally:
        if not first_try.done():
            first_try.set_result(None)


def _log_unwritten(reservation: Reservation, tokens: int, why: str) -> None:
    log.error(
        "settle of %s may be lost (%s): key %s, %d tokens (held %d); charge it by hand",
        reservation.id,
        why,
        reservation.key_id,
        tokens,
        reservation.tokens,
    )


def _quota_refusal(exc: QuotaExceeded, window: Window, shrinking: int) -> InsufficientQuota:
    """The 429 for a reservation the store refused. When only the holds of the key's own
    requests in flight that will likely shrink (``shrinking`` tokens: this node's chats) stand
    in the way, the store's wait (holds counted as lasting until they expire: an hour) would
    tell the client to give up, while the request may fit as soon as those requests settle:
    say so, and ask for a retry shortly."""
    wait = exc.retry_after_s
    if exc.fits_if_freed(shrinking):
        usage = exc.usage
        running = "request" if exc.holds == 1 else f"{exc.holds} requests"
        return InsufficientQuota(
            f"This request needs up to {exc.requested} tokens but the key's plan has "
            f"{usage.remaining} of {usage.limit} left: {exc.held} are held by the key's "
            f"{running} still running, which give back what they do not use. Retry when "
            f"{'it finishes' if exc.holds == 1 else 'they finish'}.",
            retry_after_s=IN_FLIGHT_RETRY_S if wait is None else min(wait, IN_FLIGHT_RETRY_S),
            should_retry=True,
        )
    return InsufficientQuota(
        _quota_message(exc.requested, exc.usage, window, wait),
        retry_after_s=wait,
        should_retry=wait is not None and wait <= SHOULD_RETRY_MAX_S,
    )


def _quota_message(tokens: int, usage: Usage, window: Window, wait: float | None) -> str:
    needs = f"This request needs up to {tokens} tokens"
    if window is not Window.BALANCE and tokens > usage.limit:
        return (
            f"{needs}, more than the plan's whole limit of {usage.limit} per {window.value}: "
            "lower max_tokens or send less input."
        )
    left = f"{needs} but the key's plan has {usage.remaining} of {usage.limit} left"
    return (
        f"{left} (top up to continue)."
        if wait is None
        else f"{left}; enough frees in {wait:.0f} s."
    )


async def flush_settles(timeout_s: float = SHUTDOWN_SETTLE_WAIT_S) -> None:
    """Wait for the settles still being written (called before the store closes); those still
    retrying after ``timeout_s`` are given up, each logged with what it would have charged."""
    deadline = time.monotonic() + timeout_s
    while _pending_settles:
        left = deadline - time.monotonic()
        if left <= 0:
            for task in list(_pending_settles):
                task.cancel()
            await asyncio.gather(*_pending_settles, return_exceptions=True)
            return
        await asyncio.wait(list(_pending_settles), timeout=left)


def bill_of(request: Request) -> Bill:
    return request.scope["state"]["bill"]


def _bearer(scope: Scope) -> str | None:
    for name, value in scope.get("headers", []):
        if name == b"authorization":
            scheme, _, token = value.decode("latin-1").partition(" ")
            return token.strip() if scheme.lower() == "bearer" and token.strip() else None
    return None


class AccountMiddleware:
    """401 for /v1 requests without a live key; X-RateLimit-* on every authenticated response."""

    def __init__(self, app: ASGIApp, store: Store, prefix: str = "/v1/") -> None:
        self.app = app
        self.store = store
        self.prefix = prefix
        self.shrinking = ShrinkingHolds()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith(self.prefix):
            await self.app(scope, receive, send)
            return
        try:
            bill = await self._open_bill(scope)
        except NodeError as err:
            await error_response(err)(scope, receive, send)
            return
        scope.setdefault("state", {})["bill"] = bill

        started = False

        async def send_with_headers(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                extra = [(k.lower().encode(), v.encode()) for k, v in bill.headers().items()]
                message["headers"] = [*message.get("headers", []), *extra]
            await send(message)

        try:
            await self.app(scope, receive, send_with_headers)
        except Exception:
            if started:
                raise
            # Rendered here rather than by the outermost handler, so that even an unexpected
            # failure carries the X-RateLimit-* headers (if nothing was sent yet).
            log.exception("unhandled error on %s", scope["path"])
            await error_response(EngineError("The node failed to handle the request."))(
                scope, receive, send_with_headers
            )

    async def _open_bill(self, scope: Scope) -> Bill:
        secret = _bearer(scope)
        if secret is None:
            raise Unauthorized("Missing API key: send 'Authorization: Bearer sk-st-...'.")
        try:
            found = await self.store.authenticate_usage(secret, time.time())
        except StoreUnavailable as exc:
            raise store_down(exc) from None
        if found is None:
            raise Unauthorized("Invalid API key.")
        return Bill(self.store, *found, shrinking=self.shrinking)
