"""Connection plumbing of SQLiteStore: schema, a private thread pool, one connection per
thread, explicit transactions, and sqlite errors turned into StoreUnavailable."""

from __future__ import annotations

import asyncio
import functools
import sqlite3
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from .store import StoreUnavailable

T = TypeVar("T")

SCHEMA = """
CREATE TABLE IF NOT EXISTS keys (
    id TEXT PRIMARY KEY,
    key_hash TEXT NOT NULL UNIQUE,
    name TEXT,
    plan_slug TEXT NOT NULL,
    limit_tokens INTEGER NOT NULL,
    window TEXT NOT NULL,
    revoked INTEGER NOT NULL DEFAULT 0,
    created_at REAL NOT NULL,
    spent INTEGER NOT NULL DEFAULT 0  -- settled total, kept for balance keys
);
CREATE TABLE IF NOT EXISTS charges (
    id TEXT PRIMARY KEY,              -- the reservation id
    key_id TEXT NOT NULL REFERENCES keys(id),
    ts REAL NOT NULL,                 -- reservation time; the charge stays dated here
    reserved INTEGER NOT NULL,
    actual INTEGER,                   -- NULL while pending
    settled_at REAL
);
CREATE INDEX IF NOT EXISTS charges_key_ts ON charges(key_id, ts);
CREATE INDEX IF NOT EXISTS charges_pending ON charges(key_id, ts) WHERE actual IS NULL;
"""


@contextmanager
def transaction(conn: sqlite3.Connection, mode: str = "IMMEDIATE") -> Iterator[sqlite3.Connection]:
    conn.execute(f"BEGIN {mode}")
    try:
        yield conn
    except BaseException:
        conn.rollback()
        raise
    conn.commit()


class Database:
    """Runs ``fn(conn, *args)`` on the pool. WAL lets readers proceed during a write;
    ``synchronous=NORMAL`` (WAL): commits survive a process crash without an fsync each."""

    def __init__(self, path: Path, busy_timeout_s: float, threads: int) -> None:
        self.path = path
        self._busy = busy_timeout_s
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="accounts-db")
        self._local = threading.local()
        self._conns: list[sqlite3.Connection] = []
        self._lock = threading.Lock()
        self._schema_ready = False

    def _connect(self) -> sqlite3.Connection:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(
            self.path, timeout=self._busy, isolation_level=None, check_same_thread=False
        )
        try:
            conn.row_factory = sqlite3.Row
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute("PRAGMA foreign_keys=ON")
            with self._lock:
                if not self._schema_ready:
                    conn.executescript(SCHEMA)
                    self._schema_ready = True
        except BaseException:
            conn.close()
            raise
        with self._lock:
            self._conns.append(conn)
        return conn

    def _call(self, fn: Callable[..., T], *args: Any) -> T:
        try:
            conn = getattr(self._local, "conn", None)
            if conn is None:
                conn = self._local.conn = self._connect()
            return fn(conn, *args)
        except (sqlite3.IntegrityError, sqlite3.ProgrammingError):
            raise
        except (sqlite3.DatabaseError, OSError) as e:
            raise StoreUnavailable(f"sqlite {self.path}: {e}") from e

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, functools.partial(self._call, fn, *args))

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        with self._lock:
            conns, self._conns = self._conns, []
        for conn in conns:
            conn.close()
