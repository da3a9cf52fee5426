"""The in-process references, each run as its own bounded child process (no server running):

    python -m bench.inproc embeddings SPEC.json OUT.json
    python -m bench.inproc whisper SPEC.json OUT.json
    python -m bench.inproc single-encoder SPEC.json   (JSON lines in and out, see there)

SPEC.json says what to measure; OUT.json gets one entry per repetition.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

from bench.stats import median_run, percentile

# The node's fallback temperatures for temperature 0 (node/engines/whisper.py), which are also
# faster-whisper's defaults.
TEMPERATURES = [0.0, 0.2, 0.4, 0.6, 0.8, 1.0]


def embeddings(spec: dict[str, Any]) -> dict[str, Any]:
    """The ceiling: SentenceTransformer.encode over all texts at each batch size (the best one
    wins), and the latency of encoding one text alone."""
    from sentence_transformers import SentenceTransformer

    texts: list[str] = spec["texts"]
    model = SentenceTransformer(spec["path"], device="cpu")
    model.max_seq_length = int(spec["max_seq_length"])

    def encode(items: list[str], batch_size: int) -> None:
        model.encode(items, batch_size=batch_size, convert_to_numpy=True, normalize_embeddings=True)

    encode(texts[:64], 64)  # warm-up
    reps = []
    for rep in range(int(spec["reps"])):
        by_batch: dict[str, float] = {}
        for bs in spec["batch_sizes"]:
            t0 = time.perf_counter()
            encode(texts, bs)
            by_batch[str(bs)] = len(texts) / (time.perf_counter() - t0)
        single = []
        for text in texts[: int(spec["single_samples"])]:
            t0 = time.perf_counter()
            encode([text], 1)
            single.append((time.perf_counter() - t0) * 1000)
        best = max(by_batch, key=lambda k: by_batch[k])
        reps.append(
            {
                "texts_s": by_batch[best],
                "best_batch": int(best),
                "by_batch": by_batch,
                "single_p50_ms": percentile(single, 50),
                "single_p99_ms": percentile(single, 99),
            }
        )
        print(f"  in-process embeddings rep {rep}: {reps[-1]}", flush=True)
    return {"reps": reps}


def single_encoder(spec: dict[str, Any]) -> None:
    """Stays loaded: for each JSON list of texts on stdin, encodes them one at a time as the
    node's engine does and answers the latencies (ms) as one JSON line; "ready" first."""
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(spec["path"], device="cpu")
    model.max_seq_length = int(spec["max_seq_length"])
    model.encode(spec["texts"][:64], batch_size=64)  # warm-up
    print(json.dumps("ready"), flush=True)
    for line in sys.stdin:
        latencies = []
        for text in json.loads(line):
            t0 = time.perf_counter()
            model.encode([text], batch_size=1, convert_to_numpy=True, normalize_embeddings=True)
            latencies.append((time.perf_counter() - t0) * 1000)
        print(json.dumps(latencies), flush=True)


def whisper(spec: dict[str, Any]) -> dict[str, Any]:
    """faster-whisper with the node's settings on each clip (file path in, so decoding counts
    as it does in the node); the long clip also through BatchedInferencePipeline."""
    from faster_whisper import BatchedInferencePipeline, WhisperModel

    eng = spec["engine"]
    model = WhisperModel(
        spec["path"],
        device="cpu",
        compute_type=eng.get("compute_type", "int8"),
        cpu_threads=int(eng.get("cpu_threads", 0)),
    )
    batched = BatchedInferencePipeline(model)
    common: dict[str, Any] = dict(
        language=spec["language"],
        initial_prompt=None,
        temperature=TEMPERATURES,
        beam_size=int(eng.get("beam_size", 5)),
    )

    def timed(fn: Any, path: str, **kwargs: Any) -> dict[str, Any]:
        t0 = time.perf_counter()
        segments, info = fn(path, **common, **kwargs)
        text = "".join(s.text for s in segments).strip()  # the generator does the work
        wall = time.perf_counter() - t0
        return {
            "wall_s": wall,
            "audio_s": info.duration,
            "rtfx": info.duration / wall,
            "text": text,
        }

    timed(model.transcribe, spec["clips"]["short"], vad_filter=False)  # warm-up
    reps = []
    for rep in range(int(spec["reps"])):
        out = {
            "short_sequential": median_run(
                [
                    timed(model.transcribe, spec["clips"]["short"], vad_filter=False)
                    for _ in range(int(spec["short_samples"]))
                ]
            ),
            "long_sequential": timed(model.transcribe, spec["clips"]["long"], vad_filter=False),
            # The batched pipeline needs VAD (or clip timestamps) for audio over 30 s.
            "long_batched": timed(
                batched.transcribe,
                spec["clips"]["long"],
                vad_filter=True,
                batch_size=int(spec["batch_size"]),
            ),
        }
        reps.append(out)
        short = {k: round(v["rtfx"], 2) for k, v in out.items()}
        print(f"  in-process whisper rep {rep}: RTFx {short}", flush=True)
    return {"reps": reps}


def main(argv: list[str]) -> int:
    if argv[0] == "single-encoder":
        single_encoder(json.loads(Path(argv[1]).read_text()))
        return 0
    kind, spec_path, out_path = argv
    spec = json.loads(Path(spec_path).read_text())
    result = {"embeddings": embeddings, "whisper": whisper}[kind](spec)
    Path(out_path).write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
