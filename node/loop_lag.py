"""How late the event loop runs what is due.

Every request's work on the node (key lookup, admission, each streamed chunk) waits its turn
on the one event loop, so the loop's lag is latency the node adds to all of them at once:
work that blocks the loop, or a process starved of CPU. A task asks to wake every
``interval_s`` and records how late it woke.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

LAG_INTERVAL_S = 0.1


async def watch_loop_lag(
    observe: Callable[[float], None], interval_s: float = LAG_INTERVAL_S
) -> None:
    """Observe each wake-up's lateness (seconds) until cancelled."""
    loop = asyncio.get_running_loop()
    while True:
        due = loop.time() + interval_s
        await asyncio.sleep(interval_s)
        observe(max(0.0, loop.time() - due))
