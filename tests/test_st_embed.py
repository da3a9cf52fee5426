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
from node.engines.embed_passes import split_into_passes
from node.engines.st_embed import DEFAULT_OVERHEAD_TOKENS, SentenceTransformerEngine
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


def _embed(
    engine: SentenceTransformerEngine, texts: list[str], progress: EmbeddingProgress | None = None
) -> asyncio.Future[np.ndarray]:
    """What the route does: count the texts' tokens, then queue them."""
    return engine.embed(texts, engine.count_tokens(texts), progress)


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
        got = await _embed(engine, TEXTS)
        assert got.shape == expected.shape == (len(TEXTS), engine.dimensions)
        assert np.allclose(got, expected, atol=1e-5)
        alone = await _embed(engine, [TEXTS[4]])  # alone: padded to nothing but itself
        assert np.allclose(alone[0], expected[4], atol=1e-5)

    _with_engine(body)


class _Gate:
    """Wraps the engine's ``_passes``: records each batch and holds the first one until
    ``release``, so a test can queue more work behind it deterministically."""

    def __init__(self, engine: SentenceTransformerEngine) -> None:
        self.batches: list[list[str]] = []
        self.started = threading.Event()
        self.released = threading.Event()
        self._passes = engine._passes
        engine._passes = self  # type: ignore[method-assign]

    def __call__(self, texts: list[str], lengths: list[int]) -> Any:
        self.batches.append(list(texts))
        if len(self.batches) == 1:
            self.started.set()
            self.released.wait(30)
        return self._passes(texts, lengths)

    async def wait_started(self) -> None:
        assert await asyncio.to_thread(self.started.wait, 30)


def test_waiting_requests_share_a_batch_and_cancelled_ones_are_left_out() -> None:
    async def body(engine: SentenceTransformerEngine) -> None:
        gate = _Gate(engine)
        first = _embed(engine, [TEXTS[4]])
        await gate.wait_started()
        waiting = [_embed(engine, [t]) for t in TEXTS[:3]]
        gone = _embed(engine, ["this request went away"])
        gone.cancel()
        gate.released.set()
        results = await asyncio.gather(first, *waiting)
        assert gate.batches[:2] == [[TEXTS[4]], TEXTS[:3]]  # the three waited, then went as one
        for text, result in zip([TEXTS[4], *TEXTS[:3]], results, strict=True):
            assert np.allclose(result, await _embed(engine, [text]), atol=1e-5)

    _with_engine(body)


def test_stop_fails_waiting_requests_and_refuses_new_ones() -> None:
    async def main() -> None:
        engine = SentenceTransformerEngine(standin_spec(ModelKind.EMBEDDING))
        await engine.start()
        gate = _Gate(engine)
        running = _embed(engine, [TEXTS[4]])
        await gate.wait_started()
        queued = _embed(engine, ["queued behind the running batch"])
        stopping = asyncio.ensure_future(engine.stop())
        await asyncio.sleep(0.05)  # stop() has queued its sentinel behind the job
        gate.released.set()
        await stopping
        assert (await running).shape == (1, 384)  # the batch in flight ends normally
        with pytest.raises(EngineDead):
            await queued
        with pytest.raises(EngineDead):
            await _embed(engine, ["after stop"])
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
        big = _embed(engine, texts)
        await gate.wait_started()
        small = _embed(engine, ["Tåget till Malmö är försenat."])
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
        # Longest texts first (in tokens), as encode() would order them; put back in the
        # request's order.
        counts = engine.count_tokens(texts)
        longest = sorted(range(len(texts)), key=lambda i: -counts[i])[:64]
        assert sorted(gate.batches[0]) == sorted(texts[i] for i in longest)
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
        big = _embed(engine, texts, progress)
        await gate.wait_started()
        big.cancel()  # what the route does when the client disconnects
        taken = progress.taken()  # what the route bills: the piece in flight
        gate.released.set()
        await _embed(engine, ["after"])
        assert [len(b) for b in gate.batches] == [64, 1]  # none of its other 236 texts
        assert sorted(texts[i] for i in taken) == sorted(gate.batches[0])
        assert progress.taken() == taken

    _with_engine(body)


