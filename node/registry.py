"""Model lifecycle: loading -> ready | failed (retried) -> ready; ready -> restarting -> ready;
one entry per public model.

Models load in the background so the HTTP server answers (503) from the first moment. A
watcher notices an engine that died (vLLM's engine core process, say) and restarts it with
back-off while the model answers 503.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import time
from collections.abc import Callable
from enum import StrEnum
from typing import Any

from node.config import ModelKind, ModelSpec
from node.engines.base import Engine
from node.errors import InvalidRequest, ModelNotFound, Unavailable, WrongModelKind
from node.scheduler import SlotPool

log = logging.getLogger(__name__)

EngineFactory = Callable[[ModelSpec], Engine]

_EXPECTED_LOAD_S = {ModelKind.CHAT: 60.0, ModelKind.EMBEDDING: 10.0, ModelKind.TRANSCRIPTION: 10.0}
_WATCH_INTERVAL_S = 1.0
_MAX_BACKOFF_S = 60.0
_FIRST_RETRY_S = 5.0
LOAD_TIMEOUT_S = 1800.0
"""A load that takes longer fails (and is tried again): loads run one at a time, so a hung one
would otherwise keep every other model from loading or restarting."""


def freeze_gc_heap() -> None:
    """Move everything alive now (a loaded model's many objects) out of the garbage
    collector's reach, as ``vllm serve`` does at start: otherwise each full collection walks
    them all while every request on the event loop waits."""
    gc.collect()
    gc.freeze()


class ModelState(StrEnum):
    LOADING = "loading"
    READY = "ready"
    FAILED = "failed"
    RESTARTING = "restarting"
    STOPPED = "stopped"


class ModelEntry:
    def __init__(
        self, spec: ModelSpec, factory: EngineFactory, load_lock: asyncio.Lock | None = None
    ) -> None:
        self.spec = spec
        self.slots = SlotPool(spec.slots, spec.queue_timeout_ms)
        self.state = ModelState.LOADING
        self.error: str | None = None
        self.engine: Any = None
        self.restarts = 0
        self._factory = factory
        self._state_since = time.monotonic()
        self._last_load_s: float | None = None
        self._dead = asyncio.Event()
        self._load_lock = load_lock or asyncio.Lock()

    def _set(self, state: ModelState, error: str | None = None) -> None:
        self.state, self.error, self._state_since = state, error, time.monotonic()

    def retry_after_s(self) -> float:
        """Time left of the expected load, from the last load's duration (or a per-kind guess)."""
        expected = self._last_load_s or _EXPECTED_LOAD_S[self.spec.kind]
        elapsed = time.monotonic() - self._state_since
        return max(1.0, expected - elapsed) if elapsed < expected else 2.0

    def require_ready(self) -> Any:
        """The engine, or 503 model_loading / model_unavailable with a Retry-After."""
        if self.state is ModelState.READY and self.engine is not None and not self.engine.dead:
            return self.engine
        if self.state is ModelState.READY:  # its engine just died: the watcher restarts it
            self.report_dead(self.engine)
        if self.state in (ModelState.LOADING, ModelState.RESTARTING, ModelState.READY):
            doing = "loading" if self.state is ModelState.LOADING else "restarting"
            raise Unavailable(
                f"The model {self.spec.name} is {doing}; try again shortly.",
                code="model_loading",
                retry_after_s=self.retry_after_s(),
                should_retry=True,
            )
        raise Unavailable(
            f"The model {self.spec.name} is unavailable: {self.error or self.state.value}",
            code="model_unavailable",
            retry_after_s=30.0,
            should_retry=False,
        )

    def report_dead(self, engine: Any) -> None:
        """A request saw ``engine`` die: the watcher restarts it, unless that engine is
        already gone (a late report about the previous engine must not restart the new one)."""
        if engine is not None and engine is self.engine:
            self._dead.set()

    async def load(self) -> bool:
        """Start an engine, holding the registry's load lock from start to, on failure, the
        engine's teardown (its processes freeing GPU memory count as much as a load)."""
        started = time.monotonic()
        async with self._load_lock:
            engine: Any = None
            try:
                engine = self._factory(self.spec)
                await asyncio.wait_for(engine.start(), LOAD_TIMEOUT_S)
            except asyncio.CancelledError:
                if engine is not None:
                    with contextlib.suppress(Exception):
                        await engine.stop()
                raise
            except Exception as exc:
                if isinstance(exc, TimeoutError):
                    exc = TimeoutError(f"the load took more than {LOAD_TIMEOUT_S:.0f} s")
                log.error("model %s failed to load: %s", self.spec.name, exc, exc_info=exc)
                if engine is not None:
                    with contextlib.suppress(Exception):
                        await engine.stop()
                self._set(ModelState.FAILED, f"{type(exc).__name__}: {exc}")
                return False
        self.engine = engine
        self._last_load_s = time.monotonic() - started
        self._dead.clear()
        self._set(ModelState.READY)
        log.info("model %s ready in %.1f s", self.spec.name, self._last_load_s)
        freeze_gc_heap()
        return True

    async def run(self) -> None:
        """Load, then watch: a dead engine is stopped and loaded again with back-off.

        A failed first load is tried again too, from ``_FIRST_RETRY_S`` doubling up to
        ``_MAX_BACKOFF_S`` (GPU memory still held by a process that is going away, a model
        folder being synced); meanwhile the model answers 503 model_unavailable with the
        reason, as ``/v1/models`` shows it.
        """
        backoff = _FIRST_RETRY_S
        while not await self.load():
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, _MAX_BACKOFF_S)
        backoff = 1.0
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._dead.wait(), _WATCH_INTERVAL_S)
            if not (self._dead.is_set() or self.engine.dead):
                continue
            log.error("engine of %s died; restarting", self.spec.name)
            self._set(ModelState.RESTARTING, "engine died")
            self.restarts += 1
            old, self.engine = self.engine, None
            async with self._load_lock:  # its teardown frees GPU memory: not during a load
                with contextlib.suppress(Exception):
                    await old.stop()
            while not await self.load():
                self._set(ModelState.RESTARTING, self.error)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, _MAX_BACKOFF_S)
            backoff = 1.0

    async def stop(self) -> None:
        self._set(ModelState.STOPPED)
        engine, self.engine = self.engine, None
        if engine is not None:
            await engine.stop()

    def describe(self) -> dict[str, Any]:
        engine = self.engine
        return {
            "state": self.state.value,
            "error": self.error,
            "slots_in_use": self.slots.in_use,
            "slots_total": self.slots.total,
            "engine_requests": getattr(engine, "running_requests", 0) if engine else 0,
            "engine_pids": getattr(engine, "pids", []) if engine else [],
            "restarts": self.restarts,
        }


