"""Keys, plans and metering on the real node: 401s, X-RateLimit-* headers, exact charges."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import httpx
import openai
import pytest

from node.accounts.keys import generate_key
from tests.e2e.audio_files import duration_s, speak
from tests.e2e.node_process import NodeProcess

pytestmark = pytest.mark.e2e

RATE_HEADERS = (
    "X-RateLimit-Limit-Tokens",
    "X-RateLimit-Used-Tokens",
    "X-RateLimit-Remaining-Tokens",
)
QUESTION = [{"role": "user", "content": "What is the capital of Sweden?"}]


def _headers(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def wait_used(node: NodeProcess, key: str, expected: int, timeout: float = 15) -> int:
    deadline = time.monotonic() + timeout
    while (value := node.used_tokens(key)) != expected and time.monotonic() < deadline:
        time.sleep(0.2)
    return value


@pytest.fixture
def fresh_key(node: NodeProcess) -> str:
    return node.create_key("--plan", "custom", "--limit-tokens", "100000", "--window", "hour")


def _unknown_but_well_formed() -> str:
    return generate_key()[0]


@pytest.mark.parametrize(
    "auth",
    [
        None,
        "Bearer",
        "Bearer sk-st-short",
        "Basic abc",
        "Bearer not-a-key",
        "Bearer " + _unknown_but_well_formed(),
    ],
)
def test_bad_keys_are_401_in_openai_shape(node: NodeProcess, auth: str | None) -> None:
    headers = {"Authorization": auth} if auth else {}
    for method, path in (("GET", "/v1/models"), ("POST", "/v1/chat/completions")):
        r = httpx.request(method, node.base_url + path, headers=headers, json={})
        assert r.status_code == 401
        err = r.json()["error"]
        assert err["type"] == "authentication_error" and isinstance(err["code"], str)


def test_revoked_key_is_401(node: NodeProcess) -> None:
    key = node.create_key("--plan", "hobby")
    assert httpx.get(node.base_url + "/v1/models", headers=_headers(key)).status_code == 200
    node.cli("keys", "revoke", key)
    assert httpx.get(node.base_url + "/v1/models", headers=_headers(key)).status_code == 401


def test_health_routes_need_no_key(node: NodeProcess) -> None:
    for path in ("/health", "/health/live", "/health/ready"):
        assert httpx.get(node.base_url + path).status_code == 200


def test_rate_headers_on_success_error_and_models(node: NodeProcess, fresh_key: str) -> None:
    ok = httpx.post(
        node.base_url + "/v1/chat/completions",
        headers=_headers(fresh_key),
        json={"model": "qwen3.5:9b", "messages": QUESTION, "max_tokens": 10},
        timeout=60,
    )
    missing = httpx.post(
        node.base_url + "/v1/chat/completions",
        headers=_headers(fresh_key),
        json={"model": "nope", "messages": QUESTION},
    )
    models = httpx.get(node.base_url + "/v1/models", headers=_headers(fresh_key))
    for r in (ok, missing, models):
        assert all(h in r.headers for h in RATE_HEADERS), r.headers
        assert r.headers["X-RateLimit-Limit-Tokens"] == "100000"
    assert missing.status_code == 404
    assert int(models.headers["X-RateLimit-Used-Tokens"]) == ok.json()["usage"]["total_tokens"]


def test_models_listing_costs_nothing(node: NodeProcess, fresh_key: str) -> None:
    before = node.used_tokens(fresh_key)
    for _ in range(3):
        node.used_tokens(fresh_key)
    assert node.used_tokens(fresh_key) == before == 0


def test_stream_headers_and_charge(node: NodeProcess, fresh_key: str) -> None:
    client = openai.OpenAI(api_key=fresh_key, base_url=node.base_url + "/v1", max_retries=0)
    raw = client.chat.completions.with_streaming_response.create(
        model="qwen3.5:9b",
        messages=QUESTION,
        max_tokens=20,
        stream=True,
        stream_options={"include_usage": True},
    )
    with raw as response:
        assert all(h in response.headers for h in RATE_HEADERS)
        # While streaming, the window holds the reservation: prompt + max_tokens.
        reserved = int(response.headers["X-RateLimit-Used-Tokens"])
        chunks = list(response.parse())
    usage = chunks[-1].usage
    assert usage is not None
    assert reserved == usage.prompt_tokens + 20
    assert wait_used(node, fresh_key, usage.total_tokens) == usage.total_tokens


def test_ledger_equals_the_sum_of_usage(node: NodeProcess, fresh_key: str, tmp_path: Path) -> None:
    client = openai.OpenAI(api_key=fresh_key, base_url=node.base_url + "/v1", max_retries=0)
    total = 0
    chat = client.chat.completions.create(model="qwen3.6:35b-a3b", messages=QUESTION, max_tokens=15)
    total += chat.usage.total_tokens  # type: ignore[union-attr]
    emb = client.embeddings.create(model="bge-m3:latest", input=["hej", "hej då"])
    total += emb.usage.total_tokens
    wav = speak("Good morning. The weather in Stockholm is cold today.", "en", tmp_path / "a.wav")
    with open(wav, "rb") as f:
        raw = client.audio.transcriptions.with_raw_response.create(model="whisper-1", file=f)
    charged = int(raw.headers["X-Audio-Tokens-Charged"])
    assert charged == math.ceil(round(duration_s(wav) * 100, 6))
    total += charged
    assert wait_used(node, fresh_key, total) == total


def test_stream_cut_by_client_is_charged_for_its_part(node: NodeProcess, fresh_key: str) -> None:
    body = {
        "model": "qwen3.6:35b-a3b",
        "max_tokens": 200,
        "stream": True,
        "messages": [{"role": "user", "content": "Write a long essay about Sweden."}],
    }
    with httpx.stream(
        "POST",
        node.base_url + "/v1/chat/completions",
        json=body,
        headers=_headers(fresh_key),
        timeout=60,
    ) as r:
        reserved = int(r.headers["X-RateLimit-Used-Tokens"])
        got = 0
        for line in r.iter_lines():
            if line.startswith("data: {"):
                got += 1
                assert "usage" not in json.loads(line[6:])  # not asked for: not shown
            if got >= 5:
                break
    deadline = time.monotonic() + 20
    while (now := node.used_tokens(fresh_key)) == reserved and time.monotonic() < deadline:
        time.sleep(0.2)
    prompt = reserved - 200
    assert prompt < now < reserved  # the prompt and a part of the reply, not the whole hold


def test_stream_cut_before_its_first_chunk_is_charged_its_prompt(
    node: NodeProcess, fresh_key: str
) -> None:
    """The engine took the prompt in (the hold was placed after rendering it), so a client that
    leaves before any token pays for it, as a cut non-streamed request does."""
    long_question = [{"role": "user", "content": "Sweden has many lakes. " * 300}]
    client = openai.OpenAI(api_key=fresh_key, base_url=node.base_url + "/v1")
    prompt = client.chat.completions.create(
        model="qwen3.5:9b", messages=long_question, max_tokens=1
    ).usage.prompt_tokens  # type: ignore[union-attr]
    before = node.used_tokens(fresh_key)
    body = {"model": "qwen3.5:9b", "max_tokens": 50, "stream": True, "messages": long_question}
    with httpx.stream(
        "POST", node.base_url + "/v1/chat/completions", json=body, headers=_headers(fresh_key)
    ) as r:
        reserved = int(r.headers["X-RateLimit-Used-Tokens"])  # headers only: prefill runs
    assert reserved == before + prompt + 50
    deadline = time.monotonic() + 20
    while (now := node.used_tokens(fresh_key)) == reserved and time.monotonic() < deadline:
        time.sleep(0.2)
    assert before + prompt <= now < reserved


def test_legacy_completion_cut_early_pays_every_prompt(node: NodeProcess, fresh_key: str) -> None:
    """Each chunk of a multi-prompt completion states only its own prompt's tokens; a cut
    stream still pays for both prompts, which the engine took in."""
    client = openai.OpenAI(api_key=fresh_key, base_url=node.base_url + "/v1")
    prompts = ["Sweden has many lakes. " * 40, "Norway has many fjords. " * 8]
    whole = client.completions.create(model="qwen3.5:9b", prompt=prompts, max_tokens=1)
    assert whole.usage
    before = node.used_tokens(fresh_key)
    hold = before + whole.usage.prompt_tokens + 2 * 100
    stream = client.completions.create(
        model="qwen3.5:9b", prompt=prompts, max_tokens=100, stream=True,
        extra_body={"ignore_eos": True},
    )  # fmt: skip
    seen = 0
    for chunk in stream:
        seen += len(chunk.choices)
        if seen >= 6:
            break
    stream.close()
    deadline = time.monotonic() + 20
    while (now := node.used_tokens(fresh_key)) == hold and time.monotonic() < deadline:
        time.sleep(0.2)
    assert before + whole.usage.prompt_tokens + 6 <= now < hold


def test_request_over_the_whole_limit_is_429_no_retry(node: NodeProcess) -> None:
    key = node.create_key("--plan", "custom", "--limit-tokens", "50", "--window", "hour")
    r = httpx.post(
        node.base_url + "/v1/chat/completions",
        headers=_headers(key),
        json={"model": "qwen3.5:9b", "messages": QUESTION, "max_tokens": 100},
    )
    assert r.status_code == 429
    assert r.json()["error"]["code"] == "insufficient_quota"
    assert "more than the plan's whole limit of 50 per hour" in r.json()["error"]["message"]
    assert r.headers["x-should-retry"] == "false"
    assert all(h in r.headers for h in RATE_HEADERS)
    assert node.used_tokens(key) == 0  # nothing charged for a refused request


def test_max_tokens_past_the_window_is_400_whatever_the_plan(node: NodeProcess) -> None:
    """A client's bug, not a quota matter: the doc's 400 before the plan's 429."""
    key = node.create_key("--plan", "custom", "--limit-tokens", "50", "--window", "hour")
    r = httpx.post(
        node.base_url + "/v1/chat/completions",
        headers=_headers(key),
        json={"model": "qwen3.5:9b", "messages": QUESTION, "max_tokens": 10**9},
    )
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"


