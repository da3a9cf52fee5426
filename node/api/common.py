"""Small pieces every route shares: JSON bodies, validation errors, admission, streams."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError
from starlette.requests import Request

from node.errors import EngineError, InvalidRequest, NodeError, RateLimited, sse_error_event
from node.registry import ModelEntry
from node.scheduler import Permit

log = logging.getLogger(__name__)

M = TypeVar("M", bound=BaseModel)


async def read_json(request: Request) -> dict[str, Any]:
    raw = await request.body()
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InvalidRequest(f"The request body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise InvalidRequest("The request body must be a JSON object.")
    return body


def validation_error(exc: ValidationError) -> InvalidRequest:
    """The first problem pydantic found, naming the field."""
    first = exc.errors()[0]
    loc = ".".join(str(p) for p in first.get("loc", ()))
    msg = first.get("msg", "invalid value")
    return InvalidRequest(f"Invalid field '{loc}': {msg}" if loc else msg, param=loc or None)


def parse(model: type[M], data: dict[str, Any]) -> M:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise validation_error(exc) from None


async def admit(entry: ModelEntry) -> Permit:
    """A slot of the model or 429 model_busy, before any expensive work."""
    permit = await entry.slots.acquire()
    if permit is None:
        raise RateLimited(
            f"All {entry.slots.total} slots of {entry.spec.name} are busy; retry shortly.",
            code="model_busy",
            retry_after_s=entry.slots.retry_after_s(),
            should_retry=True,
        )
    return permit


async def stream_with_permit(
    chunks: AsyncIterator[str], permit: Permit, entry: ModelEntry
) -> AsyncIterator[str]:
    """Pass SSE chunks through; the slot is released when the stream ends, however it ends.

    An error after the headers went out becomes an SSE error event followed by [DONE].
    A client that goes away cancels this generator, which closes the engine's (aborting it).
    """
    try:
        async for chunk in chunks:
            yield chunk
    except NodeError as err:
        if err.status == 503:
            entry.report_dead()
        yield sse_error_event(err)
    except Exception:
        log.exception("stream of %s failed", entry.spec.name)
        yield sse_error_event(EngineError("The stream failed inside the node."))
    finally:
        permit.release()
        close = getattr(chunks, "aclose", None)
        if close is not None:
            await close()
