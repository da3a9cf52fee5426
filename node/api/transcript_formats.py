"""Rendering a transcript in the response formats OpenAI's transcription route offers, and
the server-sent events of a streamed one."""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

from node.engines.base import Transcript
from node.sse import sse_data

FORMATS = ("json", "text", "verbose_json", "srt", "vtt")


def _stamp(seconds: float, sep: str) -> str:
    ms = round(seconds * 1000)
    h, ms = divmod(ms, 3_600_000)
    m, ms = divmod(ms, 60_000)
    s, ms = divmod(ms, 1000)
    return f"{h:02d}:{m:02d}:{s:02d}{sep}{ms:03d}"


def srt(t: Transcript) -> str:
    blocks = [
        f"{i}\n{_stamp(s.start, ',')} --> {_stamp(s.end, ',')}\n{s.text.strip()}\n"
        for i, s in enumerate(t.segments, start=1)
    ]
    return "\n".join(blocks)


def vtt(t: Transcript) -> str:
    blocks = [
        f"{_stamp(s.start, '.')} --> {_stamp(s.end, '.')}\n{s.text.strip()}\n" for s in t.segments
    ]
    return "WEBVTT\n\n" + "\n".join(blocks)


def verbose_json(
    t: Transcript, usage: dict[str, Any], granularities: Collection[str] = ("segment",)
) -> dict[str, Any]:
    """OpenAI's verbose_json: ``segments`` and/or ``words``, as ``timestamp_granularities``
    asked (segments alone by default)."""
    out: dict[str, Any] = {
        "task": "transcribe",
        "language": t.language,
        "duration": round(t.duration, 3),
        "text": t.text,
    }
    if "segment" in granularities:
        out["segments"] = _segments(t)
    if "word" in granularities:
        out["words"] = [
            {"word": w.word, "start": w.start, "end": w.end} for s in t.segments for w in s.words
        ]
    out["usage"] = usage
    return out


def _segments(t: Transcript) -> list[dict[str, Any]]:
    return [
        {
            "id": s.id,
            "seek": 0,
            "start": s.start,
            "end": s.end,
            "text": s.text,
            "tokens": s.tokens,
            "temperature": s.temperature,
            "avg_logprob": s.avg_logprob,
            "compression_ratio": s.compression_ratio,
            "no_speech_prob": s.no_speech_prob,
        }
        for s in t.segments
    ]


def delta_event(text: str) -> str:
    """One ``transcript.text.delta`` event: the text of the segment just decoded."""
    return sse_data({"type": "transcript.text.delta", "delta": text})


def done_event(text: str, tokens: int) -> str:
    """The closing ``transcript.text.done`` event; its usage is what the key was charged
    (100 tokens per second of audio), in the token form the SDK types it with."""
    usage = {
        "type": "tokens",
        "input_tokens": tokens,
        "input_token_details": {"audio_tokens": tokens, "text_tokens": 0},
        "output_tokens": 0,
        "total_tokens": tokens,
    }
    return sse_data({"type": "transcript.text.done", "text": text, "usage": usage})
