"""RedisStore: the shared backend for several node processes (one Redis, not a cluster).

Same semantics as SQLiteStore (see ``node.accounts.windows``); reserve and settle are Lua
scripts, so each check-and-charge is atomic across processes. Layout under ``prefix``:

* ``key:<id>`` hash (record, ``key_hash``, ``spent`` for balance keys); ``hash:<sha256>`` ->
  id; ``keys`` zset of ids by creation time.
* ``pending:<id>`` zset ``"<res_id>|<reserved>"`` by reservation time.
* ``hour:<id>`` zset ``"<res_id>|<actual>"`` of settled charges by reservation time (rolling
  hour), and ``hourmin:<id>`` hash of their totals per minute (``windows.BUCKET_S``): the
  hour's sum reads the minute totals and, from the zset, only the charges of the minute the
  window's start cuts (whichever side of the cut is shorter), so it costs the same however
  busy the key. Both are trimmed on reserve to the minutes that can still count.
  ``day:<id>:<YYYY-MM-DD>`` settled counter per local day; balance: ``spent`` field.
* ``res:<res_id>`` hash of one reservation, kept ``RES_RETENTION_S`` for idempotent settles.

Times travel as ``repr(float)`` strings and Lua formats no number but whole ones, so scores
stay exact. An ``hour:`` zset from before ``hourmin:`` existed is totalled into it on first
use (a settle adds to both and a reserve trims both to the same minutes, so an hour key
with charges but no ``hourmin:`` hash can only be one of those).
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any
from zoneinfo import ZoneInfo

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from . import keys as k
from .plans import Plan, Window
from .redis_lua import CREATE, RESERVE, SETTLE, USAGE
from .store import (
    KeyNotFound,
    KeyRecord,
    Reservation,
    ReservationNotFound,
    StoreUnavailable,
    Usage,
    check_tokens,
    new_reservation_id,
)
from .windows import (
    BUCKET_S,
    HOUR_S,
    RESERVATION_TTL_S,
    bucket_of,
    bucket_split,
    day_bounds,
    quota_exceeded,
)

RES_RETENTION_S = 2 * 86400  # a settle later than this (real time) finds no reservation
DAY_COUNTER_TTL_S = 3 * 86400
GC_MARGIN_S = 600.0  # keep entries this long past relevance, for nodes with lagging clocks
_HOUR_BUCKET_S = BUCKET_S[Window.HOUR]  # redis_lua assumes 60
_UNAVAILABLE = ("OOM", "READONLY", "LOADING", "MASTERDOWN", "BUSY", "NOAUTH", "WRONGPASS")


def _pairs(flat: list[Any]) -> list[tuple[float, int]]:
    return [(float(flat[i]), int(flat[i + 1])) for i in range(0, len(flat), 2)]


def _record(h: dict[str, str]) -> KeyRecord:
    return KeyRecord(
        id=h["id"],
        name=h.get("name"),
        plan_slug=h["plan_slug"],
        limit_tokens=int(h["limit_tokens"]),
        window=Window(h["window"]),
        revoked=h.get("revoked") == "1",
        created_at=float(h["created_at"]),
    )


class RedisStore:
    def __init__(
        self,
        url: str,
        tz: str = "Europe/Stockholm",
        *,
        prefix: str = "staik:acct",
        reservation_ttl_s: float = RESERVATION_TTL_S,
        connect_timeout_s: float = 2.0,
    ) -> None:
        self.tz = ZoneInfo(tz)
        self.ttl = reservation_ttl_s
        self.p = prefix
        self._r = aioredis.Redis.from_url(
            url,
            decode_responses=True,
            socket_connect_timeout=connect_timeout_s,
            socket_timeout=5.0,
            retry=Retry(ExponentialBackoff(cap=0.5, base=0.05), 2),
        )
        self._usage = self._r.register_script(USAGE)
        self._reserve = self._r.register_script(RESERVE)
        self._settle = self._r.register_script(SETTLE)
        self._create = self._r.register_script(CREATE)

    @contextmanager
    def _guard(self) -> Iterator[None]:
        try:
            yield
        except (RedisConnectionError, RedisTimeoutError, OSError) as e:
            raise StoreUnavailable(f"redis: {e}") from e
        except ResponseError as e:
            if str(e).startswith(_UNAVAILABLE):
                raise StoreUnavailable(f"redis: {e}") from e
            raise

    def _window_keys(self, key_id: str, day: str) -> list[str]:
        p = self.p
        return [
            f"{p}:key:{key_id}",
            f"{p}:pending:{key_id}",
            f"{p}:hour:{key_id}",
            f"{p}:day:{key_id}:{day}",
            f"{p}:hourmin:{key_id}",
        ]

    def _window_args(self, now: float) -> tuple[list[str], str]:
        """STATE's ARGV at ``now`` and the local day's label."""
        start, _, label = day_bounds(now, self.tz)
        lo = now - HOUR_S
        b, cut_start, cut_end, inside = bucket_split(lo, _HOUR_BUCKET_S)
        args = [repr(now - self.ttl), repr(lo), repr(start), str(b), repr(cut_start)]
        return [*args, repr(cut_end), "in" if inside else "out"], label

    async def _resolve(self, key_or_id: str) -> dict[str, str] | None:
        with self._guard():
            if key_or_id.startswith(k.KEY_PREFIX):
                if k.parse_key(key_or_id) is None:
                    return None
                h = k.hash_key(key_or_id)
                key_id = await self._r.get(f"{self.p}:hash:{h}")
                if key_id is None:
                    return None
                rec = await self._r.hgetall(f"{self.p}:key:{key_id}")
                return rec if rec and k.hashes_equal(rec["key_hash"], h) else None
            if not k.is_key_id(key_or_id):
                return None
            return await self._r.hgetall(f"{self.p}:key:{key_or_id}") or None

    # -- keys -------------------------------------------------------------------------------

    async def create_key(
        self, plan: Plan, name: str | None = None, tokens: int | None = None
    ) -> tuple[str, KeyRecord]:
        limit = plan.limit_tokens if tokens is None else check_tokens(tokens)
        for _ in range(8):  # key ids are 32 random bits: retry the rare collision
            secret, key_hash, key_id = k.generate_key()
            rec = KeyRecord(key_id, name, plan.slug, limit, plan.window, False, time.time())
            args = [key_id, key_hash, plan.slug, limit, plan.window.value, repr(rec.created_at)]
            if name is not None:
                args.append(name)
            keys = [f"{self.p}:key:{key_id}", f"{self.p}:hash:{key_hash}", f"{self.p}:keys"]
            with self._guard():
                if await self._create(keys=keys, args=args):
                    return secret, rec
        raise RuntimeError("could not allocate a unique key id")

    async def authenticate(self, secret: str) -> KeyRecord | None:
        if k.parse_key(secret) is None:
            return None  # malformed: refused without a lookup
        h = await self._resolve(secret)
        return None if h is None or h.get("revoked") == "1" else _record(h)

    async def authenticate_usage(self, secret: str, now: float) -> tuple[KeyRecord, Usage] | None:
        record = await self.authenticate(secret)
        if record is None:
            return None
        try:
            return record, await self.usage(record.id, now)
        except KeyNotFound:
            return None

    async def list_keys(self) -> list[KeyRecord]:
        with self._guard():
            ids = await self._r.zrange(f"{self.p}:keys", 0, -1)
            pipe = self._r.pipeline(transaction=False)
            for key_id in ids:
                pipe.hgetall(f"{self.p}:key:{key_id}")
            rows = await pipe.execute()
        recs = [_record(h) for h in rows if h]
        return sorted(recs, key=lambda r: (r.created_at, r.id))

    async def get_key(self, key_or_id: str) -> KeyRecord | None:
        h = await self._resolve(key_or_id)
        return None if h is None else _record(h)

    async def revoke(self, key_or_id: str) -> bool:
        h = await self._resolve(key_or_id)
        if h is None:
            return False
        with self._guard():
            await self._r.hset(f"{self.p}:key:{h['id']}", "revoked", "1")
        return True

    async def topup(self, key_or_id: str, tokens: int) -> KeyRecord:
        check_tokens(tokens, positive=True)
        h = await self._resolve(key_or_id)
        if h is None:
            raise KeyNotFound(key_or_id)
        if h["window"] != Window.BALANCE.value:
            raise ValueError(f"{h['id']} is not a balance (pay-as-you-go) key")
        with self._guard():
            h["limit_tokens"] = str(
                await self._r.hincrby(f"{self.p}:key:{h['id']}", "limit_tokens", tokens)
            )
        return _record(h)

    # -- accounting -------------------------------------------------------------------------

    async def usage(self, key_id: str, now: float) -> Usage:
        args, label = self._window_args(now)
        with self._guard():
            out = await self._usage(keys=self._window_keys(key_id, label), args=args)
        if out[0] == -1:
            raise KeyNotFound(key_id)
        return Usage.of(int(out[2]), int(out[1]))

    async def reserve(self, key_id: str, tokens: int, now: float) -> tuple[Reservation, Usage]:
        check_tokens(tokens)
        res = Reservation(new_reservation_id(), key_id, tokens)
        args, label = self._window_args(now)
        gc = bucket_of(now - HOUR_S - GC_MARGIN_S, _HOUR_BUCKET_S)  # trims whole minutes
        args += [
            res.id,
            str(tokens),
            repr(now),
            label,
            str(gc),
            repr(float(gc * _HOUR_BUCKET_S)),
            repr(now - self.ttl - GC_MARGIN_S),
            str(RES_RETENTION_S),
            repr(self.ttl),
        ]
        keys = [*self._window_keys(key_id, label), f"{self.p}:res:{res.id}"]
        with self._guard():
            out = await self._reserve(keys=keys, args=args)
        if out[0] == -1:
            raise KeyNotFound(key_id)
        used, limit = int(out[1]), int(out[2])
        if out[0] == 0:
            raise quota_exceeded(
                window=Window(out[5]),
                limit=limit,
                used=used,
                tokens=tokens,
                settled=[(-math.inf, int(out[6])), *_pairs(out[3])],
                pending=_pairs(out[4]),
                now=now,
                tz=self.tz,
                ttl=self.ttl,
            )
        return res, Usage.of(limit, used)

    async def settle(self, reservation_id: str, actual_tokens: int, now: float) -> Usage:
        check_tokens(actual_tokens, "actual_tokens")
        res_key = f"{self.p}:res:{reservation_id}"
        with self._guard():
            r = await self._r.hmget(res_key, ["key", "day", "ts"])
            if r[0] is None:
                raise ReservationNotFound(reservation_id)
            key_id, day, ts = r
            key, pending, hour, counter, minutes = self._window_keys(key_id, day)
            bucket = str(bucket_of(float(ts), _HOUR_BUCKET_S))
            done = await self._settle(
                keys=[res_key, key, pending, hour, counter, minutes],
                args=[
                    reservation_id,
                    str(actual_tokens),
                    repr(now),
                    str(DAY_COUNTER_TTL_S),
                    bucket,
                ],
            )
        if done == -1:  # expired between the lookup and the script
            raise ReservationNotFound(reservation_id)
        return await self.usage(key_id, now)

    async def ping(self) -> None:
        with self._guard():
            await self._r.ping()

    async def close(self) -> None:
        await self._r.aclose()
