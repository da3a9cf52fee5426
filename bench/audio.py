"""Transcription: the node against in-process faster-whisper (same folder, compute type and
beam size) on espeak-ng speech; the long clip also sequential against the batched pipeline."""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from bench import procs
from bench.config import MODELS, BenchConfig
from bench.rows import Row, bars_of, compare_row, value_row
from bench.stats import median_run, ratio, summary

LANGUAGE = "sv"
# The short clip decodes at temperature 0 on the stand-in. The one before (about "transkriberings-
# tjänsten" and the weather) fell back through every temperature up to 1.0, sampling at random,
# so its time varied from about 1 to 8 s from run to run.
SHORT = "Hej, det här är ett test av tjänsten. God morgon, det här är ett test."
SENTENCES = [
    SHORT,
    "Regeringen presenterade i dag en ny budget för skolan och vården.",
    "Tåget mot Göteborg är försenat på grund av snö och kyla.",
    "Forskarna vid universitetet har mätt hur elpriset påverkas av vintern.",
    "Mötet börjar klockan nio och slutar strax efter lunch.",
    "Företaget anställer tjugo nya utvecklare under våren.",
    "Det blåser kraftigt längs kusten och färjorna står stilla.",
    "Biblioteket har öppet till klockan åtta varje vardag.",
]


def _run(argv: list[str]) -> None:
    subprocess.run(argv, check=True, capture_output=True, timeout=300)


def duration_s(path: Path) -> float:
    out = subprocess.run(["soxi", "-D", str(path)], check=True, capture_output=True, text=True)
    return float(out.stdout.strip())


