"""Store cost: the accounting latency of one request against how full the key's window is.

`python -m bench.store_cost [--backend sqlite|redis|both] [--rows 0,1000,10000,50000]`

One request's accounting is ``authenticate_usage`` + ``reserve`` + ``settle``, timed together.
Each row level gets a fresh key (``--plan``, default the rolling-hour agent-pro) whose window
is first filled through the Store API with that many settled charges spread evenly over the
preceding hour, as a key busy at a steady rate leaves it (so the window's boundary minute
holds its share too), and timed where the window's start cuts a minute in half, the worst case
for the stores' minute buckets. The clock is simulated, so a level never waits for real time.
Redis: a throwaway ``redis-server`` on a free loopback port, like the tests' fixture.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path

from bench.stats import percentile
from node.accounts.plans import PLANS, Plan
from node.accounts.store import Store

WINDOW_S = 3600.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def redis_server(workdir: Path) -> Iterator[str]:
    """A redis-server without persistence on a free port; its URL, killed on exit."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise SystemExit("redis-server not found on PATH")
    port = _free_port()
    args = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", ""]
    args += ["--appendonly", "no", "--dir", str(workdir)]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit("redis-server did not start") from None
                time.sleep(0.05)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.terminate()
        proc.wait(5)


@asynccontextmanager
async def open_backend(backend: str, workdir: Path) -> AsyncIterator[Store]:
    store: Store
    if backend == "sqlite":
        from node.accounts.sqlite import SQLiteStore

        store = SQLiteStore(workdir / "accounts.db")
        try:
            yield store
        finally:
            await store.close()
        return
    from node.accounts.redis import RedisStore

    with redis_server(workdir) as url:
        store = RedisStore(url, prefix="bench")
        try:
            await store.ping()
            yield store
        finally:
            await store.close()


async def fill(store: Store, key_id: str, rows: int, end: float) -> None:
    """``rows`` settled charges, reserved evenly over the hour before ``end``."""
    step = WINDOW_S / max(rows, 1)
    for i in range(rows):
        ts = end - WINDOW_S + (i + 0.5) * step
        res, _ = await store.reserve(key_id, 10, ts)
        await store.settle(res.id, 10, ts)


async def measure(store: Store, plan: Plan, rows: int, samples: int) -> dict[str, float]:
    secret, rec = await store.create_key(plan, f"bench-{rows}", tokens=10**12)
    end = time.time() // 60 * 60 + 30  # the window's start halves a minute: the costliest cut
    t0 = time.perf_counter()
    await fill(store, rec.id, rows, end)
    fill_s = time.perf_counter() - t0
    took = []
    for i in range(samples):
        now = end + i * 0.001
        t0 = time.perf_counter()
        await store.authenticate_usage(secret, now)
        res, _ = await store.reserve(rec.id, 10, now)
        await store.settle(res.id, 10, now)
        took.append((time.perf_counter() - t0) * 1000)
    p50, p99 = percentile(took, 50), percentile(took, 99)
    assert p50 is not None and p99 is not None
    return {"p50_ms": p50, "p99_ms": p99, "fill_s": fill_s}


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--backend", choices=["sqlite", "redis", "both"], default="both")
    ap.add_argument("--rows", default="0,1000,10000,50000", help="comma-separated row levels")
    ap.add_argument("--samples", type=int, default=200)
    ap.add_argument("--plan", default="agent-pro", choices=sorted(PLANS))
    a = ap.parse_args()
    levels = [int(x) for x in a.rows.split(",")]
    backends = ["sqlite", "redis"] if a.backend == "both" else [a.backend]
    for backend in backends:
        with tempfile.TemporaryDirectory() as tmp:
            async with open_backend(backend, Path(tmp)) as store:
                for rows in levels:
                    r = await measure(store, PLANS[a.plan], rows, a.samples)
                    print(
                        f"{backend:6s} {a.plan} {rows:6d} rows: auth+reserve+settle "
                        f"p50 {r['p50_ms']:.2f} ms p99 {r['p99_ms']:.2f} ms "
                        f"(fill {r['fill_s']:.1f} s)",
                        flush=True,
                    )


if __name__ == "__main__":
    asyncio.run(main())
