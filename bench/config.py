"""What one bench run measures and how big it is: the full run and the smoke."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
MODELS = BENCH_DIR / "models"
SECTIONS = ("chat", "embeddings", "transcription", "overload")


@dataclass(frozen=True)
class BenchConfig:
    smoke: bool = False
    reps: int = 3
    sections: tuple[str, ...] = SECTIONS
    out_dir: Path = BENCH_DIR / "results"
    server_start_timeout_s: float = 600
    # chat: vllm bench serve, random dataset, the same for the node and vllm serve
    chat_concurrency: tuple[int, ...] = (1, 8, 32)
    chat_prompts_per_client: int = 8  # num_prompts = max(min_prompts, concurrency * this)
    chat_min_prompts: int = 32
    chat_input_len: int = 256
    chat_output_len: int = 128
    chat_warmups: int = 4
    chat_run_timeout_s: float = 600
    # embeddings: single-input requests against the in-process ceiling
    embed_concurrency: tuple[int, ...] = (1, 16, 64)
    embed_texts: int = 512
    embed_batch_sizes: tuple[int, ...] = (8, 16, 32, 64, 128)
    embed_single_samples: int = 64
    # transcription: espeak-ng clips (the short one is one sentence, about 5 s)
    long_clip_s: float = 600.0
    short_clip_samples: int = 9  # requests per repetition on the short clip; its median counts
    whisper_batch_size: int = 8
    # overload: S slots, 10 x S concurrent clients against S
    overload_factor: int = 10
    overload_duration_s: float = 20.0
    overload_max_tokens: int = 32
    overload_retry_ms: int | None = None  # None: honour the node's retry-after-ms


def smoke_config(base: BenchConfig) -> BenchConfig:
    """One repetition of everything at tiny sizes: proves the harness, not the node."""
    return replace(
        base,
        smoke=True,
        reps=1,
        server_start_timeout_s=240,
        chat_concurrency=(1, 2),
        chat_prompts_per_client=4,
        chat_min_prompts=8,
        chat_input_len=64,
        chat_output_len=16,
        chat_warmups=1,
        chat_run_timeout_s=120,
        embed_concurrency=(1, 2),
        embed_texts=64,
        embed_batch_sizes=(16, 64),
        embed_single_samples=16,
        long_clip_s=30.0,
        short_clip_samples=2,
        overload_duration_s=4.0,
        overload_max_tokens=16,
    )