def test_spent_daily_cap_is_429_with_true_retry_after(node: NodeProcess) -> None:
    key = node.create_key("--plan", "custom", "--limit-tokens", "120", "--window", "day")
    client = openai.OpenAI(api_key=key, base_url=node.base_url + "/v1", max_retries=0)
    client.chat.completions.create(model="qwen3.5:9b", messages=QUESTION, max_tokens=40)
    with pytest.raises(openai.RateLimitError) as info:
        client.chat.completions.create(model="qwen3.5:9b", messages=QUESTION, max_tokens=80)
    headers = info.value.response.headers
    assert info.value.code == "insufficient_quota"
    assert 0 < int(headers["Retry-After"]) <= 25 * 3600  # until local midnight
    assert headers["x-should-retry"] == ("false" if int(headers["Retry-After"]) > 120 else "true")


def test_request_blocked_only_by_the_keys_own_stream_is_told_to_retry_soon(
    node: NodeProcess,
) -> None:
    """A running stream holds its whole max_tokens; a second request that fits once it settles
    gets a short retry (the SDK's retry then passes), not the hour the hold could last."""
    key = node.create_key("--plan", "custom", "--limit-tokens", "1000", "--window", "hour")
    client = openai.OpenAI(api_key=key, base_url=node.base_url + "/v1", max_retries=0)
    body = {"model": "qwen3.5:9b", "max_tokens": 600, "stream": True, "messages": QUESTION}
    with httpx.stream(
        "POST", node.base_url + "/v1/chat/completions", json=body, headers=_headers(key)
    ) as running:
        held = int(running.headers["X-RateLimit-Used-Tokens"])
        with pytest.raises(openai.RateLimitError) as info:
            client.chat.completions.create(model="qwen3.5:9b", messages=QUESTION, max_tokens=350)
    headers, error = info.value.response.headers, info.value.body
    assert isinstance(error, dict) and error["code"] == "insufficient_quota"
    assert f"{held} are held by the key's request still running" in error["message"]
    assert (headers["retry-after"], headers["x-should-retry"]) == ("2", "true")
    deadline = time.monotonic() + 20
    while node.used_tokens(key) == held and time.monotonic() < deadline:
        time.sleep(0.2)  # the cut stream settles to its part
    assert node.used_tokens(key) < held
    reply = client.chat.completions.create(model="qwen3.5:9b", messages=QUESTION, max_tokens=350)
    assert reply.usage and reply.usage.completion_tokens > 0