class Registry:
    """The node's models by public name, each loaded and watched by a task of its own.

    Models load one at a time, in the models file's order (restarts too): vLLM sizes its KV
    cache from the drop in the GPU's free memory while it profiles, so another model loading
    on the same GPU meanwhile would count as its own use (a cache too small, or vLLM's check
    that free memory never rises during profiling failing the load).
    """

    def __init__(self, specs: list[ModelSpec], factory: EngineFactory) -> None:
        loading = asyncio.Lock()
        self.entries = [ModelEntry(spec, factory, loading) for spec in specs]
        self._by_name = {name: e for e in self.entries for name in e.spec.public_names}
        self._tasks: list[asyncio.Task[None]] = []

    def resolve(self, name: Any, kind: ModelKind) -> ModelEntry:
        """The entry behind a public name: 404 if unknown, 400 if it is not a ``kind`` model."""
        if name is None or name == "":
            raise InvalidRequest("The field 'model' is required.", param="model")
        if not isinstance(name, str):
            raise InvalidRequest(
                "Invalid type for 'model': expected a string.", param="model", code="invalid_type"
            )
        entry = self._by_name.get(name)
        if entry is None:
            raise ModelNotFound(f"The model '{name}' does not exist.", param="model")
        if entry.spec.kind is not kind:
            raise WrongModelKind(
                f"The model '{name}' is {_a(entry.spec.kind.value)} model; this route needs "
                f"{_a(kind.value)} model.",
                param="model",
            )
        return entry

    def start(self) -> None:
        for entry in self.entries:
            self._tasks.append(asyncio.create_task(entry.run(), name=f"model:{entry.spec.name}"))

    @property
    def all_ready(self) -> bool:
        return all(e.state is ModelState.READY for e in self.entries)

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        # Engines stop in parallel: each vLLM engine takes seconds to tear its processes down.
        await asyncio.gather(*(e.stop() for e in self.entries), return_exceptions=True)


def _a(word: str) -> str:
    """``word`` with its indefinite article: "a chat", "an embedding"."""
    return f"{'an' if word[0] in 'aeiou' else 'a'} {word}"
