"""Per-model slots: admission control, pure logic with no I/O.

The concurrency rule: a model runs at most ``slots`` requests at once. Admission is a
non-blocking try-acquire; a request may wait up to the model's ``queue_timeout_ms`` for a slot
(0 by default: answer 429 at once), and up to ``LEAVING_GRACE_S`` when a holder's client has
already gone (see ``SlotPool.acquire``). A permit is held for the whole request, streams
included, and released exactly once, in every outcome. When
refusing, the pool estimates how soon a slot frees from how fast its slots have been freeing
lately (the mean hold time of recent requests divided by the number of slots), so clients get
an honest Retry-After. The estimate is spread at random between half and one and a half times
itself (the mean stays honest): the openai SDK sleeps exactly what Retry-After says, so
clients refused together and told the same figure would all come back in the same instant and
queue behind one another again.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import deque
from collections.abc import Callable

_RECENT = 32  # hold times remembered for the retry estimate
_DEFAULT_HOLD_S = 1.0  # before anything finished
LEAVING_GRACE_S = 0.05
"""How long requests that find every slot held wait for a holder whose client has gone, from
when a refusal first saw it gone. A cut stream frees its slot some event-loop turns after the
disconnect; a request that unwinds slowly (an image being fetched, a clip being decoded) costs
the requests behind it this wait once, not for as long as it takes."""

Leaving = Callable[[], bool]
"""Whether a holder's client has gone (its connection closing), for a holder still running."""


class Permit:
    """One held slot. ``release`` is idempotent; use it in ``finally`` or as a context manager."""

    __slots__ = ("_pool", "_acquired_at", "_released", "leaving", "gone_since")

    def __init__(self, pool: SlotPool, acquired_at: float, leaving: Leaving | None) -> None:
        self._pool = pool
        self._acquired_at = acquired_at
        self._released = False
        self.leaving = leaving
        self.gone_since: float | None = None

    def release(self) -> None:
        if not self._released:
            self._released = True
            self._pool._release(self)

    def __enter__(self) -> Permit:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


class SlotPool:
    def __init__(
        self,
        total: int,
        queue_timeout_ms: int = 0,
        clock: Callable[[], float] = time.monotonic,
        spread: Callable[[], float] = lambda: random.uniform(0.5, 1.5),
    ) -> None:
        if total < 1:
            raise ValueError("a model needs at least one slot")
        self.total = total
        self.queue_timeout_s = queue_timeout_ms / 1000
        self._clock = clock
        self._spread = spread
        self._in_use = 0
        self._holds: deque[float] = deque(maxlen=_RECENT)
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._held: set[Permit] = set()

    @property
    def in_use(self) -> int:
        return self._in_use

    def try_acquire(self, leaving: Leaving | None = None) -> Permit | None:
        if self._in_use >= self.total or self._waiters:
            return None
        self._in_use += 1
        return self._hand_out(leaving)

    async def acquire(self, leaving: Leaving | None = None) -> Permit | None:
        """Try at once; then wait up to the queue timeout, first come first served.

        ``leaving`` tells, while the permit is held, whether its client has gone. A request
        that finds every slot held waits (if longer than the queue timeout) for a holder whose
        client has gone, within its ``LEAVING_GRACE_S``: a client that cut its stream and asks
        again at once must not find its old stream still holding the slot because the server
        has not yet unwound it (80 to 86 of 200 such requests were refused without a wait). Any
        other refusal is at once: an event-loop turn taken on every refusal, as before, doubled
        the 429's p99 under overload (9.3 to 4.7 ms in the node), the turn being whatever else
        the loop had to run.
        """
        permit = self.try_acquire(leaving)
        if permit is not None:
            return permit
        wait_s = max(self.queue_timeout_s, self._grace_left())
        if wait_s <= 0:
            return None
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        got = False
        try:
            await asyncio.wait_for(asyncio.shield(waiter), wait_s)
            got = True
        except TimeoutError:
            pass
        finally:
            if waiter in self._waiters:
                self._waiters.remove(waiter)
            if not got and waiter.done() and not waiter.cancelled():
                # Handed a slot just as the wait ended (timeout or cancellation): pass it on.
                self._free_one()
            if not waiter.done():
                waiter.cancel()
        # The releasing side kept the count: the slot passed straight to this waiter.
        return self._hand_out(leaving) if got else None

    def _grace_left(self) -> float:
        """Seconds left of the grace of the holders whose clients have gone (0 if none); a
        holder's grace starts when this first sees it gone."""
        now = self._clock()
        left = 0.0
        for permit in self._held:
            if permit.leaving is not None and permit.leaving():
                if permit.gone_since is None:
                    permit.gone_since = now
                left = max(left, permit.gone_since + LEAVING_GRACE_S - now)
        return left

    def _hand_out(self, leaving: Leaving | None) -> Permit:
        permit = Permit(self, self._clock(), leaving)
        self._held.add(permit)
        return permit

    def _release(self, permit: Permit) -> None:
        self._held.discard(permit)
        self._holds.append(max(0.0, self._clock() - permit._acquired_at))
        self._free_one()

    def _free_one(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)  # the slot moves to the waiter; in_use stays
                return
        self._in_use -= 1

    def retry_after_s(self) -> float:
        """Expected seconds until a slot frees, from the recent mean hold time, spread. The
        queue counts only where the model has one: a wait within a leaving holder's grace is
        over in a moment."""
        mean_hold = sum(self._holds) / len(self._holds) if self._holds else _DEFAULT_HOLD_S
        queued = (len(self._waiters) if self.queue_timeout_s > 0 else 0) + 1
        return max(0.05, mean_hold * queued / self.total * self._spread())
