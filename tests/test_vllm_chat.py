"""Pure pieces of the vLLM chat engine: its serve flags, usage tracking in streams, and the
refusal of parameters vLLM would silently drop."""

from __future__ import annotations

import asyncio
import json
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest

from node.config import ModelKind, load_models
from node.engines.base import ChatProgress, UsageMeter
from node.engines.vllm_chat import (
    VllmChatEngine,
    _count_aborted_tokens,
    _parse_args,
    _Rendering,
    _rendering,
    build_or_abandon,
    engine_cli_args,
    error_from_vllm,
    refuse_loose_scalars,
    refuse_unknown_fields,
)
from node.engines.vllm_sse import UsageWish, tidy_choices, track_usage
from node.errors import InvalidRequest, invalid_from_validation

ROOT = Path(__file__).resolve().parents[1]
CHAT_YAML = """
models:
  - name: qwen3.5:9b
    kind: chat
    path: "{models_dir}/chat"
    context_window: 2048
    default_max_tokens: 256
"""


@pytest.mark.parametrize("file", ["models.yaml", "models.standin.yaml"])
def test_every_chat_model_parses_with_vllms_own_argument_parser(file: str) -> None:
    for spec in load_models((ROOT / file).read_text(), Path("/m")):
        if spec.kind is not ModelKind.CHAT:
            continue
        args = _parse_args(engine_cli_args(spec))
        assert args.max_model_len == spec.context_window
        assert args.served_model_name == spec.public_names
        assert json.loads(json.dumps(args.override_generation_config)) == {
            "max_new_tokens": spec.default_max_tokens
        }


@pytest.mark.parametrize(("avx512", "dtype"), [(True, "bfloat16"), (False, "float32")])
def test_a_cpu_without_avx512_gets_float32_unless_the_spec_says(
    monkeypatch: pytest.MonkeyPatch, avx512: bool, dtype: str
) -> None:
    import torch

    monkeypatch.setattr(torch.cpu, "_is_avx512_supported", lambda: avx512)
    (spec,) = load_models(CHAT_YAML, Path("/m"))
    assert _parse_args(engine_cli_args(spec)).dtype == dtype
    spec.engine["dtype"] = "float16"
    assert _parse_args(engine_cli_args(spec)).dtype == "float16"


def test_production_chat_models_have_tool_parsers() -> None:
    specs = load_models((ROOT / "models.yaml").read_text(), Path("/m"))
    for spec in specs:
        if spec.kind is ModelKind.CHAT:
            args = _parse_args(engine_cli_args(spec))
            assert args.enable_auto_tool_choice and args.tool_call_parser


def _chunk(obj: dict) -> str:
    """As vLLM writes them: compact JSON."""
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"


def test_usage_is_tracked_and_hidden_unless_asked() -> None:
    usage = UsageMeter()
    content = {
        "choices": [{"delta": {"content": "Hej"}}],
        "usage": {"prompt_tokens": 5, "completion_tokens": 1, "total_tokens": 6},
    }
    shown = track_usage(_chunk(content), usage, UsageWish(final=False, continuous=False))
    assert shown is not None and json.loads(shown[6:]) == {"choices": content["choices"]}
    assert usage.total == 6
    final = {
        "choices": [],
        "usage": {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7},
    }
    assert track_usage(_chunk(final), usage, UsageWish(final=False, continuous=False)) is None
    assert usage.total == 7
    assert track_usage(_chunk(final), usage, UsageWish(final=True, continuous=False))


def test_usage_kept_in_every_chunk_when_continuous_was_asked() -> None:
    usage = UsageMeter()
    content = {
        "choices": [{"delta": {"content": "x"}}],
        "usage": {"prompt_tokens": 5, "completion_tokens": 1, "total_tokens": 6},
    }
    shown = track_usage(_chunk(content), usage, UsageWish(final=True, continuous=True))
    assert shown == _chunk(content)


def test_non_usage_chunks_pass_untouched() -> None:
    done = "data: [DONE]\n\n"
    assert track_usage(done, UsageMeter(), UsageWish(False, False)) == done


def test_unknown_parameters_are_refused_by_name() -> None:
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest

    ok = {
        "model": "m",
        "messages": [],
        "temperature": 0.2,
        "user": "u",
        "logit_bias": {},
        "seed": 1,
        "max_completion_tokens": 3,
        "metadata": {"a": "b"},
    }
    refuse_unknown_fields(ok, ChatCompletionRequest)
    with pytest.raises(InvalidRequest) as info:
        refuse_unknown_fields({**ok, "modalities": ["audio"]}, ChatCompletionRequest)
    assert info.value.param == "modalities" and info.value.code == "unsupported_parameter"
    refuse_unknown_fields({**ok, "top_k": 5, "ignore_eos": True}, ChatCompletionRequest)
    for reserved in ("mm_processor_kwargs", "request_id", "chat_template", "vllm_xargs"):
        assert reserved in ChatCompletionRequest.model_fields  # known to vLLM, all the same:
        with pytest.raises(InvalidRequest) as info:
            refuse_unknown_fields({**ok, reserved: {}}, ChatCompletionRequest)
        assert info.value.param == reserved


