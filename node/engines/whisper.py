"""Speech to text through faster-whisper (CTranslate2), and audio decoding through PyAV."""

from __future__ import annotations

import asyncio
import io
import itertools
import logging
from collections.abc import Callable
from typing import Any

import numpy as np

from node.config import ModelSpec
from node.engines.base import Segment, Transcript, TranscriptionProgress, Word
from node.errors import InvalidRequest

log = logging.getLogger(__name__)

SAMPLE_RATE = 16_000


MAX_AUDIO_S = 3 * 3600  # 25 MB of compressed silence can hold days of audio: cap the decode


def decode_audio(data: bytes, max_seconds: float = MAX_AUDIO_S) -> np.ndarray:
    """Any container/codec FFmpeg (PyAV) knows -> mono float32 at 16 kHz; 400 if it can't.

    Decodes frame by frame and stops past ``max_seconds``, so a small file that expands to
    hours of samples is refused before it fills the memory.
    """
    import av

    if not data:
        raise InvalidRequest("The uploaded file is empty.", param="file", code="invalid_audio")
    cap = int(max_seconds * SAMPLE_RATE)
    chunks: list[np.ndarray] = []
    total = 0
    try:
        with av.open(io.BytesIO(data), mode="r", metadata_errors="ignore") as container:
            resampler = av.AudioResampler(format="s16", layout="mono", rate=SAMPLE_RATE)
            frames = container.decode(audio=0)
            for frame in itertools.chain(frames, [None]):  # None flushes the resampler
                for out in resampler.resample(frame):
                    samples = out.to_ndarray().reshape(-1)
                    total += samples.size
                    if total > cap:
                        raise _too_long(max_seconds)
                    chunks.append(samples)
    except InvalidRequest:
        raise
    except Exception as exc:
        raise InvalidRequest(
            "The file could not be decoded as audio. Supported formats: mp3, wav, m4a, ogg, "
            "flac, webm, mp4.",
            param="file",
            code="invalid_audio",
        ) from exc
    if total == 0:
        raise InvalidRequest("The file holds no audio.", param="file", code="invalid_audio")
    return np.concatenate(chunks).astype(np.float32) / 32768.0


def _too_long(max_seconds: float) -> InvalidRequest:
    return InvalidRequest(
        f"The audio is longer than {max_seconds / 60:g} minutes; split it into parts.",
        param="file",
        code="audio_too_long",
    )


class TranscriptionStopped(Exception):
    """Raised in the worker thread when its progress was told to stop."""


class WhisperEngine:
    def __init__(self, spec: ModelSpec) -> None:
        self.spec = spec
        self._model: Any = None
        self._batched: Any = None
        self.batched_from_s = float(spec.engine.get("batched_from_s", 120))

    async def start(self) -> None:
        from faster_whisper import BatchedInferencePipeline, WhisperModel

        opts = self.spec.engine
        self._model = await asyncio.to_thread(
            WhisperModel,
            self.spec.path,
            device=opts.get("device", "cpu"),
            compute_type=opts.get("compute_type", "int8"),
            cpu_threads=int(opts.get("cpu_threads", 0)),
        )
        self._batched = BatchedInferencePipeline(self._model)

    @property
    def dead(self) -> bool:
        return False

    async def transcribe(
        self,
        audio: np.ndarray,
        *,
        language: str | None,
        prompt: str | None,
        temperature: float,
        words: bool = False,
        progress: TranscriptionProgress | None = None,
        on_segment: Callable[[Segment], None] | None = None,
    ) -> Transcript:
        """The transcript, with each segment's words timed if ``words``; if the caller is
        cancelled (its client left), the decoding stops after the current segment, and this
        returns only once it has: the slot is not free while the thread still works.

        ``on_segment`` is called with each segment as soon as it is decoded, on the worker
        thread (streaming hands it over to the event loop)."""
        progress = progress or TranscriptionProgress()
        args = (audio, language, prompt, temperature, words, progress, on_segment)
        work = asyncio.ensure_future(asyncio.to_thread(self._transcribe, *args))
        try:
            return await asyncio.shield(work)
        except asyncio.CancelledError:
            progress.stop.set()
            await asyncio.gather(work, return_exceptions=True)
            raise

    def _transcribe(
        self,
        audio: np.ndarray,
        language: str | None,
        prompt: str | None,
        temperature: float,
        words: bool,
        progress: TranscriptionProgress,
        on_segment: Callable[[Segment], None] | None,
    ) -> Transcript:
        duration = len(audio) / SAMPLE_RATE
        kwargs: dict[str, Any] = dict(
            language=language,
            initial_prompt=prompt or None,
            temperature=temperature if temperature > 0 else [0.0, 0.2, 0.4, 0.6, 0.8, 1.0],
            beam_size=int(self.spec.engine.get("beam_size", 5)),
            vad_filter=False,
            word_timestamps=words,  # aligned from the cross-attention: extra work, so on demand
        )
        if duration >= self.batched_from_s:
            # Long audio: the batched pipeline decodes VAD-cut chunks together (it needs VAD).
            # With timestamps, as the sequential path: else each chunk of up to 30 s (pauses
            # included) is one segment, too long for a subtitle cue or a streamed delta.
            batch = int(self.spec.engine.get("batch_size", 8))
            kwargs["vad_filter"] = True
            kwargs["without_timestamps"] = False
            segments, info = self._batched.transcribe(audio, batch_size=batch, **kwargs)
        else:
            segments, info = self._model.transcribe(audio, **kwargs)
        out: list[Segment] = []
        for s in segments:  # lazy: each step decodes the next segment (or batch)
            segment = Segment(
                id=len(out),
                start=round(s.start, 3),
                end=round(s.end, 3),
                text=s.text,
                avg_logprob=s.avg_logprob,
                compression_ratio=s.compression_ratio,
                no_speech_prob=s.no_speech_prob,
                temperature=s.temperature or 0.0,
                tokens=list(s.tokens),
                words=[
                    Word(w.word.strip(), round(w.start, 3), round(w.end, 3)) for w in s.words or ()
                ],
            )
            out.append(segment)
            if on_segment is not None:
                on_segment(segment)
            progress.done_s = min(duration, s.end)
            if progress.stop.is_set():
                raise TranscriptionStopped
        progress.done_s = duration
        text = "".join(s.text for s in out).strip()
        return Transcript(text=text, language=info.language, duration=duration, segments=out)

    async def stop(self) -> None:
        self._model = None
        self._batched = None


def is_language(code: str) -> bool:
    from faster_whisper.tokenizer import _LANGUAGE_CODES

    return code in _LANGUAGE_CODES