def test_passes_are_cut_by_length_at_a_cost_measured_on_load() -> None:
    async def body(engine: SentenceTransformerEngine) -> None:
        # Measured when the model loaded: a pass costs something fixed, and padding costs too.
        assert 0 < engine._overhead_tokens < 1e6
        sizes: list[int] = []
        one_pass = engine._pass

        def recording(texts: list[str]) -> Any:
            sizes.append(len(texts))
            return one_pass(texts)

        engine._pass = recording  # type: ignore[method-assign]
        texts = _many_texts(40)
        counts = engine.count_tokens(texts)
        await engine.embed(texts, counts)
        longest_first = sorted(counts, reverse=True)
        runs = split_into_passes(longest_first, engine._overhead_tokens, engine.batch_size)
        assert sizes == [end - start for start, end in runs]
        assert len(sizes) > 1  # TEXTS run from 1 to 100 tokens: some are cut apart

    _with_engine(body)


def test_a_request_gets_its_vectors_while_the_rest_of_its_batch_encodes() -> None:
    async def body(engine: SentenceTransformerEngine) -> None:
        engine._overhead_tokens = 0.0  # every length its own pass: the long text goes first
        gate = _Gate(engine)
        held = _embed(engine, ["holds the first batch"])
        await gate.wait_started()
        long_done = threading.Event()
        long = _embed(engine, [TEXTS[4]])
        long.add_done_callback(lambda _: long_done.set())
        short = _embed(engine, ["Hej."])
        seen: list[bool] = []
        one_pass = engine._pass

        def watching(texts: list[str]) -> Any:
            if texts == ["Hej."]:  # the short text's pass waits until the long one is answered
                seen.append(long_done.wait(30))
            return one_pass(texts)

        engine._pass = watching  # type: ignore[method-assign]
        gate.released.set()
        await asyncio.gather(held, long, short)
        assert gate.batches[1] == [TEXTS[4], "Hej."]  # one batch, two passes
        assert seen == [True]

    _with_engine(body)


def test_a_failing_pass_fails_the_requests_it_leaves_and_the_engine_goes_on() -> None:
    async def body(engine: SentenceTransformerEngine) -> None:
        engine._overhead_tokens = 0.0  # the long text's pass, then the short one's
        gate = _Gate(engine)
        held = _embed(engine, ["holds the first batch"])
        await gate.wait_started()
        long = _embed(engine, [TEXTS[4]])
        short = _embed(engine, ["Hej."])
        one_pass = engine._pass

        def failing(texts: list[str]) -> Any:
            if texts == ["Hej."]:
                raise RuntimeError("out of memory")
            return one_pass(texts)

        engine._pass = failing  # type: ignore[method-assign]
        gate.released.set()
        await held
        assert (await long).shape == (1, 384)  # answered before the failing pass
        with pytest.raises(RuntimeError, match="out of memory"):
            await short
        engine._pass = one_pass  # type: ignore[method-assign]
        assert (await _embed(engine, ["Hej."])).shape == (1, 384)

    _with_engine(body)


def test_a_pass_cost_that_cannot_be_measured_leaves_the_default(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def broken(self: SentenceTransformerEngine) -> Any:
        raise KeyError("attention_mask")

    monkeypatch.setattr(SentenceTransformerEngine, "_measure_pass_cost", broken)

    async def body(engine: SentenceTransformerEngine) -> None:
        assert engine._overhead_tokens == DEFAULT_OVERHEAD_TOKENS
        assert (await _embed(engine, TEXTS[:3])).shape == (3, 384)
        with pytest.raises(ValueError, match="token counts"):
            engine.embed(TEXTS[:3], [4, 5])

    _with_engine(body)


def test_a_request_of_more_characters_than_its_token_cap_allows_is_refused_untokenized() -> None:
    from node.api.embeddings import MAX_REQUEST_TOKENS, refuse_too_many_chars
    from node.errors import InvalidRequest

    per_input = "x" * 1000
    fits = [per_input] * (MAX_REQUEST_TOKENS * 2 // 1000)
    assert refuse_too_many_chars(fits, 2) == MAX_REQUEST_TOKENS * 2
    with pytest.raises(InvalidRequest) as info:
        refuse_too_many_chars([*fits, "x"], 2)
    assert info.value.code == "max_tokens_per_request"
    assert f"Requested {MAX_REQUEST_TOKENS * 2 + 1} characters" in info.value.message
