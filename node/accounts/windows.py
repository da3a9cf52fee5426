"""Window arithmetic shared by the stores: which charges count at ``now``, the buckets that
keep summing them cheap, and retry-after.

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

import heapq
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from zoneinfo import ZoneInfo

from .plans import Window
from .store import QuotaExceeded, Usage

HOUR_S = 3600.0
RESERVATION_TTL_S = 3600.0
"""An unsettled reservation stops holding capacity after this long. One hour: far longer than
any request the node serves, short enough that a crash does not lock a key out for long."""
BUCKET_S = {Window.HOUR: 60, Window.DAY: 900}
"""The stores also total each key's settled charges per bucket of this many seconds of their
``ts``: a window's sum is then a few dozen bucket totals plus the charges of the one bucket
its start cuts, however busy the key. 60 s: the cut bucket of a rolling hour holds at most a
minute of charges. 900 s: local midnight falls on a quarter hour in every current timezone,
so a day's first bucket is never cut, and a day is under a hundred buckets."""

Item = tuple[float, int]


def day_bounds(now: float, tz: ZoneInfo) -> tuple[float, float, str]:
    """``(start, end, label)`` of the local calendar day holding ``now``: epoch seconds of its
    midnight and the next, and its ISO date."""
    local = datetime.fromtimestamp(now, tz)
    start = datetime(local.year, local.month, local.day, tzinfo=tz)
    nxt = start.date() + timedelta(days=1)
    end = datetime(nxt.year, nxt.month, nxt.day, tzinfo=tz)
    return start.timestamp(), end.timestamp(), local.date().isoformat()


@dataclass(frozen=True, slots=True)
class Buckets:
    """A rolling-hour key's settled charges in its window, by bucket, oldest first.

    ``spans[i] = (end, total)``: every charge of bucket ``i`` has ``ts < end`` and
    ``ts >= spans[i - 1][0]``; ``total`` sums the ones in the window. ``items(i)`` reads them
    as ``(ts, amount)`` in ts order. retry_after reads the charges of one bucket only, so a
    refusal costs the same however many charges the window holds.
    """

    spans: Sequence[tuple[float, int]]
    items: Callable[[int], Iterable[Item]]


def bucket_of(ts: float, size: int) -> int:
    """The bucket ``b`` with ``b * size <= ts < (b + 1) * size``, exactly (int-float
    comparisons in Python are exact, so no rounding can put a charge in a neighbour)."""
    b = math.floor(ts / size)
    if b * size > ts:
        b -= 1
    elif (b + 1) * size <= ts:
        b += 1
    return b


def window_start(window: Window, now: float, tz: ZoneInfo) -> tuple[float, bool]:
    """``(bound, inclusive)``: a charge dated ``ts`` is in ``window`` at ``now`` iff ``ts >
    bound`` (``>=`` when inclusive). Charges dated after ``now`` count too. Not for balance."""
    if window is Window.HOUR:
        return now - HOUR_S, False
    return day_bounds(now, tz)[0], True


def bucket_split(bound: float, size: int) -> tuple[int, float, float, bool]:
    """``(b, start, end, inside)`` for the bucket ``[start, end)`` that a window's ``bound``
    cuts: ``inside`` when it is cheaper to add up its charges inside the window than to
    subtract those outside from its total (the bound sits in the bucket's later half)."""
    b = bucket_of(bound, size)
    start, end = float(b * size), float((b + 1) * size)
    return b, start, end, end - bound <= bound - start


def _hour_settled(buckets: Buckets, pending: list[Item], need: int) -> Iterator[Item]:
    """The settled charges retry_after needs, in ts order: all those of the buckets before
    the first bucket by whose last free ``need`` tokens have freed (counting ``pending``
    frees, ``(time, amount)`` in time order) as one item dated -inf, then that bucket's own.

    Exact: up to the previous bucket's last free nothing reaches ``need`` (the check there
    failed with all of it freed), between the two the -inf item is already freed in full,
    and by this bucket's last free ``need`` is reached before any later charge frees.
    """
    before, pend, j = 0, 0, 0
    for i, (end, total) in enumerate(buckets.spans):
        last_free = end + HOUR_S  # >= ts + HOUR_S of every charge of the bucket
        while j < len(pending) and pending[j][0] <= last_free:
            pend += pending[j][1]
            j += 1
        if before + total + pend >= need:
            yield (-math.inf, before)
            yield from buckets.items(i)
            return
        before += total
    yield (-math.inf, before)


def retry_after(
    *,
    window: Window,
    limit: int,
    used: int,
    tokens: int,
    settled: Iterable[Item] | Buckets,
    pending: Iterable[Item],
    now: float,
    day_end: float | None = None,
    ttl: float = RESERVATION_TTL_S,
) -> float | None:
    """Seconds until ``tokens`` more fit, if nothing else is reserved or settled meanwhile.

    ``settled`` / ``pending``: ``(ts, amount)`` of the charges that make up ``used`` (for a
    balance or day key, ``settled`` may be empty: settled spend frees never or all at
    midnight), or, for an hour key, its settled charges as ``Buckets``, read lazily. None
    means never: the request is bigger than the whole limit, or a balance key needs a top-up.
    """
    need = used + tokens - limit
    if need <= 0:
        return 0.0
    if tokens > limit:
        return None
    frees: list[Item] = []
    for ts, amount in pending:
        expiry = ts + ttl
        if window is Window.HOUR:
            expiry = min(expiry, ts + HOUR_S)
        frees.append((expiry, amount))
    frees.sort()
    stream: Iterable[Item] = frees
    if window is Window.HOUR:
        if isinstance(settled, Buckets):
            settled = _hour_settled(settled, frees, need)
        else:
            settled = sorted(settled)
        stream = heapq.merge(frees, ((ts + HOUR_S, amount) for ts, amount in settled))
    elif window is Window.DAY:
        assert day_end is not None
        stream = [(t, a) for t, a in frees if t < day_end]
        stream.append((day_end, used))  # midnight frees everything, after any hold before it
    freed = 0
    for t, amount in stream:
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
    settled: Iterable[Item] | Buckets,
    pending: Iterable[Item],
    now: float,
    tz: ZoneInfo,
    ttl: float,
) -> QuotaExceeded:
    """The error for a reservation that does not fit, with its true retry-after."""
    pending = list(pending)
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
    held = sum(amount for _, amount in pending)
    return QuotaExceeded(Usage.of(limit, used), tokens, wait, held=held, holds=len(pending))
