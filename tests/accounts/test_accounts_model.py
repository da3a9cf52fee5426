"""Random operation sequences checked against a deliberately naive reference model.

The model keeps every charge and, for retry-after, *searches* the future: it evaluates usage
at every instant where something could free (a charge sliding out, a hold expiring, a local
midnight) and returns the first one where the request fits. The stores compute the same
thing incrementally, so agreement checks both the window rules and the retry-after maths.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import date, datetime, time, timedelta
from zoneinfo import ZoneInfo

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from node.accounts.plans import Window, custom_plan
from node.accounts.store import QuotaExceeded, Store, Usage

from .support import StoreFactory, run_with

TZ = "Europe/Stockholm"
LIMIT = 1000


def _local_date(t: float, tz: ZoneInfo) -> date:
    return datetime.fromtimestamp(t, tz).date()


@dataclass
class Charge:
    ts: float
    reserved: int
    actual: int | None = None


@dataclass
class Model:
    window: Window
    ttl: float
    tz: ZoneInfo
    limit: int = LIMIT
    charges: dict[str, Charge] = field(default_factory=dict)

    def amount(self, c: Charge, now: float) -> int:
        if c.actual is not None:
            return c.actual
        return c.reserved if now < c.ts + self.ttl else 0

    def in_window(self, c: Charge, now: float) -> bool:
        if self.window is Window.HOUR:
            return now < c.ts + 3600
        if self.window is Window.DAY:
            return _local_date(c.ts, self.tz) == _local_date(now, self.tz)
        return True

    def used(self, now: float) -> int:
        return sum(self.amount(c, now) for c in self.charges.values() if self.in_window(c, now))

    def usage(self, now: float) -> Usage:
        return Usage.of(self.limit, self.used(now))

    def retry_after(self, tokens: int, now: float) -> float | None:
        candidates = set()
        for c in self.charges.values():
            if c.actual is None:
                candidates.add(c.ts + self.ttl)
            if self.window is Window.HOUR:
                candidates.add(c.ts + 3600)
        if self.window is Window.DAY:
            tomorrow = _local_date(now, self.tz) + timedelta(days=1)
            candidates.add(datetime.combine(tomorrow, time(), self.tz).timestamp())
        for t in sorted(x for x in candidates if x > now):
            if self.used(t) + tokens <= self.limit:
                return t - now
        return None


starts = st.sampled_from(
    [
        datetime(2025, 6, 1, 23, 30, tzinfo=ZoneInfo(TZ)).timestamp(),
        datetime(2025, 3, 29, 22, 0, tzinfo=ZoneInfo(TZ)).timestamp(),  # spring-forward night
        datetime(2025, 10, 25, 22, 0, tzinfo=ZoneInfo(TZ)).timestamp(),  # fall-back night
        datetime(2025, 1, 15, 9, 17, 30, tzinfo=ZoneInfo(TZ)).timestamp(),
    ]
)
steps = st.one_of(
    st.sampled_from([0, 1, 60, 599, 600, 1799, 1800, 3599, 3600, 3601, 7200, 43200]),
    st.integers(0, 5000),
)
ops = st.lists(
    st.one_of(
        st.tuples(st.just("advance"), steps),
        st.tuples(st.just("reserve"), st.integers(0, LIMIT + 50)),
        st.tuples(st.just("settle"), st.integers(0, 30), st.integers(0, LIMIT)),
    ),
    max_size=25,
)


async def _scenario(
    s: Store, window: Window, ttl: float, start: float, script: list[tuple]
) -> None:
    model = Model(window, ttl, ZoneInfo(TZ))
    _, rec = await s.create_key(custom_plan(LIMIT, window))
    now, res_ids = start, []
    for op in script:
        if op[0] == "advance":
            now += op[1]
        elif op[0] == "reserve":
            tokens = op[1]
            expect = model.usage(now)
            if expect.used + tokens <= LIMIT:
                res, got = await s.reserve(rec.id, tokens, now)
                model.charges[res.id] = Charge(now, tokens)
                res_ids.append(res.id)
                assert got == model.usage(now)
            else:
                with pytest.raises(QuotaExceeded) as exc:
                    await s.reserve(rec.id, tokens, now)
                assert exc.value.usage == expect
                want = model.retry_after(tokens, now)
                if want is None:
                    assert exc.value.retry_after_s is None
                else:
                    assert exc.value.retry_after_s == pytest.approx(want, abs=1e-6)
        elif res_ids:
            rid = res_ids[op[1] % len(res_ids)]
            got = await s.settle(rid, op[2], now)
            if model.charges[rid].actual is None:
                model.charges[rid].actual = op[2]
            assert got == model.usage(now)
        assert await s.usage(rec.id, now) == model.usage(now)


@settings(
    max_examples=50,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    window=st.sampled_from(list(Window)),
    ttl=st.sampled_from([3600.0, 900.0]),
    start=starts,
    script=ops,
)
def test_store_matches_reference_model(
    make_store: StoreFactory, window: Window, ttl: float, start: float, script: list[tuple]
) -> None:
    run_with(
        make_store,
        lambda s: _scenario(s, window, ttl, start, script),
        tz=TZ,
        reservation_ttl_s=ttl,
    )
