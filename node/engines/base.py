"""The typed seams between the node and its engines, one protocol per capability."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from node.errors import Unavailable


class EngineDead(Unavailable):
    """The engine process stopped under a request; the model goes to restarting."""

    code = "model_unavailable"


PromptHook = Callable[[int, int], Awaitable[None]]
"""Called once the prompt is rendered, before generation: (prompt_tokens, max_tokens)."""


@dataclass
class ChatResult:
    """Either a whole response body or a stream of SSE strings (``data: ...\\n\\n``).

    ``usage`` is the OpenAI usage object; a stream keeps it current as chunks go out, so a
    stream cut short still knows what it produced.
    """

    body: dict[str, Any] | None = None
    stream: AsyncIterator[str] | None = None
    usage: dict[str, int] = field(default_factory=dict)

    @property
    def total_tokens(self) -> int:
        return int(self.usage.get("total_tokens", 0))


@dataclass
class Segment:
    id: int
    start: float
    end: float
    text: str
    avg_logprob: float = 0.0
    compression_ratio: float = 0.0
    no_speech_prob: float = 0.0
    temperature: float = 0.0
    tokens: list[int] = field(default_factory=list)


@dataclass
class Transcript:
    text: str
    language: str
    duration: float
    segments: list[Segment]


class Engine(Protocol):
    async def start(self) -> None: ...
    async def stop(self) -> None: ...
    @property
    def dead(self) -> bool: ...


class ChatEngine(Engine, Protocol):
    async def chat(
        self, body: dict[str, Any], on_prompt: PromptHook | None = None
    ) -> ChatResult: ...

    async def complete(
        self, body: dict[str, Any], on_prompt: PromptHook | None = None
    ) -> ChatResult: ...


class EmbeddingEngine(Engine, Protocol):
    def count_tokens(self, texts: list[str]) -> list[int]: ...
    async def embed(self, texts: list[str]) -> np.ndarray: ...


class TranscriptionEngine(Engine, Protocol):
    async def transcribe(
        self,
        audio: np.ndarray,
        *,
        language: str | None,
        prompt: str | None,
        temperature: float,
    ) -> Transcript: ...
