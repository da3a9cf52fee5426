"""Transcription on the real faster-whisper stand-in: formats, containers, headers."""

from __future__ import annotations

import json
import math
from pathlib import Path

import httpx
import openai
import pytest

from tests.e2e.audio_files import CONTAINERS, convert, duration_s, join_with_silence, speak
from tests.e2e.node_process import NodeProcess

pytestmark = pytest.mark.e2e

SENTENCES = (
    "Good morning. The weather in Stockholm is cold today. Tomorrow it will snow in Uppsala. "
    "On Friday the sun returns to Gothenburg. The trains to Malmo are running late this week. "
    "Many people in Stockholm take the ferry to work. "
)


@pytest.fixture(scope="session")
def speech(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("speech")
    return {
        "en": speak("Good morning. The weather in Stockholm is cold today.", "en", d / "en.wav"),
        # Decoded at temperature 0 by the stand-in: a sentence it falls back on is transcribed
        # by sampling at random (once in many runs: "hej, bit hej, bit hej").
        "sv": speak("Hej, det här är ett test av tjänsten.", "sv", d / "sv.wav"),
    }


def _post(node: NodeProcess, key: str, path: Path, **fields: str) -> httpx.Response:
    with open(path, "rb") as f:
        return httpx.post(
            node.base_url + "/v1/audio/transcriptions",
            headers={"Authorization": f"Bearer {key}"},
            files={"file": (path.name, f)},
            data={"model": "kb-whisper-large", **fields},
            timeout=120,
        )


def test_sdk_example_from_the_doc(client: openai.OpenAI, speech: dict[str, Path]) -> None:
    with open(speech["sv"], "rb") as f:
        result = client.audio.transcriptions.create(model="kb-whisper-large", file=f, language="sv")
    assert "hej" in result.text.lower() and "test" in result.text.lower()


def test_whisper_1_alias_with_raw_response_headers(
    client: openai.OpenAI, speech: dict[str, Path]
) -> None:
    with open(speech["en"], "rb") as f:
        raw = client.audio.transcriptions.with_raw_response.create(
            model="whisper-1", file=f, language="en"
        )
    seconds = duration_s(speech["en"])
    assert float(raw.headers["X-Audio-Duration-Seconds"]) == pytest.approx(seconds, abs=0.01)
    assert int(raw.headers["X-Audio-Tokens-Charged"]) == math.ceil(seconds * 100)
    assert "Stockholm" in raw.parse().text


@pytest.mark.parametrize("fmt", ["json", "text", "verbose_json", "srt", "vtt"])
def test_every_response_format(
    node: NodeProcess, api_key: str, speech: dict[str, Path], fmt: str
) -> None:
    r = _post(node, api_key, speech["en"], response_format=fmt, language="en")
    assert r.status_code == 200, r.text
    assert "X-Audio-Duration-Seconds" in r.headers and "X-Audio-Tokens-Charged" in r.headers
    if fmt == "json":
        body = r.json()
        assert "Stockholm" in body["text"] and body["usage"]["type"] == "duration"
    elif fmt == "verbose_json":
        body = r.json()
        assert body["language"] == "en"
        assert body["duration"] == pytest.approx(duration_s(speech["en"]), abs=0.01)
        assert body["segments"] and {"start", "end", "text"} <= body["segments"][0].keys()
        assert body["segments"][-1]["end"] <= body["duration"] + 0.5
        assert body["usage"]["seconds"] == pytest.approx(body["duration"], abs=0.01)
    elif fmt == "text":
        assert "Stockholm" in r.text and not r.text.lstrip().startswith("{")
    elif fmt == "srt":
        assert r.text.startswith("1\n00:00:0") and " --> " in r.text and "Stockholm" in r.text
    else:
        assert r.text.startswith("WEBVTT") and " --> " in r.text and "Stockholm" in r.text


def test_word_timestamps_as_the_sdk_asks_for_them(
    client: openai.OpenAI, speech: dict[str, Path]
) -> None:
    seconds = duration_s(speech["en"])
    with open(speech["en"], "rb") as f:
        words_only = client.audio.transcriptions.create(
            model="whisper-1",
            file=f,
            response_format="verbose_json",
            timestamp_granularities=["word"],
            language="en",
        )
    assert words_only.segments is None and words_only.words
    spoken = [w.word for w in words_only.words]
    assert " ".join(spoken) == words_only.text  # every word, stripped, in order
    starts = [w.start for w in words_only.words]
    assert starts == sorted(starts)
    assert all(0 <= w.start <= w.end <= seconds + 0.5 for w in words_only.words)
    with open(speech["en"], "rb") as f:
        both = client.audio.transcriptions.create(
            model="whisper-1",
            file=f,
            response_format="verbose_json",
            timestamp_granularities=["word", "segment"],
            language="en",
        )
    assert both.segments and both.words
    with open(speech["en"], "rb") as f:
        default = client.audio.transcriptions.create(
            model="whisper-1", file=f, response_format="verbose_json", language="en"
        )
    assert default.segments and default.words is None


def test_unknown_timestamp_granularity_is_400(
    node: NodeProcess, api_key: str, speech: dict[str, Path]
) -> None:
    r = _post(node, api_key, speech["en"], **{"timestamp_granularities[]": "char"})
    assert r.status_code == 400
    assert r.json()["error"]["param"].startswith("timestamp_granularities")


@pytest.mark.parametrize("container", sorted(CONTAINERS))
def test_every_container_of_the_doc(
    node: NodeProcess, api_key: str, speech: dict[str, Path], container: str, tmp_path: Path
) -> None:
    path = convert(speech["en"], container, tmp_path)
    r = _post(node, api_key, path, response_format="verbose_json", language="en")
    assert r.status_code == 200, r.text
    body = r.json()
    assert "Stockholm" in body["text"]
    seconds = duration_s(path)
    assert float(r.headers["X-Audio-Duration-Seconds"]) == pytest.approx(seconds, abs=0.01)
    assert int(r.headers["X-Audio-Tokens-Charged"]) == math.ceil(round(seconds * 100, 6))


def test_undecodable_audio_is_400(node: NodeProcess, api_key: str, tmp_path: Path) -> None:
    junk = tmp_path / "junk.mp3"
    junk.write_bytes(b"this is not audio at all" * 100)
    r = _post(node, api_key, junk)
    assert r.status_code == 400
    assert r.json()["error"]["param"] == "file"
    assert r.headers["X-Audio-Duration-Seconds"] == "0.000"  # never decoded
    assert r.headers["X-Audio-Tokens-Charged"] == "0"


def test_audio_over_the_quota_is_429_showing_its_length_and_no_charge(
    node: NodeProcess, speech: dict[str, Path]
) -> None:
    key = node.create_key("--plan", "custom", "--limit-tokens", "50", "--window", "hour")
    r = _post(node, key, speech["en"])
    assert r.status_code == 429 and r.json()["error"]["code"] == "insufficient_quota"
    seconds = float(r.headers["X-Audio-Duration-Seconds"])
    assert seconds == pytest.approx(duration_s(speech["en"]), abs=0.01)
    assert r.headers["X-Audio-Tokens-Charged"] == "0"
    assert r.headers["X-RateLimit-Used-Tokens"] == "0"


def test_unknown_language_is_400(node: NodeProcess, api_key: str, speech: dict[str, Path]) -> None:
    r = _post(node, api_key, speech["en"], language="klingon")
    assert r.status_code == 400 and r.json()["error"]["param"] == "language"


def test_bad_response_format_is_400(
    node: NodeProcess, api_key: str, speech: dict[str, Path]
) -> None:
    r = _post(node, api_key, speech["en"], response_format="xml")
    assert r.status_code == 400 and r.json()["error"]["param"] == "response_format"


def test_missing_file_is_400(node: NodeProcess, api_key: str) -> None:
    r = httpx.post(
        node.base_url + "/v1/audio/transcriptions",
        headers={"Authorization": f"Bearer {api_key}"},
        files={"other": ("x.txt", b"x")},
        data={"model": "whisper-1"},
        timeout=30,
    )
    assert r.status_code == 400 and r.json()["error"]["param"] == "file"


def test_answers_before_the_route_carry_the_audio_headers_too(
    node: NodeProcess, api_key: str
) -> None:
    """The doc: every response includes the audio headers; those the route never saw (no key,
    a bad key, a wrong method) decoded no audio and charged none. Each header once, also on a
    route's own error."""
    url = node.base_url + "/v1/audio/transcriptions"
    key = {"Authorization": f"Bearer {api_key}"}
    answers = [
        (401, httpx.post(url, data={"model": "whisper-1"}, timeout=30)),
        (401, httpx.post(url, headers={"Authorization": "Bearer sk-st-nope"}, timeout=30)),
        (405, httpx.get(url, headers=key, timeout=30)),
        (
            400,
            httpx.post(
                url,
                headers=key,
                files={"other": ("x.txt", b"x")},
                data={"model": "whisper-1"},
                timeout=30,
            ),
        ),
    ]
    for status, r in answers:
        assert r.status_code == status, (status, r.text)
        assert r.headers.get_list("X-Audio-Duration-Seconds") == ["0.000"], status
        assert r.headers.get_list("X-Audio-Tokens-Charged") == ["0"], status


def test_upload_over_25_mb_is_413_with_declared_length(node: NodeProcess, api_key: str) -> None:
    big = b"\0" * (26 * 1024 * 1024)
    r = httpx.post(
        node.base_url + "/v1/audio/transcriptions",
        headers={"Authorization": f"Bearer {api_key}"},
        files={"file": ("big.wav", big)},
        data={"model": "whisper-1"},
        timeout=60,
    )
    assert r.status_code == 413
    assert r.json()["error"]["code"] == "file_too_large"


def test_upload_over_25_mb_is_413_when_chunked(node: NodeProcess, api_key: str) -> None:
    boundary = "staikboundary"
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="model"\r\n\r\nwhisper-1\r\n'
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; '
        f'filename="big.wav"\r\nContent-Type: audio/wav\r\n\r\n'
    ).encode()

    def body():  # type: ignore[no-untyped-def]
        yield head
        chunk = b"\0" * (1024 * 1024)
        for _ in range(27):
            yield chunk
        yield f"\r\n--{boundary}--\r\n".encode()

    r = httpx.post(
        node.base_url + "/v1/audio/transcriptions",
        headers={
            "Authorization": f"Bearer {api_key}",
            "Content-Type": f"multipart/form-data; boundary={boundary}",
        },
        content=body(),
        timeout=60,
    )
    assert r.status_code == 413, r.text
    assert json.loads(r.text)["error"]["code"] == "file_too_large"


