"""The sentence-transformers engine on the real stand-in: its lean encode loop gives what
``SentenceTransformer.encode`` gives, it batches what waits, and drops what was cancelled."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable
from typing import Any

import numpy as np
import pytest

from node.config import ModelKind
from node.engines.base import EmbeddingProgress, EngineDead
from node.engines.st_embed import SentenceTransformerEngine
from tests.standins import standin_spec

TEXTS = [
    "Hej.",
    "Stockholm är Sveriges huvudstad och ligger vid Mälarens utlopp i Östersjön.",
    "The council decided to invest in new rail lines.",
    "Ö",
    " ".join(["Regeringen presenterade budgeten för nästa år"] * 12),
    "Emoji and symbols: ☃ € ✓ 😀",
    "Kort mening om vädret i Göteborg.",
    "A second sentence of middling length, in English, about cold weather and energy.",
    "Tåget till Malmö är försenat.",
    "x",
]


def _with_engine(body: Callable[[SentenceTransformerEngine], Awaitable[None]]) -> None:
    async def main() -> None:
        engine = SentenceTransformerEngine(standin_spec(ModelKind.EMBEDDING))
        await engine.start()
        try:
            await body(engine)
        finally:
            await engine.stop()

    asyncio.run(main())


def test_vectors_match_sentence_transformers_encode() -> None:
    async def body(engine: SentenceTransformerEngine) -> None:
        expected = engine._model.encode(
            TEXTS, batch_size=engine.batch_size, normalize_embeddings=True, convert_to_numpy=True
        )
        got = await engine.embed(TEXTS)
        assert got.shape == expected.shape == (len(TEXTS), engine.dimensions)
        assert np.allclose(got, expected, atol=1e-5)
        alone = await engine.embed([TEXTS[4]])  # alone: padded to nothing but itself
        assert np.allclose(alone[0], expected[4], atol=1e-5)

    _with_engine(body)


class _Gate:
    """Wraps the engine's ``_vectors``: records each batch and holds the first one until
    ``release``, so a test can queue more work behind it deterministically."""

    def __init__(self, engine: SentenceTransformerEngine) -> None:
        self.batches: list[list[str]] = []
        self.started = threading.Event()
        self.released = threading.Event()
        self._vectors = engine._vectors
        engine._vectors = self  # type: ignore[method-assign]

    def __call__(self, texts: list[str]) -> Any:
        self.batches.append(list(texts))
        if len(self.batches) == 1:
            self.started.set()
            self.released.wait(30)
        return self._vectors(texts)

    async def wait_started(self) -> None:
        assert await asyncio.to_thread(self.started.wait, 30)


def test_waiting_requests_share_a_batch_and_cancelled_ones_are_left_out() -> None:
    async def body(engine: SentenceTransformerEngine) -> None:
        gate = _Gate(engine)
        first = engine.embed([TEXTS[4]])
        await gate.wait_started()
        waiting = [engine.embed([t]) for t in TEXTS[:3]]
        gone = engine.embed(["this request went away"])
        gone.cancel()
        gate.released.set()
        results = await asyncio.gather(first, *waiting)
        assert gate.batches[:2] == [[TEXTS[4]], TEXTS[:3]]  # the three waited, then went as one
        for text, result in zip([TEXTS[4], *TEXTS[:3]], results, strict=True):
            assert np.allclose(result, await engine.embed([text]), atol=1e-5)

    _with_engine(body)


def test_stop_fails_waiting_requests_and_refuses_new_ones() -> None:
    async def main() -> None:
        engine = SentenceTransformerEngine(standin_spec(ModelKind.EMBEDDING))
        await engine.start()
        gate = _Gate(engine)
        running = engine.embed([TEXTS[4]])
        await gate.wait_started()
        queued = engine.embed(["queued behind the running batch"])
        stopping = asyncio.ensure_future(engine.stop())
        await asyncio.sleep(0.05)  # stop() has queued its sentinel behind the job
        gate.released.set()
        await stopping
        assert (await running).shape == (1, 384)  # the batch in flight ends normally
        with pytest.raises(EngineDead):
            await queued
        with pytest.raises(EngineDead):
            await engine.embed(["after stop"])
        assert gate.batches == [[TEXTS[4]]] and not engine.dead

    asyncio.run(main())


def _many_texts(n: int) -> list[str]:
    """``n`` distinct texts of varied lengths."""
    return [f"{TEXTS[i % len(TEXTS)]} ({i})" for i in range(n)]


def test_a_big_request_goes_in_pieces_and_a_small_one_gets_its_turn_in_between() -> None:
    async def body(engine: SentenceTransformerEngine) -> None:
        assert engine.max_batch == 64
        texts = _many_texts(200)
        gate = _Gate(engine)
        big = engine.embed(texts)
        await gate.wait_started()
        small = engine.embed(["Tåget till Malmö är försenat."])
        finished: list[str] = []
        big.add_done_callback(lambda _: finished.append("big"))
        small.add_done_callback(lambda _: finished.append("small"))
        gate.released.set()
        vectors = await big
        await small
        # Round robin: the big request's pieces, the small one with the third, the rest.
        assert [len(b) for b in gate.batches] == [64, 64, 64, 9]
        assert "Tåget till Malmö är försenat." in gate.batches[2]
        assert finished == ["small", "big"]
        # Longest texts first, as encode() would order them; put back in the request's order.
        assert gate.batches[0] == sorted(texts, key=len, reverse=True)[:64]
        expected = engine._model.encode(
            texts, batch_size=engine.batch_size, normalize_embeddings=True, convert_to_numpy=True
        )
        assert vectors.shape == expected.shape and np.allclose(vectors, expected, atol=1e-5)

    _with_engine(body)


def test_a_cancelled_big_request_stops_after_the_piece_in_flight() -> None:
    async def body(engine: SentenceTransformerEngine) -> None:
        texts = _many_texts(300)
        gate = _Gate(engine)
        progress = EmbeddingProgress()
        big = engine.embed(texts, progress)
        await gate.wait_started()
        big.cancel()  # what the route does when the client disconnects
        taken = progress.taken()  # what the route bills: the piece in flight
        gate.released.set()
        await engine.embed(["after"])
        assert [len(b) for b in gate.batches] == [64, 1]  # none of its other 236 texts
        assert sorted(texts[i] for i in taken) == sorted(gate.batches[0])
        assert progress.taken() == taken

    _with_engine(body)
