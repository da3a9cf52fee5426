"""POST /v1/chat/completions: route to the model's vLLM engine, hold a slot for the whole reply.

The quota reservation happens inside the engine call, once vLLM has rendered the prompt and
its true size is known, and before any token is generated (the prompt hook).
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from node.api.common import admit, read_json, stream_with_permit
from node.billing import Bill, bill_of
from node.config import ModelKind
from node.engines.base import ChatResult
from node.errors import NodeError
from node.registry import Registry

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


async def chat_completions(request: Request) -> Response:
    registry: Registry = request.app.state.registry
    bill = bill_of(request)
    body = await read_json(request)
    entry = registry.resolve(body.get("model"), ModelKind.CHAT)
    engine = entry.require_ready()
    permit = await admit(entry)
    try:
        result = await engine.chat(body, on_prompt=lambda p, m: bill.reserve(p + m))
    except BaseException as exc:
        permit.release()
        await bill.settle(0)
        if isinstance(exc, NodeError) and exc.status == 503:
            entry.report_dead()
        raise
    if result.stream is None:
        permit.release()
        await bill.settle(result.total_tokens)
        return JSONResponse(result.body)
    return StreamingResponse(
        _settled(stream_with_permit(result.stream, permit, entry), result, bill),
        media_type="text/event-stream",
        headers=SSE_HEADERS,
    )


async def _settled(
    chunks: AsyncIterator[str], result: ChatResult, bill: Bill
) -> AsyncIterator[str]:
    """Settle what the stream really produced, however it ended (a cut stream counts its part)."""
    try:
        async for chunk in chunks:
            yield chunk
    finally:
        await bill.settle(result.total_tokens)