def test_long_audio_goes_through_the_batched_pipeline(
    node: NodeProcess, api_key: str, tmp_path: Path
) -> None:
    """Above the stand-in's batched_from_s (20 s) the batched, VAD-chunked pipeline runs, and
    still cuts segments at the model's timestamps: VAD merges both parts of speech and the
    pause between them into one chunk of up to 30 s, which without timestamps would be one
    25 s segment."""
    first = speak(SENTENCES, "en", tmp_path / "first.wav")
    second = speak(
        "The museum opens at ten in the morning. In the evening we eat dinner together.",
        "en",
        tmp_path / "second.wav",
    )
    pause_from, pause_s = duration_s(first), 8.0
    wav = join_with_silence(first, pause_s, second, tmp_path / "long.wav")
    seconds = duration_s(wav)
    assert seconds > 20
    r = _post(node, api_key, wav, response_format="verbose_json", language="en")
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["text"].count("Stockholm") >= 2 and "Gothenburg" in body["text"]
    assert "museum" in body["text"].lower()
    spans = [(s["start"], s["end"]) for s in body["segments"]]
    assert len(spans) >= 3 and spans[-1][1] > pause_from + pause_s, spans
    assert max(end - start for start, end in spans) < 15, spans
    assert int(r.headers["X-Audio-Tokens-Charged"]) == math.ceil(round(seconds * 100, 6))


