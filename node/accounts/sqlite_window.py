"""SQLiteStore's window reads and the bucket write of a settle (rules in ``windows``).

A window's settled sum must not cost more as a key gets busier: every request reads it
inside a ``BEGIN IMMEDIATE`` transaction, so its cost serialises the whole node. Settles
therefore also add to ``charge_buckets`` (per key and ``BUCKET_S`` seconds of ``ts``), and a
window's sum is the bucket totals past the one bucket its start cuts, plus that bucket's
charges inside the window, or its total less those outside: whichever is the shorter stretch
of time, read index-only from ``charges_settled``.
"""

from __future__ import annotations

import sqlite3

from .plans import Window
from .windows import BUCKET_S, Buckets, Item, bucket_of, bucket_split

_SETTLED = "FROM charges WHERE key_id = ? AND actual IS NOT NULL"


def add_settled(conn: sqlite3.Connection, key_id: str, window: Window, ts: float, n: int) -> None:
    """Count a settled charge of ``n`` tokens dated ``ts``; call in the settle's transaction."""
    if window is Window.BALANCE:
        conn.execute("UPDATE keys SET spent = spent + ? WHERE id = ?", (n, key_id))
        return
    conn.execute(
        "INSERT INTO charge_buckets (key_id, bucket, total) VALUES (?, ?, ?)"
        " ON CONFLICT (key_id, bucket) DO UPDATE SET total = total + excluded.total",
        (key_id, bucket_of(ts, BUCKET_S[window]), n),
    )


def _cut(
    conn: sqlite3.Connection, key_id: str, size: int, bound: float, inclusive: bool
) -> tuple[int, float, int]:
    """``(b, end, n)``: the bucket ``[.., end)`` that ``bound`` cuts and the sum of its
    settled charges inside the window."""
    b, start, end, inside = bucket_split(bound, size)
    if inside:
        op = ">=" if inclusive else ">"
        q = f"SELECT COALESCE(SUM(actual), 0) {_SETTLED} AND ts {op} ? AND ts < ?"
        return b, end, conn.execute(q, (key_id, bound, end)).fetchone()[0]
    total = conn.execute(
        "SELECT total FROM charge_buckets WHERE key_id = ? AND bucket = ?", (key_id, b)
    ).fetchone()
    op = "<" if inclusive else "<="
    q = f"SELECT COALESCE(SUM(actual), 0) {_SETTLED} AND ts >= ? AND ts {op} ?"
    outside = conn.execute(q, (key_id, start, bound)).fetchone()[0]
    return b, end, (total[0] if total else 0) - outside


def settled_sum(
    conn: sqlite3.Connection, key_id: str, window: Window, bound: float, inclusive: bool
) -> int:
    """Settled tokens of an hour / day key dated after ``bound`` (or at it, if inclusive)."""
    b, _, n = _cut(conn, key_id, BUCKET_S[window], bound, inclusive)
    later = conn.execute(
        "SELECT COALESCE(SUM(total), 0) FROM charge_buckets WHERE key_id = ? AND bucket > ?",
        (key_id, b),
    )
    return n + later.fetchone()[0]


def hour_buckets(conn: sqlite3.Connection, key_id: str, bound: float) -> Buckets:
    """An hour key's settled charges dated after ``bound``, as retry_after reads them."""
    size = BUCKET_S[Window.HOUR]
    b, end, n = _cut(conn, key_id, size, bound, False)
    rows = conn.execute(
        "SELECT bucket, total FROM charge_buckets WHERE key_id = ? AND bucket > ? ORDER BY bucket",
        (key_id, b),
    )
    later = rows.fetchall()
    starts = [bound, *(float(r[0] * size) for r in later)]
    spans = [(end, n), *((float((r[0] + 1) * size), r[1]) for r in later)]

    def items(i: int) -> list[Item]:  # a bucket's worth: fetched whole, no cursor left open
        q = f"SELECT ts, actual {_SETTLED} AND ts > ? AND ts >= ? AND ts < ? ORDER BY ts"
        return [(r[0], r[1]) for r in conn.execute(q, (key_id, bound, starts[i], spans[i][0]))]

    return Buckets(spans, items)
