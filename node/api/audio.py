"""POST /v1/audio/transcriptions: multipart upload -> faster-whisper -> the asked format,
or (``stream=true``) a server-sent event per decoded segment."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field
from starlette.datastructures import FormData, UploadFile
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from node.api import transcript_formats as fmt
from node.api.common import (
    SSE_HEADERS,
    ClientGone,
    ClosingStreamingResponse,
    admit,
    cancel_if_client_leaves,
    parse,
)
from node.api.transcription_job import StreamedTranscription, TranscriptionJob
from node.api.uploads import read_form
from node.billing import bill_of
from node.config import ModelKind
from node.engines.base import Transcript, TranscriptionProgress
from node.engines.whisper import SAMPLE_RATE, decode_audio, is_language
from node.errors import InvalidRequest, NodeError
from node.metering import audio_headers, audio_tokens
from node.registry import Registry

STREAMED_FORMATS = ("json", "text")  # a stream carries text events, not timed segments
PATH = "/v1/audio/transcriptions"


class AudioHeadersMiddleware:
    """The doc's audio headers on every answer of the transcription route, also those sent
    before the route runs (a missing key's 401, a wrong method's 405, a draining node's 503):
    no audio was decoded, none charged. The route sets them itself once it has the audio."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] != PATH:
            await self.app(scope, receive, send)
            return

        async def send_with_audio_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                if not any(name.lower() == b"x-audio-tokens-charged" for name, _ in headers):
                    none = audio_headers(0.0, charged=0)
                    headers += [(k.lower().encode(), v.encode()) for k, v in none.items()]
                    message["headers"] = headers
            await send(message)

        await self.app(scope, receive, send_with_audio_headers)


class TranscriptionForm(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str
    language: str | None = None
    prompt: str | None = None
    temperature: float = Field(default=0.0, ge=0.0, le=1.0)
    response_format: Literal["json", "text", "verbose_json", "srt", "vtt"] = "json"
    # Which timings verbose_json carries (the SDK sends each as ``timestamp_granularities[]``).
    timestamp_granularities: list[Literal["word", "segment"]] = ["segment"]
    # Served for both names, whisper-1 included (OpenAI ignores it there): the SDK, asked to
    # stream, reads server-sent events whichever model it named.
    stream: bool = False

    @property
    def words(self) -> bool:
        """Word timings cost the engine extra work: only when verbose_json will show them."""
        return self.response_format == "verbose_json" and "word" in self.timestamp_granularities


_GRANULARITIES = ("timestamp_granularities[]", "timestamp_granularities")


@dataclass
class _Heard:
    seconds: float = 0.0  # the audio's length, once decoded


async def transcriptions(request: Request) -> Response:
    """Every answer carries the doc's audio headers: a refused or failed request shows the
    audio's length (0 if it never got decoded) and 0 tokens charged."""
    heard = _Heard()
    try:
        return await _transcribe(request, heard)
    except NodeError as err:
        err.extra_headers.update(audio_headers(heard.seconds, charged=0))
        raise


async def _transcribe(request: Request, heard: _Heard) -> Response:
    registry: Registry = request.app.state.registry
    bill = bill_of(request)
    form = await read_form(request, request.app.state.settings.max_upload_bytes)
    try:
        fields = _text_fields(form)
        entry = registry.resolve(fields.get("model"), ModelKind.TRANSCRIPTION)
        req = _parse_fields(fields)
        upload = form.get("file")
        if not isinstance(upload, UploadFile):
            raise InvalidRequest(
                "The multipart field 'file' (the audio) is required.", param="file"
            )
        engine = entry.require_ready()
        permit = await admit(entry, request)
    except BaseException:
        await form.close()
        raise
    # From here the permit is held: released on any failure, else handed to the answer.
    try:
        data = await upload.read()
        await form.close()
        audio = await asyncio.to_thread(decode_audio, data)
        heard.seconds = len(audio) / SAMPLE_RATE
        charge = audio_tokens(heard.seconds)
        await bill.reserve(charge)
    except BaseException:
        permit.release()
        await form.close()
        raise

    job = TranscriptionJob(
        engine, audio, req.language, req.prompt, req.temperature, req.words, bill, charge
    )
    if req.stream:
        metrics = request.app.state.metrics
        streamed = StreamedTranscription(
            job,
            permit,
            count_error=lambda code: metrics.stream_error(request.scope, code),
            count_charged=lambda tokens: metrics.charged(entry.spec.name, audio=tokens),
        )
        return ClosingStreamingResponse(
            streamed.events(),
            finish=streamed.finish,
            media_type="text/event-stream",
            headers={**SSE_HEADERS, **audio_headers(heard.seconds)},
        )
    with permit:
        progress = TranscriptionProgress()
        used = 0
        try:
            transcript = await cancel_if_client_leaves(request, job.run(progress))
            used = charge
        except ClientGone:
            # Decoding stopped after the segment in hand: the audio transcribed is billed.
            used = audio_tokens(progress.done_s)
            return Response(status_code=499)  # nobody reads it; the access log shows why
        finally:
            charged = await bill.settle(used)
            request.app.state.metrics.charged(entry.spec.name, audio=charged)
    return _render(transcript, req)


def _text_fields(form: FormData) -> dict[str, object]:
    """The form's non-empty text fields; the repeated granularity fields as one list."""
    fields: dict[str, object] = {k: v for k, v in form.items() if isinstance(v, str) and v != ""}
    granularities = [v for k in _GRANULARITIES for v in form.getlist(k) if isinstance(v, str) and v]
    if granularities:
        fields["timestamp_granularities"] = granularities
    return fields


def _parse_fields(fields: dict[str, object]) -> TranscriptionForm:
    req = parse(TranscriptionForm, fields)
    if req.language is not None and not is_language(req.language):
        raise InvalidRequest(
            f"'{req.language}' is not a language code Whisper knows (e.g. 'sv', 'en').",
            param="language",
        )
    if req.stream and req.response_format not in STREAMED_FORMATS:
        raise InvalidRequest(
            f"A streamed transcription sends text events; response_format "
            f"'{req.response_format}' cannot be streamed (use 'json' or 'text', or stream=false).",
            param="response_format",
        )
    return req


def _render(transcript: Transcript, req: TranscriptionForm) -> Response:
    headers = audio_headers(transcript.duration)
    usage = {"type": "duration", "seconds": round(transcript.duration, 3)}
    match req.response_format:
        case "text":
            return PlainTextResponse(transcript.text + "\n", headers=headers)
        case "srt":
            return PlainTextResponse(fmt.srt(transcript), headers=headers)
        case "vtt":
            return PlainTextResponse(fmt.vtt(transcript), headers=headers, media_type="text/vtt")
        case "verbose_json":
            body = fmt.verbose_json(transcript, usage, req.timestamp_granularities)
            return JSONResponse(body, headers=headers)
        case _:
            return JSONResponse({"text": transcript.text, "usage": usage}, headers=headers)
