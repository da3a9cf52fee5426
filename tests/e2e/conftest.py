"""One real node for the whole session, driven with the official openai SDK."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from tests.e2e.node_process import ROOT, NodeProcess


def _models_dir() -> str:
    if os.environ.get("STAIK_MODELS_DIR"):
        return os.environ["STAIK_MODELS_DIR"]
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return str(Path(base) / "staik-node" / "models")


@pytest.fixture(scope="session")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeProcess]:
    workdir = tmp_path_factory.mktemp("node")
    proc = NodeProcess(
        workdir, ROOT / "models.standin.yaml", env={"STAIK_MODELS_DIR": _models_dir()}
    )
    proc.start()
    try:
        proc.wait_ready()
        yield proc
    finally:
        proc.stop()


@pytest.fixture(scope="session")
def api_key(node: NodeProcess) -> str:
    """A key with room for the whole session (Agent Pro: 1,000,000 tokens per hour)."""
    return node.create_key("--plan", "agent-pro", "--name", "e2e")


@pytest.fixture(scope="session")
def client(node: NodeProcess, api_key: str) -> openai.OpenAI:
    return openai.OpenAI(
        api_key=api_key, base_url=node.base_url + "/v1", max_retries=0, timeout=120
    )
