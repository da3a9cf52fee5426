"""Model lifecycle as pure logic, with a scripted test engine (no model behind it)."""

from __future__ import annotations

import asyncio

import pytest

from node.config import ModelKind, ModelSpec
from node.errors import ModelNotFound, Unavailable, WrongModelKind
from node.registry import ModelEntry, ModelState, Registry

SPEC = ModelSpec(name="m", kind=ModelKind.EMBEDDING, path="/nowhere", aliases=["alias"])


class ScriptedEngine:
    """Starts (or fails to) as told; ``dead`` can be flipped by the test."""

    def __init__(self, fail: bool = False) -> None:
        self.fail = fail
        self.dead = False
        self.stopped = False

    async def start(self) -> None:
        await asyncio.sleep(0)
        if self.fail:
            raise RuntimeError("weights not found")

    async def stop(self) -> None:
        self.stopped = True


def test_failed_load_is_503_model_unavailable_with_the_reason() -> None:
    async def scenario() -> None:
        entry = ModelEntry(SPEC, lambda spec: ScriptedEngine(fail=True))
        await entry.run()
        assert entry.state is ModelState.FAILED and "weights not found" in (entry.error or "")
        with pytest.raises(Unavailable) as info:
            entry.require_ready()
        assert info.value.code == "model_unavailable"

    asyncio.run(scenario())


def test_a_factory_that_raises_is_a_failed_load_not_a_stuck_one() -> None:
    def factory(spec: ModelSpec) -> ScriptedEngine:
        raise ValueError("bad engine option")

    entry = ModelEntry(SPEC, factory)
    asyncio.run(entry.run())
    assert entry.state is ModelState.FAILED


def test_loading_is_503_model_loading_with_retry_after() -> None:
    entry = ModelEntry(SPEC, lambda spec: ScriptedEngine())
    with pytest.raises(Unavailable) as info:
        entry.require_ready()
    assert info.value.code == "model_loading" and info.value.retry_after_s >= 1


def test_dead_engine_is_restarted_and_stale_reports_are_ignored() -> None:
    async def scenario() -> None:
        engines: list[ScriptedEngine] = []

        def factory(spec: ModelSpec) -> ScriptedEngine:
            engines.append(ScriptedEngine())
            return engines[-1]

        entry = ModelEntry(SPEC, factory)
        task = asyncio.create_task(entry.run())
        while entry.state is not ModelState.READY:
            await asyncio.sleep(0.01)
        first = entry.engine
        first.dead = True
        with pytest.raises(Unavailable):
            entry.require_ready()  # notices the death and reports it
        while entry.restarts == 0 or entry.state is not ModelState.READY:
            await asyncio.sleep(0.01)
        assert first.stopped and entry.engine is not first
        entry.report_dead(first)  # a late report about the old engine
        await asyncio.sleep(1.2)
        assert entry.restarts == 1 and entry.state is ModelState.READY
        task.cancel()

    asyncio.run(scenario())


def test_resolve_names_aliases_and_kinds() -> None:
    registry = Registry([SPEC], lambda spec: ScriptedEngine())
    assert registry.resolve("alias", ModelKind.EMBEDDING).spec is SPEC
    with pytest.raises(ModelNotFound):
        registry.resolve("other", ModelKind.EMBEDDING)
    with pytest.raises(WrongModelKind):
        registry.resolve("m", ModelKind.CHAT)
