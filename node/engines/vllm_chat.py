"""Chat through vLLM in-process: an AsyncLLM engine plus vLLM's own OpenAI serving objects.

The node reuses vLLM's chat layer (templates, sampling parameters, SSE chunks, usage) and owns
everything around it. The engine core runs in a child process that vLLM spawns; the AsyncLLM
client lives in the node's event loop.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import math
import re
import threading
import typing
from collections.abc import AsyncIterator, Callable
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

from node.config import ModelSpec
from node.engines.base import ChatProgress, ChatResult, EngineDead, PromptHook
from node.engines.vllm_sse import UsageWish, tidy_choices, track_usage
from node.errors import (
    ContextLengthExceeded,
    EngineError,
    InvalidRequest,
    NodeError,
    invalid_from_validation,
)

log = logging.getLogger(__name__)


@dataclass
class _Rendering:
    """One request as the render step (which vLLM runs inside our call) needs to know it."""

    asked: int | None
    """max_completion_tokens or max_tokens as the client sent it; None if it sent neither
    (vLLM's parsed request holds a default then: 16 on legacy completions)."""
    on_prompt: PromptHook | None
    field: str = "max_tokens"
    """The parameter that carried ``asked``, as errors name it."""
    prompt: int = 0
    """Set by the render step: the tokens of every prompt the engine will take in."""
    progress: ChatProgress | None = None
    """Where the tokens of replies vLLM aborts (the client left) are counted."""


_rendering: ContextVar[_Rendering | None] = ContextVar("rendering", default=None)


def engine_cli_args(spec: ModelSpec) -> list[str]:
    """vLLM serve flags for one model: the spec's fixed fields, then its ``engine:`` mapping
    (a dtype the mapping leaves out is chosen for the CPU, see ``cpu_dtype``)."""
    engine = dict(spec.engine)
    if "dtype" not in engine:
        engine["dtype"] = cpu_dtype()
    args = [
        "--model",
        spec.path,
        "--served-model-name",
        *spec.public_names,
        "--max-model-len",
        str(spec.context_window),
        "--override-generation-config",
        json.dumps({"max_new_tokens": spec.default_max_tokens}),
        "--disable-log-stats",
    ]
    for key, value in engine.items():
        flag = "--" + key.replace("_", "-")
        if value is True:
            args.append(flag)
        elif value is False or value is None:
            continue
        elif isinstance(value, dict | list):
            args += [flag, json.dumps(value)]
        else:
            args += [flag, str(value)]
    return args


def cpu_dtype() -> str | None:
    """On vLLM's x86 CPU backend, bfloat16 where the CPU has AVX-512 (vLLM's bfloat16 kernels
    need it), else float32: on AVX2 bfloat16 is emulated, several times slower (an AVX2 EPYC
    here: prefill 4.4x, 8-sequence decode 3.3x slower than float32). None elsewhere (a GPU):
    vLLM's own choice."""
    import torch
    from vllm.platforms import CpuArchEnum, current_platform

    if not current_platform.is_cpu() or current_platform.get_cpu_architecture() != CpuArchEnum.X86:
        return None
    return "bfloat16" if torch.cpu._is_avx512_supported() else "float32"


def _parse_args(cli: list[str]) -> Any:
    from vllm.entrypoints.launchers.cli_args import make_arg_parser, validate_parsed_serve_args
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = make_arg_parser(FlexibleArgumentParser(prog="staik-node"))
    args = parser.parse_args(cli)
    validate_parsed_serve_args(args)
    return args


class VllmChatEngine:
    """One AsyncLLM engine serving one public chat model (and its aliases)."""

    def __init__(self, spec: ModelSpec) -> None:
        self.spec = spec
        self._llm: Any = None
        self._chat: Any = None
        self._completion: Any = None

    async def start(self) -> None:
        from starlette.datastructures import State
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.entrypoints.launchers.api_server.app_state import init_app_state
        from vllm.usage.usage_lib import UsageContext
        from vllm.v1.engine.async_llm import AsyncLLM

        args = _parse_args(engine_cli_args(self.spec))
        engine_args = AsyncEngineArgs.from_cli_args(args)

        def build() -> Any:
            # Blocking (it spawns the engine core and waits for it): kept off the event loop so
            # the HTTP server answers 503 while the model loads.
            config = engine_args.create_engine_config(usage_context=UsageContext.OPENAI_API_SERVER)
            return AsyncLLM.from_vllm_config(
                vllm_config=config,
                usage_context=UsageContext.OPENAI_API_SERVER,
                enable_log_requests=False,
                disable_log_stats=True,
            )

        self._llm = await build_or_abandon(build)
        _count_aborted_tokens(self._llm.output_processor)
        await self._llm.reset_mm_cache()
        state = State()
        await init_app_state(self._llm, state, args, await self._llm.get_supported_tasks())
        self._chat = state.openai_serving_chat
        self._completion = state.openai_serving_completion
        for serving in (self._chat, self._completion):
            # vLLM reads --override-generation-config max_new_tokens as a cap on every request;
            # the node means it as the default when a request omits max_tokens (which
            # default_sampling_params still carries), so lift the cap.
            serving.override_max_tokens = None
        _rank_top_logprobs(self._chat)
        self._guard_context_window(self._chat, "render_chat_request")
        self._guard_context_window(self._completion, "render_completion_request")

    def _guard_context_window(self, serving: Any, method: str) -> None:
        """Check each rendered prompt before generation: the window, then the request's hook.

        vLLM refuses a prompt longer than the window but shortens an oversized max_tokens; the
        API doc promises a 400 naming both numbers. The check runs on vLLM's own rendering, so
        the prompt length is the one the engine will see (template and image tokens included),
        and the hook (quota reservation) learns the true prompt size before any token is made.
        """
        render = getattr(serving, method)
        window = self.spec.context_window
        default = self.spec.default_max_tokens or window

        async def checked_render(request: Any) -> Any:
            result = await render(request)
            # chat renders (conversation, inputs); completions render the inputs alone
            inputs = result[1] if isinstance(result, tuple) else result
            rendering = _rendering.get()
            if not isinstance(inputs, list) or rendering is None:
                return result  # an ErrorResponse (vLLM reports it), or not one of our calls
            requested, field = rendering.asked, rendering.field
            prompts = [serving._extract_prompt_len(i) for i in inputs]
            prompt = max(prompts, default=0)
            if requested is not None and prompt + requested > window:
                raise ContextLengthExceeded(
                    f"This model's context window is {window} tokens; the prompt has {prompt} "
                    f"tokens and {field} asks for {requested} ({prompt} + {requested} = "
                    f"{prompt + requested} > {window}). Shorten the prompt or lower {field}.",
                    param=field,
                )
            if requested is None and request.max_tokens is not None:
                # vLLM's own default (16 on legacy completions), not the client's: the node's
                # default applies, as on chat; vLLM clamps it to each prompt's room.
                request.max_tokens = default
            rendering.prompt = sum(prompts)
            if rendering.on_prompt is not None:
                n = request.n or 1
                budget = sum(
                    (requested if requested is not None else min(default, window - p)) * n
                    for p in prompts
                )
                await rendering.on_prompt(rendering.prompt, budget)
            return result

        setattr(serving, method, checked_render)

    @property
    def dead(self) -> bool:
        return self._llm is not None and bool(getattr(self._llm, "errored", False))

    @property
    def running_requests(self) -> int:
        """Requests the engine is still working on (aborted ones leave this count)."""
        return 0 if self._llm is None else self._llm.output_processor.get_num_unfinished_requests()

    @property
    def pids(self) -> list[int]:
        """The engine core process(es), for operators (and the restart test)."""
        try:
            manager = self._llm.engine_core.resources.engine_manager
            return [p.pid for p in manager.processes if p.pid]
        except AttributeError:
            return []

    async def chat(
        self,
        body: dict[str, Any],
        on_prompt: PromptHook | None = None,
        progress: ChatProgress | None = None,
    ) -> ChatResult:
        from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest

        create = self._chat.create_chat_completion
        return await self._run(ChatCompletionRequest, body, on_prompt, progress, create)

    async def complete(
        self,
        body: dict[str, Any],
        on_prompt: PromptHook | None = None,
        progress: ChatProgress | None = None,
    ) -> ChatResult:
        """Legacy text completions (POST /v1/completions) on the same engine."""
        from vllm.entrypoints.openai.completion.protocol import CompletionRequest

        create = self._completion.create_completion
        return await self._run(CompletionRequest, body, on_prompt, progress, create)

    async def _run(
        self,
        model: Any,
        body: dict[str, Any],
        on_prompt: PromptHook | None,
        progress: ChatProgress | None,
        create: Any,
    ) -> ChatResult:
        from pydantic import ValidationError
        from vllm.entrypoints.openai.chat_completion.protocol import StreamOptions
        from vllm.entrypoints.serve.engine.protocol import ErrorResponse
        from vllm.exceptions import VLLMClientError

        refuse_unknown_fields(body, model)
        refuse_loose_scalars(body, model)
        try:
            request = model.model_validate(body)
        except ValidationError as exc:
            raise invalid_from_validation(exc) from None
        except VLLMClientError as exc:
            # vLLM's validators reject a client's bad combination of fields (e.g. stream_options
            # without stream) with these, naming the field: a 400, never a 500.
            raise self._translate(exc) from None
        except (ValueError, TypeError, AttributeError, KeyError) as exc:
            # Older validators raise plain exceptions for the same: a 400 too.
            raise InvalidRequest(f"Invalid request: {exc}", param=_field_named(str(exc))) from None
        if (request.n or 1) > 1 and request.temperature is not None and request.temperature < 1e-5:
            # OpenAI gives n greedy choices; vLLM refuses n > 1 with greedy sampling (below its
            # 1e-5). Sampling from the single most likely token is greedy by another name.
            request.temperature, request.top_k = 1.0, 1
        wants_usage = UsageWish.of(request)
        if request.stream:
            # Usage in every chunk, so a stream cut short still knows what it produced; the
            # node strips what the client did not ask for.
            request.stream_options = StreamOptions(include_usage=True, continuous_usage_stats=True)
        # max_tokens past the window was refused by the route (refuse_max_tokens_past_window)
        requested = asked_max_tokens(body)
        rendering = _Rendering(
            requested, on_prompt, field=max_tokens_field(body), progress=progress
        )
        token = _rendering.set(rendering)
        try:
            result = await create(request, None)
        except NodeError:
            raise
        except Exception as exc:
            raise self._translate(exc) from exc
        finally:
            _rendering.reset(token)
        if isinstance(result, ErrorResponse):
            raise error_from_vllm(result)
        if hasattr(result, "model_dump"):
            body_out = result.model_dump()  # nulls kept, as `vllm serve` and OpenAI send them
            if any(c.get("finish_reason") == "abort" for c in body_out.get("choices") or []):
                raise await self._aborted()
            tidy_choices(body_out.get("choices") or [], "message")
            out = ChatResult(body=body_out)
            out.usage.record(body_out.get("usage") or {}, None)
            return out
        out = ChatResult()
        out.usage.prompt_floor = rendering.prompt
        out.stream = self._guard_stream(result, out, wants_usage)
        return out

    async def _guard_stream(
        self, chunks: AsyncIterator[str], out: ChatResult, wants: UsageWish
    ) -> AsyncIterator[str]:
        """vLLM's SSE strings, with usage tracked into ``out`` and shown as the client asked.

        An engine death mid-stream surfaces as EngineDead.
        """
        try:
            async for chunk in chunks:
                if chunk.startswith('data: {"error"'):
                    # vLLM catches failures inside its generator and sends them as an event
                    # with an integer code; the node re-raises them in its own shape.
                    raise self._stream_error(json.loads(chunk[6:])["error"])
                if '"finish_reason":"abort"' in chunk:
                    # The engine aborted the request itself (its core died and vLLM cleaned
                    # up); a client's abort closes this generator instead, so never gets here.
                    raise await self._aborted()
                shown = track_usage(chunk, out.usage, wants)
                if shown:
                    yield shown
        except NodeError:
            raise
        except Exception as exc:
            raise self._translate(exc) from exc
        finally:
            await _aclose(chunks)

    async def _aborted(self) -> NodeError:
        """The error for a request the engine aborted: engine death, once vLLM has noticed."""
        for _ in range(20):
            if self.dead:
                return EngineDead(f"The engine of {self.spec.name} stopped; it is being restarted.")
            await asyncio.sleep(0.05)
        log.error("engine %s aborted a request", self.spec.name)
        return EngineError("The engine aborted the request.")

    def _stream_error(self, err: dict[str, Any]) -> NodeError:
        status = int(err.get("code") or 500) if str(err.get("code", "")).isdigit() else 500
        message = str(err.get("message", ""))
        if self.dead or "EngineCore" in message or "EngineDead" in message:
            return EngineDead(f"The engine of {self.spec.name} stopped; it is being restarted.")
        if 400 <= status < 500:
            return InvalidRequest(message, param=err.get("param"))
        log.error("engine %s failed mid-stream: %s", self.spec.name, message)
        return EngineError("Generation failed inside the engine.")

    def _translate(self, exc: Exception) -> NodeError:
        """vLLM's own classification of an exception (client 4xx or server 5xx), as NodeError."""
        from vllm.entrypoints.serve.exception_handling.error_response import create_error_response
        from vllm.v1.engine.exceptions import EngineDeadError

        if self.dead or isinstance(exc, EngineDeadError):
            return EngineDead(f"The engine of {self.spec.name} stopped; it is being restarted.")
        err = create_error_response(exc)
        if int(err.error.code) < 500 or int(err.error.code) == 501:
            return error_from_vllm(err)
        log.error("engine %s failed: %r", self.spec.name, exc)
        return EngineError("Generation failed inside the engine.")

    async def stop(self) -> None:
        if self._llm is not None:
            llm, self._llm = self._llm, None
            # AsyncLLM.shutdown cancels its output handler only once the engine process is
            # gone; meanwhile the handler, still running on this loop, sees the engine die and
            # logs an ERROR traceback on an ordinary stop. (`vllm serve` blocks its loop
            # through shutdown; engines here stop in parallel, on threads.) So cancel it first.
            handler = getattr(llm, "output_handler", None)
            if handler is not None:
                handler.cancel()
            await asyncio.to_thread(llm.shutdown)


def _rank_top_logprobs(serving: Any) -> None:
    """``top_logprobs`` as OpenAI gives them: the k most likely tokens, most likely first.

    vLLM's logprobs of a step hold the sampled token first, then the top k by rank; its chat
    serving keeps the first k in that order, so when the sampled token is not among the top k
    it comes first and the k-th most likely is dropped. Ordering by rank first fixes both.
    """
    top = serving._get_top_logprobs

    def ranked(logprobs: dict, top_logprobs: int | None, *args: Any, **kwargs: Any) -> Any:
        if top_logprobs and top_logprobs > 0 and len(logprobs) > 1:
            logprobs = dict(sorted(logprobs.items(), key=_by_rank))
        return top(logprobs, top_logprobs, *args, **kwargs)

    serving._get_top_logprobs = ranked


def _count_aborted_tokens(processor: Any) -> None:
    """Count into the request's ``ChatProgress`` the tokens of a reply vLLM aborts.

    A non-streamed reply whose client leaves is cancelled inside vLLM's ``generate``, which
    aborts it in its output processor; the tokens made so far are known only there, and
    dropped by the abort. So the abort reads them first, within the cancelled request's own
    task (hence its ``_rendering``). A stream counts its tokens from its chunks instead.
    """
    abort = processor.abort_requests

    def counting(request_ids: Any, internal: bool) -> Any:
        rendering = _rendering.get()
        if rendering is None or rendering.progress is None:
            return abort(request_ids, internal)
        ids = list(request_ids)
        rendering.progress.generated += _tokens_made(processor, ids, internal)
        return abort(ids, internal)

    processor.abort_requests = counting


def _tokens_made(processor: Any, request_ids: list[str], internal: bool) -> int:
    """Output tokens the frontend holds for these requests: of each request, or of each
    choice of an n > 1 parent (its finished choices wait in the parent's aggregator)."""
    states, made = processor.request_states, 0
    for external in request_ids:
        ids = [external] if internal else processor.external_req_ids.get(external, [])
        for request_id in ids:
            parent = processor.parent_requests.get(request_id)
            children = parent.child_requests if parent is not None else ()
            for state in [states.get(request_id), *(states.get(c) for c in children)]:
                if state is not None and state.detokenizer is not None:
                    made += state.detokenizer.num_output_tokens()
            if parent is not None:
                done = (o for o in parent.output_aggregator if o is not None and o.finished())
                made += sum(len(o.token_ids) for o in done)
    return made


def _by_rank(item: tuple[int, Any]) -> float:
    rank = item[1].rank
    return math.inf if rank is None else rank


async def build_or_abandon(build: Callable[[], Any]) -> Any:
    """``build()`` (an engine: blocking, minutes on a GPU) on a thread. If the caller is
    cancelled meanwhile (the node stops while the model loads), the thread cannot be stopped,
    so the engine it builds is shut down the moment it exists, not left running with its
    processes and GPU memory."""
    lock = threading.Lock()
    abandoned = False
    built: Any = None

    def run() -> Any:
        nonlocal built
        engine = build()
        with lock:
            if not abandoned:
                built = engine
                return engine
        engine.shutdown()
        return None

    try:
        return await asyncio.to_thread(run)
    except asyncio.CancelledError:
        with lock:
            abandoned = True
            engine, built = built, None
        if engine is not None:  # built, but its result was not taken: shut it down here
            await asyncio.to_thread(engine.shutdown)
        raise


def max_tokens_field(body: dict[str, Any]) -> str:
    """The parameter that carries the client's max_tokens, as errors name it."""
    return (
        "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    )


def refuse_max_tokens_past_window(body: dict[str, Any], window: int) -> None:
    """400 context_length_exceeded for a max_tokens no prompt leaves room for: the doc's
    answer, whatever the key's plan (checked before the quota, which would say 429)."""
    requested = asked_max_tokens(body)
    if isinstance(requested, int) and not isinstance(requested, bool) and requested >= window:
        field = max_tokens_field(body)
        raise ContextLengthExceeded(
            f"{field} asks for {requested} tokens, but this model's context window is "
            f"{window} tokens, prompt included. Lower {field}.",
            param=field,
        )


def asked_max_tokens(body: dict[str, Any]) -> Any:
    """The reply size the client asked for, as sent (None if it named none; its type is
    checked by ``refuse_loose_scalars``): max_completion_tokens wins over max_tokens."""
    explicit = body.get("max_completion_tokens")
    return explicit if explicit is not None else body.get("max_tokens")


async def _aclose(gen: Any) -> None:
    close = getattr(gen, "aclose", None)
    if close is not None:
        await close()


# Fields the openai SDK may send that change nothing about the result: accepted and ignored.
HARMLESS_FIELDS = frozenset(
    {"user", "metadata", "store", "service_tier", "prompt_cache_key", "safety_identifier"}
)


# vLLM request fields that reach past what the node controls: media processing and fetching
# (the image checks, their pixel and count limits), the engine's request id, its cache and
# disaggregation plumbing, a chat template of the client's, scheduling priority.
OPERATOR_FIELDS = frozenset(
    {
        "mm_processor_kwargs", "media_io_kwargs", "mm_payload", "return_mm_kwargs",
        "request_id", "kv_transfer_params", "ec_transfer_params", "vllm_xargs",
        "chat_template", "priority", "routed_experts_prompt_start",
    }
)  # fmt: skip


def refuse_unknown_fields(body: dict[str, Any], model: Any) -> None:
    """400 naming a parameter vLLM does not know, instead of silently ignoring it (vLLM's own
    models accept and drop extra fields), since ignoring it could change what the client gets;
    and one of ``OPERATOR_FIELDS``, which vLLM knows but the node keeps for itself."""
    known = set(model.model_fields) | {f.alias for f in model.model_fields.values() if f.alias}
    unknown = sorted((set(body) - known - HARMLESS_FIELDS) | (set(body) & OPERATOR_FIELDS))
    if unknown:
        raise InvalidRequest(
            f"Unsupported parameter{'s' if len(unknown) > 1 else ''}: {', '.join(unknown)}.",
            param=unknown[0],
            code="unsupported_parameter",
        )


_SCALAR_NAMES = {bool: "a boolean", int: "an integer", float: "a number"}


@functools.cache
def _scalar_fields(model: Any) -> dict[str, type]:
    """The model's boolean and numeric fields (possibly nullable), with their type."""
    found = {}
    for name, info in model.model_fields.items():
        args = set(typing.get_args(info.annotation)) or {info.annotation}
        kinds = args - {type(None)}
        if len(kinds) == 1 and (kind := kinds.pop()) in _SCALAR_NAMES:
            found[name] = kind
    return found


def _json_kind(value: Any) -> str:
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a decimal number"
    return {str: "a string", list: "an array", dict: "an object"}.get(type(value), "null")


def _fits(value: Any, kind: type) -> bool:
    if kind is bool:
        return isinstance(value, bool)
    if isinstance(value, bool):
        return False
    return isinstance(value, int) or (kind is float and isinstance(value, float))


def refuse_loose_scalars(body: dict[str, Any], model: Any) -> None:
    """400 for a boolean or number sent as another JSON type, as OpenAI answers it: vLLM's
    models coerce ("stream": "yes" would stream, "n": "2" would count)."""
    for name, kind in _scalar_fields(model).items():
        if name not in body:
            continue
        value = body[name]
        if value is None:
            continue  # vLLM's own validation says whether null is allowed
        if not _fits(value, kind):
            raise InvalidRequest(
                f"Invalid type for '{name}': expected {_SCALAR_NAMES[kind]}, but got "
                f"{_json_kind(value)} instead.",
                param=name,
                code="invalid_type",
            )


def error_from_vllm(err: Any) -> NodeError:
    """Map vLLM's ErrorResponse into the node's hierarchy; client mistakes stay 4xx."""
    info = err.error
    status = int(info.code)
    message = info.message
    param = info.param or _field_named(message)
    if "context length" in message or "maximum context" in message:
        return ContextLengthExceeded(message, param=param or "messages")
    if status == 501:  # a feature this engine lacks: the client's request, so a 400
        return InvalidRequest(message, param=param, code="unsupported_parameter")
    if 400 <= status < 500:
        return InvalidRequest(message, param=param, status=status)
    return EngineError(message)


_FIELD_FIRST = re.compile(r"([a-z][a-z0-9_]*) (?:must|should|cannot) ")


def _field_named(message: str) -> str | None:
    """The field a plain validation message of vLLM's starts with ("frequency_penalty must be
    in [-2, 2], got 3.0."), where it gives no ``param`` of its own."""
    found = _FIELD_FIRST.match(message)
    return found.group(1) if found else None
