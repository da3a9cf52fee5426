"""Models, health and the error shape of every refusal, on the real node."""

from __future__ import annotations

import httpx
import openai
import pytest

from tests.e2e.node_process import NodeProcess

pytestmark = pytest.mark.e2e

PUBLIC = {
    "gemma4:31b",
    "qwen3.6:35b-a3b",
    "qwen3.5:9b",
    "bge-m3:latest",
    "kb-whisper-large",
    "whisper-1",
}


def _assert_error_shape(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert isinstance(err["code"], str) and err["message"]
    return err


def test_models_list_has_public_names_kinds_and_states(client: openai.OpenAI) -> None:
    models = {m.id: m for m in client.models.list()}
    assert set(models) == PUBLIC
    extra = models["gemma4:31b"].model_extra or {}
    assert extra["kind"] == "chat" and extra["state"] == "ready" and extra["context_window"]
    assert (models["bge-m3:latest"].model_extra or {})["kind"] == "embedding"
    assert (models["whisper-1"].model_extra or {})["alias_of"] == "kb-whisper-large"
    assert client.models.retrieve("qwen3.5:9b").id == "qwen3.5:9b"


def test_health_routes(node: NodeProcess) -> None:
    assert httpx.get(node.base_url + "/health").json()["status"] == "ok"
    assert httpx.get(node.base_url + "/health/live").status_code == 200
    ready = httpx.get(node.base_url + "/health/ready")
    assert ready.status_code == 200
    assert set(ready.json()["models"]) == PUBLIC - {"whisper-1"}


def test_unknown_model_is_404(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "x"}])
    assert info.value.code == "model_not_found"


def test_malformed_json_is_400(node: NodeProcess, api_key: str) -> None:
    r = httpx.post(
        node.base_url + "/v1/chat/completions",
        content=b"{not json",
        headers={"Authorization": f"Bearer {api_key}", "Content-Type": "application/json"},
    )
    _assert_error_shape(r, 400)


@pytest.mark.parametrize(
    "body,param",
    [
        ({"model": "qwen3.5:9b", "messages": "hello"}, "messages"),
        ({"model": "qwen3.5:9b", "messages": []}, "messages"),
        (
            {"model": "qwen3.5:9b", "messages": [{"role": "user", "content": "x"}], "stop": ""},
            "stop",  # vLLM's "stop cannot contain an empty string" names no param itself
        ),
        (
            {
                "model": "qwen3.5:9b",
                "messages": [{"role": "user", "content": "x"}],
                "temperature": "hot",
            },
            "temperature",
        ),
        (
            {"model": "qwen3.5:9b", "messages": [{"role": "user", "content": "x"}], "stream": "1"},
            "stream",  # vLLM would coerce it (and stream); OpenAI refuses it
        ),
        ({"model": "bge-m3:latest", "input": 3.5}, "input"),
        ({"model": "bge-m3:latest", "input": "x", "encoding_format": "hex"}, "encoding_format"),
    ],
)
def test_malformed_fields_are_400_naming_the_field(
    node: NodeProcess, api_key: str, body: dict, param: str
) -> None:
    route = "/v1/embeddings" if "input" in body else "/v1/chat/completions"
    r = httpx.post(
        node.base_url + route, json=body, headers={"Authorization": f"Bearer {api_key}"}, timeout=30
    )
    err = _assert_error_shape(r, 400)
    assert err["param"] and err["param"].startswith(param)


@pytest.mark.parametrize(
    "route,raw,param",
    [
        ("/v1/embeddings", rb'{"model":"bge-m3:latest","input":["ok","\udc80x"]}', "input[1]"),
        (
            "/v1/chat/completions",
            rb'{"model":"qwen3.5:9b","messages":[{"role":"user","content":"a\ud800"}]}',
            "messages[0].content",
        ),
    ],
)
def test_an_unpaired_surrogate_is_400_not_a_tokenizer_crash(
    node: NodeProcess, api_key: str, route: str, raw: bytes, param: str
) -> None:
    """Valid JSON, but no text: a client that cut a string inside an emoji sends it."""
    r = httpx.post(
        node.base_url + route,
        content=raw,
        headers={"Authorization": f"Bearer {api_key}", "Content-Type": "application/json"},
        timeout=30,
    )
    assert _assert_error_shape(r, 400)["param"] == param
    encoded = b'{"model":"bge-m3:latest","input":"a\xed\xa0\x80"}'  # as bytes: not UTF-8
    r = httpx.post(
        node.base_url + "/v1/embeddings",
        content=encoded,
        headers={"Authorization": f"Bearer {api_key}", "Content-Type": "application/json"},
        timeout=30,
    )
    _assert_error_shape(r, 400)
    emoji = rb'{"model":"bge-m3:latest","input":"\ud83d\ude00 ok"}'  # a pair: fine
    r = httpx.post(
        node.base_url + "/v1/embeddings",
        content=emoji,
        headers={"Authorization": f"Bearer {api_key}", "Content-Type": "application/json"},
        timeout=30,
    )
    assert r.status_code == 200, r.text


