"""SQLiteStore: the single-node backend, stdlib sqlite3 in WAL mode.

Every reservation is one row of ``charges``, inserted in a ``BEGIN IMMEDIATE`` transaction
together with the limit check (so concurrent reservations, from threads or processes, never
overshoot), and settling is one guarded UPDATE of that row plus, in the same transaction,
the key's bucket total or balance spend (so a repeat or a kill -9 between the two can neither
double nor lose a charge). Window sums read those bucket totals, at a cost that does not grow
with the key's traffic (``sqlite_window``). ``synchronous=NORMAL`` in WAL mode: a committed
charge survives a crash or kill -9 of the process; a power loss may forget the last moments'
charges (an undercharge, never a double one) in exchange for no fsync per request.
"""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path
from zoneinfo import ZoneInfo

from . import keys as k
from .plans import Plan, Window
from .sqlite_db import Database, transaction
from .sqlite_window import add_settled, hour_buckets, settled_sum
from .store import (
    KeyNotFound,
    KeyRecord,
    QuotaExceeded,
    Reservation,
    ReservationNotFound,
    Usage,
    check_tokens,
    new_reservation_id,
)
from .windows import RESERVATION_TTL_S, Buckets, quota_exceeded, window_start

_KEY_COLS = "id, name, plan_slug, limit_tokens, window, revoked, created_at"


def _record(row: sqlite3.Row) -> KeyRecord:
    return KeyRecord(
        id=row["id"],
        name=row["name"],
        plan_slug=row["plan_slug"],
        limit_tokens=row["limit_tokens"],
        window=Window(row["window"]),
        revoked=bool(row["revoked"]),
        created_at=row["created_at"],
    )


