"""The event-loop lag watch: a loop blocked for a while shows as one late wake-up."""

from __future__ import annotations

import asyncio
import time

from node.loop_lag import watch_loop_lag


def test_a_blocked_loop_shows_as_a_late_wake_up() -> None:
    async def scenario() -> list[float]:
        lags: list[float] = []
        watch = asyncio.create_task(watch_loop_lag(lags.append, interval_s=0.01))
        await asyncio.sleep(0.05)  # a few wake-ups on time
        seen = len(lags)
        time.sleep(0.2)  # blocks the loop: the wake-up due meanwhile comes at least this late
        await asyncio.sleep(0.05)
        watch.cancel()
        assert seen >= 1
        return lags[seen:]

    after_block = asyncio.run(scenario())
    assert after_block, "no wake-up after the block"
    assert max(after_block) >= 0.18
    assert all(lag >= 0 for lag in after_block)