@pytest.fixture(scope="module")
def very_long(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Over 150 s of speech: long enough that a client leaving is seen mid-way."""
    wav = speak(SENTENCES * 14, "en", tmp_path_factory.mktemp("long") / "very-long.wav")
    assert duration_s(wav) > 150
    return wav


def test_a_client_that_leaves_stops_its_transcription_and_pays_for_what_was_done(
    node: NodeProcess, api_key: str, very_long: Path
) -> None:
    """The client gives up (read timeout) while a long clip is transcribed: decoding stops
    after the segment in hand, the slot frees long before the clip would have been done,
    and the key is charged for the audio transcribed, not for the whole clip."""
    before = node.used_tokens(api_key)
    with pytest.raises(httpx.ReadTimeout), open(very_long, "rb") as f:
        httpx.post(
            node.base_url + "/v1/audio/transcriptions",
            headers={"Authorization": f"Bearer {api_key}"},
            files={"file": (very_long.name, f)},
            data={"model": "kb-whisper-large", "language": "en"},
            timeout=httpx.Timeout(60, read=1.5),
        )
    assert node.wait_slots_free("kb-whisper-large") == 0
    charged = node.used_tokens(api_key) - before
    assert 0 < charged < math.ceil(round(duration_s(very_long) * 100, 6)) / 2


def test_a_streamed_transcription_sends_a_delta_per_segment_then_the_done_event(
    node: NodeProcess, client: openai.OpenAI, api_key: str, tmp_path: Path
) -> None:
    """``stream=True`` through the SDK: text deltas as segments are decoded, then the whole
    text with the usage charged; the audio headers go out with the stream's 200."""
    wav = speak(SENTENCES, "en", tmp_path / "streamed.wav")
    charge = math.ceil(round(duration_s(wav) * 100, 6))
    before = node.used_tokens(api_key)
    with open(wav, "rb") as f:
        raw = client.audio.transcriptions.with_raw_response.create(
            model="whisper-1", file=f, language="en", stream=True
        )
    assert raw.headers["content-type"].startswith("text/event-stream")
    assert int(raw.headers["X-Audio-Tokens-Charged"]) == charge
    assert float(raw.headers["X-Audio-Duration-Seconds"]) == pytest.approx(duration_s(wav), 0.01)
    events = list(raw.parse())
    deltas = [e.delta for e in events if e.type == "transcript.text.delta"]
    done = events[-1]
    assert done.type == "transcript.text.done" and events[:-1] and len(deltas) == len(events) - 1
    assert len(deltas) >= 2  # several segments, each sent as it was decoded
    assert "".join(deltas).strip() == done.text
    assert "Stockholm" in done.text and "Gothenburg" in done.text
    assert done.usage is not None and done.usage.total_tokens == charge
    assert node.used_tokens(api_key) - before == charge

    with open(wav, "rb") as f:  # the same clip, not streamed: the same text
        whole = client.audio.transcriptions.create(model="whisper-1", file=f, language="en")
    assert whole.text == done.text


def test_a_streamed_transcription_in_text_format_streams_too(
    client: openai.OpenAI, speech: dict[str, Path]
) -> None:
    with open(speech["sv"], "rb") as f:
        stream = client.audio.transcriptions.create(
            model="kb-whisper-large", file=f, language="sv", response_format="text", stream=True
        )
        events = list(stream)
    assert [e.type for e in events][-1] == "transcript.text.done"
    assert "hej" in events[-1].text.lower()


def test_a_stream_in_a_timed_format_is_400(
    node: NodeProcess, api_key: str, speech: dict[str, Path]
) -> None:
    r = _post(node, api_key, speech["en"], response_format="srt", stream="true")
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == "response_format"
    assert r.headers["X-Audio-Tokens-Charged"] == "0"


def test_a_client_that_leaves_a_streamed_transcription_stops_it_and_pays_for_what_was_done(
    node: NodeProcess, api_key: str, very_long: Path
) -> None:
    """The client reads the first delta and hangs up: decoding stops after the segment in
    hand, the slot frees, and the key pays for the audio transcribed, not the whole clip."""
    before = node.used_tokens(api_key)
    with (
        open(very_long, "rb") as f,
        httpx.Client(timeout=120) as http,
        http.stream(
            "POST",
            node.base_url + "/v1/audio/transcriptions",
            headers={"Authorization": f"Bearer {api_key}"},
            files={"file": (very_long.name, f)},
            data={"model": "kb-whisper-large", "language": "en", "stream": "true"},
        ) as r,
    ):
        assert r.status_code == 200
        first = next(line for line in r.iter_lines() if line.startswith("data: "))
        assert json.loads(first[len("data: ") :])["type"] == "transcript.text.delta"
    assert node.wait_slots_free("kb-whisper-large") == 0
    charged = node.used_tokens(api_key) - before
    assert 0 < charged < math.ceil(round(duration_s(very_long) * 100, 6)) / 2
