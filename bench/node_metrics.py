"""The node's own account of its latency: its Prometheus request histogram, scraped before and
after a run, gives the quantiles of that run's requests of one route and status as the node
timed them (arrival in the app to last byte), without the client's or the kernel's share; its
event-loop lag histogram, scraped the same way, shows how long work waited for the loop."""

from __future__ import annotations

import math

import httpx
from prometheus_client.parser import text_string_to_metric_families

HISTOGRAM = "staik_request_duration_seconds"
LOOP_LAG = "staik_event_loop_lag_seconds"  # how late the node's event loop wakes, every 0.1 s
Buckets = dict[float, float]  # upper bound (s) -> cumulative count


def scrape(base_url: str) -> str:
    """The node's /metrics page, read once for every histogram taken from it."""
    return httpx.get(base_url + "/metrics", timeout=10).text


def buckets(page: str, name: str, labels: dict[str, str] | None = None) -> Buckets:
    """The buckets of histogram ``name`` on a scraped page (the series with ``labels``)."""
    wanted = labels or {}
    out: Buckets = {}
    for family in text_string_to_metric_families(page):
        for s in family.samples:
            if s.name == name + "_bucket" and all(s.labels.get(k) == v for k, v in wanted.items()):
                out[float(s.labels["le"])] = s.value
    return out


def request_buckets(page: str, route: str, status: int) -> Buckets:
    """The request histogram's buckets for one route and status."""
    return buckets(page, HISTOGRAM, {"route": route, "status": str(status)})


def quantile_ms(q: float, before: Buckets, after: Buckets) -> float | None:
    """Prometheus's histogram_quantile over the requests counted between two scrapes: linear
    within the bucket that holds the q-th request (q in 0..1); None if there were none."""
    bounds = sorted(after)
    counts = [after[b] - before.get(b, 0.0) for b in bounds]
    if not counts or counts[-1] <= 0:
        return None
    rank = q * counts[-1]
    lower, below = 0.0, 0.0
    for bound, cumulative in zip(bounds, counts, strict=True):
        if cumulative >= rank:
            if math.isinf(bound):
                return lower * 1000  # beyond the last finite bucket: its bound, as Prometheus
            inside = cumulative - below
            share = (rank - below) / inside if inside else 1.0
            return (lower + (bound - lower) * share) * 1000
        lower, below = bound, cumulative
    return None
