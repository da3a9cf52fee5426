"""SQLiteStore's key lookup and reservations run on the caller's thread, and still answer when
they can't."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
import time
from pathlib import Path

import pytest

from node.accounts.plans import custom_plan
from node.accounts.sqlite import SQLiteStore
from node.accounts.sqlite_db import Database
from node.accounts.store import StoreUnavailable, Usage
from node.accounts.windows import Window

from .support import run_with_store

NOW = 1_750_000_000.0


def test_key_lookup_and_reservation_need_no_pool_thread(tmp_path: Path) -> None:
    """With the pool's only thread held, authenticate_usage and reserve still answer: no hop
    to it."""
    store = SQLiteStore(tmp_path / "accounts.db", threads=1)

    async def body(s: SQLiteStore) -> None:
        secret, rec = await s.create_key(custom_plan(1000, Window.HOUR))
        await s.reserve(rec.id, 100, NOW)
        release = threading.Event()
        held = asyncio.ensure_future(s._db.run(lambda conn: release.wait(10)))
        await asyncio.sleep(0.05)
        try:
            found = await asyncio.wait_for(s.authenticate_usage(secret, NOW), 2)
            _, usage = await asyncio.wait_for(s.reserve(rec.id, 50, NOW), 2)
        finally:
            release.set()
            await held
        assert found is not None
        assert found[0].id == rec.id and found[1] == Usage(1000, 100, 900)
        assert usage == Usage(1000, 150, 850)
        assert await s.authenticate_usage("sk-st-" + "0" * 48, NOW) is None
        checkpoints = await s._db.inline(lambda conn: conn.execute("PRAGMA wal_autocheckpoint"))
        assert checkpoints.fetchone()[0] == 0  # the pool's connections checkpoint, not this one

    run_with_store(store, body)


def test_a_reservation_meeting_a_held_write_lock_waits_on_the_pool(tmp_path: Path) -> None:
    """Another writer (here a second connection, as another process's) holds the write lock:
    the inline reservation is answered busy at once, so it goes to the pool, waits there and
    lands once the lock is released, counted once, and the inline connection stays usable."""
    path = tmp_path / "accounts.db"
    store = SQLiteStore(path, threads=1)

    async def body(s: SQLiteStore) -> None:
        _, rec = await s.create_key(custom_plan(1000, Window.HOUR))
        await s.reserve(rec.id, 100, NOW)  # the inline connection exists
        other = sqlite3.connect(path, isolation_level=None)
        other.execute("BEGIN IMMEDIATE")
        inline = s._db._inline.conn
        loop = asyncio.get_running_loop()
        started = loop.time()
        reserving = asyncio.ensure_future(s.reserve(rec.id, 200, NOW))
        await asyncio.sleep(0.2)
        assert loop.time() - started < 1  # the loop was not held waiting for the lock
        assert not reserving.done()  # waiting on the pool, not refused
        other.execute("ROLLBACK")
        other.close()
        _, usage = await asyncio.wait_for(reserving, 5)
        assert usage == Usage(1000, 300, 700)
        _, usage = await s.reserve(rec.id, 1, NOW)
        assert usage == Usage(1000, 301, 699)
        assert s._db._inline.conn is inline  # a busy answer at BEGIN leaves it usable

    run_with_store(store, body)


def test_busy_inside_an_inline_transaction_drops_the_connection(tmp_path: Path) -> None:
    """A busy answer after the transaction began (SQLite may give one on a statement): the
    transaction is rolled back, the connection replaced (no half-open transaction survives,
    nor the write lock it holds), and the write lands once, from the pool, without waiting."""
    db = Database(tmp_path / "accounts.db", busy_timeout_s=5, threads=1)
    loop_thread = threading.get_ident()

    def insert(conn: sqlite3.Connection) -> None:
        conn.execute("BEGIN IMMEDIATE")
        conn.execute("INSERT INTO meta (name, value) VALUES ('probe', '1')")
        if threading.get_ident() == loop_thread:
            busy = sqlite3.OperationalError("database is locked")
            busy.sqlite_errorcode = sqlite3.SQLITE_BUSY
            raise busy
        conn.commit()

    async def body() -> None:
        await db.run(lambda conn: None)  # schema made, as by any store call
        await db.inline(lambda conn: None)
        first = db._inline.conn
        started = time.monotonic()
        await db.inline(insert)
        assert time.monotonic() - started < 1  # the pool's write did not wait for a lock
        assert db._inline.conn is None and first is not None
        count = "SELECT COUNT(*) FROM meta WHERE name = 'probe'"
        assert await db.inline(lambda conn: conn.execute(count).fetchone()[0]) == 1

    try:
        asyncio.run(body())
    finally:
        db.close()


def test_a_busy_inline_read_goes_to_the_pool(tmp_path: Path) -> None:
    """SQLite answers a WAL reader busy only in rare cases (recovery after a crash): then the
    read is retried on the pool, whose connections wait out the busy timeout."""
    db = Database(tmp_path / "accounts.db", busy_timeout_s=5, threads=1)
    loop_thread = threading.get_ident()

    def lookup(conn: sqlite3.Connection) -> str:
        if threading.get_ident() == loop_thread:
            busy = sqlite3.OperationalError("database is locked")
            busy.sqlite_errorcode = sqlite3.SQLITE_BUSY
            raise busy
        return str(conn.execute("SELECT 'from the pool'").fetchone()[0])

    def broken(conn: sqlite3.Connection) -> None:
        raise sqlite3.OperationalError("disk I/O error")

    async def body() -> None:
        await db.run(lambda conn: None)  # schema made, as by any store call
        assert await db.inline(lookup) == "from the pool"
        with pytest.raises(StoreUnavailable):
            await db.inline(broken)
        assert await db.inline(lambda conn: conn.execute("SELECT 7").fetchone()[0]) == 7

    try:
        asyncio.run(body())
    finally:
        db.close()
