"""Audio decoding: exact length at 16 kHz, a cap on decoded length, clear refusals."""

from __future__ import annotations

import io
import wave

import numpy as np
import pytest

from node.engines.whisper import decode_audio
from node.errors import InvalidRequest


def _wav(seconds: float, rate: int = 22050) -> bytes:
    t = np.arange(int(seconds * rate)) / rate
    samples = (np.sin(2 * np.pi * 440 * t) * 8000).astype("<i2")
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(samples.tobytes())
    return buf.getvalue()


def test_decodes_to_16_khz_mono_float() -> None:
    audio = decode_audio(_wav(2.0))
    assert audio.dtype == np.float32
    assert abs(len(audio) - 32000) <= 16
    assert 0.1 < float(np.abs(audio).max()) <= 1.0


def test_audio_longer_than_the_cap_is_refused_while_decoding() -> None:
    with pytest.raises(InvalidRequest) as info:
        decode_audio(_wav(3.0), max_seconds=1.0)
    assert info.value.code == "audio_too_long" and info.value.param == "file"


@pytest.mark.parametrize("data", [b"", b"not audio" * 50, _wav(0.0)])
def test_undecodable_or_empty_audio_is_400(data: bytes) -> None:
    with pytest.raises(InvalidRequest) as info:
        decode_audio(data)
    assert info.value.status == 400 and info.value.param == "file"
