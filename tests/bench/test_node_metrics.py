"""The bench's reading of the node's histogram: quantiles of the requests between two scrapes."""

from __future__ import annotations

import math

import pytest

from bench.node_metrics import quantile_ms

INF = math.inf


def test_quantiles_count_only_the_requests_between_the_scrapes() -> None:
    before = {0.001: 50.0, 0.002: 50.0, 0.005: 50.0, INF: 50.0}  # an earlier run: all < 1 ms
    after = {0.001: 50.0, 0.002: 140.0, 0.005: 149.0, INF: 150.0}  # this run's 100: 1-2 ms...
    assert quantile_ms(0.5, before, after) == pytest.approx(1.5556, abs=1e-3)  # 50th of 90
    assert quantile_ms(0.95, before, after) == pytest.approx(2 + 3 * (5 / 9), abs=1e-3)
    assert quantile_ms(0.995, before, after) == pytest.approx(5.0)  # in +Inf: the last bound


def test_no_requests_no_quantile() -> None:
    same = {0.001: 3.0, INF: 3.0}
    assert quantile_ms(0.99, same, same) is None
    assert quantile_ms(0.99, {}, {}) is None
