"""Overload: a chat model of S slots under 10 x S concurrent clients against S clients.

Each client loops for a fixed time: one non-streaming chat request (fixed output length), then
the next. A client answered 429 waits what the node's ``retry-after-ms`` says (as the openai SDK
does; ``--overload-retry-ms`` overrides it with a fixed pause) and tries again. Measured: the
latency of the 429 answers, and the output tokens/s of the admitted requests, against the same
loop with only S clients (no excess).

The floor: the same client process drives the node with S clients (its engine as busy as in
the overload run) and, with the other 9 x S, ``bench.refuser``, a bare app that answers 429 at
once and tells the same mean retry-after as the node did. Its 429 latency at the client is what
any Python server gets on these cores under that load; the node's is compared with it.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from bench import procs, refuser
from bench.clients import session
from bench.config import MODELS, BenchConfig
from bench.node_metrics import LOOP_LAG, buckets, quantile_ms, request_buckets, scrape
from bench.rows import Row, bars_of, compare_row, value_row
from bench.stats import percentile, summary

MODEL = "qwen3.5:9b"
ROUTE = "/v1/chat/completions"
PROMPT = (
    "Write a short note for a colleague about the train to Gothenburg: it leaves at nine, "
    "the meeting starts after lunch, and the budget for the trip was approved yesterday."
)


async def drive(
    url: str, key: str, clients: int, duration_s: float, max_tokens: int, retry_ms: int | None
) -> dict[str, Any]:
    body = json.dumps(
        {
            "model": MODEL,
            "messages": [{"role": "user", "content": PROMPT}],
            "max_tokens": max_tokens,
            "ignore_eos": True,
            "temperature": 0,
        }
    )
    tokens = 0
    admitted: list[float] = []
    refused: list[float] = []
    told_s: list[float] = []
    codes: Counter[str] = Counter()
    async with session(url, key, clients) as c:
        start = time.perf_counter()
        deadline = start + duration_s

        async def client() -> None:
            nonlocal tokens
            while (now := time.perf_counter()) < deadline:
                async with c.post(ROUTE, data=body) as r:
                    raw = await r.read()
                    ms = (time.perf_counter() - now) * 1000
                if r.status == 200:
                    tokens += int(json.loads(raw)["usage"]["completion_tokens"])
                    admitted.append(ms)
                    continue
                codes[f"{r.status} {_error_code(raw)}"] += 1
                if r.status != 429:
                    await asyncio.sleep(0.05)
                    continue
                refused.append(ms)
                told_s.append(_retry_s(r.headers))
                pause = told_s[-1] if retry_ms is None else retry_ms / 1000
                await asyncio.sleep(max(0.0, min(pause, deadline - time.perf_counter())))

        await asyncio.gather(*(client() for _ in range(clients)))
        wall = time.perf_counter() - start
    return {
        "clients": clients,
        "wall_s": wall,
        "admitted_tok_s": tokens / wall,
        "admitted": len(admitted),
        "admitted_p50_ms": percentile(admitted, 50),
        "refused": len(refused),
        "refused_per_s": len(refused) / wall,
        "refused_p50_ms": percentile(refused, 50),
        "refused_p99_ms": percentile(refused, 99),
        "told_retry_ms": 1000 * sum(told_s) / len(told_s) if told_s else None,
        "errors": dict(codes),
    }


async def drive_floor(
    node_url: str,
    refuser_url: str,
    key: str,
    slots: int,
    refused_clients: int,
    duration_s: float,
    max_tokens: int,
    retry_ms: int | None,
) -> dict[str, Any]:
    """S clients on the node and the excess on the refuser, together in this process."""
    node, floor = await asyncio.gather(
        drive(node_url, key, slots, duration_s, max_tokens, retry_ms),
        drive(refuser_url, key, refused_clients, duration_s, max_tokens, retry_ms),
    )
    return {**floor, "admitted_tok_s": node["admitted_tok_s"], "admitted": node["admitted"]}


def _error_code(raw: bytes) -> str:
    try:
        return str(json.loads(raw)["error"]["code"])
    except (ValueError, KeyError, TypeError):
        return "?"


def _retry_s(headers: Mapping[str, str]) -> float:
    """What openai-python waits: retry-after-ms, else retry-after seconds (1 s if neither)."""
    try:
        if "retry-after-ms" in headers:
            return float(headers["retry-after-ms"]) / 1000
        return float(headers.get("retry-after", "1"))
    except ValueError:
        return 1.0


def run_overload(
    cfg: BenchConfig, env: dict[str, str], workdir: Path, logs: Path
) -> dict[str, Any]:
    from node.config import load_models

    (spec,) = load_models((MODELS / "overload.yaml").read_text(), procs.models_dir(env))
    slots = spec.slots
    node_env = {**env, "STAIK_DB_PATH": str(workdir / "overload-node.sqlite3")}
    key = procs.create_key(node_env)
    runs: dict[str, list[dict[str, Any]]] = {"baseline": [], "overload": [], "floor": []}
    loads = {"baseline": slots, "overload": cfg.overload_factor * slots}
    with procs.node_server(MODELS / "overload.yaml", node_env, logs / "overload-node.log") as n:
        n.start("/health/ready", cfg.server_start_timeout_s)
        print(f"  overload node ready in {n.ready_s:.0f} s (S = {slots} slots)", flush=True)
        args = (n.base_url, key)
        asyncio.run(drive(*args, slots, 1.0, cfg.overload_max_tokens, None))  # warm-up
        for rep in range(cfg.reps):
            for name, clients in loads.items():
                before = scrape(n.base_url)
                run = asyncio.run(
                    drive(
                        *args,
                        clients,
                        cfg.overload_duration_s,
                        cfg.overload_max_tokens,
                        cfg.overload_retry_ms,
                    )
                )
                after = scrape(n.base_url)
                refused = request_buckets(before, ROUTE, 429), request_buckets(after, ROUTE, 429)
                lag = buckets(before, LOOP_LAG), buckets(after, LOOP_LAG)
                for field, (was, now) in (("node_refused", refused), ("loop_lag", lag)):
                    run[f"{field}_p50_ms"] = quantile_ms(0.5, was, now)
                    run[f"{field}_p99_ms"] = quantile_ms(0.99, was, now)
                runs[name].append(run)
                p99s = [
                    f"{where} {v:.2f} ms"
                    for where, v in (
                        ("at the client", run["refused_p99_ms"]),
                        ("in the node", run["node_refused_p99_ms"]),
                    )
                    if v is not None
                ]
                print(
                    f"  overload {name:8s} {clients:3d} clients rep {rep}: "
                    f"{run['admitted_tok_s']:.1f} tok/s admitted, {run['refused']} x 429"
                    + (f" (p99 {', '.join(p99s)})" if p99s else "")
                    + f", errors {run['errors']}",
                    flush=True,
                )
            told = runs["overload"][-1]["told_retry_ms"]  # None: the refuser's own default
            refuser_log = logs / "overload-refuser.log"
            with procs.refuser_server(env, refuser_log, told) as bare:
                bare.start("/health/ready", cfg.server_start_timeout_s)
                floor = asyncio.run(
                    drive_floor(
                        n.base_url,
                        bare.base_url,
                        key,
                        slots,
                        loads["overload"] - slots,
                        cfg.overload_duration_s,
                        cfg.overload_max_tokens,
                        cfg.overload_retry_ms,
                    )
                )
            runs["floor"].append(floor)
            print(
                f"  overload floor    {loads['overload'] - slots:3d} clients on a bare refuser "
                f"(told {told or refuser.RETRY_MS:.0f} ms) rep {rep}: {floor['refused']} x 429, p99 at the client "
                f"{floor['refused_p99_ms'] or float('nan'):.2f} ms; node beside it "
                f"{floor['admitted_tok_s']:.1f} tok/s",
                flush=True,
            )
    return _report(cfg, slots, loads, runs, n.ready_s)


def _report(
    cfg: BenchConfig,
    slots: int,
    loads: dict[str, int],
    runs: dict[str, list[dict[str, Any]]],
    ready_s: float,
) -> dict[str, Any]:
    def of(name: str, key: str) -> dict[str, Any]:
        return summary([r[key] for r in runs[name]])

    at = f"S={slots}, {loads['overload']} vs {loads['baseline']} clients"
    rows: list[Row] = [
        compare_row(
            "admitted_tok_s",
            at,
            "tok/s",
            ("with 10x excess", of("overload", "admitted_tok_s")),
            ("without excess", of("baseline", "admitted_tok_s")),
            ("excess/no excess >= 0.95", lambda r: r >= 0.95),
        ),
        compare_row(
            "latency_429_p50_ms",
            at,
            "ms",
            ("node, at the client", of("overload", "refused_p50_ms")),
            ("bare refuser, at the client", of("floor", "refused_p50_ms")),
        ),
        value_row(
            "latency_429_p99_ms",
            at,
            "ms",
            ("node, at the client", of("overload", "refused_p99_ms")),
            ("< 5 ms", lambda v: v < 5.0),
        ),
        compare_row(
            "latency_429_p99_ms_vs_floor",
            at,
            "ms",
            ("node, at the client", of("overload", "refused_p99_ms")),
            ("bare refuser, at the client", of("floor", "refused_p99_ms")),
        ),
        value_row(
            "latency_429_p50_ms_in_node",
            at,
            "ms",
            ("node's own histogram", of("overload", "node_refused_p50_ms")),
            None,
        ),
        value_row(
            "latency_429_p99_ms_in_node",
            at,
            "ms",
            ("node's own histogram", of("overload", "node_refused_p99_ms")),
            ("< 5 ms", lambda v: v < 5.0),
        ),
        value_row(
            "event_loop_lag_p50_ms", at, "ms",
            ("node's loop, with 10x excess", of("overload", "loop_lag_p50_ms")), None,
        ),
        value_row(
            "event_loop_lag_p99_ms", at, "ms",
            ("node's loop, with 10x excess", of("overload", "loop_lag_p99_ms")), None,
        ),
        compare_row(
            "refused_per_s", at, "429/s",
            ("node", of("overload", "refused_per_s")),
            ("bare refuser", of("floor", "refused_per_s")),
        ),
        value_row(
            "429_in_baseline", f"{loads['baseline']} clients", "requests",
            ("node", of("baseline", "refused")), None,
        ),
    ]  # fmt: skip
    return {
        "peer": "the same load without the excess",
        "settings": {
            "slots": slots,
            "clients": loads,
            "duration_s": cfg.overload_duration_s,
            "max_tokens": cfg.overload_max_tokens,
            "floor": "bench.refuser (bare Starlette app on uvicorn, 429 at once) with "
            f"{loads['overload'] - slots} clients while {slots} drive the node",
            "retry": "node's retry-after-ms"
            if cfg.overload_retry_ms is None
            else f"fixed {cfg.overload_retry_ms} ms",
        },
        "ready_s": {"node": ready_s},
        "runs": runs,
        "rows": rows,
        "series": [],
        "bars": [
            bars_of(
                "overload_throughput.png",
                f"Overload: admitted output tokens/s, S={slots} slots",
                "output tokens/s",
                {
                    f"{loads['baseline']} clients": [of("baseline", "admitted_tok_s")],
                    f"{loads['overload']} clients": [of("overload", "admitted_tok_s")],
                },
                ["admitted throughput"],
            ),
            bars_of(
                "overload_429_latency.png",
                f"Overload: latency of the 429 answers, {loads['overload']} clients",
                "ms",
                {
                    "node": [
                        of("overload", "refused_p50_ms"),
                        of("overload", "refused_p99_ms"),
                    ],
                    "bare refuser (floor)": [
                        of("floor", "refused_p50_ms"),
                        of("floor", "refused_p99_ms"),
                    ],
                },
                ["p50", "p99"],
            ),
        ],
    }
