"""POST /v1/embeddings: strings in, float or base64 vectors out."""

from __future__ import annotations

import asyncio
import base64
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from node.api.common import ClientGone, admit, cancel_if_client_leaves, parse, read_json
from node.billing import bill_of
from node.config import ModelKind
from node.engines.base import EmbeddingProgress
from node.errors import InvalidRequest
from node.registry import Registry

MAX_INPUTS = 2048
MAX_REQUEST_TOKENS = 300_000  # summed over the inputs, as OpenAI caps it: bounds one request's work
_INLINE_TOKENIZE_CHARS = 20_000


class EmbeddingRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str
    input: str | list[str] | list[int] | list[list[int]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(default=None, ge=1)
    user: str | None = None

    def texts(self) -> list[str]:
        items = [self.input] if isinstance(self.input, str) else list(self.input)
        if not items:
            raise InvalidRequest("'input' must not be empty.", param="input")
        if len(items) > MAX_INPUTS:
            raise InvalidRequest(f"'input' holds more than {MAX_INPUTS} items.", param="input")
        if not all(isinstance(t, str) for t in items):
            raise InvalidRequest(
                "Token-id inputs are not supported here: send the text itself.", param="input"
            )
        if any(not t for t in items):
            raise InvalidRequest("'input' must not contain empty strings.", param="input")
        return items


def refuse_too_many_chars(texts: list[str], chars_per_token: int) -> int:
    """The inputs' characters; 400 past what MAX_REQUEST_TOKENS allow at ``chars_per_token``
    (the engine's bound per token), before any tokenizing."""
    chars = sum(map(len, texts))
    if chars > MAX_REQUEST_TOKENS * chars_per_token:
        raise _too_many_tokens(
            f"{chars} characters, more than {MAX_REQUEST_TOKENS} tokens of at most "
            f"{chars_per_token} characters"
        )
    return chars


def _too_many_tokens(what: str) -> InvalidRequest:
    return InvalidRequest(
        f"Requested {what}, max {MAX_REQUEST_TOKENS} tokens per request (summed over the "
        "inputs); split the inputs over several requests.",
        param="input",
        code="max_tokens_per_request",
    )


async def embeddings(request: Request) -> Response:
    registry: Registry = request.app.state.registry
    body = await read_json(request)
    entry = registry.resolve(body.get("model"), ModelKind.EMBEDDING)
    req = parse(EmbeddingRequest, body)
    texts = req.texts()
    engine = entry.require_ready()
    if req.dimensions is not None and req.dimensions != engine.dimensions:
        raise InvalidRequest(
            f"{entry.spec.name} returns {engine.dimensions}-dimensional vectors; other "
            "dimensions are not supported.",
            param="dimensions",
        )
    engine.refuse_overlong(texts)
    chars = refuse_too_many_chars(texts, engine.max_chars_per_token)
    bill = bill_of(request)
    with await admit(entry, request):
        if chars > _INLINE_TOKENIZE_CHARS:  # big inputs: off the event loop
            counts = await asyncio.to_thread(engine.count_tokens, texts)
        else:
            counts = engine.count_tokens(texts)
        tokens = sum(counts)
        if tokens > MAX_REQUEST_TOKENS:
            raise _too_many_tokens(f"{tokens} tokens")
        await bill.reserve(tokens)
        used = 0
        # One text is one encode, not worth watching for the client on the hot path.
        progress = EmbeddingProgress() if len(texts) > 1 else None
        try:
            if progress is None:
                vectors = await engine.embed(texts, counts)
            else:
                vectors = await cancel_if_client_leaves(
                    request, engine.embed(texts, counts, progress)
                )
            used = tokens
        except ClientGone:
            # The engine drops the pieces not yet started; the inputs it took are billed.
            assert progress is not None
            used = sum(counts[i] for i in progress.taken())
            return Response(status_code=499)  # nobody reads it; the access log shows why
        finally:
            charged = await bill.settle(used)
            request.app.state.metrics.charged(entry.spec.name, input=charged)
    data = []
    for i, vector in enumerate(vectors):
        if req.encoding_format == "base64":
            value: object = base64.b64encode(vector.astype("<f4").tobytes()).decode()
        else:
            value = vector.astype(float).tolist()
        data.append({"object": "embedding", "index": i, "embedding": value})
    usage = {"prompt_tokens": tokens, "total_tokens": tokens}
    return JSONResponse({"object": "list", "data": data, "model": req.model, "usage": usage})
