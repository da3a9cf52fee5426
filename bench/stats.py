"""Small statistics: percentiles of one run, and median/min/max over repetitions."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from typing import Any


def percentile(values: Sequence[float], q: float) -> float | None:
    """Linear-interpolated percentile (q in 0..100), as numpy's default; None when empty."""
    if not values:
        return None
    data = sorted(values)
    pos = (len(data) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(data) - 1)
    return data[lo] + (data[hi] - data[lo]) * (pos - lo)


def summary(values: Sequence[float | None]) -> dict[str, Any]:
    """median, min, max and n of the repetitions that produced a number."""
    got = [float(v) for v in values if v is not None]
    if not got:
        return {"median": None, "min": None, "max": None, "n": 0}
    return {"median": statistics.median(got), "min": min(got), "max": max(got), "n": len(got)}


def ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return a / b


def summarize_runs(runs: list[dict[str, Any]], keys: Sequence[str]) -> dict[str, Any]:
    """One summary per metric over a list of per-repetition dicts."""
    return {k: summary([r.get(k) for r in runs]) for k in keys}


def median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The run of median wall time standing for all of them (one short run is noisy), with
    every run's wall time beside it."""
    ordered = sorted(runs, key=lambda r: r["wall_s"])
    return {**ordered[len(ordered) // 2], "samples_wall_s": [r["wall_s"] for r in ordered]}
