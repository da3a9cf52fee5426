"""Accounting: API keys, plans, and token quotas (reserve before a request, settle after).

Pure library, no HTTP. ``open_store`` picks the backend: Redis when several node processes
share quotas, else a local SQLite file.
"""

from __future__ import annotations

from pathlib import Path

from .keys import generate_key, hash_key, parse_key
from .plans import PLANS, Plan, Window, custom_plan, get_plan
from .store import (
    KeyNotFound,
    KeyRecord,
    QuotaExceeded,
    Reservation,
    ReservationNotFound,
    Store,
    StoreUnavailable,
    Usage,
)


def open_store(db_path: Path, redis_url: str | None, tz: str = "Europe/Stockholm") -> Store:
    """RedisStore at ``redis_url`` if given, else SQLiteStore at ``db_path``. Nothing is
    connected yet; call ``await store.ping()`` to check reachability."""
    if redis_url:
        from .redis import RedisStore

        return RedisStore(redis_url, tz)
    from .sqlite import SQLiteStore

    return SQLiteStore(db_path, tz)


__all__ = [
    "PLANS",
    "KeyNotFound",
    "KeyRecord",
    "Plan",
    "QuotaExceeded",
    "Reservation",
    "ReservationNotFound",
    "Store",
    "StoreUnavailable",
    "Usage",
    "Window",
    "custom_plan",
    "generate_key",
    "get_plan",
    "hash_key",
    "open_store",
    "parse_key",
]
