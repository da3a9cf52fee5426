"""An admitted transcription (audio decoded, its charge held), run whole or streamed as the
server-sent events of OpenAI's streamed transcriptions."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

import numpy as np

from node.api import transcript_formats as fmt
from node.billing import Bill
from node.engines.base import Segment, Transcript, TranscriptionEngine, TranscriptionProgress
from node.errors import EngineError, NodeError, sse_error_event
from node.metering import audio_tokens
from node.scheduler import Permit

log = logging.getLogger(__name__)


@dataclass
class TranscriptionJob:
    engine: TranscriptionEngine
    audio: np.ndarray
    language: str | None
    prompt: str | None
    temperature: float
    words: bool
    bill: Bill
    charge: int  # the tokens held for the whole clip

    def run(
        self,
        progress: TranscriptionProgress,
        on_segment: Callable[[Segment], None] | None = None,
    ) -> Awaitable[Transcript]:
        return self.engine.transcribe(
            self.audio,
            language=self.language,
            prompt=self.prompt,
            temperature=self.temperature,
            words=self.words,
            progress=progress,
            on_segment=on_segment,
        )


class StreamedTranscription:
    """One delta event per decoded segment, then the done event.

    ``finish`` runs however the stream ends (``ClosingStreamingResponse``): it stops the
    decoding after the segment in hand if the client left, releases the slot, and settles:
    the whole clip once done, the audio transcribed if the client left, nothing if the
    transcription failed (an SSE error event says why). The work starts with the first event
    asked for, so a stream never started costs nothing.
    """

    def __init__(
        self,
        job: TranscriptionJob,
        permit: Permit,
        *,
        count_error: Callable[[str], None],
        count_charged: Callable[[int], None],
    ) -> None:
        self.job = job
        self.permit = permit
        self.count_error = count_error
        self.count_charged = count_charged
        self.progress = TranscriptionProgress()
        self.work: asyncio.Future[Transcript] | None = None
        self.used: int | None = None  # None: ended early, billed by progress

    async def events(self) -> AsyncIterator[str]:
        loop = asyncio.get_running_loop()
        decoded: asyncio.Queue[Segment | None] = asyncio.Queue()
        self.work = work = asyncio.ensure_future(
            self.job.run(self.progress, on_segment=lambda s: _hand_over(loop, decoded, s))
        )
        work.add_done_callback(lambda _: decoded.put_nowait(None))  # after every segment
        try:
            started = False
            while (segment := await decoded.get()) is not None:
                delta = segment.text if started else segment.text.lstrip()
                if delta:
                    started = True
                    yield fmt.delta_event(delta)
            # The thread has ended: free the slot now, not turns later in ``finish``.
            self.permit.release()
            transcript = await work
            self.used = self.job.charge
            yield fmt.done_event(transcript.text, self.job.charge)
        except NodeError as err:
            yield self._failed(err)
        except Exception:
            log.exception("streamed transcription failed")
            yield self._failed(EngineError("The transcription failed inside the node."))

    def _failed(self, err: NodeError) -> str:
        self.used = 0
        self.count_error(err.code)
        return sse_error_event(err)

    async def finish(self) -> None:
        if self.work is not None:
            if not self.work.done():  # the client left: stop after the segment in hand
                self.work.cancel()
            (outcome,) = await asyncio.gather(self.work, return_exceptions=True)
            if self.used is None and isinstance(outcome, Exception):
                self.used = 0  # it failed (after the client left): nothing is charged
        self.permit.release()
        used = audio_tokens(self.progress.done_s) if self.used is None else self.used
        self.count_charged(await self.job.bill.settle(used))


def _hand_over(
    loop: asyncio.AbstractEventLoop, decoded: asyncio.Queue[Segment | None], segment: Segment
) -> None:
    with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is listening
        loop.call_soon_threadsafe(decoded.put_nowait, segment)
