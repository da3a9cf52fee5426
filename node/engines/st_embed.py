"""Embeddings through sentence-transformers, with concurrent requests batched together.

Requests queue their texts; one worker takes everything waiting (up to ``max_batch`` texts),
encodes it in a single ``encode`` call off the event loop, and hands each request its rows.
Batching is what lets many small concurrent requests approach the in-process ceiling.

``encode`` always runs on the engine's own thread: torch's OpenMP keeps a thread team per
calling thread, so a rotating pool could leave several teams on the cores; one thread, one
team.

``encode`` sorts the texts of a call by length and runs them ``batch_size`` at a time, each
sub-batch padded to its longest text. Gathering many texts but encoding them in small
sub-batches (``batch_size``, 16 by default) keeps the padding small: on the CPU stand-in, 64
mixed-length texts encode at about 150 texts/s in sub-batches of 16 against 95 in one batch,
and 32 of them at about 145 in sub-batches of 8 against 133 at 16 (the stand-in's files use 8).
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import functools
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np

from node.config import ModelSpec
from node.errors import ContextLengthExceeded

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass
class _Job:
    texts: list[str]
    done: asyncio.Future[np.ndarray]


def _plain_counter(tokenizer: Any) -> Any:
    """The model's Rust tokenizer, copied, without truncation or padding: for counting.

    A copy, because a fast tokenizer switches its padding/truncation state per call, so one
    shared by counting (on the event loop) and ``encode`` (padding, on the engine's thread)
    breaks batches that race. The raw tokenizer rather than the transformers wrapper, which
    logs a warning for every input over the model's length (those get a 400 here anyway).
    """
    counter = copy.deepcopy(tokenizer.backend_tokenizer)
    counter.no_truncation()
    counter.no_padding()
    return counter


class SentenceTransformerEngine:
    def __init__(self, spec: ModelSpec) -> None:
        self.spec = spec
        self.max_batch = int(spec.engine.get("max_batch", 64))
        self.batch_size = int(spec.engine.get("batch_size", 16))
        self._model: Any = None
        self._counter: Any = None  # a tokenizer of its own for count_tokens (see start)
        self._queue: asyncio.Queue[_Job] = asyncio.Queue()
        self._worker: asyncio.Task[None] | None = None
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"embed-{spec.name}")

    async def _on_thread(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._thread, functools.partial(fn, *args, **kwargs))

    async def start(self) -> None:
        from sentence_transformers import SentenceTransformer

        device = self.spec.engine.get("device", "cpu")
        self._model = await self._on_thread(SentenceTransformer, self.spec.path, device=device)
        if self.spec.context_window:
            self._model.max_seq_length = self.spec.context_window
        self._counter = _plain_counter(self._model.tokenizer)
        self._worker = asyncio.create_task(self._run(), name=f"embed:{self.spec.name}")

    @property
    def dead(self) -> bool:
        return self._worker is not None and self._worker.done()

    @property
    def dimensions(self) -> int:
        return int(self._model.get_sentence_embedding_dimension())

    def count_tokens(self, texts: list[str]) -> list[int]:
        """Tokens per input as the model sees them (special tokens included); 400 for an input
        longer than the model's window (it would be cut silently otherwise)."""
        counts = [len(e.ids) for e in self._counter.encode_batch(texts, add_special_tokens=True)]
        window = self.spec.context_window
        for i, n in enumerate(counts):
            if window and n > window:
                raise ContextLengthExceeded(
                    f"Input {i} has {n} tokens; the model {self.spec.name} accepts at most "
                    f"{window} tokens per input.",
                    param="input",
                )
        return counts

    async def embed(self, texts: list[str]) -> np.ndarray:
        """One unit-length vector per text, batched with whatever else is waiting."""
        job = _Job(texts, asyncio.get_running_loop().create_future())
        await self._queue.put(job)
        return await job.done

    async def _run(self) -> None:
        while True:
            jobs = [await self._queue.get()]
            size = len(jobs[0].texts)
            while not self._queue.empty() and size < self.max_batch:
                job = self._queue.get_nowait()
                jobs.append(job)
                size += len(job.texts)
            texts = [t for job in jobs for t in job.texts]
            try:
                vectors = await self._on_thread(
                    self._model.encode,
                    texts,
                    batch_size=self.batch_size,
                    convert_to_numpy=True,
                    normalize_embeddings=True,
                    show_progress_bar=False,
                )
            except Exception as exc:  # one bad batch must not kill the worker
                log.exception("embedding batch failed")
                for job in jobs:
                    if not job.done.done():
                        job.done.set_exception(exc)
                continue
            offset = 0
            for job in jobs:
                n = len(job.texts)
                if not job.done.done():  # the request may have gone away
                    job.done.set_result(vectors[offset : offset + n])
                offset += n

    async def stop(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._worker
        self._model = None
        self._thread.shutdown(wait=False)
