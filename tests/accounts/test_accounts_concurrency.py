"""Concurrent reservations never overshoot; a killed writer never loses or doubles a charge."""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from node.accounts.plans import PLANS, Window, custom_plan
from node.accounts.sqlite import SQLiteStore
from node.accounts.store import QuotaExceeded, Store, Usage

from .support import StoreFactory, run_with, run_with_store

NOW = 1_750_000_000.0


async def _race(stores: list[Store], key_id: str, n: int, tokens: int) -> int:
    async def one(i: int) -> bool:
        try:
            await stores[i % len(stores)].reserve(key_id, tokens, NOW)
        except QuotaExceeded:
            return False
        return True

    return sum(await asyncio.gather(*(one(i) for i in range(n))))


@pytest.mark.parametrize("window", [Window.HOUR, Window.DAY, Window.BALANCE])
def test_gather_100_reservations(make_store: StoreFactory, window: Window) -> None:
    async def body(s: Store) -> None:
        _, rec = await s.create_key(custom_plan(1000, window))
        assert await _race([s], rec.id, 100, 15) == 66
        assert await s.usage(rec.id, NOW) == Usage(1000, 990, 10)

    run_with(make_store, body)


def test_sqlite_stores_in_threads_share_the_limit(tmp_path: Path) -> None:
    """Four stores (own pools, own connections, like four processes), 100 reservations."""
    db = tmp_path / "accounts.db"
    key_id = run_with_store(
        SQLiteStore(db), lambda s: s.create_key(custom_plan(1000, Window.HOUR))
    )[1].id
    wins: list[int] = []
    barrier = threading.Barrier(4)

    def worker() -> None:
        async def body(s: Store) -> int:
            barrier.wait()
            return await _race([s], key_id, 25, 15)

        wins.append(run_with_store(SQLiteStore(db), body))

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(wins) == 66
    usage = run_with_store(SQLiteStore(db), lambda s: s.usage(key_id, NOW))
    assert usage == Usage(1000, 990, 10)


CHILD = """
import asyncio, sys
from node.accounts.sqlite import SQLiteStore

async def main():
    s = SQLiteStore(sys.argv[1])
    while True:
        r, _ = await s.reserve(sys.argv[2], 10, 1.0)
        print("r", flush=True)
        await s.settle(r.id, 7, 2.0)
        print("s", flush=True)

asyncio.run(main())
"""


def test_sqlite_kill_9_mid_stream(tmp_path: Path) -> None:
    db = tmp_path / "accounts.db"
    _, rec = run_with_store(SQLiteStore(db), lambda s: s.create_key(PLANS["payg"]))
    root = Path(__file__).resolve().parents[2]
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(db), rec.id],
        stdout=subprocess.PIPE,
        cwd=root,
        env={**os.environ, "PYTHONPATH": str(root)},
    )
    assert child.stdout is not None
    lines = [child.stdout.readline() for _ in range(41)]
    assert all(lines), "child died early"
    time.sleep(0.005)
    child.send_signal(signal.SIGKILL)
    child.wait()
    child.stdout.close()

    with sqlite3.connect(db) as conn:
        rows = conn.execute("SELECT reserved, actual FROM charges").fetchall()
        spent = conn.execute("SELECT spent FROM keys WHERE id = ?", (rec.id,)).fetchone()[0]
    conn.close()
    settled = sum(1 for _, a in rows if a is not None)
    pending = len(rows) - settled
    assert all(r == 10 and a in (None, 7) for r, a in rows)
    assert settled >= 20 and pending <= 1  # the child settles before reserving again
    assert spent == 7 * settled
    # the abandoned hold counts until its TTL, then frees; settled spend stays
    usage = run_with_store(SQLiteStore(db), lambda s: s.usage(rec.id, 1.0 + 3599))
    assert usage.used == 7 * settled + 10 * pending
    usage = run_with_store(SQLiteStore(db), lambda s: s.usage(rec.id, 1.0 + 3600))
    assert usage.used == 7 * settled


def test_concurrent_duplicate_settles_charge_once(make_store: StoreFactory) -> None:
    async def body(s: Store) -> None:
        _, rec = await s.create_key(custom_plan(1000, Window.BALANCE))
        res, _ = await s.reserve(rec.id, 500, NOW)
        await asyncio.gather(*(s.settle(res.id, 300, NOW + 1) for _ in range(20)))
        assert await s.usage(rec.id, NOW + 2) == Usage(1000, 300, 700)

    run_with(make_store, body)


def test_two_redis_stores_share_the_limit(redis_url: str) -> None:
    """Two clients on one prefix, as two node processes would be."""
    from node.accounts.redis import RedisStore

    async def main() -> None:
        a, b = (
            RedisStore(redis_url, prefix="test:shared"),
            RedisStore(redis_url, prefix="test:shared"),
        )
        try:
            _, rec = await a.create_key(custom_plan(1000, Window.HOUR))
            assert await _race([a, b], rec.id, 100, 15) == 66
            assert await b.usage(rec.id, NOW) == Usage(1000, 990, 10)
        finally:
            await a.close()
            await b.close()

    asyncio.run(main())
