"""POST /v1/chat/completions and the legacy POST /v1/completions on the chat models' vLLM
engines; a slot is held for the whole reply, streams included.

Images are checked (vision models only) before admission and fetched or decoded after it, so
vLLM only ever sees inline data: URLs. The quota reservation happens inside the engine call,
once vLLM has rendered the prompt and its true size is known, and before any token is
generated (the prompt hook).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from node.api.common import admit, read_json, stream_with_permit
from node.billing import Bill, bill_of
from node.config import ModelKind
from node.engines.base import ChatResult
from node.errors import InvalidRequest, NodeError
from node.images import count_images, inline_images
from node.registry import ModelEntry, Registry

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


async def chat_completions(request: Request) -> Response:
    return await _generate(request, chat=True)


async def completions(request: Request) -> Response:
    return await _generate(request, chat=False)


async def _generate(request: Request, *, chat: bool) -> Response:
    registry: Registry = request.app.state.registry
    bill = bill_of(request)
    body = await read_json(request)
    entry = registry.resolve(body.get("model"), ModelKind.CHAT)
    engine = entry.require_ready()
    images = _count_images(body, entry) if chat else 0
    permit = await admit(entry)
    try:
        if images:
            policy = request.app.state.image_policy
            body = {**body, "messages": await inline_images(body["messages"], policy)}
        run = engine.chat if chat else engine.complete
        result = await run(body, on_prompt=lambda p, m: bill.reserve(p + m))
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


def _count_images(body: dict[str, Any], entry: ModelEntry) -> int:
    """Images in the messages; 400 naming the model if it has no vision."""
    messages = body.get("messages")
    images = count_images(messages) if isinstance(messages, list) else 0
    if images and not entry.spec.vision:
        raise InvalidRequest(
            f"The model '{entry.spec.name}' does not accept images; send them to a vision "
            "model (gemma4:31b).",
            param="messages",
            code="image_not_supported",
        )
    return images


async def _settled(
    chunks: AsyncIterator[str], result: ChatResult, bill: Bill
) -> AsyncIterator[str]:
    """Settle what the stream really produced, however it ended (a cut stream counts its part)."""
    try:
        async for chunk in chunks:
            yield chunk
    finally:
        await bill.settle(result.total_tokens)
