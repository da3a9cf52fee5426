"""Several nodes sharing one Redis: one key's limit holds across them, and the ledger equals
what the responses reported. A node whose store is unreachable refuses (fail closed).

The nodes here serve only the embedding model (cheap to start three times); the accounting
path is the same for every route."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml

from node.accounts.keys import generate_key
from tests.e2e.node_process import ROOT, NodeProcess, free_port
from tests.standins import models_dir

pytestmark = pytest.mark.e2e

LIMIT = 2000


def _embed_only_models(tmp: Path) -> Path:
    models = yaml.safe_load((ROOT / "models.standin.yaml").read_text())["models"]
    embed = next(m for m in models if m["name"] == "bge-m3:latest")
    embed["slots"] = 512  # so that the quota, not the slots, is what refuses
    path = tmp / "models.embed.yaml"
    path.write_text(yaml.safe_dump({"models": [embed]}))
    return path


def _start(tmp: Path, name: str, redis_url: str) -> NodeProcess:
    workdir = tmp / name
    workdir.mkdir()
    node = NodeProcess(
        workdir,
        _embed_only_models(workdir),
        env={"STAIK_MODELS_DIR": models_dir(), "STAIK_REDIS_URL": redis_url},
    )
    node.start()
    return node


@pytest.fixture(scope="module")
def nodes(tmp_path_factory: pytest.TempPathFactory, redis_url: str) -> Iterator[list[NodeProcess]]:
    tmp = tmp_path_factory.mktemp("shared")
    started = [_start(tmp, f"n{i}", redis_url) for i in range(3)]
    try:
        for node in started:
            node.wait_ready(180)
        yield started
    finally:
        for node in started:
            node.stop()


def test_one_keys_limit_holds_across_three_nodes(nodes: list[NodeProcess]) -> None:
    key = nodes[0].create_key("--plan", "custom", "--limit-tokens", str(LIMIT), "--window", "hour")
    texts = [f"Mening nummer {i} om vädret i Stockholm idag." for i in range(300)]

    async def one(client: httpx.AsyncClient, i: int) -> httpx.Response:
        node = nodes[i % 3]
        return await client.post(
            node.base_url + "/v1/embeddings",
            headers={"Authorization": f"Bearer {key}"},
            json={"model": "bge-m3:latest", "input": texts[i], "encoding_format": "base64"},
        )

    async def burst() -> list[httpx.Response]:
        limits = httpx.Limits(max_connections=300)
        async with httpx.AsyncClient(timeout=120, limits=limits) as client:
            return await asyncio.gather(*(one(client, i) for i in range(300)))

    responses = asyncio.run(burst())
    ok = [r for r in responses if r.status_code == 200]
    refused = [r for r in responses if r.status_code != 200]
    assert ok and refused
    assert {r.status_code for r in refused} == {429}
    assert {r.json()["error"]["code"] for r in refused} == {"insufficient_quota"}
    charged = sum(r.json()["usage"]["total_tokens"] for r in ok)
    assert charged <= LIMIT
    ledger = json.loads(nodes[2].cli("keys", "usage", key).stdout)
    assert ledger["used"] == charged
    # Every node reads the same window.
    for node in nodes:
        r = httpx.get(node.base_url + "/v1/models", headers={"Authorization": f"Bearer {key}"})
        assert int(r.headers["X-RateLimit-Used-Tokens"]) == charged


def test_unreachable_store_fails_closed(tmp_path: Path) -> None:
    node = _start(tmp_path, "dead-store", f"redis://127.0.0.1:{free_port()}/0")
    try:
        node.wait_listening()
        r = httpx.post(
            node.base_url + "/v1/embeddings",
            timeout=30,
            headers={"Authorization": "Bearer sk-st-" + "a" * 38},
            json={"model": "bge-m3:latest", "input": "hej"},
        )
        assert r.status_code == 401  # a key with a bad checksum is refused without the store
        r = httpx.post(
            node.base_url + "/v1/embeddings",
            timeout=30,
            headers={"Authorization": f"Bearer {generate_key()[0]}"},
            json={"model": "bge-m3:latest", "input": "hej"},
        )
        assert r.status_code == 503
        assert r.json()["error"]["code"] == "store_unavailable"
        assert httpx.get(node.base_url + "/health/live").status_code == 200
    finally:
        node.stop()
