"""Chat completions on the real vLLM stand-in engines, through the official openai SDK."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from tests.e2e.node_process import NodeProcess

pytestmark = pytest.mark.e2e

CHAT_MODELS = ["qwen3.6:35b-a3b", "qwen3.5:9b", "gemma4:31b"]
LONG_ESSAY = "Write a long, detailed essay about the history of Sweden, at least 2000 words."
QUESTION = [{"role": "user", "content": "What is the capital of Sweden?"}]


@pytest.mark.parametrize("model", CHAT_MODELS)
def test_chat_answers_with_real_model_text(client: openai.OpenAI, model: str) -> None:
    reply = client.chat.completions.create(
        model=model, messages=QUESTION, temperature=0, max_tokens=30
    )
    assert "Stockholm" in (reply.choices[0].message.content or "")
    assert reply.model == model
    usage = reply.usage
    assert usage and usage.prompt_tokens > 5 and usage.completion_tokens > 0
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


def test_two_engines_answer_at_the_same_time(client: openai.OpenAI) -> None:
    def ask(model: str) -> str:
        r = client.chat.completions.create(
            model=model, messages=QUESTION, temperature=0, max_tokens=30
        )
        return r.choices[0].message.content or ""

    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(ask, ["qwen3.6:35b-a3b", "qwen3.5:9b"] * 2))
    assert all("Stockholm" in a for a in answers)


def test_stream_carries_text_and_usage_chunk(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model="qwen3.5:9b",
        messages=QUESTION,
        temperature=0,
        max_tokens=30,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert "Stockholm" in text
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0
    assert all(c.usage is None for c in chunks[:-1])


def test_stream_without_include_usage_has_no_usage(client: openai.OpenAI) -> None:
    chunks = list(
        client.chat.completions.create(
            model="qwen3.5:9b", messages=QUESTION, temperature=0, max_tokens=10, stream=True
        )
    )
    assert chunks and all(c.usage is None for c in chunks)


def test_raw_stream_ends_with_done(node: NodeProcess, api_key: str) -> None:
    with httpx.stream(
        "POST",
        node.base_url + "/v1/chat/completions",
        headers={"Authorization": f"Bearer {api_key}"},
        json={"model": "qwen3.5:9b", "messages": QUESTION, "max_tokens": 8, "stream": True},
        timeout=60,
    ) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"


def test_prompt_plus_max_tokens_above_window_is_400_naming_both(client: openai.OpenAI) -> None:
    window = 8192
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(
            model="qwen3.5:9b", messages=QUESTION, max_tokens=window - 10
        )
    err = info.value
    assert err.code == "context_length_exceeded"
    message = str(err.body["message"])  # type: ignore[index]
    assert str(window) in message and str(window - 10) in message and "prompt" in message
    assert err.param == "max_tokens"
    with pytest.raises(openai.BadRequestError) as info:  # errors name the field that was sent
        client.chat.completions.create(
            model="qwen3.5:9b", messages=QUESTION, max_completion_tokens=window - 10
        )
    assert info.value.param == "max_completion_tokens"
    assert "max_completion_tokens asks for" in str(info.value.body["message"])  # type: ignore[index]


def test_stream_options_without_stream_is_400_naming_it(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(
            model="qwen3.5:9b",
            messages=QUESTION,
            max_tokens=3,
            stream_options={"include_usage": True},
        )
    assert info.value.param == "stream_options"


def test_max_tokens_alone_above_window_is_400(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="gemma4:31b", messages=QUESTION, max_tokens=100_000)
    assert info.value.code == "context_length_exceeded"
    assert "4096" in str(info.value.body["message"])  # type: ignore[index]


def test_omitted_max_tokens_uses_the_models_default(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(
        model="qwen3.6:35b-a3b",
        messages=[{"role": "user", "content": LONG_ESSAY}],
        temperature=0,
    )
    usage = reply.usage
    assert usage is not None
    assert usage.completion_tokens == 256  # default_max_tokens in models.standin.yaml
    assert reply.choices[0].finish_reason == "length"


def test_explicit_max_tokens_above_the_default_is_honoured(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(
        model="qwen3.6:35b-a3b",
        messages=QUESTION,
        max_tokens=300,
        extra_body={"ignore_eos": True},
    )
    assert reply.usage is not None and reply.usage.completion_tokens == 300  # default is 256
