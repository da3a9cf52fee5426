from __future__ import annotations

from datetime import date, datetime
from zoneinfo import ZoneInfo

import pytest

from node.accounts.plans import Window
from node.accounts.windows import HOUR_S, day_bounds, retry_after

STHLM = ZoneInfo("Europe/Stockholm")


@pytest.mark.parametrize(
    ("day", "hours"), [((2025, 3, 30), 23), ((2025, 10, 26), 25), ((2025, 6, 1), 24)]
)
def test_day_bounds_across_dst(day: tuple[int, int, int], hours: int) -> None:
    noon = datetime(*day, 12, tzinfo=STHLM).timestamp()
    start, end, label = day_bounds(noon, STHLM)
    assert start == datetime(*day, tzinfo=STHLM).timestamp()
    assert end - start == hours * 3600
    assert label == date(*day).isoformat()
    assert day_bounds(start, STHLM)[0] == start and day_bounds(end - 0.001, STHLM)[1] == end
    assert day_bounds(end, STHLM)[0] == end


def test_retry_after_rules() -> None:
    common = {"limit": 100, "now": 10_000.0}
    hour = [(9_000.0, 50), (9_500.0, 40)]
    fits = retry_after(window=Window.HOUR, used=90, tokens=10, settled=hour, pending=[], **common)
    assert fits == 0.0
    wait = retry_after(window=Window.HOUR, used=90, tokens=70, settled=hour, pending=[], **common)
    assert wait == 9_500 + HOUR_S - 10_000  # 60 must free: 50 alone is not enough
    too_big = retry_after(window=Window.HOUR, used=0, tokens=101, settled=[], pending=[], **common)
    assert too_big is None
    pend = [(9_900.0, 30)]
    bal = retry_after(window=Window.BALANCE, used=90, tokens=30, settled=[], pending=pend, **common)
    assert bal == 9_900 + 3600 - 10_000
    assert retry_after(window=Window.BALANCE, used=90, tokens=50, settled=[], pending=pend,
                       **common) is None  # fmt: skip
    day = retry_after(
        window=Window.DAY, used=90, tokens=50, settled=[], pending=pend, day_end=12_000.0,
        ttl=60_000.0, **common,
    )  # fmt: skip
    assert day == 2_000.0  # the hold outlives the day: midnight frees first
