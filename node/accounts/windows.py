"""Window arithmetic shared by the stores: which charges count at ``now``, and retry-after.

Rules (identical in every store):

* A charge is dated at its *reservation* time ``ts``, also after settling, so a long request
  counts in the hour / day it started in, and a settle never moves capacity around in time.
* ``Window.HOUR``: a charge counts while ``now < ts + 3600``.
* ``Window.DAY``: a charge counts while ``ts`` is on or after the local midnight that starts
  ``now``'s day (in the store's timezone).
* ``Window.BALANCE``: every settled charge counts forever against the purchased total.
* A pending (unsettled) reservation counts with its reserved amount while
  ``now < ts + RESERVATION_TTL_S`` (and while its window still counts it). After that it is
  considered abandoned (node killed mid-request) and holds nothing; a late settle still
  records the actual charge, dated ``ts`` as usual.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime, timedelta
from zoneinfo import ZoneInfo

from .plans import Window
from .store import QuotaExceeded, Usage

HOUR_S = 3600.0
RESERVATION_TTL_S = 3600.0
"""An unsettled reservation stops holding capacity after this long. One hour: far longer than
any request the node serves, short enough that a crash does not lock a key out for long."""


def day_bounds(now: float, tz: ZoneInfo) -> tuple[float, float, str]:
    """``(start, end, label)`` of the local calendar day holding ``now``: epoch seconds of its
    midnight and the next, and its ISO date."""
    local = datetime.fromtimestamp(now, tz)
    start = datetime(local.year, local.month, local.day, tzinfo=tz)
    nxt = start.date() + timedelta(days=1)
    end = datetime(nxt.year, nxt.month, nxt.day, tzinfo=tz)
    return start.timestamp(), end.timestamp(), local.date().isoformat()


def retry_after(
    *,
    window: Window,
    limit: int,
    used: int,
    tokens: int,
    settled: Iterable[tuple[float, int]],
    pending: Iterable[tuple[float, int]],
    now: float,
    day_end: float | None = None,
    ttl: float = RESERVATION_TTL_S,
) -> float | None:
    """Seconds until ``tokens`` more fit, if nothing else is reserved or settled meanwhile.

    ``settled`` / ``pending``: ``(ts, amount)`` of the charges that make up ``used`` (for a
    balance key, ``settled`` may be empty: settled spend never frees). None means never: the
    request is bigger than the whole limit, or a balance key needs a top-up.
    """
    need = used + tokens - limit
    if need <= 0:
        return 0.0
    if tokens > limit:
        return None
    frees: list[tuple[float, int]] = []
    for ts, amount in pending:
        expiry = ts + ttl
        if window is Window.HOUR:
            expiry = min(expiry, ts + HOUR_S)
        frees.append((expiry, amount))
    if window is Window.HOUR:
        frees.extend((ts + HOUR_S, amount) for ts, amount in settled)
    elif window is Window.DAY:
        assert day_end is not None
        frees = [(t, a) for t, a in frees if t < day_end]
        frees.append((day_end, used))  # midnight frees everything
    frees.sort()
    freed = 0
    for t, amount in frees:
        freed += amount
        if freed >= need:
            return max(0.0, t - now)
    return None


def quota_exceeded(
    *,
    window: Window,
    limit: int,
    used: int,
    tokens: int,
    settled: Iterable[tuple[float, int]],
    pending: Iterable[tuple[float, int]],
    now: float,
    tz: ZoneInfo,
    ttl: float,
) -> QuotaExceeded:
    """The error for a reservation that does not fit, with its true retry-after."""
    day_end = day_bounds(now, tz)[1] if window is Window.DAY else None
    wait = retry_after(
        window=window,
        limit=limit,
        used=used,
        tokens=tokens,
        settled=settled,
        pending=pending,
        now=now,
        day_end=day_end,
        ttl=ttl,
    )
    return QuotaExceeded(Usage.of(limit, used), tokens, wait)