def test_missing_model_is_400(node: NodeProcess, api_key: str) -> None:
    r = httpx.post(
        node.base_url + "/v1/chat/completions",
        json={"messages": []},
        headers={"Authorization": f"Bearer {api_key}"},
    )
    assert _assert_error_shape(r, 400)["param"] == "model"


def test_unknown_route_and_wrong_method(node: NodeProcess, api_key: str) -> None:
    auth = {"Authorization": f"Bearer {api_key}"}
    _assert_error_shape(httpx.get(node.base_url + "/v1/nothing", headers=auth), 404)
    wrong = httpx.get(node.base_url + "/v1/chat/completions", headers=auth)
    _assert_error_shape(wrong, 405)
    assert wrong.headers["Allow"] == "POST"
    _assert_error_shape(httpx.get(node.base_url + "/nothing"), 404)
    slash = httpx.post(node.base_url + "/v1/chat/completions/", headers=auth, json={})
    _assert_error_shape(slash, 404)  # not a redirect to http://<this host>/...


def test_json_body_over_the_cap_is_413(node: NodeProcess, api_key: str) -> None:
    auth = {"Authorization": f"Bearer {api_key}", "Content-Type": "application/json"}
    big = b'{"model": "qwen3.5:9b", "messages": [], "pad": "' + b"x" * (9 * 1024 * 1024) + b'"}'
    declared = httpx.post(
        node.base_url + "/v1/chat/completions", content=big, headers=auth, timeout=60
    )
    assert _assert_error_shape(declared, 413)["code"] == "request_too_large"

    def chunks():  # type: ignore[no-untyped-def]
        for i in range(0, len(big), 1 << 20):
            yield big[i : i + (1 << 20)]

    chunked = httpx.post(
        node.base_url + "/v1/chat/completions", content=chunks(), headers=auth, timeout=60
    )
    assert _assert_error_shape(chunked, 413)["code"] == "request_too_large"


def test_a_body_of_a_million_small_values_is_refused_before_parsing(
    node: NodeProcess, api_key: str
) -> None:
    """Parsing them would hold the event loop for everyone; no request here needs so many."""
    auth = {"Authorization": f"Bearer {api_key}", "Content-Type": "application/json"}
    values = b",".join([b"0"] * 1_000_002)
    body = b'{"model": "bge-m3:latest", "input": [' + values + b"]}"
    r = httpx.post(node.base_url + "/v1/embeddings", content=body, headers=auth, timeout=60)
    error = _assert_error_shape(r, 413)
    assert error["code"] == "request_too_large" and "commas" in error["message"]


def test_browsers_get_cors_without_a_key_for_the_preflight(node: NodeProcess, api_key: str) -> None:
    """As OpenAI's API: a web app may call the node with its bearer key, and read the
    X-RateLimit-* headers."""
    origin = {"Origin": "https://app.example"}
    preflight = httpx.options(
        node.base_url + "/v1/chat/completions",
        headers={
            **origin,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization, content-type",
        },
    )
    assert preflight.status_code == 200
    assert preflight.headers["access-control-allow-origin"] == "*"
    assert "POST" in preflight.headers["access-control-allow-methods"]
    listed = httpx.get(
        node.base_url + "/v1/models", headers={**origin, "Authorization": f"Bearer {api_key}"}
    )
    assert listed.status_code == 200 and listed.headers["access-control-allow-origin"] == "*"
    exposed = listed.headers["access-control-expose-headers"].lower()
    assert "x-ratelimit-remaining-tokens" in exposed and "x-audio-tokens-charged" in exposed
