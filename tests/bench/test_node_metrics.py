"""The bench's reading of the node's histograms: buckets from one scraped page, and quantiles of
the requests between two scrapes."""

from __future__ import annotations

import math

import pytest

from bench.node_metrics import LOOP_LAG, buckets, quantile_ms, request_buckets

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


PAGE = """\
# HELP staik_request_duration_seconds d
# TYPE staik_request_duration_seconds histogram
staik_request_duration_seconds_bucket{le="0.001",route="/v1/chat/completions",status="429"} 3.0
staik_request_duration_seconds_bucket{le="+Inf",route="/v1/chat/completions",status="429"} 4.0
staik_request_duration_seconds_bucket{le="0.001",route="/v1/chat/completions",status="200"} 0.0
staik_request_duration_seconds_bucket{le="+Inf",route="/v1/chat/completions",status="200"} 9.0
staik_request_duration_seconds_count{route="/v1/chat/completions",status="429"} 4.0
staik_request_duration_seconds_sum{route="/v1/chat/completions",status="429"} 0.01
# HELP staik_event_loop_lag_seconds l
# TYPE staik_event_loop_lag_seconds histogram
staik_event_loop_lag_seconds_bucket{le="0.0005"} 7.0
staik_event_loop_lag_seconds_bucket{le="+Inf"} 8.0
staik_event_loop_lag_seconds_count 8.0
staik_event_loop_lag_seconds_sum 0.004
"""


def test_one_scraped_page_gives_each_histograms_buckets() -> None:
    assert request_buckets(PAGE, "/v1/chat/completions", 429) == {0.001: 3.0, float("inf"): 4.0}
    assert request_buckets(PAGE, "/v1/chat/completions", 200) == {0.001: 0.0, float("inf"): 9.0}
    assert buckets(PAGE, LOOP_LAG) == {0.0005: 7.0, float("inf"): 8.0}
