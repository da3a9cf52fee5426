"""The typed seams between the node and its engines, one protocol per capability."""

from __future__ import annotations

import threading
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
class UsageMeter:
    """Tokens a reply used. A stream records vLLM's continuous usage chunk by chunk (it counts
    each of the n choices separately), so a stream cut short still knows what it produced.

    Until the final usage arrives, the prompt is at least ``prompt_floor``: the tokens of every
    prompt the engine took in, known before the first chunk. A chunk states only the prompt of
    its own choice (of one prompt among several in a legacy completion), and a stream cut
    before any chunk states nothing; the engine processed the prompts all the same.
    """

    seen_prompt: int = 0
    prompt_floor: int = 0
    by_choice: dict[int, int] = field(default_factory=dict)
    final_total: int | None = None

    def record(self, numbers: dict[str, Any], choice: int | None) -> None:
        """``choice`` None: the request's final usage (all choices)."""
        self.seen_prompt = int(numbers.get("prompt_tokens", self.seen_prompt))
        if choice is None:
            self.final_total = int(numbers.get("total_tokens", 0))
            return
        self.by_choice[choice] = int(numbers.get("completion_tokens", 0))

    @property
    def prompt(self) -> int:
        if self.final_total is not None:
            return self.seen_prompt
        return max(self.seen_prompt, self.prompt_floor)

    @property
    def total(self) -> int:
        if self.final_total is not None:
            return self.final_total
        return self.prompt + sum(self.by_choice.values())

    @property
    def completion(self) -> int:
        return max(0, self.total - self.prompt)


@dataclass
class ChatResult:
    """Either a whole response body or a stream of SSE strings (``data: ...\\n\\n``)."""

    body: dict[str, Any] | None = None
    stream: AsyncIterator[str] | None = None
    usage: UsageMeter = field(default_factory=UsageMeter)

    @property
    def total_tokens(self) -> int:
        return self.usage.total


@dataclass
class ChatProgress:
    """Shared by a chat request and its engine: the tokens generated for replies the engine
    aborted before they were whole (a non-streamed request whose client left)."""

    generated: int = 0


@dataclass
class Word:
    word: str
    start: float
    end: float


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
    words: list[Word] = field(default_factory=list)  # only when word timestamps were asked


@dataclass
class TranscriptionProgress:
    """Shared by a transcription and its caller: ``stop`` asks the engine to end after the
    segment it is decoding; ``done_s`` is the audio transcribed so far."""

    stop: threading.Event = field(default_factory=threading.Event)
    done_s: float = 0.0


@dataclass
class EmbeddingProgress:
    """Shared by an embeddings request and the engine: the inputs handed to the encoder so
    far (once handed over they are encoded, even if the request is cancelled). Read after
    cancelling, it is exactly the work the request cost: the engine records and checks for
    cancellation under ``lock``."""

    rows: list[int] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def taken(self) -> list[int]:
        with self.lock:
            return list(self.rows)


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
        self,
        body: dict[str, Any],
        on_prompt: PromptHook | None = None,
        progress: ChatProgress | None = None,
    ) -> ChatResult: ...

    async def complete(
        self,
        body: dict[str, Any],
        on_prompt: PromptHook | None = None,
        progress: ChatProgress | None = None,
    ) -> ChatResult: ...


class EmbeddingEngine(Engine, Protocol):
    def count_tokens(self, texts: list[str]) -> list[int]: ...
    def embed(
        self, texts: list[str], lengths: list[int], progress: EmbeddingProgress | None = None
    ) -> Awaitable[np.ndarray]: ...


class TranscriptionEngine(Engine, Protocol):
    async def transcribe(
        self,
        audio: np.ndarray,
        *,
        language: str | None,
        prompt: str | None,
        temperature: float,
        words: bool = False,
        progress: TranscriptionProgress | None = None,
        on_segment: Callable[[Segment], None] | None = None,
    ) -> Transcript: ...
