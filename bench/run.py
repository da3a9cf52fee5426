"""``scripts/bench [--smoke] [...]``: every comparison of issue 6, on loopback,
each step bounded in time; results in bench/results/ (latest.json, latest.md, PNGs).

Exit status: 0 when every comparison ran (whatever the figures), 1 when one could not run.
"""

from __future__ import annotations

import argparse
import shlex
import shutil
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench import procs
from bench.audio import run_transcription
from bench.chat import run_chat
from bench.config import SECTIONS, BenchConfig, smoke_config
from bench.embed import run_embeddings
from bench.machine import load_average, machine
from bench.overload import run_overload
from bench.report import write

Runner = Callable[[BenchConfig, dict[str, str], Path, Path], dict[str, Any]]
RUNNERS: dict[str, Runner] = {
    "chat": run_chat,
    "embeddings": run_embeddings,
    "transcription": run_transcription,
    "overload": run_overload,
}


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(",") if x.strip())


def parse_args(argv: list[str]) -> BenchConfig:
    p = argparse.ArgumentParser(prog="scripts/bench", description=__doc__)
    p.add_argument("--smoke", action="store_true", help="one repetition, tiny sizes (minutes)")
    p.add_argument("--reps", type=int, help="repetitions of each measurement (default 3)")
    p.add_argument("--only", help=f"comma-separated subset of {','.join(SECTIONS)}")
    p.add_argument("--out", type=Path, help="results folder (default bench/results)")
    p.add_argument("--chat-concurrency", type=_ints, help="e.g. 1,8,32")
    p.add_argument("--chat-output-len", type=int)
    p.add_argument(
        "--chat-prompts-per-client",
        type=int,
        help="prompts per concurrent client (default 8; fewer for a slow CPU)",
    )
    p.add_argument("--chat-min-prompts", type=int, help="prompts at least per run (default 32)")
    p.add_argument("--embed-concurrency", type=_ints, help="e.g. 1,16,64")
    p.add_argument("--long-clip-s", type=float, help="length of the long clip (default 600)")
    p.add_argument("--overload-retry-ms", type=int, help="fixed pause after a 429")
    a = p.parse_args(argv)
    cfg = BenchConfig()
    if a.smoke:
        cfg = smoke_config(cfg)
    sections = tuple(s.strip() for s in a.only.split(",")) if a.only else SECTIONS
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        p.error(f"unknown sections: {sorted(unknown)}")
    overrides: dict[str, Any] = {
        "reps": a.reps,
        "out_dir": a.out,
        "chat_concurrency": a.chat_concurrency,
        "chat_output_len": a.chat_output_len,
        "chat_prompts_per_client": a.chat_prompts_per_client,
        "chat_min_prompts": a.chat_min_prompts,
        "embed_concurrency": a.embed_concurrency,
        "long_clip_s": a.long_clip_s,
        "overload_retry_ms": a.overload_retry_ms,
    }
    cfg = replace(cfg, sections=sections, **{k: v for k, v in overrides.items() if v is not None})
    if cfg.reps < 1:
        p.error("--reps must be at least 1")
    return cfg


def main(argv: list[str]) -> int:
    cfg = parse_args(argv)
    procs.install_cleanup()
    t0 = time.monotonic()
    started = datetime.now(UTC).isoformat(timespec="seconds")
    load_start = load_average()
    out_dir = cfg.out_dir
    logs = out_dir / "logs"
    shutil.rmtree(logs, ignore_errors=True)
    logs.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="staik-bench-"))
    env = procs.base_env(workdir)
    sections: dict[str, dict[str, Any]] = {}
    failed = []
    try:
        for name in cfg.sections:
            print(f"[bench] {name} (load average {load_average()})", flush=True)
            t_section = time.monotonic()
            try:
                sections[name] = RUNNERS[name](cfg, env, workdir, logs)
            except Exception as exc:  # one comparison failing must not lose the others
                traceback.print_exc()
                sections[name] = {"error": f"{type(exc).__name__}: {str(exc)[-1500:]}"}
                failed.append(name)
            finally:
                procs.kill_all()
            sections[name]["section_wall_s"] = round(time.monotonic() - t_section, 1)
            print(f"[bench] {name} done in {sections[name]['section_wall_s']:.0f} s", flush=True)
    finally:
        procs.kill_all()
        shutil.rmtree(workdir, ignore_errors=True)
    doc = {
        "command": "scripts/bench " + shlex.join(argv),
        "started": started,
        "wall_s": time.monotonic() - t0,
        "load_start": load_start,
        "load_end": load_average(),
        "machine": machine(),
        "config": vars(cfg),
        "sections": sections,
    }
    files = write(doc, out_dir)
    print(f"[bench] wrote {', '.join(str(f) for f in files)}", flush=True)
    print((out_dir / "latest.md").read_text(), flush=True)
    print(f"[bench] total {time.monotonic() - t0:.0f} s", flush=True)
    if failed:
        print(f"[bench] could not run: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
