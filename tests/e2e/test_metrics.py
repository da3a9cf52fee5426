"""GET /metrics on the real node: request durations by route and status, tokens charged,
model gauges, the event loop's lag."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import httpx
import openai
import pytest

from tests.e2e.audio_files import speak
from tests.e2e.node_process import NodeProcess

pytestmark = pytest.mark.e2e


def _count(samples: dict, route: str, status: int) -> float:
    labels = (("route", route), ("status", str(status)))
    return samples.get(("staik_request_duration_seconds_count", labels), 0.0)


def test_requests_are_counted_by_route_and_status(node: NodeProcess, client: openai.OpenAI) -> None:
    before = node.metrics()
    client.models.list()
    client.models.retrieve("qwen3.5:9b")
    for _ in range(2):  # refused before routing: labelled by the route's path all the same
        assert httpx.get(node.base_url + "/v1/models").status_code == 401
    assert httpx.get(node.base_url + "/v1/nope").status_code == 401
    after = node.metrics()

    def grew(route: str, status: int) -> float:
        return _count(after, route, status) - _count(before, route, status)

    assert grew("/v1/models", 200) == 1
    assert grew("/v1/models/{model:path}", 200) == 1
    assert grew("/v1/models", 401) == 2
    assert grew("unrouted", 401) == 1
    labels = (("route", "/v1/models"), ("status", "200"))
    assert after[("staik_request_duration_seconds_sum", labels)] > 0


def test_error_answers_are_counted_by_their_code(node: NodeProcess, api_key: str) -> None:
    """A 429 for a spent plan and a 429 for busy slots mean different things to an operator:
    each error answer counts under its code, whichever layer of the node gave it."""
    chat = "/v1/chat/completions"
    small = node.create_key("--plan", "custom", "--limit-tokens", "50", "--window", "hour")
    question = [{"role": "user", "content": "Hej"}]
    before = node.metrics()
    for key, body in (
        (small, {"model": "qwen3.5:9b", "messages": question, "max_tokens": 100}),
        (api_key, {"model": "no-such-model", "messages": question}),
        ("sk-st-nonsense", {"model": "qwen3.5:9b", "messages": question}),
    ):
        httpx.post(node.base_url + chat, json=body, headers={"Authorization": f"Bearer {key}"})
    after = node.metrics()

    def grew(status: int, code: str) -> float:
        labels = (("code", code), ("route", chat), ("status", str(status)))
        sample = ("staik_errors_total", labels)
        return after.get(sample, 0.0) - before.get(sample, 0.0)

    assert grew(429, "insufficient_quota") == 1
    assert grew(429, "model_busy") == 0
    assert grew(404, "model_not_found") == 1
    assert grew(401, "invalid_api_key") == 1


def test_a_client_hanging_up_mid_body_is_a_499_not_a_500(node: NodeProcess, api_key: str) -> None:
    """Its doing, not the server's: no 5xx for an operator's alerts, no error traceback."""
    route = "/v1/embeddings"
    before = node.metrics()
    host, port = node.base_url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as conn:
        conn.sendall(
            f"POST {route} HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {api_key}\r\n"
            "Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n"
            '{"model": "bge-m3:latest", "input": "half'.encode()
        )
        time.sleep(0.5)
    deadline = time.monotonic() + 10
    while _count(node.metrics(), route, 499) == _count(before, route, 499):
        assert time.monotonic() < deadline, "the hang-up was never counted"
        time.sleep(0.2)
    assert _count(node.metrics(), route, 500) == _count(before, route, 500)


def test_models_report_state_and_slots(node: NodeProcess) -> None:
    samples = node.metrics()
    ready = (("model", "bge-m3:latest"), ("state", "ready"))
    loading = (("model", "bge-m3:latest"), ("state", "loading"))
    assert samples[("staik_model_state", ready)] == 1
    assert samples[("staik_model_state", loading)] == 0
    assert samples[("staik_slots", (("model", "qwen3.5:9b"),))] >= 1
    assert samples[("staik_slots_in_use", (("model", "qwen3.5:9b"),))] == 0
    assert ("staik_model_restarts_total", (("model", "gemma4:31b"),)) in samples


def test_tokens_charged_are_counted_by_model_and_type(
    node: NodeProcess, client: openai.OpenAI, tmp_path: Path
) -> None:
    """What each request was charged shows per model: a chat reply and a stream as prompt
    and completion tokens, embeddings as input tokens, a transcription as audio tokens."""

    def charged(samples: dict, model: str, kind: str) -> float:
        return samples.get(("staik_tokens_charged_total", (("model", model), ("type", kind))), 0)

    before = node.metrics()
    reply = client.chat.completions.create(
        model="qwen3.5:9b", messages=[{"role": "user", "content": "Hej!"}], max_tokens=5
    )
    stream = client.chat.completions.create(
        model="qwen3.5:9b",
        messages=[{"role": "user", "content": "Hej igen!"}],
        max_tokens=5,
        stream=True,
        stream_options={"include_usage": True},
    )
    streamed = [c.usage for c in stream if c.usage is not None][-1]
    vectors = client.embeddings.create(model="bge-m3:latest", input=["en", "två ord"])
    wav = speak("Hello from Stockholm.", "en", tmp_path / "hello.wav")
    with open(wav, "rb") as f:
        heard = client.audio.transcriptions.with_raw_response.create(model="whisper-1", file=f)
    after = node.metrics()

    def grew(model: str, kind: str) -> float:
        return charged(after, model, kind) - charged(before, model, kind)

    assert reply.usage is not None
    assert grew("qwen3.5:9b", "prompt") == reply.usage.prompt_tokens + streamed.prompt_tokens
    assert grew("qwen3.5:9b", "completion") == (
        reply.usage.completion_tokens + streamed.completion_tokens
    )
    assert grew("bge-m3:latest", "input") == vectors.usage.prompt_tokens
    assert grew("kb-whisper-large", "audio") == int(heard.headers["X-Audio-Tokens-Charged"])


def test_the_event_loops_lag_is_watched_all_along(node: NodeProcess) -> None:
    """A wake-up every 0.1 s, each one's lateness in the histogram."""
    count = ("staik_event_loop_lag_seconds_count", ())
    before = node.metrics()[count]
    time.sleep(1.0)  # 10 wake-ups due; a busy machine may delay a few
    after = node.metrics()
    assert after[count] - before >= 3
    assert after[("staik_event_loop_lag_seconds_sum", ())] >= 0
    assert after[("staik_event_loop_lag_seconds_bucket", (("le", "+Inf"),))] == after[count]
