"""Chat through vLLM in-process: an AsyncLLM engine plus vLLM's own OpenAI serving objects.

The node reuses vLLM's chat layer (templates, sampling parameters, SSE chunks, usage) and owns
everything around it. The engine core runs in a child process that vLLM spawns; the AsyncLLM
client lives in the node's event loop.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from typing import Any

from node.config import ModelSpec
from node.engines.base import ChatResult, EngineDead
from node.errors import ContextLengthExceeded, EngineError, InvalidRequest, NodeError

log = logging.getLogger(__name__)


def engine_cli_args(spec: ModelSpec) -> list[str]:
    """vLLM serve flags for one model: the spec's fixed fields, then its ``engine:`` mapping."""
    args = [
        "--model", spec.path,
        "--served-model-name", *spec.public_names,
        "--max-model-len", str(spec.context_window),
        "--override-generation-config", json.dumps({"max_new_tokens": spec.default_max_tokens}),
        "--disable-log-stats",
    ]
    for key, value in spec.engine.items():
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

        self._llm = await asyncio.to_thread(build)
        await self._llm.reset_mm_cache()
        state = State()
        await init_app_state(self._llm, state, args, await self._llm.get_supported_tasks())
        self._chat = state.openai_serving_chat
        self._guard_context_window(self._chat)

    def _guard_context_window(self, serving: Any) -> None:
        """Make prompt + max_tokens above the window a 400, where vLLM would silently clamp.

        vLLM refuses a prompt longer than the window but shortens an oversized max_tokens; the
        API doc promises a 400 naming both numbers. The check runs on vLLM's own rendering, so
        the prompt length is the one the engine will see (template and image tokens included).
        """
        render = serving.render_chat_request
        window = self.spec.context_window

        async def checked_render(request: Any) -> Any:
            result = await render(request)
            if isinstance(result, tuple):
                requested = request.max_completion_tokens or request.max_tokens
                if requested is not None:
                    for engine_input in result[1]:
                        prompt = serving._extract_prompt_len(engine_input)
                        if prompt + requested > window:
                            raise ContextLengthExceeded(
                                f"This model's context window is {window} tokens; the prompt "
                                f"has {prompt} tokens and max_tokens asks for {requested} "
                                f"({prompt} + {requested} = {prompt + requested} > {window}). "
                                "Shorten the prompt or lower max_tokens.",
                                param="max_tokens",
                            )
            return result

        serving.render_chat_request = checked_render

    @property
    def dead(self) -> bool:
        return self._llm is not None and bool(getattr(self._llm, "errored", False))

    async def chat(self, body: dict[str, Any]) -> ChatResult:
        from pydantic import ValidationError
        from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
        from vllm.entrypoints.serve.engine.protocol import ErrorResponse

        try:
            request = ChatCompletionRequest.model_validate(body)
        except ValidationError as exc:
            raise invalid_from_validation(exc) from None
        try:
            result = await self._chat.create_chat_completion(request, None)
        except NodeError:
            raise
        except Exception as exc:
            if self.dead:
                raise EngineDead(f"the engine of {self.spec.name} stopped") from exc
            raise
        if isinstance(result, ErrorResponse):
            raise error_from_vllm(result)
        if hasattr(result, "model_dump"):
            return ChatResult(body=result.model_dump(exclude_none=True))
        return ChatResult(stream=self._guard_stream(result))

    async def _guard_stream(self, chunks: AsyncIterator[str]) -> AsyncIterator[str]:
        """vLLM's SSE strings, passed through; an engine death mid-stream surfaces as EngineDead."""
        try:
            async for chunk in chunks:
                yield chunk
        except NodeError:
            raise
        except Exception as exc:
            if self.dead:
                raise EngineDead(f"the engine of {self.spec.name} stopped") from exc
            raise EngineError(f"generation failed: {type(exc).__name__}") from exc
        finally:
            await _aclose(chunks)

    async def stop(self) -> None:
        if self._llm is not None:
            llm, self._llm = self._llm, None
            await asyncio.to_thread(llm.shutdown)


async def _aclose(gen: Any) -> None:
    close = getattr(gen, "aclose", None)
    if close is not None:
        await close()


def invalid_from_validation(exc: Any) -> InvalidRequest:
    first = exc.errors()[0]
    loc = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
    msg = first.get("msg", "invalid value")
    return InvalidRequest(f"Invalid field '{loc}': {msg}" if loc else msg, param=loc or None)


def error_from_vllm(err: Any) -> NodeError:
    """Map vLLM's ErrorResponse into the node's hierarchy; client mistakes stay 4xx."""
    info = err.error
    status = int(info.code)
    message = info.message
    if "context length" in message or "maximum context" in message:
        return ContextLengthExceeded(message, param=info.param or "messages")
    if 400 <= status < 500:
        return InvalidRequest(message, param=info.param, status=status)
    return EngineError(message)
