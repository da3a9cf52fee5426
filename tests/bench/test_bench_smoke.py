"""Keeps scripts/bench working: the smoke (one repetition, tiny sizes) must run every
comparison and write its files. It asserts nothing about the figures (not a timed test)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.bench
def test_bench_smoke_writes_its_files(tmp_path: Path) -> None:
    out = tmp_path / "results"
    run = subprocess.run(
        [str(ROOT / "scripts" / "bench"), "--smoke", "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert (out / "latest.md").read_text().strip()
    results = json.loads((out / "latest.json").read_text())
    assert results
    assert list(out.glob("*.png"))
