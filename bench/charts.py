"""PNG charts with matplotlib: lines against concurrency (median, whiskers from min to max) and
grouped bars; every figure carries the machine/versions caption."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bench.rows import Bars, Series


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _whiskers(med: list[float | None], lo: list[float | None], hi: list[float | None]) -> Any:
    below = [
        m - lo_ if m is not None and lo_ is not None else 0 for m, lo_ in zip(med, lo, strict=False)
    ]
    above = [
        hi_ - m if m is not None and hi_ is not None else 0 for m, hi_ in zip(med, hi, strict=False)
    ]
    return [below, above]


def _finish(plt: Any, fig: Any, ax: Any, title: str, caption: str, path: Path) -> None:
    ax.set_title(title, fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.text(0.01, 0.01, caption, fontsize=6, color="0.35", wrap=True)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def line_chart(series: Series, caption: str, out_dir: Path) -> Path:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.2))
    x = series["x"]
    for line in series["lines"]:
        keep = [i for i, m in enumerate(line["median"]) if m is not None]
        if not keep:
            continue
        med = [line["median"][i] for i in keep]
        err = _whiskers(med, [line["min"][i] for i in keep], [line["max"][i] for i in keep])
        ax.errorbar([x[i] for i in keep], med, yerr=err, marker="o", capsize=3, label=line["label"])
    for i, (label, y) in enumerate(series["hlines"].items()):
        if y is not None:
            ax.axhline(y, linestyle="--", color=f"C{i + 3}", label=label)
    if len(x) > 1 and max(x) / max(min(x), 1) >= 8:
        ax.set_xscale("log", base=2)
    ax.set_xticks(x)
    ax.set_xticklabels([str(v) for v in x])
    ax.set_xlabel("concurrency (clients)")
    ax.set_ylabel(series["ylabel"])
    ax.set_ylim(bottom=0)
    path = out_dir / series["file"]
    _finish(plt, fig, ax, series["title"], caption, path)
    return path


def bar_chart(bars: Bars, caption: str, out_dir: Path) -> Path:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.2))
    groups = bars["groups"]
    width = 0.8 / max(1, len(bars["bars"]))
    for j, (label, points) in enumerate(bars["bars"].items()):
        xs, med, lo, hi = [], [], [], []
        for g, p in enumerate(points):
            if p.get("median") is None:
                continue
            xs.append(g + (j - (len(bars["bars"]) - 1) / 2) * width)
            med.append(p["median"])
            lo.append(p["min"])
            hi.append(p["max"])
        if xs:
            ax.bar(xs, med, width, yerr=_whiskers(med, lo, hi), capsize=3, label=label)
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels(groups)
    ax.set_ylabel(bars["ylabel"])
    path = out_dir / bars["file"]
    _finish(plt, fig, ax, bars["title"], caption, path)
    return path


def draw_all(sections: dict[str, Any], caption: str, out_dir: Path) -> list[Path]:
    made = []
    for section in sections.values():
        for series in section.get("series", []):
            made.append(line_chart(series, caption, out_dir))
        for bars in section.get("bars", []):
            made.append(bar_chart(bars, caption, out_dir))
    return made
