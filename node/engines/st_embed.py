"""Embeddings through sentence-transformers, with concurrent requests batched together.

Requests queue their texts with their token counts; the engine's own thread takes what waits,
up to ``max_batch`` texts, encodes it (``_passes``: what ``SentenceTransformer.encode``
computes) and hands each request its rows back on the event loop as soon as they are encoded,
while the rest of the batch goes on. Batching is what lets many small concurrent requests
approach the in-process ceiling.

A request bigger than what is left of a batch goes in pieces, longest texts first, and waits
its turn again after each piece (round robin): small requests that arrive meanwhile are not
stuck behind thousands of texts, and a big request cancelled (its client left) stops after the
piece in flight.

The thread gathers and encodes by itself rather than being driven from an asyncio task: a job
reaches it without waiting for an event-loop turn, and only the results cross back (one call
per request). One long-lived thread also means one OpenMP thread team, which torch keeps per
calling thread; the model is loaded on it too.

Like ``encode``, ``_passes`` sorts the texts by length and pads each forward pass to its
longest text; unlike ``encode``, which runs fixed sub-batches of ``batch_size``, it cuts the
sorted texts where a new pass costs less than the padding it saves (``embed_passes``), with
``batch_size`` texts at most in a pass. What a pass costs is measured when the model loads
(``engine.forward_overhead_tokens`` in models.yaml sets it instead).
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import itertools
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from node.config import ModelSpec
from node.engines.base import EmbeddingProgress, EngineDead
from node.engines.embed_passes import PassCost, split_into_passes
from node.errors import ContextLengthExceeded

log = logging.getLogger(__name__)


@dataclass
class _Job:
    texts: list[str]
    lengths: list[int]  # token counts, as count_tokens gives them
    done: asyncio.Future[np.ndarray]
    progress: EmbeddingProgress | None = None
    # Only for a job that goes in pieces (the encoder thread's own bookkeeping):
    order: list[int] = field(default_factory=list)  # its rows, longest text first
    sent: int = 0  # rows of ``order`` handed to a batch so far
    out: np.ndarray | None = None  # its vectors, filled piece by piece

    def left(self) -> int:
        return len(self.texts) - self.sent


@dataclass
class _Piece:
    job: _Job
    rows: list[int] | None  # None: the whole job, in one piece

    @property
    def texts(self) -> list[str]:
        texts = self.job.texts
        return texts if self.rows is None else [texts[i] for i in self.rows]

    @property
    def lengths(self) -> list[int]:
        lengths = self.job.lengths
        return lengths if self.rows is None else [lengths[i] for i in self.rows]


_STOP = None  # put on the queue by stop(): the encoder thread ends
# A forward pass's fixed cost in padded tokens when it cannot be measured: the CPU stand-in's.
DEFAULT_OVERHEAD_TOKENS = 32.0


def _plain_counter(tokenizer: Any) -> Any:
    """The model's Rust tokenizer, copied, without truncation or padding: for counting.

    A copy, because a fast tokenizer switches its padding/truncation state per call, so one
    shared by counting (on the event loop) and encoding (padding, on the engine's thread)
    breaks batches that race. The raw tokenizer rather than the transformers wrapper, which
    logs a warning for every input over the model's length (those get a 400 here anyway).
    """
    counter = copy.deepcopy(tokenizer.backend_tokenizer)
    counter.no_truncation()
    counter.no_padding()
    return counter


MIN_CHARS_PER_TOKEN = 64
"""Characters per token of the window an embeddings input may hold, at least (see
``refuse_overlong``): real text averages about 4."""


class SentenceTransformerEngine:
    def __init__(self, spec: ModelSpec) -> None:
        self.spec = spec
        self.max_batch = max(1, int(spec.engine.get("max_batch", 64)))
        self.batch_size = max(1, int(spec.engine.get("batch_size", 32)))
        self._overhead_tokens = 0.0  # a forward pass's fixed cost in padded tokens (see _serve)
        self._model: Any = None
        self._dimensions = 0
        self._counter: Any = None  # a tokenizer of its own for count_tokens (see start)
        self.max_chars_per_token = 0  # the vocabulary's longest token (see refuse_overlong)
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._encoder: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping = False

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        loaded: asyncio.Future[None] = self._loop.create_future()
        self._encoder = threading.Thread(
            target=self._serve, args=(loaded,), name=f"embed-{self.spec.name}", daemon=True
        )
        self._encoder.start()
        await loaded
        self._counter = _plain_counter(self._model.tokenizer)
        longest = max(map(len, self._counter.get_vocab()), default=1)
        self.max_chars_per_token = max(longest, MIN_CHARS_PER_TOKEN)

    @property
    def dead(self) -> bool:
        return self._encoder is not None and not self._encoder.is_alive() and not self._stopping

    @property
    def dimensions(self) -> int:
        return self._dimensions

    def refuse_overlong(self, texts: list[str]) -> None:
        """400 for an input of more than ``max_chars_per_token`` characters per token of the
        window: tokenizing megabytes only to refuse them would hold a slot and a core for
        minutes, for free. The vocabulary's longest token bounds what a token can cover (as
        vLLM bounds prompts), except for what a tokenizer drops (runs of spaces, zero-width
        characters): hence the floor of ``MIN_CHARS_PER_TOKEN``, far past real text."""
        window = self.spec.context_window
        if not window:
            return
        bound = window * self.max_chars_per_token
        for i, text in enumerate(texts):
            if len(text) > bound:
                raise ContextLengthExceeded(
                    f"Input {i} has {len(text)} characters; the model {self.spec.name} "
                    f"accepts at most {window} tokens per input, and at most {bound} "
                    "characters.",
                    param="input",
                )

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

    def embed(
        self, texts: list[str], lengths: list[int], progress: EmbeddingProgress | None = None
    ) -> asyncio.Future[np.ndarray]:
        """One unit-length vector per text, batched with whatever else is waiting; ``lengths``
        are the texts' token counts from ``count_tokens``.

        The texts are queued before this returns, so the encode can start while the caller
        does other work before awaiting. Cancelling the future drops texts whose batch has
        not started yet; ``progress`` then tells which were encoded all the same.
        """
        assert self._loop is not None, "embed() before start()"
        if len(lengths) != len(texts):
            raise ValueError(f"{len(texts)} texts but {len(lengths)} token counts")
        job = _Job(texts, lengths, self._loop.create_future(), progress)
        if self._stopping or self.dead:
            job.done.set_exception(_stopped(self.spec.name))
        else:
            self._jobs.put(job)
        return job.done

    async def stop(self) -> None:
        self._stopping = True
        if self._encoder is not None:
            self._jobs.put(_STOP)
            await asyncio.to_thread(self._encoder.join)  # at most the batch in flight
        self._model = None

    # The encoder thread.

    def _serve(self, loaded: asyncio.Future[None]) -> None:
        try:
            self._model = self._load()
            self._overhead_tokens = self._pass_overhead_tokens()
        except BaseException as exc:
            self._call_soon(_resolve, loaded, None, exc)
            return
        self._call_soon(_resolve, loaded, None, None)
        pending: deque[_Job] = deque()  # jobs waiting for (more of) their texts, in turn
        try:
            while (pieces := self._next_batch(pending)) is not None:
                if pieces:
                    self._encode(pieces, pending)
        finally:  # stopped, or (a bug) died: nobody may wait forever
            self._fail(list(pending))
            self._fail_queued()

    def _load(self) -> Any:
        from sentence_transformers import SentenceTransformer

        device = self.spec.engine.get("device", "cpu")
        model = SentenceTransformer(self.spec.path, device=device)
        if self.spec.context_window:
            model.max_seq_length = self.spec.context_window
        model.eval()  # as encode() sets it on each call; _pass relies on it
        self._dimensions = int(model.get_embedding_dimension())
        return model

    def _pass_overhead_tokens(self) -> float:
        """A forward pass's fixed cost in padded tokens: from models.yaml if set there, else
        measured on this machine."""
        configured = self.spec.engine.get("forward_overhead_tokens")
        if configured is not None:
            return max(0.0, float(configured))
        try:
            cost = self._measure_pass_cost()
        except Exception:  # a tuning hint only: never a reason to fail the model
            log.warning(
                "%s: could not time a forward pass; passes are cut where padding would cost "
                "more than %.0f tokens", self.spec.name, DEFAULT_OVERHEAD_TOKENS, exc_info=True,
            )  # fmt: skip
            return DEFAULT_OVERHEAD_TOKENS
        if cost.fixed_s <= 0:  # the small pass was slowed (the machine busy): not a measurement
            log.warning(
                "%s: timing a forward pass gave no fixed cost (%s); passes are cut where padding "
                "would cost more than %.0f tokens", self.spec.name, cost, DEFAULT_OVERHEAD_TOKENS,
            )  # fmt: skip
            return DEFAULT_OVERHEAD_TOKENS
        log.info(
            "%s: a forward pass takes %.1f ms + %.4f ms per padded token; passes are cut where "
            "padding would cost more than %.0f tokens",
            self.spec.name, cost.fixed_s * 1e3, cost.per_token_s * 1e3, cost.overhead_tokens,
        )  # fmt: skip
        return cost.overhead_tokens

    def _measure_pass_cost(self) -> PassCost:
        """Times a pass of one short text and one of a few longer texts (best of 3 each, after a
        warm-up): the line through them is what a pass costs on this machine."""

        def timed(texts: list[str]) -> tuple[int, float]:
            padded = int(self._model.preprocess(texts)["attention_mask"].numel())
            self._pass(texts)
            best = float("inf")
            for _ in range(3):
                t0 = time.perf_counter()
                self._pass(texts)
                best = min(best, time.perf_counter() - t0)
            return padded, best

        small = timed([" ".join(["hej"] * 14)])
        large = timed([" ".join(["hej"] * 62)] * min(8, self.batch_size))
        return PassCost.from_two_passes(small, large)

    def _next_batch(self, pending: deque[_Job]) -> list[_Piece] | None:
        """About ``max_batch`` texts from the jobs in turn, waiting for one if there is none;
        None once ``stop`` was called. Requests cancelled meanwhile are left out. A job of up
        to ``max_batch`` texts goes whole (the batch may overshoot by less than one such job);
        a bigger one gives what fits and goes back in line with the rest of it."""
        arrived = [] if pending else [self._jobs.get()]
        with contextlib.suppress(queue.Empty):  # everything queued joins the line
            while True:
                arrived.append(self._jobs.get_nowait())
        for i, job in enumerate(arrived):
            if job is _STOP:
                self._fail([*pending, *(j for j in arrived[i + 1 :] if j is not _STOP)])
                pending.clear()
                return None
            pending.append(job)
        pieces: list[_Piece] = []
        room = self.max_batch
        for _ in range(len(pending)):
            if room <= 0:
                break
            job = pending.popleft()
            if job.done.cancelled():
                continue
            if job.sent == 0 and len(job.texts) <= self.max_batch:  # whole, as it came
                if _take(job, None):
                    pieces.append(_Piece(job, None))
                    room -= len(job.texts)
                continue
            if job.sent == 0:  # the first piece of many: longest first, as encode would
                job.order = sorted(range(len(job.texts)), key=lambda i: -job.lengths[i])
                job.out = np.empty((len(job.texts), self.dimensions), dtype=np.float32)
            rows = job.order[job.sent : job.sent + min(job.left(), room)]
            if not _take(job, rows):
                continue
            pieces.append(_Piece(job, rows))
            job.sent += len(rows)
            room -= len(rows)
            if job.left():
                pending.append(job)  # its next piece after the others' turn
        return pieces

    def _encode(self, pieces: list[_Piece], pending: deque[_Job]) -> None:
        """Encodes the batch pass by pass and hands each piece its vectors as soon as its last
        text is encoded: the event loop answers those requests, and reads the next ones, while
        the rest of the batch encodes, rather than all at once after it with the encoder idle."""
        texts = [t for piece in pieces for t in piece.texts]
        lengths = [n for piece in pieces for n in piece.lengths]
        owner = [k for k, piece in enumerate(pieces) for _ in piece.texts]
        first = list(itertools.accumulate((len(piece.texts) for piece in pieces), initial=0))
        left = [len(piece.texts) for piece in pieces]  # texts of each piece not yet encoded
        delivered = [False] * len(pieces)
        vectors = np.empty((len(texts), self.dimensions), dtype=np.float32)
        try:
            for rows, encoded in self._passes(texts, lengths):
                vectors[rows] = encoded
                for i in rows:
                    k = owner[i]
                    left[k] -= 1
                    if not left[k]:
                        self._deliver(pieces[k], vectors[first[k] : first[k + 1]])
                        delivered[k] = True
        except BaseException as exc:  # one bad pass fails the requests it leaves, not the engine
            log.exception("embedding batch failed")
            left_out = [p for p, done in zip(pieces, delivered, strict=True) if not done]
            for piece in left_out:
                self._call_soon(_resolve, piece.job.done, None, exc)
            failed = {id(piece.job) for piece in left_out}
            for _ in range(len(pending)):  # their next pieces are not encoded
                job = pending.popleft()
                if id(job) not in failed:
                    pending.append(job)
            if not isinstance(exc, Exception):
                raise

    def _deliver(self, piece: _Piece, vectors: np.ndarray) -> None:
        job = piece.job
        if piece.rows is None:
            self._call_soon(_resolve, job.done, vectors, None)
            return
        assert job.out is not None
        job.out[piece.rows] = vectors
        if job.sent == len(job.texts):  # its last piece (one piece per batch at most)
            self._call_soon(_resolve, job.done, job.out, None)

    def _passes(
        self, texts: list[str], lengths: list[int]
    ) -> Iterator[tuple[list[int], np.ndarray]]:
        """What ``encode(texts, normalize_embeddings=True)`` computes, as (rows, vectors) pass
        by pass. Like encode's own loop: longest texts first, the model's ``preprocess`` and
        forward; unlike it: passes cut by length (``split_into_passes``), and none of the checks
        and set-up encode repeats on every call (about 1 ms on the CPU stand-in, 10% of
        encoding a short text)."""
        order = sorted(range(len(texts)), key=lambda i: -lengths[i])
        runs = split_into_passes(
            [lengths[i] for i in order], self._overhead_tokens, self.batch_size
        )
        for start, end in runs:
            rows = order[start:end]
            yield rows, self._pass([texts[i] for i in rows])

    def _pass(self, texts: list[str]) -> np.ndarray:
        """One forward pass: the texts' unit-length vectors."""
        import torch
        from sentence_transformers.util import batch_to_device

        model = self._model
        with torch.inference_mode():
            features = batch_to_device(model.preprocess(texts), model.device)
            embedded = model(features)["sentence_embedding"]
            return torch.nn.functional.normalize(embedded, p=2, dim=1).cpu().numpy()

    def _fail_queued(self) -> None:
        jobs: list[_Job] = []
        with contextlib.suppress(queue.Empty):
            while True:
                job = self._jobs.get_nowait()
                if job is not _STOP:
                    jobs.append(job)
        self._fail(jobs)

    def _fail(self, jobs: list[_Job]) -> None:
        for job in jobs:
            self._call_soon(_resolve, job.done, None, _stopped(self.spec.name))

    def _call_soon(self, fn: Callable[..., None], *args: Any) -> None:
        assert self._loop is not None
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is waiting
            self._loop.call_soon_threadsafe(fn, *args)


def _take(job: _Job, rows: list[int] | None) -> bool:
    """Hand ``rows`` of the job (None: all) to the batch being formed, unless the request
    was cancelled; recorded in its progress under the lock, so that a request that reads its
    progress after cancelling sees exactly what is encoded."""
    if job.progress is None:
        return not job.done.cancelled()
    with job.progress.lock:
        if job.done.cancelled():
            return False
        job.progress.rows.extend(range(len(job.texts)) if rows is None else rows)
        return True


def _resolve(future: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
    if future.done():  # cancelled: the request went away
        return
    if error is None:
        future.set_result(result)
    else:
        future.set_exception(error)


def _stopped(name: str) -> EngineDead:
    return EngineDead(f"The embedding engine of {name} stopped; retry shortly.")
