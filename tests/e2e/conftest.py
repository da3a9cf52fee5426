"""One real node for the whole session, driven with the official openai SDK.

The session's node is stopped with SIGTERM by the last test module (test_zz_shutdown.py),
which checks the graceful stop; the fixture's teardown only cleans up after it.
"""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import openai
import pytest

from tests.e2e.node_process import ROOT, NodeProcess
from tests.standins import models_dir


@pytest.fixture(scope="session")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeProcess]:
    workdir = tmp_path_factory.mktemp("node")
    env = {
        "STAIK_MODELS_DIR": models_dir(),
        # The operator allow-list: lets the vision test serve an image from loopback.
        "STAIK_IMAGE_ALLOWED_HOSTS": "localhost",
        "STAIK_MAX_JSON_BYTES": str(8 * 1024 * 1024),  # small, so the cap test sends little
        # The shutdown test's streams must finish inside the drain deadline even where the CPU
        # decodes slowly (no AVX-512: several times slower); the default 30 s cut them once.
        "STAIK_DRAIN_TIMEOUT_S": "180",
        # Short, so the stalled-reader test waits little; every other test reads its streams.
        "STAIK_STREAM_STALL_TIMEOUT_S": "8",
    }
    proc = NodeProcess(workdir, ROOT / "models.standin.yaml", env=env)
    # Agent Pro: 1,000,000 tokens per hour, room for the whole session.
    proc.key = proc.create_key("--plan", "agent-pro", "--name", "e2e")
    proc.start()
    try:
        proc.wait_listening()
        # The HTTP server answers before the chat engines are loaded: remember what it said.
        proc.early_answer = httpx.post(
            proc.base_url + "/v1/chat/completions",
            headers={"Authorization": f"Bearer {proc.key}"},
            json={"model": "qwen3.5:9b", "messages": [{"role": "user", "content": "hi"}]},
            timeout=30,
        )
        proc.wait_ready()
        yield proc
    finally:
        proc.stop()


@pytest.fixture(scope="session")
def api_key(node: NodeProcess) -> str:
    return node.key


@pytest.fixture(scope="session")
def client(node: NodeProcess, api_key: str) -> openai.OpenAI:
    return openai.OpenAI(
        api_key=api_key, base_url=node.base_url + "/v1", max_retries=0, timeout=120
    )
