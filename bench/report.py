"""bench/results/latest.json, latest.md (one table per comparison) and the PNG charts."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from bench.charts import draw_all
from bench.machine import caption
from bench.rows import Row

NOTES = {
    "chat": "Both servers get the same engine flags (the node's own translation of the models "
    "file); vllm bench serve streams chat completions with ignore_eos, so every request makes "
    "exactly the output length; each run starts a fresh `vllm bench serve` process, whose start "
    "is not timed. Both servers are started afresh each repetition and are up together (an idle "
    "one costs no CPU); they take turns at each concurrency, who goes first alternating, "
    "because the machine's speed drifts by minutes.",
    "embeddings": "Clients are asyncio aiohttp in the bench process, on the same cores as the node. "
    "The in-process reference is a process of its own, loaded beside the node (idle while the "
    "node works, and the node idle while it works), because the machine's speed drifts by "
    "minutes: each repetition measures the ceiling right next to the node's highest "
    "concurrency (before it on even repetitions, after it on odd ones). Added latency = node "
    "p50 at c=1 minus the p50 of the reference encoding the same texts one at a time, in "
    "blocks of 32 interleaved with the node's.",
    "transcription": "Both sides get the WAV file (decoding included), language sv, the node's "
    "beam size, compute type and temperature fallback. Whisper pads every clip to 30 s windows, "
    "so short clips have a low real-time factor on both sides. The in-process reference stays "
    "loaded beside the node and the two take turns, request by request (who goes first "
    "alternates), because the machine's speed drifts by minutes. Each repetition's short-clip "
    "figure is the median of several requests (short_clip_samples), one request being noisy; "
    "the paired ratio is the median of each request's node/in-process ratio against its "
    "neighbour, which leaves the drift between requests out. The node's requests go over one "
    "kept-open HTTP client, as an SDK's do.",
    "overload": "Closed-loop aiohttp clients; after a 429 a client waits as the node's retry-after-ms "
    "says (as openai-python does) unless --overload-retry-ms is given. Latencies are measured "
    "at the client, which shares the cores with the node, and by the node itself: the "
    "quantiles of its /metrics histogram (arrival in the app to last byte; interpolated within "
    "buckets of 0.5, 1, 2, 5, 10 ms) over the run's 429 answers. The event-loop lag is how late "
    "the node's loop woke a task due every 0.1 s during the overload runs: a request waiting "
    "that long before the app sees it is in the client's figure, not in the node's. The floor "
    "(each repetition, after the overload run): the same client process drives the node with "
    "S clients, so its engine works as in the overload run, and with the other 9 x S a bare "
    "Starlette app on uvicorn (bench/refuser.py) that answers 429 at once, telling the mean "
    "retry-after the node told; its 429 latency at the client is what any Python server gets "
    "on these cores under that load.",
}
TITLES = {
    "chat": "Chat: the node against `vllm serve` (driven by `vllm bench serve`)",
    "embeddings": "Embeddings: the node against in-process sentence-transformers",
    "transcription": "Transcription: the node against in-process faster-whisper",
    "overload": "Overload: 10 x S clients against a model of S slots",
}


def fmt(v: Any) -> str:
    if v is None:
        return "–"
    if isinstance(v, bool):
        return "yes" if v else "**no**"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        a = abs(v)
        if v.is_integer() and a < 100:
            return str(int(v))
        return f"{v:.0f}" if a >= 100 else f"{v:.1f}" if a >= 10 else f"{v:.2f}"
    return str(v)


def _cells(s: dict[str, Any] | None) -> list[str]:
    if not s:
        return ["–", "–", "–"]
    return [fmt(s.get("median")), fmt(s.get("min")), fmt(s.get("max"))]


def table(rows: list[Row]) -> list[str]:
    head = (
        "| metric | at | unit | subject | median | min | max "
        "| reference | median | min | max | ratio | target | met |"
    )
    out = [head, "|" + "---|" * 14]
    for r in rows:
        cells = [r["metric"], r["at"], r["unit"], r["subject"], *_cells(r["node"])]
        cells += [r["reference"] or "–", *_cells(r["peer"]), fmt(r["ratio"])]
        cells += [r["target"] or "–", fmt(r["met"])]
        out.append("| " + " | ".join(cells) + " |")
    return out


def markdown(doc: dict[str, Any], charts: list[Path]) -> str:
    m = doc["machine"]
    lines = ["# staik-node side-by-side benchmarks", ""]
    if doc["config"]["smoke"]:
        lines += [
            "> **Smoke run**: one repetition at tiny sizes. It proves the harness works; "
            "its figures say little about the node.",
            "",
        ]
    lines += [
        f"- Run: `{doc['command']}`, started {doc['started']}, {doc['wall_s']:.0f} s in all",
        f"- Machine: {caption(m)}",
        f"- Versions: {', '.join(f'{k} {v}' for k, v in m['versions'].items())}",
        f"- Load average (1, 5, 15 min) at start {doc['load_start']}, at end {doc['load_end']}"
        " (other work on the same cores makes the figures noisy)",
        f"- Repetitions per measurement: {doc['config']['reps']}; cells give median, min and max"
        " over them; ratio = subject median / reference median",
        "",
    ]
    for name, section in doc["sections"].items():
        lines += [f"## {TITLES.get(name, name)}", ""]
        if "error" in section:
            lines += [f"**Not measured**: {section['error']}", ""]
            continue
        settings = section.get("settings", {})
        lines += [NOTES.get(name, ""), ""] if name in NOTES else []
        lines += [f"Settings: `{json.dumps(settings, ensure_ascii=False)}`", ""]
        if section.get("ready_s"):
            ready = ", ".join(f"{k} {v:.0f} s" for k, v in section["ready_s"].items())
            lines += [f"Time to ready (the slowest start; in no figure): {ready}", ""]
        lines += table(section["rows"]) + [""]
        for extra in ("node_errors", "same_text_as_in_process"):
            if section.get(extra):
                lines += [f"{extra}: `{json.dumps(section[extra], ensure_ascii=False)}`", ""]
        files = [c.name for c in charts if _belongs(c.name, section)]
        lines += [f"![{f}]({f})" for f in files] + ([""] if files else [])
    lines += ["## Targets of issue 6", ""]
    for name, section in doc["sections"].items():
        for r in section.get("rows", []):
            if r["target"]:
                verdict = {True: "met", False: "**missed**", None: "not evaluated"}[r["met"]]
                lines.append(f"- {name} {r['metric']} ({r['at']}): {r['target']}: {verdict}")
    return "\n".join(lines) + "\n"


def _belongs(file: str, section: dict[str, Any]) -> bool:
    names = [s["file"] for s in section.get("series", [])]
    return file in names + [b["file"] for b in section.get("bars", [])]


def write(doc: dict[str, Any], out_dir: Path) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    charts = draw_all(
        {k: v for k, v in doc["sections"].items() if "error" not in v},
        caption(doc["machine"]),
        out_dir,
    )
    (out_dir / "latest.json").write_text(json.dumps(doc, indent=2, ensure_ascii=False, default=str))
    (out_dir / "latest.md").write_text(markdown(doc, charts))
    return [out_dir / "latest.json", out_dir / "latest.md", *charts]
