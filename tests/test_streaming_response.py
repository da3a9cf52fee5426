"""ClosingStreamingResponse lets go of what a stream holds however the response ends."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from node.api.common import ClosingStreamingResponse

SCOPE = {"type": "http", "asgi": {"spec_version": "2.3"}, "method": "POST", "path": "/"}


async def _serve(client_gone_after: int, sends_suspend: int) -> tuple[list[str], int]:
    """One streamed response to a client that disconnects after ``client_gone_after`` loop
    turns, over a server whose sends take ``sends_suspend`` turns."""
    ran: list[str] = []
    finished = 0

    async def events() -> AsyncIterator[str]:
        ran.append("started")
        try:
            for i in range(3):
                await asyncio.sleep(0.01)
                yield f"data: {i}\n\n"
        finally:
            ran.append("closed")

    async def finish() -> None:
        nonlocal finished
        finished += 1

    async def receive() -> dict[str, str]:
        for _ in range(client_gone_after):
            await asyncio.sleep(0)
        return {"type": "http.disconnect"}

    async def send(message: object) -> None:
        for _ in range(sends_suspend):
            await asyncio.sleep(0)

    response = ClosingStreamingResponse(events(), finish=finish, media_type="text/event-stream")
    await response(SCOPE, receive, send)
    return ran, finished


@pytest.mark.parametrize("client_gone_after", [0, 1, 3])
@pytest.mark.parametrize("sends_suspend", [0, 1, 3])
def test_finish_runs_once_whether_or_not_the_stream_ever_started(
    client_gone_after: int, sends_suspend: int
) -> None:
    ran, finished = asyncio.run(_serve(client_gone_after, sends_suspend))
    assert finished == 1
    assert ran in ([], ["started", "closed"])  # a started stream is closed, not left to the GC


def test_a_client_gone_before_the_first_chunk_can_leave_the_stream_unstarted() -> None:
    """Why ``finish`` exists: Starlette may cancel the body before it starts, and a generator
    never started never runs its ``finally``."""
    ran, finished = asyncio.run(_serve(client_gone_after=0, sends_suspend=1))
    assert ran == [] and finished == 1


def test_a_client_that_stops_reading_lets_go_of_the_stream_after_the_stall_timeout() -> None:
    """Its send blocks for good (connected, reading nothing): on_stall marks it and finish
    runs at once, while the response is still stuck; once the response ends (here: the
    client finally goes), finish is not run a second time."""

    async def body() -> tuple[int, int, int, int]:
        stalls = finished = sent = 0

        async def events() -> AsyncIterator[str]:
            for i in range(1000):
                yield f"data: {i}\n\n"

        async def send(message: dict) -> None:
            nonlocal sent
            sent += 1
            if sent > 3:
                await asyncio.Event().wait()  # the client's window is full: never returns

        async def receive() -> dict[str, str]:
            await asyncio.Event().wait()  # connected: no disconnect ever comes
            return {}

        def on_stall() -> None:
            nonlocal stalls
            stalls += 1

        async def finish() -> None:
            nonlocal finished
            await asyncio.sleep(0.05)  # the engine's abort takes a while
            finished += 1

        response = ClosingStreamingResponse(
            events(), finish=finish, on_stall=on_stall, stall_timeout_s=0.2
        )
        serving = asyncio.ensure_future(response(SCOPE, receive, send))
        await asyncio.sleep(0.1)
        early = stalls + finished
        await asyncio.sleep(0.6)
        assert not serving.done()
        stalled_then = finished
        serving.cancel()
        await asyncio.gather(serving, return_exceptions=True)
        return early, stalls, stalled_then, finished

    assert asyncio.run(body()) == (0, 1, 1, 1)


def test_finish_runs_once_when_the_client_leaves_during_the_stall_finish() -> None:
    """The watchdog's finish is still running (the engine's abort) when the response ends:
    the response waits for that same run instead of starting a second one."""

    async def body() -> tuple[int, int]:
        started = finished = 0
        gate = asyncio.Event()

        async def events() -> AsyncIterator[str]:
            for i in range(1000):
                yield f"data: {i}\n\n"

        async def send(message: dict) -> None:
            if message["type"] == "http.response.body":
                await asyncio.Event().wait()

        async def receive() -> dict[str, str]:
            await gate.wait()  # the client leaves once the stall's finish has begun
            return {"type": "http.disconnect"}

        async def finish() -> None:
            nonlocal started, finished
            started += 1
            gate.set()
            await asyncio.sleep(0.2)
            finished += 1

        response = ClosingStreamingResponse(
            events(), finish=finish, on_stall=lambda: None, stall_timeout_s=0.1
        )
        await asyncio.wait_for(response(SCOPE, receive, send), 5)
        return started, finished

    assert asyncio.run(body()) == (1, 1)


def test_a_reading_client_never_stalls() -> None:
    async def body() -> int:
        stalls = 0

        async def events() -> AsyncIterator[str]:
            for i in range(5):
                await asyncio.sleep(0.1)  # the engine is slow, not the client
                yield f"data: {i}\n\n"

        async def send(message: dict) -> None:
            await asyncio.sleep(0.01)

        async def receive() -> dict[str, str]:
            await asyncio.Event().wait()
            return {}

        def on_stall() -> None:
            nonlocal stalls
            stalls += 1

        async def finish() -> None:
            pass

        response = ClosingStreamingResponse(
            events(), finish=finish, on_stall=on_stall, stall_timeout_s=0.05
        )
        await asyncio.wait_for(response(SCOPE, receive, send), 5)
        return stalls

    assert asyncio.run(body()) == 0
