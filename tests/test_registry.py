"""Model lifecycle as pure logic, with a scripted test engine (no model behind it)."""

from __future__ import annotations

import asyncio

import pytest

from node import registry
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


async def _until(predicate, timeout: float = 5.0) -> None:  # type: ignore[no-untyped-def]
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.001)


def test_failed_load_is_503_model_unavailable_with_the_reason() -> None:
    async def scenario() -> None:
        entry = ModelEntry(SPEC, lambda spec: ScriptedEngine(fail=True))
        task = asyncio.create_task(entry.run())
        await _until(lambda: entry.state is ModelState.FAILED)
        assert "weights not found" in (entry.error or "")
        with pytest.raises(Unavailable) as info:
            entry.require_ready()
        assert info.value.code == "model_unavailable"
        task.cancel()

    asyncio.run(scenario())


def test_a_factory_that_raises_is_a_failed_load_not_a_stuck_one() -> None:
    def factory(spec: ModelSpec) -> ScriptedEngine:
        raise ValueError("bad engine option")

    async def scenario() -> None:
        entry = ModelEntry(SPEC, factory)
        task = asyncio.create_task(entry.run())
        await _until(lambda: entry.state is ModelState.FAILED)
        assert "bad engine option" in (entry.error or "")
        task.cancel()

    asyncio.run(scenario())


def test_a_failed_first_load_is_tried_again_with_back_off(monkeypatch: pytest.MonkeyPatch) -> None:
    """The first start fails (say, GPU memory not yet freed), the next ones succeed."""
    monkeypatch.setattr(registry, "_FIRST_RETRY_S", 0.01)
    made: list[ScriptedEngine] = []

    def factory(spec: ModelSpec) -> ScriptedEngine:
        made.append(ScriptedEngine(fail=len(made) < 2))
        return made[-1]

    async def scenario() -> None:
        entry = ModelEntry(SPEC, factory)
        task = asyncio.create_task(entry.run())
        await _until(lambda: entry.state is ModelState.READY)
        assert len(made) == 3 and made[0].stopped and made[1].stopped
        assert entry.engine is made[2] and entry.require_ready() is made[2]
        assert entry.restarts == 0 and entry.error is None
        task.cancel()

    asyncio.run(scenario())


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


def test_models_load_one_at_a_time_in_the_files_order() -> None:
    """On a GPU each vLLM engine measures its memory while it loads: no two loads overlap."""
    starts: list[str] = []
    running: set[str] = set()
    overlaps: list[set[str]] = []

    class TimedEngine(ScriptedEngine):
        def __init__(self, name: str) -> None:
            super().__init__()
            self.name = name

        async def start(self) -> None:
            starts.append(self.name)
            running.add(self.name)
            if len(running) > 1:
                overlaps.append(set(running))
            await asyncio.sleep(0.02)
            running.discard(self.name)

    specs = [ModelSpec(name=n, kind=ModelKind.EMBEDDING, path="/nowhere") for n in "abc"]

    async def scenario() -> None:
        models = Registry(specs, lambda spec: TimedEngine(spec.name))
        models.start()
        await _until(lambda: models.all_ready)
        await models.stop()

    asyncio.run(scenario())
    assert starts == ["a", "b", "c"] and overlaps == []


def test_a_hung_load_times_out_and_its_teardown_ends_before_the_next_load(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """One load at a time: a hung one must not hold the others for good, and an engine's
    teardown (GPU memory coming free) must not overlap another's load either."""
    monkeypatch.setattr(registry, "LOAD_TIMEOUT_S", 0.05)
    events: list[str] = []

    class Engine(ScriptedEngine):
        def __init__(self, name: str) -> None:
            super().__init__()
            self.name = name

        async def start(self) -> None:
            events.append(f"start {self.name}")
            if self.name == "hung":
                await asyncio.sleep(3600)

        async def stop(self) -> None:
            await asyncio.sleep(0.05)
            events.append(f"stopped {self.name}")

    specs = [ModelSpec(name=n, kind=ModelKind.EMBEDDING, path="/x") for n in ("hung", "b")]

    async def scenario() -> None:
        models = Registry(specs, lambda spec: Engine(spec.name))
        models.start()
        await _until(lambda: models.entries[1].state is ModelState.READY)
        assert models.entries[0].state is ModelState.FAILED
        assert "took more than" in (models.entries[0].error or "")
        for task in models._tasks:
            task.cancel()

    asyncio.run(scenario())
    assert events[:3] == ["start hung", "stopped hung", "start b"]
