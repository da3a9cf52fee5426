"""Bill.settle against a real SQLite store: an exact charge is written after the response, an
inexact one before it, and nothing is lost at shutdown."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from node import billing
from node.accounts import StoreUnavailable
from node.accounts.plans import PLANS, Window, custom_plan
from node.accounts.sqlite import SQLiteStore
from node.billing import Bill, ShrinkingHolds, flush_settles
from node.errors import InsufficientQuota


class GatedStore(SQLiteStore):
    """The real store, with settles (or reservations) held until the test lets them through."""

    def __init__(self, path: Path, held: str = "settle") -> None:
        super().__init__(path)
        self.gate = asyncio.Event()
        self.held = held

    async def settle(self, reservation_id: str, actual_tokens: int, now: float):  # type: ignore[no-untyped-def]
        if self.held == "settle":
            await self.gate.wait()
        return await super().settle(reservation_id, actual_tokens, now)

    async def reserve(self, key_id: str, tokens: int, now: float):  # type: ignore[no-untyped-def]
        if self.held == "reserve":
            await self.gate.wait()
        return await super().reserve(key_id, tokens, now)


async def _bill(store: SQLiteStore, plan: str = "agent-pro", tokens: int | None = None) -> Bill:
    secret, _ = await store.create_key(PLANS[plan], "t", tokens)
    found = await store.authenticate_usage(secret, 0.0)
    assert found is not None
    return Bill(store, *found, clock=lambda: 1000.0)


def test_exact_charge_settles_in_the_background_and_flushes(tmp_path: Path) -> None:
    async def body() -> None:
        store = GatedStore(tmp_path / "a.db")
        bill = await _bill(store)
        await bill.reserve(40)
        # Returns (the tokens charged) although the write is held.
        assert await asyncio.wait_for(bill.settle(40), 1) == 40
        assert bill.headers()["X-RateLimit-Used-Tokens"] == "40"
        flushing = asyncio.ensure_future(flush_settles())
        await asyncio.sleep(0.05)
        assert not flushing.done()  # shutdown waits for the held write
        store.gate.set()
        await asyncio.wait_for(flushing, 5)
        charges = await store._run(
            lambda c: c.execute("SELECT reserved, actual FROM charges").fetchall()
        )
        assert [tuple(r) for r in charges] == [(40, 40)]
        await store.close()

    asyncio.run(body())


def test_smaller_actual_is_written_before_settle_returns(tmp_path: Path) -> None:
    async def body() -> None:
        store = GatedStore(tmp_path / "b.db")
        bill = await _bill(store)
        await bill.reserve(100)
        settling = asyncio.ensure_future(bill.settle(30))
        await asyncio.sleep(0.05)
        assert not settling.done()  # the caller's next request must see 30, not 100
        store.gate.set()
        assert await asyncio.wait_for(settling, 5) == 30
        assert bill.headers()["X-RateLimit-Used-Tokens"] == "30"
        assert (await store.usage(bill.key.id, 1000.0)).used == 30
        assert await bill.settle(30) == 0  # a second settle is a no-op and charges nothing
        assert (await store.usage(bill.key.id, 1000.0)).used == 30
        await store.close()

    asyncio.run(body())


def test_a_request_over_the_whole_limit_is_told_so_not_to_top_up(tmp_path: Path) -> None:
    """Waiting or topping up cannot make it fit an hour or day plan: say what can."""

    async def body() -> None:
        store = SQLiteStore(tmp_path / "c.db")
        bill = await _bill(store)  # agent-pro: 1,000,000 per hour
        with pytest.raises(InsufficientQuota) as info:
            await bill.reserve(1_000_001)
        assert "more than the plan's whole limit of 1000000 per hour" in info.value.message
        assert "top up" not in info.value.message and info.value.retry_after_s is None
        with pytest.raises(InsufficientQuota) as info:
            await (await _bill(store, "payg", 100)).reserve(101)
        assert "top up to continue" in info.value.message  # a balance grows by top-ups
        await store.close()

    asyncio.run(body())


def test_a_request_that_can_never_fit_is_refused_before_any_work(tmp_path: Path) -> None:
    """refuse_hopeless needs no store call: the plan's limit, or a balance, says it all."""

    async def body() -> None:
        store = SQLiteStore(tmp_path / "d.db")
        bill = await _bill(store)  # agent-pro: 1,000,000 per hour
        bill.refuse_hopeless(1_000_000)  # may fit once the hour frees it: the store decides
        with pytest.raises(InsufficientQuota) as info:
            bill.refuse_hopeless(1_000_001)
        assert info.value.should_retry is False and "whole limit" in info.value.message
        balance = await _bill(store, "payg", 100)
        balance.refuse_hopeless(100)
        with pytest.raises(InsufficientQuota) as info:
            balance.refuse_hopeless(101)
        assert "top up" in info.value.message
        assert (await store.usage(bill.key.id, 1000.0)).used == 0  # nothing was held
        await store.close()

    asyncio.run(body())


