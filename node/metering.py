"""How each kind of request is counted in tokens, as the API doc bills it."""

from __future__ import annotations

import math

AUDIO_TOKENS_PER_SECOND = 100


def audio_tokens(seconds: float) -> int:
    """100 tokens per second of audio, rounded up: 1 minute costs 6,000 tokens."""
    return math.ceil(round(seconds * AUDIO_TOKENS_PER_SECOND, 6))


def audio_headers(seconds: float, charged: int | None = None) -> dict[str, str]:
    """The doc's per-request audio headers; ``charged`` defaults to the price of ``seconds``."""
    return {
        "X-Audio-Duration-Seconds": f"{seconds:.3f}",
        "X-Audio-Tokens-Charged": str(audio_tokens(seconds) if charged is None else charged),
    }
