"""Slot pool: pure admission logic, driven with a controllable clock."""

import asyncio

import pytest

from node.scheduler import LEAVING_GRACE_S, SlotPool


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def test_try_acquire_refuses_beyond_total_and_release_is_idempotent() -> None:
    pool = SlotPool(2)
    a, b = pool.try_acquire(), pool.try_acquire()
    assert a and b and pool.try_acquire() is None
    a.release()
    a.release()
    assert pool.in_use == 1
    c = pool.try_acquire()
    assert c is not None and pool.try_acquire() is None


def test_retry_estimate_follows_recent_hold_times() -> None:
    clock = Clock()
    pool = SlotPool(2, clock=clock, spread=lambda: 1.0)
    for _ in range(4):
        p = pool.try_acquire()
        assert p
        clock.t += 3.0
        p.release()
    assert pool.retry_after_s() == pytest.approx(1.5)  # mean hold 3 s over 2 slots


def test_retry_estimates_are_spread_around_the_estimate() -> None:
    """Clients refused together must not all be told to come back at the same instant."""
    clock = Clock()
    pool = SlotPool(1, clock=clock)
    p = pool.try_acquire()
    assert p
    clock.t += 2.0
    p.release()
    told = [pool.retry_after_s() for _ in range(400)]
    assert all(1.0 <= t <= 3.0 for t in told)  # half to one and a half times 2 s
    assert len({round(t, 3) for t in told}) > 100
    assert sum(told) / len(told) == pytest.approx(2.0, rel=0.1)


def test_zero_slots_is_a_config_error() -> None:
    with pytest.raises(ValueError):
        SlotPool(0)


def test_waiter_gets_the_released_slot_within_queue_timeout() -> None:
    async def scenario() -> None:
        pool = SlotPool(1, queue_timeout_ms=500)
        held = pool.try_acquire()
        assert held
        waiting = asyncio.create_task(pool.acquire())
        await asyncio.sleep(0.01)
        assert pool.try_acquire() is None  # the queue goes first
        held.release()
        got = await waiting
        assert got is not None and pool.in_use == 1
        got.release()
        assert pool.in_use == 0

    asyncio.run(scenario())


def test_waiter_times_out_and_leaves_nothing_behind() -> None:
    async def scenario() -> None:
        pool = SlotPool(1, queue_timeout_ms=20)
        held = pool.try_acquire()
        assert held
        assert await pool.acquire() is None
        held.release()
        assert pool.in_use == 0
        assert pool.try_acquire() is not None

    asyncio.run(scenario())


def test_cancelled_waiter_does_not_swallow_a_slot() -> None:
    async def scenario() -> None:
        pool = SlotPool(1, queue_timeout_ms=1000)
        held = pool.try_acquire()
        assert held
        waiting = asyncio.create_task(pool.acquire())
        await asyncio.sleep(0.01)
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        held.release()
        assert pool.in_use == 0

    asyncio.run(scenario())


@pytest.mark.parametrize("slots,extra", [(1, 3), (3, 5)])
def test_exactly_the_excess_is_refused(slots: int, extra: int) -> None:
    pool = SlotPool(slots)
    permits = [pool.try_acquire() for _ in range(slots + extra)]
    assert sum(p is None for p in permits) == extra
    for p in permits:
        if p:
            p.release()
    assert pool.in_use == 0


def test_waiter_cancelled_after_being_handed_a_slot_passes_it_on() -> None:
    async def scenario() -> None:
        pool = SlotPool(1, queue_timeout_ms=1000)
        held = pool.try_acquire()
        assert held
        waiting = asyncio.create_task(pool.acquire())
        await asyncio.sleep(0.01)
        held.release()  # the slot goes to the waiter...
        waiting.cancel()  # ...which is cancelled before it resumes
        try:
            got = await waiting  # wait_for may still hand over the finished result
        except asyncio.CancelledError:
            got = None
        if got is not None:
            got.release()
        assert pool.in_use == 0
        assert pool.try_acquire() is not None

    asyncio.run(scenario())


def test_a_refusal_waits_only_for_a_holder_whose_client_has_gone() -> None:
    """A holder still serving its client is not waited for, even a release one event-loop turn
    away; one whose client has gone is, within its grace, once: a holder that never lets go
    delays the first refusal by the grace and the next ones not at all."""

    async def main() -> None:
        clock = Clock()
        pool = SlotPool(1, clock=clock)
        loop = asyncio.get_running_loop()

        async def refused_without_a_turn() -> bool:
            turned = asyncio.Event()
            loop.call_soon(turned.set)
            refused = await pool.acquire() is None
            return refused and not turned.is_set()

        for leaving in (None, lambda: False):
            held = pool.try_acquire(leaving)
            assert held is not None
            loop.call_soon(held.release)  # frees in the next turn: not waited for
            assert await refused_without_a_turn()
            await asyncio.sleep(0)
            assert pool.in_use == 0

        gone = False
        held = pool.try_acquire(lambda: gone)
        assert held is not None
        gone = True
        loop.call_soon(lambda: loop.call_soon(held.release))  # unwinds two turns later
        taken = await pool.acquire()
        assert taken is not None and pool.in_use == 1

        taken.leaving = lambda: True  # its client is gone, and it never lets go
        t0 = loop.time()
        assert await pool.acquire() is None
        assert loop.time() - t0 >= LEAVING_GRACE_S * 0.9
        clock.t += LEAVING_GRACE_S
        assert await refused_without_a_turn()  # its grace is spent
        taken.release()
        assert pool.in_use == 0 and not pool._held

    asyncio.run(main())


def test_a_released_permit_is_not_waited_for_when_its_connection_closes() -> None:
    """Keep-alive connections close long after their requests released the slot."""

    async def main() -> None:
        pool = SlotPool(1)
        closed = False
        done = pool.try_acquire(lambda: closed)
        assert done is not None
        done.release()
        closed = True
        held = pool.try_acquire()
        assert held is not None and pool._held == {held}
        loop = asyncio.get_running_loop()
        turned = asyncio.Event()
        loop.call_soon(turned.set)
        assert await pool.acquire() is None and not turned.is_set()

    asyncio.run(main())


def test_a_wait_within_a_grace_does_not_lengthen_the_retry_estimate() -> None:
    async def main() -> None:
        pool = SlotPool(1, spread=lambda: 1.0)
        held = pool.try_acquire(lambda: True)
        assert held is not None
        told_before = pool.retry_after_s()
        waiting = asyncio.create_task(pool.acquire())
        await asyncio.sleep(0)
        assert pool._waiters and pool.retry_after_s() == told_before
        held.release()
        got = await waiting
        assert got is not None

    asyncio.run(main())
