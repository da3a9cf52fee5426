"""What apps and agents send: tools, structured output, the SDK's sampling parameters, and
parameters the node refuses by name, on the real vLLM stand-ins."""

from __future__ import annotations

import json

import jsonschema
import openai
import pytest

pytestmark = pytest.mark.e2e

MODEL = "qwen3.6:35b-a3b"
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather for a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "unit": {"enum": ["C", "F"]}},
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}
ASK = [{"role": "user", "content": "What is the weather in Stockholm?"}]
PARAMS = WEATHER["function"]["parameters"]


@pytest.mark.parametrize(
    "choice", ["required", {"type": "function", "function": {"name": "get_weather"}}]
)
def test_forced_tool_call_parses_against_its_schema(client: openai.OpenAI, choice: object) -> None:
    reply = client.chat.completions.create(
        model=MODEL, messages=ASK, tools=[WEATHER], tool_choice=choice, max_tokens=60, temperature=0
    )
    calls = reply.choices[0].message.tool_calls
    assert calls and calls[0].function.name == "get_weather"
    jsonschema.validate(json.loads(calls[0].function.arguments), PARAMS)


def test_forced_tool_call_streams_as_deltas(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model=MODEL,
        messages=ASK,
        tools=[WEATHER],
        tool_choice="required",
        max_tokens=60,
        temperature=0,
        stream=True,
    )
    name, args = "", ""
    for chunk in stream:
        for call in (chunk.choices[0].delta.tool_calls or []) if chunk.choices else []:
            name += call.function.name or "" if call.function else ""
            args += call.function.arguments or "" if call.function else ""
    assert name == "get_weather"
    jsonschema.validate(json.loads(args), PARAMS)