class SQLiteStore:
    def __init__(
        self,
        path: Path | str,
        tz: str = "Europe/Stockholm",
        *,
        busy_timeout_s: float = 10.0,
        reservation_ttl_s: float = RESERVATION_TTL_S,
        threads: int = 4,
    ) -> None:
        self.path = Path(path)
        self.tz = ZoneInfo(tz)
        self.ttl = reservation_ttl_s
        self._db = Database(self.path, busy_timeout_s, threads)
        self._run = self._db.run

    @staticmethod
    def _resolve(conn: sqlite3.Connection, key_or_id: str) -> sqlite3.Row | None:
        if key_or_id.startswith(k.KEY_PREFIX):
            if k.parse_key(key_or_id) is None:
                return None
            h = k.hash_key(key_or_id)
            row = conn.execute("SELECT * FROM keys WHERE key_hash = ?", (h,)).fetchone()
            return row if row is not None and k.hashes_equal(row["key_hash"], h) else None
        if not k.is_key_id(key_or_id):
            return None
        return conn.execute("SELECT * FROM keys WHERE id = ?", (key_or_id,)).fetchone()

    def _holds(self, key: sqlite3.Row, now: float) -> tuple[str, list[object]]:
        """WHERE clause and args of the key's live holds at ``now``: few, as they are the
        requests in flight plus any abandoned within the TTL (index ``charges_pending``)."""
        window = Window(key["window"])
        where, args = "key_id = ? AND actual IS NULL AND ts > ?", [key["id"], now - self.ttl]
        if window is not Window.BALANCE:
            bound, inclusive = window_start(window, now, self.tz)
            where += f" AND ts {'>=' if inclusive else '>'} ?"
            args.append(bound)
        return where, args

    def _used(self, conn: sqlite3.Connection, key: sqlite3.Row, now: float) -> int:
        """Tokens counting against the key at ``now``: settled ones in the window (bounded
        cost, see ``sqlite_window``) plus live holds."""
        window = Window(key["window"])
        if window is Window.BALANCE:
            settled = key["spent"]
        else:
            settled = settled_sum(conn, key["id"], window, *window_start(window, now, self.tz))
        where, args = self._holds(key, now)
        held = conn.execute(f"SELECT COALESCE(SUM(reserved), 0) FROM charges WHERE {where}", args)
        return settled + held.fetchone()[0]

    def _refusal(
        self, conn: sqlite3.Connection, key: sqlite3.Row, now: float, used: int, tokens: int
    ) -> QuotaExceeded:
        """The refusal of ``tokens`` with its exact retry-after; reads one bucket's charges
        at most (``windows.Buckets``), so hammering a full key stays cheap too."""
        window = Window(key["window"])
        settled: Buckets | list[tuple[float, int]] = []
        if window is Window.HOUR:  # only a rolling hour frees settled charges one by one
            settled = hour_buckets(conn, key["id"], window_start(window, now, self.tz)[0])
        where, args = self._holds(key, now)
        held = f"FROM charges WHERE {where}"
        return quota_exceeded(
            window=window,
            limit=key["limit_tokens"],
            used=used,
            tokens=tokens,
            settled=settled,
            pending=[(r[0], r[1]) for r in conn.execute(f"SELECT ts, reserved {held}", args)],
            now=now,
            tz=self.tz,
            ttl=self.ttl,
        )

    # -- keys -------------------------------------------------------------------------------

    async def create_key(
        self, plan: Plan, name: str | None = None, tokens: int | None = None
    ) -> tuple[str, KeyRecord]:
        limit = plan.limit_tokens if tokens is None else check_tokens(tokens)

        def go(conn: sqlite3.Connection) -> tuple[str, KeyRecord]:
            for _ in range(8):  # key ids are 32 random bits: retry the rare collision
                secret, key_hash, key_id = k.generate_key()
                rec = KeyRecord(key_id, name, plan.slug, limit, plan.window, False, time.time())
                try:
                    conn.execute(
                        "INSERT INTO keys (id, name, plan_slug, limit_tokens, window, created_at,"
                        " key_hash) VALUES (?, ?, ?, ?, ?, ?, ?)",
                        (
                            key_id,
                            name,
                            plan.slug,
                            limit,
                            plan.window.value,
                            rec.created_at,
                            key_hash,
                        ),  # fmt: skip
                    )
                except sqlite3.IntegrityError:
                    continue
                return secret, rec
            raise RuntimeError("could not allocate a unique key id")

        return await self._run(go)

    async def authenticate(self, secret: str) -> KeyRecord | None:
        if k.parse_key(secret) is None:
            return None  # malformed: refused without a lookup
        row = await self._run(self._resolve, secret)
        return None if row is None or row["revoked"] else _record(row)

    async def list_keys(self) -> list[KeyRecord]:
        def go(conn: sqlite3.Connection) -> list[KeyRecord]:
            rows = conn.execute(f"SELECT {_KEY_COLS} FROM keys ORDER BY created_at, id")
            return [_record(r) for r in rows]

        return await self._run(go)

    async def get_key(self, key_or_id: str) -> KeyRecord | None:
        if not k.is_key_ref(key_or_id):
            return None
        row = await self._run(self._resolve, key_or_id)
        return None if row is None else _record(row)

    async def revoke(self, key_or_id: str) -> bool:
        if not k.is_key_ref(key_or_id):
            return False

        def go(conn: sqlite3.Connection) -> bool:
            with transaction(conn):
                row = self._resolve(conn, key_or_id)
                if row is not None:
                    conn.execute("UPDATE keys SET revoked = 1 WHERE id = ?", (row["id"],))
                return row is not None

        return await self._run(go)

    async def topup(self, key_or_id: str, tokens: int) -> KeyRecord:
        check_tokens(tokens, positive=True)

        def go(conn: sqlite3.Connection) -> KeyRecord:
            with transaction(conn):
                row = self._resolve(conn, key_or_id)
                if row is None:
                    raise KeyNotFound(key_or_id)
                if row["window"] != Window.BALANCE.value:
                    raise ValueError(f"{row['id']} is not a balance (pay-as-you-go) key")
                conn.execute(
                    "UPDATE keys SET limit_tokens = limit_tokens + ? WHERE id = ?",
                    (tokens, row["id"]),
                )
                return _record(
                    conn.execute("SELECT * FROM keys WHERE id = ?", (row["id"],)).fetchone()
                )

        return await self._run(go)

    # -- accounting -------------------------------------------------------------------------

    async def authenticate_usage(self, secret: str, now: float) -> tuple[KeyRecord, Usage] | None:
        if k.parse_key(secret) is None:
            return None  # malformed: refused without a lookup

        def go(conn: sqlite3.Connection) -> tuple[KeyRecord, Usage] | None:
            with transaction(conn, "DEFERRED"):  # one read snapshot
                row = self._resolve(conn, secret)
                if row is None or row["revoked"]:
                    return None
                return _record(row), Usage.of(row["limit_tokens"], self._used(conn, row, now))

        return await self._db.inline(go)  # every request's first step: no hop to the pool

    async def usage(self, key_id: str, now: float) -> Usage:
        def go(conn: sqlite3.Connection) -> Usage:
            with transaction(conn, "DEFERRED"):  # one read snapshot
                key = conn.execute("SELECT * FROM keys WHERE id = ?", (key_id,)).fetchone()
                if key is None:
                    raise KeyNotFound(key_id)
                return Usage.of(key["limit_tokens"], self._used(conn, key, now))

        return await self._run(go)

    async def reserve(self, key_id: str, tokens: int, now: float) -> tuple[Reservation, Usage]:
        check_tokens(tokens)
        res = Reservation(new_reservation_id(), key_id, tokens)

        def go(conn: sqlite3.Connection) -> Usage:
            with transaction(conn):
                key = conn.execute("SELECT * FROM keys WHERE id = ?", (key_id,)).fetchone()
                if key is None or key["revoked"]:
                    raise KeyNotFound(key_id)
                limit = key["limit_tokens"]
                used = self._used(conn, key, now)
                if used + tokens > limit:
                    raise self._refusal(conn, key, now, used, tokens)
                conn.execute(
                    "INSERT INTO charges (id, key_id, ts, reserved) VALUES (?, ?, ?, ?)",
                    (res.id, key_id, now, tokens),
                )
                return Usage.of(limit, used + tokens)

        return res, await self._db.inline(go)  # on a request's path: no hop unless busy

    async def settle(self, reservation_id: str, actual_tokens: int, now: float) -> Usage:
        check_tokens(actual_tokens, "actual_tokens")

        def go(conn: sqlite3.Connection) -> Usage:
            with transaction(conn):
                charge = conn.execute(
                    "SELECT c.key_id, c.ts, k.window FROM charges c JOIN keys k"
                    " ON k.id = c.key_id WHERE c.id = ?",
                    (reservation_id,),
                ).fetchone()
                if charge is None:
                    raise ReservationNotFound(reservation_id)
                key_id = charge["key_id"]
                done = conn.execute(
                    "UPDATE charges SET actual = ?, settled_at = ? WHERE id = ? AND actual IS NULL",
                    (actual_tokens, now, reservation_id),
                )
                if done.rowcount:  # the first settle: count it (a repeat changes nothing)
                    window = Window(charge["window"])
                    add_settled(conn, key_id, window, charge["ts"], actual_tokens)
                key = conn.execute("SELECT * FROM keys WHERE id = ?", (key_id,)).fetchone()
                return Usage.of(key["limit_tokens"], self._used(conn, key, now))

        return await self._run(go)

    async def ping(self) -> None:
        await self._run(lambda conn: conn.execute("SELECT 1").fetchone())

    async def close(self) -> None:
        self._db.close()
