"""The shapes every comparison hands the report: table rows and chart series."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypedDict

from bench.stats import ratio

Target = tuple[str, Callable[[float], bool]]


class Row(TypedDict):
    metric: str
    at: str
    unit: str
    subject: str
    node: dict[str, Any]
    reference: str | None
    peer: dict[str, Any] | None
    ratio: float | None
    target: str | None
    met: bool | None


class Line(TypedDict):
    label: str
    median: list[float | None]
    min: list[float | None]
    max: list[float | None]


class Series(TypedDict):
    file: str
    title: str
    ylabel: str
    x: list[int]
    lines: list[Line]
    hlines: dict[str, float]


def compare_row(
    metric: str,
    at: str,
    unit: str,
    subject: tuple[str, dict[str, Any]],
    reference: tuple[str, dict[str, Any]] | None,
    target: Target | None = None,
) -> Row:
    """One table row: the subject's summary (usually the node's), the reference's, the ratio
    of their medians and whether it meets the target (a test on the ratio)."""
    peer = reference[1] if reference else None
    r = ratio(subject[1].get("median"), peer.get("median")) if peer else None
    met = None if target is None or r is None else bool(target[1](r))
    return Row(
        metric=metric,
        at=at,
        unit=unit,
        subject=subject[0],
        node=subject[1],
        reference=reference[0] if reference else None,
        peer=peer,
        ratio=r,
        target=target[0] if target else None,
        met=met,
    )


def value_row(
    metric: str, at: str, unit: str, subject: tuple[str, dict[str, Any]], target: Target | None
) -> Row:
    """A row without a reference; the target tests the subject's median itself."""
    median = subject[1].get("median")
    met = None if target is None or median is None else bool(target[1](median))
    return Row(
        metric=metric,
        at=at,
        unit=unit,
        subject=subject[0],
        node=subject[1],
        reference=None,
        peer=None,
        ratio=None,
        target=target[0] if target else None,
        met=met,
    )


def series_of(
    file: str,
    title: str,
    ylabel: str,
    x: list[int],
    lines: dict[str, list[dict[str, Any]]],
    hlines: dict[str, float] | None = None,
) -> Series:
    """A chart: one line per label, each point a summary (median with min-max whiskers)."""
    return Series(
        file=file,
        title=title,
        ylabel=ylabel,
        x=x,
        lines=[
            Line(
                label=label,
                median=[p.get("median") for p in points],
                min=[p.get("min") for p in points],
                max=[p.get("max") for p in points],
            )
            for label, points in lines.items()
        ],
        hlines=hlines or {},
    )


class Bars(TypedDict):
    file: str
    title: str
    ylabel: str
    groups: list[str]
    bars: dict[str, list[dict[str, Any]]]


def bars_of(
    file: str, title: str, ylabel: str, bars: dict[str, list[dict[str, Any]]], groups: list[str]
) -> Bars:
    """A grouped bar chart: per label one summary per group ({} for none)."""
    return Bars(file=file, title=title, ylabel=ylabel, groups=groups, bars=bars)
