"""Store behaviour, run against SQLiteStore and RedisStore alike."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

from node.accounts import open_store
from node.accounts.keys import generate_key
from node.accounts.plans import PLANS, Window, custom_plan
from node.accounts.redis import RedisStore
from node.accounts.sqlite import SQLiteStore
from node.accounts.store import (
    KeyNotFound,
    QuotaExceeded,
    ReservationNotFound,
    Store,
    StoreUnavailable,
    Usage,
)

from .support import Runner, free_port, run_with_store

STHLM = ZoneInfo("Europe/Stockholm")
T0 = datetime(2025, 6, 1, 12, 0, tzinfo=STHLM).timestamp()


def test_key_lifecycle(run: Runner) -> None:
    async def body(s: Store) -> None:
        await s.ping()
        assert isinstance(s, Store)
        secret, rec = await s.create_key(PLANS["hobby"], "laptop")
        assert rec.plan_slug == "hobby" and rec.limit_tokens == 250_000
        assert rec.window is Window.DAY and not rec.revoked and rec.name == "laptop"
        assert await s.authenticate(secret) == rec
        assert await s.get_key(rec.id) == rec == await s.get_key(secret)
        _, other = await s.create_key(custom_plan(7, Window.HOUR))
        assert other.name is None and other.plan_slug == "custom"
        _, big = await s.create_key(PLANS["agent"], tokens=2_000_000)
        assert big.limit_tokens == 2_000_000
        assert [r.id for r in await s.list_keys()] == [rec.id, other.id, big.id]
        assert await s.authenticate(generate_key()[0]) is None  # well-formed, unknown
        assert await s.get_key("key_00000000") is None
        assert await s.revoke(secret) is True and await s.revoke(rec.id) is True
        assert await s.revoke("key_00000000") is False
        assert await s.authenticate(secret) is None
        assert (await s.get_key(rec.id)).revoked  # type: ignore[union-attr]
        with pytest.raises(KeyNotFound):
            await s.reserve(rec.id, 1, T0)
        with pytest.raises(KeyNotFound):
            await s.reserve("key_00000000", 1, T0)
        with pytest.raises(KeyNotFound):
            await s.usage("key_00000000", T0)
        with pytest.raises(ReservationNotFound):
            await s.settle("res_nope", 1, T0)
        with pytest.raises(ValueError):
            await s.reserve(other.id, -1, T0)

    run(body)


def test_reserve_settle_idempotent(run: Runner) -> None:
    async def body(s: Store) -> None:
        _, rec = await s.create_key(custom_plan(1000, Window.HOUR))
        r1, u = await s.reserve(rec.id, 600, T0)
        assert (r1.key_id, r1.tokens, u) == (rec.id, 600, Usage(1000, 600, 400))
        with pytest.raises(QuotaExceeded) as exc:
            await s.reserve(rec.id, 401, T0 + 10)
        assert exc.value.usage == Usage(1000, 600, 400)
        assert exc.value.retry_after_s == pytest.approx(3590)
        assert (exc.value.held, exc.value.holds) == (600, 1)
        assert exc.value.fits_if_freed(1) and not exc.value.fits_if_freed(0)
        assert await s.settle(r1.id, 100, T0 + 20) == Usage(1000, 100, 900)
        for _ in range(2):  # a repeated settle (retry, duplicate) changes nothing
            assert await s.settle(r1.id, 900, T0 + 30) == Usage(1000, 100, 900)
        r2, _ = await s.reserve(rec.id, 900, T0 + 40)
        assert await s.settle(r2.id, 1500, T0 + 50) == Usage(1000, 1600, 0)  # over-run counts
        assert await s.usage(rec.id, T0 + 3600) == Usage(1000, 1500, 0)  # r1 slid out
        assert await s.usage(rec.id, T0 + 3640) == Usage(1000, 0, 1000)
        with pytest.raises(QuotaExceeded) as exc:
            await s.reserve(rec.id, 1001, T0 + 3640)
        assert exc.value.retry_after_s is None  # bigger than the whole window
        assert (exc.value.held, exc.value.holds) == (0, 0)
        assert not exc.value.fits_if_freed(1000)

    run(body)


def test_rolling_hour_boundary_and_retry_after(run: Runner) -> None:
    async def body(s: Store) -> None:
        _, rec = await s.create_key(custom_plan(100, Window.HOUR))
        for i, n in enumerate([30, 30, 30]):
            r, _ = await s.reserve(rec.id, n, T0 + 600 * i)
            await s.settle(r.id, n, T0 + 600 * i + 5)
        with pytest.raises(QuotaExceeded) as exc:
            await s.reserve(rec.id, 60, T0 + 1500)
        # 90 used; 60 fit once 50 free: both of the first two charges must slide out
        assert exc.value.retry_after_s == pytest.approx(T0 + 600 + 3600 - (T0 + 1500))
        assert (await s.usage(rec.id, T0 + 3599)).used == 90
        assert (await s.usage(rec.id, T0 + 3600)).used == 60
        await s.reserve(rec.id, 40, T0 + 3600)
        with pytest.raises(QuotaExceeded):
            await s.reserve(rec.id, 1, T0 + 3600)

    run(body)


def test_daily_reset_at_local_midnight(run: Runner) -> None:
    async def body(s: Store) -> None:
        _, rec = await s.create_key(custom_plan(100, Window.DAY))
        late = datetime(2025, 6, 1, 23, 59, 0, tzinfo=STHLM).timestamp()
        r, _ = await s.reserve(rec.id, 80, late)
        await s.settle(r.id, 80, late + 120)  # settled after midnight: still dated yesterday
        with pytest.raises(QuotaExceeded) as exc:
            await s.reserve(rec.id, 30, late + 59)
        assert exc.value.retry_after_s == pytest.approx(1)
        assert (await s.usage(rec.id, late + 59.5)).used == 80
        assert (await s.usage(rec.id, late + 60)).used == 0
        r, _ = await s.reserve(rec.id, 100, late + 60)  # exactly midnight: the new day
        assert (await s.usage(rec.id, late + 61)).used == 100
        await s.settle(r.id, 90, late + 62)
        assert (await s.usage(rec.id, late + 63)).used == 90

    run(body)


def test_daily_reset_follows_configured_tz(run: Runner) -> None:
    async def body(s: Store) -> None:
        _, rec = await s.create_key(PLANS["hobby-mini"])
        utc_late = datetime(2025, 6, 1, 23, 0, tzinfo=ZoneInfo("UTC")).timestamp()
        await s.reserve(rec.id, 50_000, utc_late)  # 01:00 local Stockholm, 2 June
        assert (await s.usage(rec.id, utc_late + 3599)).remaining == 0
        assert (await s.usage(rec.id, utc_late + 3600)).remaining == 50_000

    run(body, tz="UTC")


def test_pending_reservation_expires_after_ttl(run: Runner) -> None:
    async def body(s: Store) -> None:
        _, rec = await s.create_key(custom_plan(100, Window.DAY))
        r, _ = await s.reserve(rec.id, 100, T0)  # the node dies and never settles
        with pytest.raises(QuotaExceeded) as exc:
            await s.reserve(rec.id, 10, T0 + 100)
        assert exc.value.retry_after_s == pytest.approx(200)  # TTL, not midnight
        assert (await s.usage(rec.id, T0 + 299)).used == 100
        assert (await s.usage(rec.id, T0 + 300)).used == 0
        assert await s.settle(r.id, 40, T0 + 400) == Usage(100, 40, 60)  # late settle counts

    run(body, reservation_ttl_s=300)


def test_balance_key(run: Runner) -> None:
    async def body(s: Store) -> None:
        secret, rec = await s.create_key(PLANS["payg"])
        assert rec.window is Window.BALANCE and rec.limit_tokens == 100_000
        r, u = await s.reserve(rec.id, 60_000, T0)
        assert u == Usage(100_000, 60_000, 40_000)
        with pytest.raises(QuotaExceeded) as exc:
            await s.reserve(rec.id, 50_000, T0 + 1)
        assert exc.value.retry_after_s == pytest.approx(3599)  # the hold's TTL
        await s.settle(r.id, 55_000, T0 + 2)
        with pytest.raises(QuotaExceeded) as exc:
            await s.reserve(rec.id, 50_000, T0 + 86400 * 30)  # spend never frees
        assert exc.value.retry_after_s is None and exc.value.retry_after == float("inf")
        assert exc.value.usage == Usage(100_000, 55_000, 45_000)
        rec2 = await s.topup(secret, 20_000)
        assert rec2.limit_tokens == 120_000 and (await s.get_key(rec.id)) == rec2
        r, u = await s.reserve(rec.id, 50_000, T0 + 86400 * 30)
        assert u == Usage(120_000, 105_000, 15_000)
        with pytest.raises(ValueError):
            await s.topup(rec.id, 0)
        with pytest.raises(KeyNotFound):
            await s.topup("key_00000000", 5)
        _, daily = await s.create_key(PLANS["hobby"])
        with pytest.raises(ValueError, match="not a balance"):
            await s.topup(daily.id, 5)

    run(body)


def _unreachable(kind: str, tmp_path: Path) -> Store:
    if kind == "sqlite":
        blocker = tmp_path / "not-a-dir"
        blocker.write_text("")
        return SQLiteStore(blocker / "accounts.db")
    return RedisStore(f"redis://127.0.0.1:{free_port()}/0", connect_timeout_s=0.5)


@pytest.mark.parametrize("kind", ["sqlite", "redis"])
def test_malformed_key_never_touches_the_store(kind: str, tmp_path: Path) -> None:
    """The store is unreachable: any lookup would raise, so a None proves no lookup."""

    async def body(s: Store) -> None:
        for bad in ["", "sk-st-nope", generate_key()[0][:-1] + "!", "Bearer x"]:
            assert await s.authenticate(bad) is None
            assert await s.get_key(bad) is None
        with pytest.raises(StoreUnavailable):
            await s.authenticate(generate_key()[0])
        with pytest.raises(StoreUnavailable):
            await s.ping()
        with pytest.raises(StoreUnavailable):
            await s.reserve("key_00000000", 1, T0)

    run_with_store(_unreachable(kind, tmp_path), body)


def test_open_store(tmp_path: Path, redis_url: str) -> None:
    sqlite = open_store(tmp_path / "a" / "accounts.db", None, "UTC")
    assert isinstance(sqlite, SQLiteStore)
    run_with_store(sqlite, lambda s: s.ping())
    assert (tmp_path / "a" / "accounts.db").exists()
    red = open_store(tmp_path / "unused.db", redis_url, "UTC")
    assert isinstance(red, RedisStore)
    run_with_store(red, lambda s: s.ping())


def test_authenticate_usage_in_one_call(run: Runner) -> None:
    async def body(s: Store) -> None:
        secret, rec = await s.create_key(custom_plan(100, Window.HOUR))
        assert await s.authenticate_usage(secret, T0) == (rec, Usage(100, 0, 100))
        await s.reserve(rec.id, 30, T0)
        assert await s.authenticate_usage(secret, T0 + 1) == (rec, Usage(100, 30, 70))
        assert await s.authenticate_usage(generate_key()[0], T0) is None  # unknown
        assert await s.authenticate_usage("sk-st-nope", T0) is None  # malformed
        await s.revoke(rec.id)
        assert await s.authenticate_usage(secret, T0) is None

    run(body)
