"""Bucketed window sums: exactly today's semantics at a cost that does not grow with traffic.

The stores sum a window from per-bucket totals plus the charges of the one bucket the window's
start cuts, and feed retry-after one bucket's charges; these tests pin that to the plain
per-charge rules (``retry_after`` over every item, and the reference model).
"""

from __future__ import annotations

import math
import sqlite3
import threading
from datetime import datetime
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
import redis
from hypothesis import given, settings
from hypothesis import strategies as st

from node.accounts.plans import Window, custom_plan
from node.accounts.redis import RedisStore
from node.accounts.sqlite import SQLiteStore
from node.accounts.store import QuotaExceeded, Store
from node.accounts.windows import HOUR_S, Buckets, Item, bucket_of, day_bounds, retry_after

from .support import Runner, run_with_store
from .test_accounts_model import Charge, Model

STHLM = ZoneInfo("Europe/Stockholm")
T0 = datetime(2025, 6, 1, 12, 0, tzinfo=STHLM).timestamp()

edges = st.sampled_from([0.0, 1e-6, 0.25, 29.5, 30.0, 59.75, 60 - 1e-6, 60.0])


@given(
    base=st.sampled_from([T0, 2.0**31 - 1800, -1.5e8, 0.0]),
    minute=st.integers(-5, 5),
    offset=st.one_of(edges, st.floats(0, 60)),
    size=st.sampled_from([60, 900]),
)
def test_bucket_of_is_exact(base: float, minute: int, offset: float, size: int) -> None:
    ts = base + minute * 60 + offset
    b = bucket_of(ts, size)
    assert b * size <= ts < (b + 1) * size
    assert bucket_of(float(b * size), size) == b


def _buckets(items: list[Item], bound: float, reads: list[int]) -> Buckets:
    """``items`` dated after ``bound`` as the stores bucket them (60 s), recording reads."""
    by: dict[int, list[Item]] = {}
    for ts, amount in sorted(items):
        if ts > bound:
            by.setdefault(bucket_of(ts, 60), []).append((ts, amount))
    cut = bucket_of(bound, 60)
    order = sorted(by.keys() | {cut})
    spans = [(float((b + 1) * 60), sum(a for _, a in by.get(b, []))) for b in order]

    def read(i: int) -> list[Item]:
        reads.append(i)
        return by.get(order[i], [])

    return Buckets(spans, read)