def test_tool_choice_none_answers_in_text(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(
        model=MODEL, messages=ASK, tools=[WEATHER], tool_choice="none", max_tokens=20
    )
    assert not reply.choices[0].message.tool_calls
    assert reply.choices[0].message.content


def test_json_schema_strict_answer_validates(client: openai.OpenAI) -> None:
    schema = {
        "type": "object",
        "properties": {"capital": {"type": "string"}, "population": {"type": "integer"}},
        "required": ["capital", "population"],
        "additionalProperties": False,
    }
    reply = client.chat.completions.create(
        model=MODEL,
        max_tokens=80,
        temperature=0,
        messages=[{"role": "user", "content": "Give Sweden's capital and its population."}],
        response_format={
            "type": "json_schema",
            "json_schema": {"name": "city", "schema": schema, "strict": True},
        },
    )
    jsonschema.validate(json.loads(reply.choices[0].message.content or ""), schema)


def test_json_object_answer_parses(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(
        model=MODEL,
        max_tokens=200,
        temperature=0,
        response_format={"type": "json_object"},
        messages=[{"role": "user", "content": 'Reply with a JSON object like {"city": "..."}'}],
    )
    assert reply.choices[0].finish_reason == "stop"
    assert isinstance(json.loads(reply.choices[0].message.content or ""), dict)


def test_sdk_sampling_parameters_take_effect(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(
        model=MODEL,
        messages=ASK,
        n=2,
        seed=3,
        temperature=0.7,
        top_p=0.9,
        presence_penalty=0.1,
        frequency_penalty=0.1,
        logprobs=True,
        top_logprobs=2,
        logit_bias={"42": -100},
        user="e2e",
        max_completion_tokens=5,
    )
    assert len(reply.choices) == 2
    assert all(c.logprobs and c.logprobs.content for c in reply.choices)
    assert len(reply.choices[0].logprobs.content[0].top_logprobs) == 2  # type: ignore[union-attr]
    assert reply.usage and reply.usage.completion_tokens <= 10


@pytest.mark.parametrize("stream", [False, True])
def test_top_logprobs_are_the_k_most_likely_most_likely_first(
    client: openai.OpenAI, stream: bool
) -> None:
    """Sampled at temperature 1.5, some tokens are not among the 5 most likely: they must
    not take the place of the 5th (vLLM listed the sampled token first)."""
    asked = dict(
        model=MODEL, messages=ASK, max_tokens=16, seed=1, temperature=1.5,
        logprobs=True, top_logprobs=5, extra_body={"ignore_eos": True},
    )  # fmt: skip
    if stream:
        chunks = client.chat.completions.create(**asked, stream=True)  # type: ignore[call-overload]
        steps = [t for c in chunks if c.choices and c.choices[0].logprobs
                 for t in c.choices[0].logprobs.content or []]  # fmt: skip
    else:
        reply = client.chat.completions.create(**asked)  # type: ignore[call-overload]
        steps = reply.choices[0].logprobs.content
    assert len(steps) == 16
    outside = 0
    for step in steps:
        top = [t.logprob for t in step.top_logprobs]
        assert len(top) == 5 and top == sorted(top, reverse=True), step
        if step.token not in [t.token for t in step.top_logprobs]:
            outside += 1
            assert step.logprob <= top[-1], step
    assert outside > 0  # the case that matters did occur


def test_n_greedy_choices_at_temperature_0(client: openai.OpenAI) -> None:
    """OpenAI answers n > 1 at temperature 0 (vLLM refused it): n copies of the greedy reply."""
    alone = client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=8, temperature=0)
    reply = client.chat.completions.create(
        model=MODEL, messages=ASK, max_tokens=8, temperature=0, n=3
    )
    texts = {c.message.content for c in reply.choices}
    assert len(reply.choices) == 3 and texts == {alone.choices[0].message.content}


def test_stop_sequence_stops(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(
        model=MODEL,
        temperature=0,
        max_tokens=30,
        stop=["Stockholm"],
        messages=[{"role": "user", "content": "What is the capital of Sweden?"}],
    )
    assert "Stockholm" not in (reply.choices[0].message.content or "")
    assert reply.choices[0].finish_reason == "stop"


THINKER = "qwen3.5:9b"  # its stand-in's template opens <think> when enable_thinking is on
SWEDEN = [{"role": "user", "content": "What is the capital of Sweden?"}]


def _thinking(on: bool) -> dict:
    return {"chat_template_kwargs": {"enable_thinking": on}}


def test_reasoning_is_returned_separately_and_can_be_turned_off(client: openai.OpenAI) -> None:
    on = client.chat.completions.create(
        model=THINKER, messages=SWEDEN, max_tokens=30, temperature=0, extra_body=_thinking(True)
    )
    message = on.choices[0].message
    extra = message.model_extra or {}
    assert "Stockholm" in extra["reasoning_content"]
    assert extra["reasoning"] == extra["reasoning_content"]
    assert not message.content
    off = client.chat.completions.create(
        model=THINKER, messages=SWEDEN, max_tokens=30, temperature=0, extra_body=_thinking(False)
    )
    assert "Stockholm" in (off.choices[0].message.content or "")
    assert not (off.choices[0].message.model_extra or {}).get("reasoning_content")


def test_reasoning_streams_as_deltas(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model=THINKER,
        messages=SWEDEN,
        max_tokens=30,
        temperature=0,
        stream=True,
        extra_body=_thinking(True),
    )
    deltas = [c.choices[0].delta for c in stream if c.choices]
    thinking = "".join((d.model_extra or {}).get("reasoning_content") or "" for d in deltas)
    newer = "".join((d.model_extra or {}).get("reasoning") or "" for d in deltas)
    assert "Stockholm" in thinking and thinking == newer


@pytest.mark.parametrize(
    "param,value",
    [
        ("modalities", ["text", "audio"]),
        ("audio", {"voice": "alloy", "format": "wav"}),
        ("prediction", {"type": "content", "content": "x"}),
        ("web_search_options", {}),
    ],
)
def test_unsupported_parameters_are_400_by_name(
    client: openai.OpenAI, param: str, value: object
) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(
            model=MODEL, messages=ASK, max_tokens=5, extra_body={param: value}
        )
    assert info.value.code == "unsupported_parameter"
    assert info.value.param == param


@pytest.mark.parametrize(
    ("part", "code", "param"),
    [
        ({"type": "text"}, "missing_required_parameter", "messages[0].content[0].text"),
        ({"type": "text", "text": 5}, "invalid_type", "messages[0].content[0].text"),
        ({"type": "image", "image": "x"}, "invalid_value", "messages[0].content[0].type"),
    ],
)
def test_a_bad_content_part_is_400_naming_it(
    client: openai.OpenAI, part: dict, code: str, param: str
) -> None:
    messages = [{"role": "user", "content": [part]}]
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=MODEL, messages=messages, max_tokens=5)  # type: ignore[arg-type]
    assert (info.value.code, info.value.param) == (code, param)


def test_messages_openai_refuses_are_400_naming_the_field(client: openai.OpenAI) -> None:
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}
    cases = [  # images only from the user; a tool reply names its call
        ([{"role": "system", "content": [image]}, *ASK], "messages[0].content[0].type"),
        ([*ASK, {"role": "assistant", "content": [image]}], "messages[1].content[0].type"),
        ([*ASK, {"role": "tool", "content": "42"}], "messages[1].tool_call_id"),
    ]
    for messages, param in cases:
        with pytest.raises(openai.BadRequestError) as info:
            client.chat.completions.create(model="gemma4:31b", messages=messages, max_tokens=5)  # type: ignore[arg-type]
        assert info.value.param == param
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(
            model=MODEL, messages=ASK, max_tokens=5, parallel_tool_calls=False
        )
    assert info.value.param == "parallel_tool_calls"


def test_vllm_fields_the_node_keeps_for_itself_are_refused(client: openai.OpenAI) -> None:
    for field, value in (("mm_processor_kwargs", {"size": 10**6}), ("request_id", "x")):
        with pytest.raises(openai.BadRequestError) as info:
            client.chat.completions.create(
                model=MODEL, messages=ASK, max_tokens=5, extra_body={field: value}
            )
        assert (info.value.code, info.value.param) == ("unsupported_parameter", field)


def test_a_logit_bias_outside_openais_range_is_400(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(
            model=MODEL, messages=ASK, max_tokens=5, logit_bias={"42": 200}
        )
    assert (info.value.code, info.value.param) == ("invalid_value", "logit_bias")
    reply = client.chat.completions.create(
        model=MODEL, messages=ASK, max_tokens=5, logit_bias={"42": -100}
    )
    assert reply.choices[0].message.content is not None


def test_a_role_openai_does_not_define_is_400_by_position(client: openai.OpenAI) -> None:
    messages = [*ASK, {"role": "assistant", "content": "Let me check."}]
    messages.append({"role": "wizard", "content": "It snows."})
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=MODEL, messages=messages, max_tokens=5)  # type: ignore[arg-type]
    assert info.value.code == "invalid_value"
    assert info.value.param == "messages[2].role"
    assert "'wizard'" in info.value.message
    developer = [{"role": "developer", "content": "Answer briefly."}, *ASK]
    reply = client.chat.completions.create(model=MODEL, messages=developer, max_tokens=5)  # type: ignore[arg-type]
    assert reply.choices[0].message.content


def test_an_out_of_range_sampling_parameter_is_400_naming_it(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=1, frequency_penalty=3)
    assert info.value.param == "frequency_penalty"


def test_more_than_128_choices_is_400(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=1, n=129)
    assert info.value.param == "n"
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=MODEL, prompt="Hej", max_tokens=1, n=129)
    assert info.value.param == "n"


