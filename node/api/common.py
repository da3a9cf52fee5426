"""Small pieces every route shares: JSON bodies, validation errors, admission, streams."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError
from starlette.requests import ClientDisconnect, Request
from starlette.responses import StreamingResponse
from starlette.types import Message, Receive, Scope, Send

from node.errors import (
    ClientClosedRequest,
    InvalidRequest,
    PayloadTooLarge,
    RateLimited,
    invalid_from_validation,
)
from node.registry import ModelEntry
from node.scheduler import Leaving, Permit

log = logging.getLogger(__name__)

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}

M = TypeVar("M", bound=BaseModel)
T = TypeVar("T")


class ClientGone(Exception):
    """The client disconnected before the work it asked for was done."""


async def cancel_if_client_leaves(request: Request, work: Awaitable[T]) -> T:
    """``await work``, cancelled (so the engine aborts it) if the client disconnects first.

    Call it once the body has been read: from then on the only message ``receive`` can bring
    is ``http.disconnect``.
    """
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:  # this request itself was cancelled: so is its work
        task.cancel()
        raise
    finally:
        watcher.cancel()
    if task.done():
        return task.result()
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    raise ClientGone


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


MAX_JSON_SEPARATORS = 1_000_000
"""json.loads holds the event loop (and the GIL) while it builds the body's values: 64 MB of
small numbers take over a second, every request waiting. More commas than this is far past
any real request here (a chat's window is at most 262,144 tokens; embeddings take 300,000
tokens a request), so counting them (40 ms for 64 MB) refuses such a body before parsing."""


async def read_json(request: Request) -> dict[str, Any]:
    """The body as a JSON object; 413 past the configured size (read in chunks, never whole)."""
    limit: int = request.app.state.settings.max_json_bytes
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise _body_too_large(limit)
    parts, size = [], 0
    try:
        async for part in request.stream():
            size += len(part)
            if size > limit:
                raise _body_too_large(limit)
            parts.append(part)
    except ClientDisconnect:
        raise ClientClosedRequest("The client closed the connection mid-body.") from None
    raw = b"".join(parts)
    if len(raw) > MAX_JSON_SEPARATORS and raw.count(b",") > MAX_JSON_SEPARATORS:
        raise PayloadTooLarge(
            f"The request body holds more than {MAX_JSON_SEPARATORS} commas: more values than "
            "any request here can use.",
            code="request_too_large",
        )
    try:
        # Strict UTF-8 (JSON's encoding): json.loads of bytes would let encoded surrogates in.
        body = json.loads(raw.decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InvalidRequest(f"The request body is not valid JSON: {exc}") from None
    except RecursionError:
        raise InvalidRequest("The request body is nested too deeply.") from None
    if not isinstance(body, dict):
        raise InvalidRequest("The request body must be a JSON object.")
    if _ESCAPED_SURROGATE.search(raw):
        _refuse_lone_surrogates(body, "")
    return body


# JSON may escape a UTF-16 surrogate on its own ("\ud800"); json.loads keeps it, and it is no
# text: tokenizers fail on it. Paired escapes (an emoji, as ensure_ascii writes it) are fine.
_ESCAPED_SURROGATE = re.compile(rb"\\u[dD][89a-fA-F]")
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def _refuse_lone_surrogates(value: Any, path: str) -> None:
    """400 naming the first string (or key) that holds an unpaired surrogate."""
    if isinstance(value, str):
        found = _LONE_SURROGATE.search(value)
        if found:
            raise InvalidRequest(
                f"{path or 'The body'} holds an unpaired UTF-16 surrogate "
                f"(\\u{ord(found.group()):04x}), which is not valid Unicode text.",
                param=path or None,
            )
    elif isinstance(value, dict):
        for key, item in value.items():
            _refuse_lone_surrogates(key, path)
            _refuse_lone_surrogates(item, f"{path}.{key}" if path else key)
    elif isinstance(value, list):
        for i, item in enumerate(value):
            _refuse_lone_surrogates(item, f"{path}[{i}]")


def _body_too_large(limit: int) -> PayloadTooLarge:
    return PayloadTooLarge(
        f"The request body is larger than {limit // (1024 * 1024)} MB.", code="request_too_large"
    )


def parse(model: type[M], data: dict[str, Any]) -> M:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise invalid_from_validation(exc) from None


async def admit(entry: ModelEntry, request: Request) -> Permit:
    """A slot of the model or 429 model_busy, before any expensive work."""
    permit = await entry.slots.acquire(connection_closing(request))
    if permit is None:
        raise RateLimited(
            f"All {entry.slots.total} slots of {entry.spec.name} are busy; retry shortly.",
            code="model_busy",
            retry_after_s=entry.slots.retry_after_s(),
            should_retry=True,
        )
    return permit


def connection_closing(request: Request) -> Leaving | None:
    """Whether the client's connection is closing, as the server's transport tells at once.

    ASGI reports a disconnect only through ``receive``, some event-loop turns after the server
    read the connection's end; uvicorn's ``receive`` is a method of its request cycle, which
    holds the transport. None under a server that does not show one (uvicorn at log level
    trace wraps ``receive``), said once in the log.
    """
    transport = getattr(getattr(request.receive, "__self__", None), "transport", None)
    is_closing = getattr(transport, "is_closing", None)
    if callable(is_closing):
        return is_closing
    _say_closing_unseen()
    return None


@functools.cache
def _say_closing_unseen() -> None:
    log.warning(
        "Admission cannot see clients' connections close under this server: a client that "
        "cuts a stream and asks again at once may find its old slot held (429 model_busy)."
    )


class ClosingStreamingResponse(StreamingResponse):
    """A StreamingResponse that closes its body iterator and then runs ``finish`` (release the
    slot, settle the bill), exactly once however the response ends.

    When a client goes away while a send is blocked (it stopped reading), Starlette cancels
    the send, not the generator, and leaves the generator to the garbage collector; closing it
    here runs its ``finally`` at once (the engine's request aborted). When the client is gone
    before the first chunk, Starlette may never start the generator, whose own ``finally``
    then never runs: that is why what the stream holds is let go by ``finish``, not by it.

    A client that stays connected but stops reading blocks a send for good: after
    ``stall_timeout_s`` of one blocked send, ``on_stall`` marks it and ``finish`` runs then
    (let go of the engine's work and the slot, which the client could otherwise hold for as
    long as it likes). ``finish`` runs once, in a task of its own that nothing cancels, and
    every caller waits for that one run.
    """

    def __init__(
        self,
        content: AsyncIterator[str],
        *,
        finish: Callable[[], Awaitable[None]],
        on_stall: Callable[[], None] | None = None,
        stall_timeout_s: float = 60.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(content, **kwargs)
        self._finish = finish
        self._on_stall = on_stall
        self._stall_timeout_s = stall_timeout_s
        self._sending_since: float | None = None
        self._finishing: asyncio.Future[None] | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        watch = None
        if self._on_stall is not None:
            send = self._timed(send)
            watch = asyncio.ensure_future(self._watch_for_stall())
        try:
            await super().__call__(scope, receive, send)
        finally:
            if watch is not None:
                watch.cancel()
            try:
                close = getattr(self.body_iterator, "aclose", None)
                if close is not None:
                    await close()
            finally:
                await self._finish_once()

    def _finish_once(self) -> Awaitable[None]:
        if self._finishing is None:
            self._finishing = asyncio.ensure_future(self._finish())
        return asyncio.shield(self._finishing)

    def _timed(self, send: Send) -> Send:
        """``send``, noting when a send began: a time stamp per chunk, no task or timer."""
        clock = asyncio.get_running_loop().time

        async def timed_send(message: Message) -> None:
            self._sending_since = clock()
            try:
                await send(message)
            finally:
                self._sending_since = None

        return timed_send

    async def _watch_for_stall(self) -> None:
        assert self._on_stall is not None
        clock = asyncio.get_running_loop().time
        while True:
            await asyncio.sleep(self._stall_timeout_s / 4)
            since = self._sending_since
            if since is not None and clock() - since >= self._stall_timeout_s:
                self._on_stall()
                with contextlib.suppress(Exception):  # the response's own await reports it
                    await self._finish_once()
                return
