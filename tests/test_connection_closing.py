"""Admission's view of a client's connection: uvicorn's transport, or nothing (said once)."""

import logging

import pytest
from starlette.requests import Request

from node.api import common


class Transport:
    def __init__(self) -> None:
        self.closing = False

    def is_closing(self) -> bool:
        return self.closing


class Cycle:
    """The shape of uvicorn's RequestResponseCycle that the node reads."""

    def __init__(self) -> None:
        self.transport = Transport()

    async def receive(self) -> dict:
        return {"type": "http.disconnect"}


SCOPE = {"type": "http", "method": "POST", "path": "/v1/embeddings", "headers": []}


def test_the_transport_tells_when_the_client_has_gone() -> None:
    cycle = Cycle()
    leaving = common.connection_closing(Request(SCOPE, cycle.receive))
    assert leaving is not None and not leaving()
    cycle.transport.closing = True
    assert leaving()


def test_without_a_transport_admission_is_blind_and_says_so_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def wrapped_receive() -> dict:  # as uvicorn's trace-level message logger wraps it
        return {"type": "http.disconnect"}

    common._say_closing_unseen.cache_clear()
    with caplog.at_level(logging.WARNING, logger=common.__name__):
        for _ in range(3):
            assert common.connection_closing(Request(SCOPE, wrapped_receive)) is None
    assert len(caplog.records) == 1
    assert "cannot see clients' connections close" in caplog.records[0].getMessage()
