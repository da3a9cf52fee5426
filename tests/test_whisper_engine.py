"""The faster-whisper engine on the real stand-in: a cancelled transcription stops early."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from node.config import ModelKind
from node.engines.base import TranscriptionProgress
from node.engines.whisper import SAMPLE_RATE, WhisperEngine, decode_audio
from tests.e2e.audio_files import speak
from tests.standins import standin_spec

PARAGRAPH = (
    "Good morning. The weather in Stockholm is cold today. Tomorrow it will snow in Uppsala. "
    "On Friday the sun returns to Gothenburg. The trains to Malmo are running late this week. "
    "Many people in Stockholm take the ferry to work. The museum opens at ten in the morning. "
)


def test_a_cancelled_transcription_stops_after_the_segment_in_hand(tmp_path: Path) -> None:
    """Cancelled (its client left), the decoding ends after the current segment and
    ``transcribe`` returns only then, so the slot is not freed under a running thread."""
    spec = standin_spec(ModelKind.TRANSCRIPTION)
    # One VAD chunk per batch, so the batched pipeline yields early and can stop early.
    spec = spec.model_copy(update={"engine": {**spec.engine, "batch_size": 1}})
    audio = decode_audio(speak(PARAGRAPH * 10, "en", tmp_path / "long.wav").read_bytes())
    duration = len(audio) / SAMPLE_RATE
    assert duration > 120

    async def main() -> None:
        engine = WhisperEngine(spec)
        await engine.start()
        progress = TranscriptionProgress()
        task = asyncio.ensure_future(
            engine.transcribe(audio, language="en", prompt=None, temperature=0.0, progress=progress)
        )
        while progress.done_s == 0 and not task.done():
            await asyncio.sleep(0.02)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        stopped_at = progress.done_s
        await asyncio.sleep(0.5)
        assert progress.done_s == stopped_at  # the thread had ended: nothing moves any more
        # It stops within the chunk after the one it was told in (chunks are up to 30 s).
        assert 0 < stopped_at < duration - 40
        whole = await engine.transcribe(audio, language="en", prompt=None, temperature=0.0)
        assert whole.segments[-1].end > duration - 10  # uncancelled, it goes to the end
        await engine.stop()

    asyncio.run(main())
