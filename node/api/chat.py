"""POST /v1/chat/completions and the legacy POST /v1/completions on the chat models' vLLM
engines; a slot is held for the whole reply, streams included.

Images are checked (vision models only) before admission and fetched or decoded after it, so
vLLM only ever sees inline data: URLs. The quota reservation happens inside the engine call,
once vLLM has rendered the prompt and its true size is known, and before any token is
generated (the prompt hook).
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from node.api.common import (
    SSE_HEADERS,
    ClientGone,
    ClosingStreamingResponse,
    admit,
    cancel_if_client_leaves,
    read_json,
)
from node.billing import bill_of
from node.config import ModelKind
from node.engines.base import ChatProgress, ChatResult, EngineDead
from node.engines.vllm_chat import asked_max_tokens, refuse_max_tokens_past_window
from node.errors import EngineError, InvalidRequest, NodeError, StreamStalled, sse_error_event
from node.images import count_images, inline_images
from node.metrics import Metrics
from node.registry import ModelEntry, Registry
from node.scheduler import Permit

log = logging.getLogger(__name__)

ROLES = ("system", "developer", "user", "assistant", "tool", "function")
# The content parts a client may send. vLLM parses more (input_image, audio_url, video_url,
# embeddings, parts with no type or with a cache uuid), and would fetch their URLs itself,
# past the node's image checks (private addresses, sizes, the image count).
PART_TYPES = ("text", "image_url", "refusal")
PART_TYPES_BY_ROLE = {  # as OpenAI takes them: images from the user only
    "system": ("text",),
    "developer": ("text",),
    "user": ("text", "image_url"),
    "assistant": ("text", "refusal"),
    "tool": ("text",),
    "function": ("text",),
}
MAX_CHOICES = 128  # OpenAI's bound on n: one request (one slot) must not hold the whole engine


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
    _check_choices(body.get("n"))
    if chat:
        _check_messages(body.get("messages"))
    _check_logit_bias(body.get("logit_bias"))
    if chat and body.get("parallel_tool_calls") is not None and not body.get("tools"):
        raise InvalidRequest(
            "Invalid value for 'parallel_tool_calls': 'parallel_tool_calls' is only allowed "
            "when 'tools' are specified.",
            param="parallel_tool_calls",
            code="invalid_value",
        )
    images = _count_images(body, entry) if chat else 0
    refuse_max_tokens_past_window(body, entry.spec.context_window)
    bill.refuse_hopeless(_least_tokens(body))
    permit = await admit(entry, request)
    metrics = request.app.state.metrics
    prompt_tokens = 0
    progress = ChatProgress()

    async def on_prompt(prompt: int, max_tokens: int) -> None:
        nonlocal prompt_tokens
        await bill.reserve(prompt + max_tokens, may_shrink=True)
        prompt_tokens = prompt

    try:
        if images:
            policy = request.app.state.image_policy
            body = {**body, "messages": await inline_images(body["messages"], policy)}
        run = engine.chat if chat else engine.complete
        work = run(body, on_prompt=on_prompt, progress=progress)
        result = await cancel_if_client_leaves(request, work)
    except ClientGone:
        # vLLM aborted the reply: the prompt was processed, and the tokens made so far were
        # generated all the same (as a cut stream pays for what it produced).
        permit.release()
        made = progress.generated
        if await bill.settle(prompt_tokens + made):
            metrics.charged(entry.spec.name, prompt=prompt_tokens, completion=made)
        return Response(status_code=499)  # nobody reads it; the access log shows why
    except BaseException as exc:
        permit.release()
        await bill.settle(0)
        if isinstance(exc, EngineDead):  # not any 503: a store outage is no engine death
            entry.report_dead(engine)
        raise
    if result.stream is None:
        permit.release()
        if await bill.settle(result.total_tokens):
            _count_charged(metrics, entry, result)
        return JSONResponse(result.body)
    stream = result.stream
    outcome = _Outcome()

    async def finish() -> None:
        """However the stream ended: slot back (if the relay never ran), vLLM's request closed
        (aborted if unfinished), and the bill settled: what was produced, nothing if the
        stream failed."""
        permit.release()
        try:
            await stream.aclose()  # type: ignore[attr-defined]
        finally:  # settled even if vLLM's abort fails (its engine died under the stream)
            if await bill.settle(0 if outcome.failed else result.total_tokens):
                _count_charged(metrics, entry, result)

    def stalled() -> None:
        """The client reads nothing: ``finish`` lets go now, charged what was produced, as for
        a cut stream; the relay takes no further chunk."""
        outcome.stalled = True
        metrics.stream_error(request.scope, StreamStalled.code)

    settings = request.app.state.settings
    return ClosingStreamingResponse(
        _relay(
            result,
            entry,
            engine,
            outcome,
            permit,
            lambda code: metrics.stream_error(request.scope, code),
        ),
        finish=finish,
        on_stall=stalled,
        stall_timeout_s=settings.stream_stall_timeout_s,
        media_type="text/event-stream",
        headers=SSE_HEADERS,
    )


def _count_charged(metrics: Metrics, entry: ModelEntry, result: ChatResult) -> None:
    usage = result.usage
    metrics.charged(entry.spec.name, prompt=usage.prompt, completion=usage.completion)


def _least_tokens(body: dict[str, Any]) -> int:
    """The fewest tokens the request can be charged, known before its prompt is rendered:
    the reply room it asks for in each choice of each prompt (0 if it names none)."""
    asked = asked_max_tokens(body)
    n, prompts = body.get("n"), body.get("prompt")
    if not _is_count(asked):
        return 0
    choices = n if _is_count(n) else 1
    many = isinstance(prompts, list) and bool(prompts) and not isinstance(prompts[0], int)
    return asked * choices * (len(prompts) if many else 1)


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _check_choices(n: Any) -> None:
    if _is_count(n) and n > MAX_CHOICES:
        raise InvalidRequest(
            f"n is {n}; at most {MAX_CHOICES} choices per request.", param="n", code="invalid_value"
        )


def _check_messages(messages: Any) -> None:
    """400 for no message at all, a role OpenAI does not define (vLLM would pass any role on
    to the chat template, which renders it as if it were one), or a content part other than
    its role's ``PART_TYPES_BY_ROLE``, or a tool message with no tool_call_id, as OpenAI
    answers them."""
    if not isinstance(messages, list):
        return  # vLLM's validation names the problem
    if not messages:
        raise InvalidRequest(
            "'messages' is empty; send at least one message.",
            param="messages",
            code="invalid_value",
        )
    for i, message in enumerate(messages):
        role = message.get("role") if isinstance(message, dict) else None
        if isinstance(role, str) and role not in ROLES:
            supported = ", ".join(f"'{r}'" for r in ROLES)
            raise InvalidRequest(
                f"Invalid value: '{role}'. Supported values are: {supported}.",
                param=f"messages[{i}].role",
                code="invalid_value",
            )
        if not isinstance(message, dict):
            continue  # vLLM's validation names the problem
        if role == "tool" and not isinstance(message.get("tool_call_id"), str):
            raise InvalidRequest(
                f"Missing required parameter: 'messages[{i}].tool_call_id'.",
                param=f"messages[{i}].tool_call_id",
                code="missing_required_parameter",
            )
        content = message.get("content")
        if isinstance(content, list):
            allowed = PART_TYPES_BY_ROLE.get(role, PART_TYPES)
            for j, part in enumerate(content):
                _check_part(part, f"messages[{i}].content[{j}]", allowed)


def _check_logit_bias(bias: Any) -> None:
    """OpenAI's range, as OpenAI refuses it: vLLM clamps a bias outside it silently."""
    if not isinstance(bias, dict):
        return  # absent, or vLLM's validation names the problem
    for token, value in bias.items():
        if _is_number(value) and not -100 <= value <= 100:
            raise InvalidRequest(
                f"Invalid 'logit_bias': the bias of token {token} is {value}; each must be "
                "between -100 and 100.",
                param="logit_bias",
                code="invalid_value",
            )


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _check_part(part: Any, where: str, allowed: tuple[str, ...]) -> None:
    if not isinstance(part, dict):
        return  # vLLM's validation names the problem
    kind = part.get("type")
    if kind is None:
        raise InvalidRequest(
            f"Missing required parameter: '{where}.type'.",
            param=f"{where}.type",
            code="missing_required_parameter",
        )
    if kind not in allowed:
        supported = ", ".join(f"'{t}'" for t in allowed)
        raise InvalidRequest(
            f"Invalid value: {json.dumps(kind)}. Supported values are: {supported}.",
            param=f"{where}.type",
            code="invalid_value",
        )
    if kind in ("text", "refusal") and not isinstance(part.get(kind), str):
        missing = part.get(kind) is None
        raise InvalidRequest(
            f"Missing required parameter: '{where}.{kind}'."
            if missing
            else f"Invalid type for '{where}.{kind}': expected a string.",
            param=f"{where}.{kind}",
            code="missing_required_parameter" if missing else "invalid_type",
        )
    if "uuid" in part:  # a cache key of vLLM's: one client could name another's image
        raise InvalidRequest(
            f"Unrecognized request argument supplied: {where}.uuid",
            param=f"{where}.uuid",
            code="unsupported_parameter",
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


@dataclass
class _Outcome:
    failed: bool = False
    stalled: bool = False  # the client stopped reading; the engine's request was let go


async def _relay(
    result: ChatResult,
    entry: ModelEntry,
    engine: Any,
    outcome: _Outcome,
    permit: Permit,
    count_error: Callable[[str], None],
) -> AsyncIterator[str]:
    """Pass the SSE chunks through; an error after the headers went out becomes an SSE error
    event followed by [DONE], and marks the outcome failed (charged nothing).

    The slot is released here the moment the stream ends, not only in ``finish``: that runs
    once Starlette's task group has wound down, some event-loop turns later, and a client
    that cut its stream and asks again at once must find the slot free (the cut-streams
    lifecycle test saw 78 of 200 such requests refused when only ``finish`` released it).
    """
    assert result.stream is not None
    try:
        async for chunk in result.stream:
            yield chunk
            if outcome.stalled:  # finish() is closing the stream: ask it for nothing more
                if not chunk.endswith("[DONE]\n\n"):  # told, if the client reads on
                    err = StreamStalled("The stream was stopped: the client read nothing.")
                    yield sse_error_event(err)
                break
    except NodeError as err:
        outcome.failed = True
        if isinstance(err, EngineDead):
            entry.report_dead(engine)
        count_error(err.code)
        yield sse_error_event(err)
    except Exception:
        outcome.failed = True
        log.exception("stream of %s failed", entry.spec.name)
        err = EngineError("The stream failed inside the node.")
        count_error(err.code)
        yield sse_error_event(err)
    finally:
        permit.release()