@settings(max_examples=300, deadline=None)
@given(
    base=st.sampled_from([T0, 2.0**31 - 1800]),  # the second: ts + 3600 rounds (binade edge)
    settled=st.lists(
        st.tuples(st.integers(-65, 5), edges, st.integers(0, 40)), min_size=0, max_size=40
    ),
    pending=st.lists(st.tuples(st.integers(-65, 5), edges, st.integers(0, 40)), max_size=4),
    bound_offset=st.one_of(edges, st.floats(0, 60)),
    tokens=st.integers(1, 400),
    ttl=st.sampled_from([3600.0, 900.0, 61.5]),
)
def test_retry_after_from_buckets_matches_every_item(
    base: float,
    settled: list[tuple[int, float, int]],
    pending: list[tuple[int, float, int]],
    bound_offset: float,
    tokens: int,
    ttl: float,
) -> None:
    now = base + 3600 + bound_offset
    bound = now - HOUR_S
    items = [(base + m * 60 + o, a) for m, o, a in settled]
    items = [(ts, a) for ts, a in items if ts > bound]
    holds = [(base + m * 60 + o, a) for m, o, a in pending]
    holds = [(ts, a) for ts, a in holds if ts > bound and ts > now - ttl]
    used = sum(a for _, a in items) + sum(a for _, a in holds)
    limit = max(tokens, used // 2)
    common = {"window": Window.HOUR, "limit": limit, "used": used, "tokens": tokens}
    want = retry_after(**common, settled=items, pending=holds, now=now, ttl=ttl)
    reads: list[int] = []
    got = retry_after(
        **common, settled=_buckets(items, bound, reads), pending=holds, now=now, ttl=ttl
    )
    assert got == want
    assert len(reads) <= 1  # one bucket's charges at most, however many the window holds


def test_retry_after_from_buckets_when_a_hold_outlasts_them() -> None:
    now = T0 + 700.0
    items = [(T0 + 10.0, 50)]
    holds = [(T0 + 600.0, 40)]  # frees after every bucket: their total must still count
    common = {"window": Window.HOUR, "limit": 100, "used": 90, "tokens": 90, "now": now}
    want = retry_after(**common, settled=items, pending=holds)
    assert want == T0 + 600 + 3600 - now
    assert retry_after(**common, settled=_buckets(items, now - HOUR_S, []), pending=holds) == want


# -- the stores, against the reference model ------------------------------------------------

STEPS = [0.0, 59.75, 0.25, 13.0, 60.0, 0.5, 29.5, 0.001, 31.0, 1.0]


async def _dense(s: Store, window: Window, tz: ZoneInfo, start: float) -> None:
    """Charges every few seconds across more than the window, then usage and retry-after at
    instants on both sides of bucket edges and of each charge's sliding out."""
    model = Model(window, 3600.0, tz, limit=20_000)
    _, rec = await s.create_key(custom_plan(model.limit, window))
    midnight = day_bounds(start, tz)[1]  # a charge exactly on it, too
    now, i = start, 0
    while now < start + 4000:
        tokens = 1 + (i * 7) % 23
        if now > midnight:
            now, midnight = midnight, math.inf
        res, got = await s.reserve(rec.id, tokens, now)
        model.charges[res.id] = Charge(now, tokens)
        assert got == model.usage(now)
        if i % 6:  # a few stay pending
            model.charges[res.id].actual = (i * 11) % 31
            assert await s.settle(res.id, (i * 11) % 31, now) == model.usage(now)
        now += STEPS[i % len(STEPS)]
        i += 1
    probes = sorted(
        {now + d for d in (0.0, 0.25, 30.0, 59.75, 60.0, 90.5, 1800.0, 3599.0)}
        | {c.ts + 3600 + d for c in list(model.charges.values())[-40:] for d in (-1e-3, 0.0)}
    )
    for t in probes:
        assert await s.usage(rec.id, t) == model.usage(t), t
        for extra in (1, 97, 4000):
            tokens = model.limit - model.used(t) + extra
            if tokens > model.limit:
                continue
            with pytest.raises(QuotaExceeded) as exc:
                await s.reserve(rec.id, tokens, t)
            want = model.retry_after(tokens, t)
            assert exc.value.retry_after_s == pytest.approx(want, abs=1e-6), (t, extra)


@pytest.mark.parametrize(
    ("window", "tz", "start"),
    [
        (Window.HOUR, "Europe/Stockholm", T0 + 17.25),
        (Window.DAY, "Europe/Stockholm", datetime(2025, 6, 1, 23, 10, 3, tzinfo=STHLM).timestamp()),
        # Monrovia kept -00:44:30 until 1972: its midnight cuts a 900 s bucket
        (
            Window.DAY,
            "Africa/Monrovia",
            datetime(1965, 3, 1, 23, 10, 3, tzinfo=ZoneInfo("Africa/Monrovia")).timestamp(),
        ),
    ],
)
def test_dense_window_matches_model(run: Runner, window: Window, tz: str, start: float) -> None:
    run(lambda s: _dense(s, window, ZoneInfo(tz), start), tz=tz)


@pytest.mark.parametrize(("ttl", "wait"), [(7200.0, 3500.0), (900.0, 2910.0)])
def test_hour_retry_after_with_a_hold(run: Runner, ttl: float, wait: float) -> None:
    """A hold frees at the earlier of its TTL and its hour: after the settled charges' minute
    (7200) or before it (900)."""

    async def body(s: Store) -> None:
        _, rec = await s.create_key(custom_plan(100, Window.HOUR))
        res, _ = await s.reserve(rec.id, 50, T0 + 10)
        await s.settle(res.id, 50, T0 + 10)
        await s.reserve(rec.id, 40, T0 + 600)
        with pytest.raises(QuotaExceeded) as exc:
            await s.reserve(rec.id, 90, T0 + 700)  # 80 must free
        assert exc.value.retry_after_s == pytest.approx(wait)

    run(body, reservation_ttl_s=ttl)


def test_hour_retry_after_with_a_hold_in_the_same_minute(run: Runner) -> None:
    """The minute whose charges retry-after reads is found counting the hold's free too."""

    async def body(s: Store) -> None:
        _, rec = await s.create_key(custom_plan(100, Window.HOUR))
        await s.reserve(rec.id, 40, T0 + 5)
        for dt in (10, 20):
            res, _ = await s.reserve(rec.id, 30, T0 + dt)
            await s.settle(res.id, 30, T0 + dt)
        with pytest.raises(QuotaExceeded) as exc:
            await s.reserve(rec.id, 70, T0 + 30)  # 40 at +3605 and 30 at +3610 free enough
        assert exc.value.retry_after_s == pytest.approx(3610 - 30)

    run(body, reservation_ttl_s=7200.0)


# -- data from before the buckets -----------------------------------------------------------


async def _charge_some(s: Store) -> tuple[str, str]:
    """An hour and a day key with settled and pending charges; their ids."""
    _, hour = await s.create_key(custom_plan(10_000, Window.HOUR))
    _, day = await s.create_key(custom_plan(10_000, Window.DAY))
    for i in range(30):
        for key_id in (hour.id, day.id):
            res, _ = await s.reserve(key_id, 50, T0 + 37.5 * i)
            if i % 4:
                await s.settle(res.id, i, T0 + 37.5 * i + 1)
    return hour.id, day.id


async def _usages(s: Store, key_ids: tuple[str, str]) -> list[object]:
    out: list[object] = []
    for key_id in key_ids:
        for t in (T0 + 1200.0, T0 + 3600 + 18.75, T0 + 3600 + 300.5):  # before any GC
            out.append(await s.usage(key_id, t))
            with pytest.raises(QuotaExceeded) as exc:
                await s.reserve(key_id, 9_990, t)
            out.append(exc.value.retry_after_s)
    return out


def test_sqlite_fills_buckets_of_an_older_file_once(tmp_path: Path) -> None:
    db = tmp_path / "accounts.db"
    ids = run_with_store(SQLiteStore(db), _charge_some)
    want = run_with_store(SQLiteStore(db), lambda s: _usages(s, ids))
    with sqlite3.connect(db) as conn:  # as a node before the buckets left it
        conn.executescript("DROP TABLE charge_buckets; DROP TABLE meta;")
    conn.close()
    opened: list[list[object]] = []

    def one() -> None:  # several stores (as several processes) open the old file at once
        opened.append(run_with_store(SQLiteStore(db), lambda s: _usages(s, ids)))

    threads = [threading.Thread(target=one) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert opened == [want] * 4
    assert run_with_store(SQLiteStore(db), lambda s: _usages(s, ids)) == want


def test_redis_totals_an_older_hour_zset_on_first_use(redis_url: str) -> None:
    prefix = "test:legacy-hour"
    ids = run_with_store(RedisStore(redis_url, prefix=prefix), _charge_some)
    want = run_with_store(RedisStore(redis_url, prefix=prefix), lambda s: _usages(s, ids))
    raw = redis.Redis.from_url(redis_url)
    try:
        assert raw.delete(f"{prefix}:hourmin:{ids[0]}") == 1  # as a node before them left it
        got = run_with_store(RedisStore(redis_url, prefix=prefix), lambda s: _usages(s, ids))
        assert got == want
    finally:
        raw.close()


def test_redis_trims_minutes_and_charges_together(redis_url: str) -> None:
    prefix = "test:trim"

    async def body(s: Store) -> None:
        _, rec = await s.create_key(custom_plan(1000, Window.HOUR))
        for dt in (0.0, 600.0, 1200.0):
            res, _ = await s.reserve(rec.id, 10, T0 + dt)
            await s.settle(res.id, 10, T0 + dt)
        # trims what is older than the hour plus GC_MARGIN_S, by whole minutes: T0 + 780 on
        await s.reserve(rec.id, 1, T0 + 5000)
        raw = redis.Redis.from_url(redis_url, decode_responses=True)
        try:
            minutes = raw.hkeys(f"{prefix}:hourmin:{rec.id}")
            assert minutes == [str(bucket_of(T0 + 1200, 60))]
            assert raw.zcard(f"{prefix}:hour:{rec.id}") == 1
        finally:
            raw.close()
        assert (await s.usage(rec.id, T0 + 4799)).used == 11
        assert (await s.usage(rec.id, T0 + 4800)).used == 1

    run_with_store(RedisStore(redis_url, prefix=prefix), body)
