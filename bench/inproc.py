"""The in-process references, each a child process that stays loaded beside the node and answers
JSON lines (see each one), so that its measurements interleave with the node's on a machine
whose speed drifts by some 10% over minutes:

    python -m bench.inproc embeddings-server SPEC.json
    python -m bench.inproc whisper-server SPEC.json

SPEC.json says what to load and how.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

from bench.stats import percentile

# The node's fallback temperatures for temperature 0 (node/engines/whisper.py), which are also
# faster-whisper's defaults.
TEMPERATURES = [0.0, 0.2, 0.4, 0.6, 0.8, 1.0]


def embeddings_server(spec: dict[str, Any]) -> None:
    """Stays loaded: SentenceTransformer.encode, answering each JSON line with one JSON line;
    "ready" first, after a warm-up. Two questions:

    - a list of texts: each encoded alone, as the node's engine does with one text; the
      latencies (ms);
    - ``"ceiling"``: the ceiling, all of the spec's texts at each of its batch sizes (the best
      one wins), then ``single_samples`` texts encoded alone (their p50/p99).
    """
    from sentence_transformers import SentenceTransformer

    texts: list[str] = spec["texts"]
    model = SentenceTransformer(spec["path"], device="cpu")
    model.max_seq_length = int(spec["max_seq_length"])

    def encode(items: list[str], batch_size: int) -> None:
        model.encode(items, batch_size=batch_size, convert_to_numpy=True, normalize_embeddings=True)

    def singles(items: list[str]) -> list[float]:
        latencies = []
        for text in items:
            t0 = time.perf_counter()
            encode([text], 1)
            latencies.append((time.perf_counter() - t0) * 1000)
        return latencies

    def ceiling() -> dict[str, Any]:
        by_batch: dict[str, float] = {}
        for bs in spec["batch_sizes"]:
            t0 = time.perf_counter()
            encode(texts, bs)
            by_batch[str(bs)] = len(texts) / (time.perf_counter() - t0)
        single = singles(texts[: int(spec["single_samples"])])
        best = max(by_batch, key=lambda k: by_batch[k])
        return {
            "texts_s": by_batch[best],
            "best_batch": int(best),
            "by_batch": by_batch,
            "single_p50_ms": percentile(single, 50),
            "single_p99_ms": percentile(single, 99),
        }

    encode(texts[:64], 64)  # warm-up
    print(json.dumps("ready"), flush=True)
    for line in sys.stdin:
        ask = json.loads(line)
        print(json.dumps(ceiling() if ask == "ceiling" else singles(ask)), flush=True)


def whisper_server(spec: dict[str, Any]) -> None:
    """Stays loaded: faster-whisper with the node's settings, answering each JSON line
    ``{"clip": PATH, "pipeline": "sequential" | "batched"}`` with one timed run as a JSON line;
    "ready" first, after a warm-up. Kept loaded so that its runs can alternate with the node's
    on a machine whose speed drifts. A path goes in, so decoding counts as it does in the node;
    the batched pipeline needs VAD (or clip timestamps) for audio over 30 s."""
    from faster_whisper import BatchedInferencePipeline, WhisperModel

    eng = spec["engine"]
    model = WhisperModel(
        spec["path"],
        device="cpu",
        compute_type=eng.get("compute_type", "int8"),
        cpu_threads=int(eng.get("cpu_threads", 0)),
    )
    pipelines: dict[str, tuple[Any, dict[str, Any]]] = {
        "sequential": (model.transcribe, {"vad_filter": False}),  # as the node, under 120 s
        "batched": (
            BatchedInferencePipeline(model).transcribe,
            {
                "vad_filter": True,
                "without_timestamps": False,
                "batch_size": int(spec["batch_size"]),
            },
        ),
    }
    common: dict[str, Any] = dict(
        language=spec["language"],
        initial_prompt=None,
        temperature=TEMPERATURES,
        beam_size=int(eng.get("beam_size", 5)),
    )

    def timed(clip: str, pipeline: str) -> dict[str, Any]:
        fn, kwargs = pipelines[pipeline]
        t0 = time.perf_counter()
        segments, info = fn(clip, **common, **kwargs)
        text = "".join(s.text for s in segments).strip()  # the generator does the work
        wall = time.perf_counter() - t0
        return {
            "wall_s": wall,
            "audio_s": info.duration,
            "rtfx": info.duration / wall,
            "text": text,
        }

    timed(spec["warmup_clip"], "sequential")
    print(json.dumps("ready"), flush=True)
    for line in sys.stdin:
        ask = json.loads(line)
        print(json.dumps(timed(ask["clip"], ask["pipeline"])), flush=True)


def main(argv: list[str]) -> int:
    kind, spec_path = argv
    servers = {"embeddings-server": embeddings_server, "whisper-server": whisper_server}
    servers[kind](json.loads(Path(spec_path).read_text()))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