def test_legacy_completions(client: openai.OpenAI) -> None:
    reply = client.completions.create(
        model=MODEL, prompt="The capital of Sweden is", max_tokens=8, temperature=0
    )
    assert reply.choices[0].text and reply.usage and reply.usage.completion_tokens > 0
    chunks = list(
        client.completions.create(
            model=MODEL,
            prompt="The capital of Sweden is",
            max_tokens=8,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert "".join(c.choices[0].text for c in chunks if c.choices) == reply.choices[0].text
    assert chunks[-1].usage and chunks[-1].usage.total_tokens == reply.usage.total_tokens


def test_legacy_completions_default_to_the_models_max_tokens(client: openai.OpenAI) -> None:
    """Not vLLM's legacy default of 16: a request without max_tokens gets the model's default,
    as on chat (read until the 17th token, then cut)."""
    stream = client.completions.create(
        model=MODEL, prompt="Once upon a time", stream=True,
        stream_options={"include_usage": True, "continuous_usage_stats": True},
        extra_body={"ignore_eos": True},
    )  # fmt: skip
    made = 0
    for chunk in stream:
        made = chunk.usage.completion_tokens if chunk.usage else made
        if made > 16 or any(c.finish_reason for c in chunk.choices):
            break
    stream.close()
    assert made > 16


def test_legacy_completions_window_check(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=MODEL, prompt="Hello there, how are you?", max_tokens=8191)
    assert info.value.code == "context_length_exceeded"
