"""Transcript rendering and the audio charge, pure functions."""

from __future__ import annotations

import copy

from node.api import transcript_formats as fmt
from node.engines.base import Segment, Transcript, Word
from node.metering import audio_headers, audio_tokens

T = Transcript(
    text="Hej. Hallå.",
    language="sv",
    duration=3661.5,
    segments=[Segment(0, 0.0, 1.25, " Hej."), Segment(1, 3600.5, 3661.5, " Hallå.")],
)


def test_srt_numbering_and_stamps() -> None:
    out = fmt.srt(T)
    assert out.startswith("1\n00:00:00,000 --> 00:00:01,250\nHej.\n")
    assert "2\n01:00:00,500 --> 01:01:01,500\nHallå.\n" in out


def test_vtt_header_and_stamps() -> None:
    out = fmt.vtt(T)
    assert out.startswith("WEBVTT\n\n00:00:00.000 --> 00:00:01.250\nHej.\n")


def test_verbose_json_shape() -> None:
    body = fmt.verbose_json(T, {"type": "duration", "seconds": 3661.5})
    assert body["language"] == "sv" and body["duration"] == 3661.5
    assert [s["start"] for s in body["segments"]] == [0.0, 3600.5]
    assert "words" not in body


def test_verbose_json_words_across_segments_and_without_segments() -> None:
    timed = copy.deepcopy(T)
    timed.segments[0].words = [Word("Hej.", 0.0, 1.25)]
    timed.segments[1].words = [Word("Hej", 3600.5, 3600.9), Word("då.", 3600.9, 3601.2)]
    body = fmt.verbose_json(timed, {}, ["word"])
    assert "segments" not in body
    assert body["words"] == [
        {"word": "Hej.", "start": 0.0, "end": 1.25},
        {"word": "Hej", "start": 3600.5, "end": 3600.9},
        {"word": "då.", "start": 3600.9, "end": 3601.2},
    ]
    both = fmt.verbose_json(timed, {}, ["segment", "word"])
    assert len(both["segments"]) == 2 and len(both["words"]) == 3


def test_audio_headers_of_a_refused_request() -> None:
    assert audio_headers(2.874, charged=0) == {
        "X-Audio-Duration-Seconds": "2.874",
        "X-Audio-Tokens-Charged": "0",
    }


def test_audio_is_100_tokens_per_second_rounded_up() -> None:
    assert audio_tokens(60) == 6000
    assert audio_tokens(3600) == 360_000
    assert audio_tokens(2.874) == 288
    assert audio_tokens(0.001) == 1
    assert audio_tokens(1.10) == 110  # no float noise: 1.10 * 100 is 110.00000000000001
    assert audio_headers(2.874) == {
        "X-Audio-Duration-Seconds": "2.874",
        "X-Audio-Tokens-Charged": "288",
    }