@pytest.mark.parametrize(
    ("field", "value", "expected"),
    [
        ("stream", "yes", "expected a boolean, but got a string"),
        ("n", "2", "expected an integer, but got a string"),
        ("n", True, "expected an integer, but got a boolean"),
        ("max_tokens", 5.0, "expected an integer, but got a decimal number"),
        ("temperature", "0.5", "expected a number, but got a string"),
        ("logprobs", 1, "expected a boolean, but got an integer"),
    ],
)
def test_scalars_of_another_json_type_are_refused(field: str, value: object, expected: str) -> None:
    """vLLM's models would coerce them ("stream": "yes" streams); OpenAI answers 400."""
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest

    fine = {"stream": True, "n": 2, "max_tokens": None, "temperature": 1, "top_p": 0.5}
    refuse_loose_scalars({"model": "m", "messages": [], **fine}, ChatCompletionRequest)
    with pytest.raises(InvalidRequest) as info:
        refuse_loose_scalars({"model": "m", field: value}, ChatCompletionRequest)
    assert expected in info.value.message
    assert (info.value.param, info.value.code) == (field, "invalid_type")


@pytest.mark.parametrize(
    ("message", "param"),
    [
        ({"content": "hi"}, "messages[0].role"),
        ({"role": "user", "content": None}, "messages[0].content"),
    ],
)
def test_a_bad_message_is_named_as_openai_names_it(message: dict, param: str) -> None:
    """vLLM's message types are a union: pydantic's location names a member class, which the
    client never wrote."""
    from pydantic import ValidationError
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest

    with pytest.raises(ValidationError) as info:
        ChatCompletionRequest.model_validate({"model": "m", "messages": [message]})
    assert invalid_from_validation(info.value).param == param


def test_a_plain_vllm_message_names_its_field() -> None:
    def response(message: str, param: str | None = None) -> SimpleNamespace:
        return SimpleNamespace(error=SimpleNamespace(code=400, message=message, param=param))

    err = error_from_vllm(response("frequency_penalty must be in [-2, 2], got 3.0."))
    assert err.status == 400 and err.param == "frequency_penalty"
    assert error_from_vllm(response("top_k must be -1 (disable), or at least 1")).param == "top_k"
    assert error_from_vllm(response("Bad things happened.")).param is None
    assert error_from_vllm(response("n must be 1", param="n")).param == "n"


def test_reasoning_is_sent_under_both_names() -> None:
    chunk = {"choices": [{"delta": {"reasoning": "Hmm"}}]}
    shown = track_usage(_chunk(chunk), UsageMeter(), UsageWish(final=False, continuous=False))
    assert shown is not None
    delta = json.loads(shown[6:])["choices"][0]["delta"]
    assert delta == {"reasoning": "Hmm", "reasoning_content": "Hmm"}


def test_tool_call_deltas_name_their_function_once() -> None:
    """vLLM's later deltas of a required tool call say "name": null; OpenAI's omit it."""
    later = {
        "choices": [
            {
                "index": 0,
                "delta": {
                    "tool_calls": [{"index": 0, "function": {"name": None, "arguments": "{"}}]
                },
            }
        ],
        "usage": {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7},
    }
    shown = track_usage(_chunk(later), UsageMeter(), UsageWish(final=False, continuous=False))
    assert shown is not None
    assert json.loads(shown[6:])["choices"][0]["delta"]["tool_calls"] == [
        {"index": 0, "function": {"arguments": "{"}}
    ]


def test_a_reply_of_tool_calls_has_null_content() -> None:
    call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    choices = [
        {"message": {"role": "assistant", "content": "", "tool_calls": [call]}},
        {"message": {"role": "assistant", "content": "", "tool_calls": []}},
    ]
    tidy_choices(choices, "message")
    assert choices[0]["message"]["content"] is None
    assert choices[0]["message"]["tool_calls"][0]["function"]["name"] == "f"
    assert choices[1]["message"]["content"] == ""  # no tool call: the text stays as it was


def test_nested_usage_objects_take_the_parsed_path() -> None:
    usage = UsageMeter()
    nested = {
        "choices": [{"delta": {"content": "x"}}],
        "usage": {
            "prompt_tokens": 5,
            "completion_tokens": 1,
            "total_tokens": 6,
            "prompt_tokens_details": {"cached_tokens": 0},
        },
    }
    shown = track_usage(_chunk(nested), usage, UsageWish(final=False, continuous=False))
    assert shown is not None and "usage" not in json.loads(shown[6:])
    assert usage.total == 6