def make_clips(folder: Path, long_s: float) -> dict[str, Path]:
    """short.wav: one sentence (about 5 s); long.wav: the sentences, with a pause after each,
    concatenated with sox until ``long_s`` seconds. Both 16 kHz mono 16-bit WAV."""
    folder.mkdir(parents=True, exist_ok=True)
    parts = []
    for i, text in enumerate(SENTENCES):
        raw = folder / f"s{i}.raw.wav"
        part = folder / f"s{i}.wav"
        _run(["espeak-ng", "-v", LANGUAGE, "-w", str(raw), text])
        _run(["sox", str(raw), "-r", "16000", "-c", "1", "-b", "16", str(part), "pad", "0", "0.4"])
        parts.append(part)
    short = folder / "short.wav"
    _run(["sox", str(folder / "s0.raw.wav"), "-r", "16000", "-c", "1", "-b", "16", str(short)])
    block = folder / "block.wav"
    _run(["sox", *map(str, parts), str(block)])
    repeats = max(1, int(long_s // duration_s(block)) + 1)
    long = folder / "long.wav"
    _run(["sox", *[str(block)] * repeats, str(long), "trim", "0", f"{long_s:.3f}"])
    return {"short": short, "long": long}


def transcribe_node(client: httpx.Client, key: str, clip: Path, timeout_s: float) -> dict[str, Any]:
    """One timed request on ``client``, kept open across requests as an SDK keeps its own: a
    fresh httpx client per request (its set-up and a new connection) added about 7 ms here,
    which is no part of the node."""
    data = clip.read_bytes()
    t0 = time.perf_counter()
    r = client.post(
        "/v1/audio/transcriptions",
        headers={"Authorization": f"Bearer {key}"},
        data={"model": "kb-whisper-large", "language": LANGUAGE, "response_format": "json"},
        files={"file": (clip.name, data, "audio/wav")},
        timeout=timeout_s,
    )
    wall = time.perf_counter() - t0
    if r.status_code != 200:
        return {"wall_s": wall, "rtfx": None, "error": f"{r.status_code}: {r.text[:300]}"}
    audio_s = float(r.headers.get("X-Audio-Duration-Seconds", "nan"))
    return {"wall_s": wall, "audio_s": audio_s, "rtfx": audio_s / wall, "text": r.json()["text"]}


def run_transcription(
    cfg: BenchConfig, env: dict[str, str], workdir: Path, logs: Path
) -> dict[str, Any]:
    from node.config import load_models

    (spec,) = load_models((MODELS / "transcription.yaml").read_text(), procs.models_dir(env))
    clips = make_clips(workdir / "clips", cfg.long_clip_s)
    lengths = {name: duration_s(path) for name, path in clips.items()}
    print(f"  clips: {', '.join(f'{k} {v:.1f} s' for k, v in lengths.items())}", flush=True)
    job = {
        "path": spec.path,
        "engine": spec.engine,
        "language": LANGUAGE,
        "warmup_clip": str(clips["short"]),
        "batch_size": cfg.whisper_batch_size,
    }
    (workdir / "whisper-job.json").write_text(json.dumps(job))
    reference_argv = [procs.PYTHON, "-m", "bench.inproc", "whisper-server"]
    reference_argv.append(str(workdir / "whisper-job.json"))

    node_runs: list[dict[str, Any]] = []
    inproc: list[dict[str, Any]] = []
    node_env = {**env, "STAIK_DB_PATH": str(workdir / "whisper-node.sqlite3")}
    key = procs.create_key(node_env)
    with (
        procs.node_server(MODELS / "transcription.yaml", node_env, logs / "whisper-node.log") as n,
        httpx.Client(base_url=n.base_url) as client,
    ):
        n.start("/health/ready", cfg.server_start_timeout_s)
        print(f"  transcription node ready in {n.ready_s:.0f} s", flush=True)
        transcribe_node(client, key, clips["short"], 120)  # warm-up, as the reference's
        # The reference starts once the node is up: its load would slow the node's start.
        with procs.LineChild(reference_argv, env, logs / "whisper-inproc.log") as reference:
            if reference.answer(600) != "ready":
                raise RuntimeError("the in-process faster-whisper reference did not start")
            sides = _Sides(client, key, clips, lengths, reference)
            for rep in range(cfg.reps):
                node_run, inproc_run = sides.repetition(rep, cfg.short_clip_samples)
                node_runs.append(node_run)
                inproc.append(inproc_run)
                for side, run in (("node", node_run), ("in-process", inproc_run)):
                    shown = {k: v["rtfx"] and round(v["rtfx"], 2) for k, v in run.items()}
                    print(f"  transcription {side} rep {rep}: RTFx {shown}", flush=True)
    return _report(cfg, lengths, inproc, node_runs, n.ready_s)


class _Sides:
    """The node and the in-process reference (kept loaded), run alternately on the same clips:
    the machine's speed drifts by minutes, so both sides sample the same moments of it."""

    def __init__(
        self,
        client: httpx.Client,
        key: str,
        clips: dict[str, Path],
        lengths: dict[str, float],
        reference: procs.LineChild,
    ) -> None:
        self.client = client
        self.key = key
        self.clips = clips
        self.lengths = lengths
        self.reference = reference

    def node(self, clip: str) -> dict[str, Any]:
        return transcribe_node(self.client, self.key, self.clips[clip], self._timeout_s(clip))

    def in_process(self, clip: str, pipeline: str) -> dict[str, Any]:
        ask = {"clip": str(self.clips[clip]), "pipeline": pipeline}
        answer: dict[str, Any] = self.reference.ask(ask, self._timeout_s(clip))
        return answer

    def _timeout_s(self, clip: str) -> float:
        return 60 + 6 * self.lengths[clip]  # generous: RTFx well below 1 still finishes

    def repetition(self, rep: int, short_samples: int) -> tuple[dict[str, Any], dict[str, Any]]:
        """The short clip ``short_samples`` times on each side, taking turns (who goes first
        alternates, sample by sample and repetition by repetition), the median counting; then
        the long clip once on each side, in-process both sequential and batched."""
        short_node: list[dict[str, Any]] = []
        short_ref: list[dict[str, Any]] = []
        for i in range(short_samples):
            _in_turn(
                (rep + i) % 2 == 0,
                lambda: short_node.append(self.node("short")),
                lambda: short_ref.append(self.in_process("short", "sequential")),
            )
        long: dict[str, dict[str, Any]] = {}

        def reference_long() -> None:
            long["sequential"] = self.in_process("long", "sequential")
            long["batched"] = self.in_process("long", "batched")

        _in_turn(rep % 2 == 0, lambda: long.update(node=self.node("long")), reference_long)
        # Each sample's two requests sat seconds apart: their ratio leaves out the machine's
        # drift between samples (seconds on a 2 s clip here), which the medians keep.
        paired = [
            ratio(r["wall_s"], n["wall_s"]) if n.get("rtfx") else None
            for n, r in zip(short_node, short_ref, strict=True)
        ]
        node_run = {
            "short": {**median_run(short_node), "paired_ratio": summary(paired)["median"]},
            "long": long["node"],
        }
        inproc_run = {
            "short_sequential": median_run(short_ref),
            "long_sequential": long["sequential"],
            "long_batched": long["batched"],
        }
        return node_run, inproc_run


def _in_turn(node_first: bool, node: Callable[[], None], reference: Callable[[], None]) -> None:
    for step in (node, reference) if node_first else (reference, node):
        step()


def _report(
    cfg: BenchConfig,
    lengths: dict[str, float],
    inproc: list[dict[str, Any]],
    node_runs: list[dict[str, Any]],
    ready_s: float,
) -> dict[str, Any]:
    def of(runs: list[dict[str, Any]], key: str) -> dict[str, Any]:
        return summary([r[key].get("rtfx") for r in runs])

    seq_short, seq_long = of(inproc, "short_sequential"), of(inproc, "long_sequential")
    rows: list[Row] = [
        compare_row(
            "rtfx",
            f"short {lengths['short']:.0f} s",
            "audio s / wall s",
            ("node", of(node_runs, "short")),
            ("in-process sequential", seq_short),
            ("node/in-process >= 0.95", lambda r: r >= 0.95),
        ),
        value_row(
            "rtfx_paired_ratio",
            f"short {lengths['short']:.0f} s",
            "node/in-process",
            (
                "node/in-process, request by request",
                summary([r["short"].get("paired_ratio") for r in node_runs]),
            ),
            None,
        ),
        compare_row(
            "rtfx",
            f"long {lengths['long']:.0f} s",
            "audio s / wall s",
            ("node", of(node_runs, "long")),
            ("in-process sequential", seq_long),
            ("node/in-process sequential > 1.00", lambda r: r > 1.0),
        ),
        compare_row(
            "rtfx",
            f"long {lengths['long']:.0f} s",
            "audio s / wall s",
            ("in-process batched", of(inproc, "long_batched")),
            ("in-process sequential", seq_long),
            ("batched/sequential > 1.00", lambda r: r > 1.0),
        ),
    ]
    errors = [f"{k}: {v['error']}" for r in node_runs for k, v in r.items() if v.get("error")]
    rows.append(value_row("failed", "all", "requests", ("node", summary([len(errors)])), None))
    same = {
        name: all(
            r[name].get("text") == i[f"{name}_sequential"]["text"]
            for r, i in zip(node_runs, inproc, strict=False)
        )
        for name in ("short", "long")
    }
    sample = {
        "node": node_runs[0]["short"].get("text"),
        "in_process": inproc[0]["short_sequential"]["text"],
    }
    for run in [*node_runs, *inproc]:  # keep the JSON small: the long transcripts are long
        for item in run.values():
            if isinstance(item.get("text"), str):
                item["text"] = item["text"][:160]
    return {
        "peer": "in-process faster-whisper",
        "settings": {
            "clips_s": lengths,
            "language": LANGUAGE,
            "in_process_batched": f"BatchedInferencePipeline, batch_size {cfg.whisper_batch_size}, "
            "vad_filter=True (required over 30 s), without_timestamps=False (segments at timestamps)",
            "sequential": "WhisperModel.transcribe, vad_filter=False (as the node)",
        },
        "ready_s": {"node": ready_s},
        "runs": {"node": node_runs, "in_process": inproc},
        "node_errors": errors,
        "same_text_as_in_process": same,
        "sample_text": sample,
        "rows": rows,
        "series": [],
        "bars": [
            bars_of(
                "transcription_rtfx.png",
                "Transcription: real-time factor (audio s / wall s, higher is faster)",
                "audio s / wall s",
                {
                    "node": [of(node_runs, "short"), of(node_runs, "long")],
                    "in-process sequential": [seq_short, seq_long],
                    "in-process batched": [{}, of(inproc, "long_batched")],
                },
                [f"short {lengths['short']:.0f} s", f"long {lengths['long']:.0f} s"],
            )
        ],
    }
