"""Rewriting vLLM's SSE chunks on their way out: usage tracked for billing and shown only as
the client asked, reasoning sent under both of its names, tool-call deltas as OpenAI sends
them. Runs on every token of every stream.
"""

from __future__ import annotations

import json
import re
from typing import Any

from node.engines.base import UsageMeter
from node.sse import sse_data


class UsageWish:
    """What the client asked to see of usage in a stream."""

    __slots__ = ("final", "continuous")

    def __init__(self, final: bool, continuous: bool) -> None:
        self.final, self.continuous = final, continuous

    @classmethod
    def of(cls, request: Any) -> UsageWish:
        opts = request.stream_options
        final = bool(opts and opts.include_usage)
        return cls(final, final and bool(opts.continuous_usage_stats))


# vLLM's chunks are compact JSON with a flat usage object: found without parsing the chunk.
_USAGE = re.compile(r',"usage":(\{[^{}]*\})')
_CHOICE = re.compile(r'"choices":\[\{"index":(\d+)')


def track_usage(chunk: str, meter: UsageMeter, wants: UsageWish) -> str | None:
    """Record the chunk's usage into ``meter``; return the chunk as the client should see it
    (None to drop it), with reasoning also under ``reasoning_content``.

    Runs on every token of every stream, so the common case (a content delta carrying the
    continuous usage the node asked for) is string work; only reasoning chunks are parsed.
    """
    if not chunk.startswith("data: {"):
        return chunk
    found = _USAGE.search(chunk)
    if found is None and '"usage":{' in chunk:  # a nested usage object: the slow, sure way
        return _track_usage_parsed(chunk, meter, wants)
    if found is not None:
        numbers = json.loads(found.group(1))
        if '"choices":[]' in chunk:  # the final usage-only chunk
            meter.record(numbers, None)
            return chunk if wants.final else None
        index = _CHOICE.search(chunk)
        meter.record(numbers, int(index.group(1)) if index else 0)
        if not wants.continuous:
            chunk = chunk[: found.start()] + chunk[found.end() :]
    if '"reasoning":' not in chunk and '"name":null' not in chunk:
        return chunk
    obj = json.loads(chunk[6:])
    tidy_choices(obj.get("choices") or [], "delta")
    return sse_data(obj)


def _track_usage_parsed(chunk: str, meter: UsageMeter, wants: UsageWish) -> str | None:
    obj = json.loads(chunk[6:])
    numbers = obj.get("usage") or {}
    choices = obj.get("choices")
    if not choices:
        meter.record(numbers, None)
        return chunk if wants.final else None
    meter.record(numbers, int(choices[0].get("index", 0)))
    if not wants.continuous:
        obj.pop("usage", None)
    tidy_choices(choices, "delta")
    return sse_data(obj)


def tidy_choices(choices: list[dict[str, Any]], part: str) -> None:
    """Where vLLM's message (``part`` "message") or delta ("delta") differs from OpenAI's.

    - vLLM names the thinking ``reasoning`` (newer clients read it); older clients read
      ``reasoning_content``: send both.
    - A reply of tool calls has ``content`` null, not "" (clients test for null).
    - A streamed tool call names its function in its first delta only; vLLM's later deltas
      of a required tool call say ``"name": null``, which a client appending names would
      turn into "fnull".
    """
    for choice in choices:
        message = choice.get(part) or {}
        if message.get("reasoning") is not None:
            message["reasoning_content"] = message["reasoning"]
        calls = message.get("tool_calls")
        if not calls:
            continue
        if part == "message" and message.get("content") == "":
            message["content"] = None
        for call in calls:
            function = call.get("function") or {}
            if "name" in function and function["name"] is None:
                del function["name"]