def test_a_cut_stream_with_several_choices_counts_every_choice() -> None:
    meter = UsageMeter()
    wants = UsageWish(final=False, continuous=False)
    for index, done in ((0, 3), (1, 5), (0, 4)):
        chunk = {
            "choices": [{"index": index, "delta": {"content": "x"}}],
            "usage": {"prompt_tokens": 10, "completion_tokens": done, "total_tokens": 10 + done},
        }
        track_usage(_chunk(chunk), meter, wants)
    assert meter.total == 10 + 4 + 5  # the prompt once, each choice's own count


def test_a_cut_stream_pays_at_least_every_prompt_the_engine_took_in() -> None:
    """A legacy completion's chunks state only their own prompt's size; a stream cut before
    any chunk states none. The prompts rendered before generation are the floor."""
    meter = UsageMeter(prompt_floor=250)
    assert meter.total == 250 and meter.completion == 0  # cut before the first chunk
    wants = UsageWish(final=False, continuous=False)
    for index, prompt, done in ((0, 200, 1), (1, 50, 1), (1, 50, 2)):
        chunk = {
            "choices": [{"index": index, "text": "x"}],
            "usage": {"prompt_tokens": prompt, "completion_tokens": done},
        }
        track_usage(_chunk(chunk), meter, wants)
    assert meter.total == 250 + 1 + 2 and meter.completion == 3
    final = {"choices": [], "usage": {"prompt_tokens": 260, "total_tokens": 270}}
    track_usage(_chunk(final), meter, wants)
    assert (meter.total, meter.prompt) == (270, 260)  # the engine's own final count wins


def test_stopping_cancels_the_output_handler_before_the_engine_goes() -> None:
    """Else the handler sees the engine process die during shutdown and logs an ERROR
    traceback on an ordinary stop (AsyncLLM cancels it only after the process is gone)."""

    async def scenario() -> None:
        handler = asyncio.ensure_future(asyncio.sleep(3600))  # as AsyncLLM's output_handler
        seen: list[bool] = []

        def shutdown() -> None:
            seen.append(handler.cancelling() > 0 or handler.cancelled())

        engine = VllmChatEngine(load_models(CHAT_YAML, Path("/m"))[0])
        engine._llm = SimpleNamespace(output_handler=handler, shutdown=shutdown)
        await engine.stop()
        assert seen == [True]
        await asyncio.sleep(0)  # the cancellation lands
        assert handler.cancelled()

    asyncio.run(scenario())


class _Built:
    def __init__(self) -> None:
        self.shut_down = threading.Event()

    def shutdown(self) -> None:
        self.shut_down.set()


def test_an_engine_still_building_when_the_node_stops_is_shut_down_once_built() -> None:
    """The build thread cannot be stopped: what it builds must not outlive the node's stop."""
    release, built = threading.Event(), _Built()

    def build() -> _Built:
        release.wait(5)
        return built

    async def scenario() -> None:
        loading = asyncio.ensure_future(build_or_abandon(build))
        await asyncio.sleep(0.05)
        loading.cancel()  # SIGTERM while the model loads
        with pytest.raises(asyncio.CancelledError):
            await loading
        release.set()
        assert await asyncio.to_thread(built.shut_down.wait, 5)

    asyncio.run(scenario())


def test_a_built_engine_is_returned_and_left_running() -> None:
    built = _Built()
    assert asyncio.run(build_or_abandon(lambda: built)) is built
    assert not built.shut_down.is_set()


def _state(tokens: int) -> SimpleNamespace:
    return SimpleNamespace(detokenizer=SimpleNamespace(num_output_tokens=lambda: tokens))


def test_an_aborted_reply_counts_its_tokens_into_the_requests_progress() -> None:
    """vLLM's abort drops what the frontend holds: the node counts it first, for the request
    whose task aborts (a single reply, or each choice of an n > 1 parent, finished or not)."""
    finished = SimpleNamespace(token_ids=[1, 2, 3], finished=lambda: True)
    processor = SimpleNamespace(
        request_states={"one": _state(7), "p-0": _state(4), "p-1": None},
        parent_requests={
            "p": SimpleNamespace(child_requests={"p-0"}, output_aggregator=[None, finished])
        },
        external_req_ids={"ext": ["one"]},
    )
    aborted: list[tuple[list[str], bool]] = []
    processor.abort_requests = lambda ids, internal: aborted.append((list(ids), internal))
    _count_aborted_tokens(processor)

    processor.abort_requests(iter(["one"]), True)  # no request of ours: passed on, not counted
    progress = ChatProgress()
    token = _rendering.set(_Rendering(None, None, progress=progress))
    try:
        processor.abort_requests(iter(["one"]), True)
        assert progress.generated == 7
        processor.abort_requests(["p"], True)
        assert progress.generated == 7 + 4 + 3
        processor.abort_requests(["ext"], False)
        assert progress.generated == 7 + 4 + 3 + 7
    finally:
        _rendering.reset(token)
    assert aborted == [(["one"], True), (["one"], True), (["p"], True), (["ext"], False)]