def test_a_request_blocked_only_by_the_keys_own_requests_in_flight_is_told_to_retry_soon(
    tmp_path: Path,
) -> None:
    """The holds of requests still running settle to what they use: the store's wait (a hold
    counts until it expires, an hour) must not tell the client to give up on the request."""

    async def body() -> None:
        store = SQLiteStore(tmp_path / "e.db")
        secret, _ = await store.create_key(custom_plan(1000, Window.HOUR), "t")
        found = await store.authenticate_usage(secret, 0.0)
        assert found is not None
        holds = ShrinkingHolds()  # the node's, shared by its bills

        def bill() -> Bill:
            return Bill(store, *found, clock=lambda: 1000.0, shrinking=holds)

        running, other = bill(), bill()
        await running.reserve(700, may_shrink=True)  # a chat: prompt + max_tokens
        with pytest.raises(InsufficientQuota) as info:
            await other.reserve(400)
        refusal = info.value
        assert refusal.should_retry is True and refusal.retry_after_s == 2.0
        assert "700 are held by the key's request still running" in refusal.message
        await running.settle(100)  # the running request used little of its hold
        assert holds.of(running.key.id) == 0
        await other.reserve(400)  # and the retry fits
        # A hold that settles to itself (embeddings) frees nothing: the wait is the window's.
        with pytest.raises(InsufficientQuota) as info:
            await bill().reserve(600)
        assert info.value.retry_after_s == 3600.0 and "held" not in info.value.message
        # So is it when the settled usage alone leaves no room.
        with pytest.raises(InsufficientQuota) as info:
            await bill().reserve(950)
        assert info.value.retry_after_s == 3600.0 and "held" not in info.value.message
        await store.close()

    asyncio.run(body())


def test_a_client_leaving_while_its_hold_is_written_leaves_no_hold(tmp_path: Path) -> None:
    """The store's write goes on after the request is cancelled; its hold is let go (nothing
    ran for it), not left to block the key's quota for the hold's whole TTL."""

    async def body() -> None:
        store = GatedStore(tmp_path / "f.db", held="reserve")
        bill = await _bill(store)
        reserving = asyncio.ensure_future(bill.reserve(5000))
        await asyncio.sleep(0.05)
        reserving.cancel()  # the client left
        await asyncio.sleep(0)
        store.gate.set()
        with pytest.raises(asyncio.CancelledError):
            await reserving
        await flush_settles()  # waits for the store's write, then for the release
        assert bill.reservation is None
        assert (await store.usage(bill.key.id, 1000.0)).used == 0
        charges = await store._run(
            lambda c: c.execute("SELECT reserved, actual FROM charges").fetchall()
        )
        assert [tuple(r) for r in charges] == [(5000, 0)]
        await store.close()

    asyncio.run(body())


class FlakySettleStore(SQLiteStore):
    """The real store, whose settles fail as unreachable ``failures`` times first."""

    def __init__(self, path: Path, failures: int) -> None:
        super().__init__(path)
        self.failures = failures

    async def settle(self, reservation_id: str, actual_tokens: int, now: float):  # type: ignore[no-untyped-def]
        if self.failures > 0:
            self.failures -= 1
            raise StoreUnavailable("down")
        return await super().settle(reservation_id, actual_tokens, now)


def test_a_settle_is_retried_while_the_store_is_down(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A day or balance key's hold lapses after its TTL, its charge would not: the settle is
    retried, and the caller waits for the first try only."""
    monkeypatch.setattr(billing, "SETTLE_FIRST_RETRY_S", 0.01)

    async def body() -> None:
        store = FlakySettleStore(tmp_path / "g.db", failures=3)
        bill = await _bill(store, "hobby")
        await bill.reserve(100)
        assert await asyncio.wait_for(bill.settle(30), 1) == 30
        await flush_settles()
        assert store.failures == 0
        assert (await store.usage(bill.key.id, 1000.0 + 7200)).used == 30  # the hold lapsed
        await store.close()

    asyncio.run(body())


def test_shutdown_gives_up_a_settle_that_cannot_be_written_and_logs_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(billing, "SETTLE_FIRST_RETRY_S", 0.01)

    async def body() -> None:
        store = FlakySettleStore(tmp_path / "h.db", failures=10**6)
        bill = await _bill(store, "hobby")
        await bill.reserve(100)
        await bill.settle(30)
        await asyncio.wait_for(flush_settles(timeout_s=0.2), 2)
        await store.close()

    asyncio.run(body())
    assert "may be lost (given up at shutdown)" in caplog.text and "30 tokens" in caplog.text


def test_a_settle_failing_otherwise_is_logged_for_charging_by_hand(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async def body() -> None:
        store = SQLiteStore(tmp_path / "i.db")
        bill = await _bill(store, "hobby")
        await bill.reserve(100)
        await store.close()  # settles now fail with the store's own error, not "unavailable"
        assert await bill.settle(30) == 30
        await flush_settles()

    asyncio.run(body())
    assert "may be lost (RuntimeError" in caplog.text and "30 tokens" in caplog.text
