"""Test speech made with espeak-ng and re-encoded with PyAV into the doc's containers."""

from __future__ import annotations

import subprocess
import wave
from pathlib import Path

import av

# container -> (PyAV format, codec, file suffix)
CONTAINERS = {
    "wav": ("wav", "pcm_s16le", ".wav"),
    "mp3": ("mp3", "libmp3lame", ".mp3"),
    "flac": ("flac", "flac", ".flac"),
    "ogg": ("ogg", "libopus", ".ogg"),
    "webm": ("webm", "libopus", ".webm"),
    "m4a": ("ipod", "aac", ".m4a"),
    "mp4": ("mp4", "aac", ".mp4"),
}


def speak(text: str, voice: str, out: Path) -> Path:
    subprocess.run(["espeak-ng", "-v", voice, "-w", str(out), text], check=True)
    return out


def join_with_silence(first: Path, silence_s: float, second: Path, out: Path) -> Path:
    """``first``, ``silence_s`` of silence, then ``second`` (WAVs of one format, as espeak-ng
    writes them)."""
    with wave.open(str(first)) as a, wave.open(str(second)) as b:
        params = a.getparams()
        gap = b"\0" * (int(silence_s * params.framerate) * params.sampwidth * params.nchannels)
        frames = a.readframes(a.getnframes()) + gap + b.readframes(b.getnframes())
    with wave.open(str(out), "wb") as w:
        w.setparams(params)
        w.writeframes(frames)
    return out


def duration_s(path: Path) -> float:
    with av.open(str(path)) as f:
        stream = f.streams.audio[0]
        frames = sum(frame.samples for frame in f.decode(stream))
        return frames / stream.rate


def convert(wav: Path, container: str, out_dir: Path) -> Path:
    fmt, codec, suffix = CONTAINERS[container]
    out = out_dir / (wav.stem + suffix)
    rate = 48000 if codec == "libopus" else 22050 if codec != "aac" else 44100
    with av.open(str(wav)) as src, av.open(str(out), "w", format=fmt) as dst:
        stream = dst.add_stream(codec, rate=rate)
        stream.layout = "mono"
        resampler = av.AudioResampler(
            format=stream.format.name if stream.format else None, layout="mono", rate=rate
        )
        for frame in src.decode(audio=0):
            for res in resampler.resample(frame):
                for packet in stream.encode(res):
                    dst.mux(packet)
        for res in resampler.resample(None):
            for packet in stream.encode(res):
                dst.mux(packet)
        for packet in stream.encode(None):
            dst.mux(packet)
    return out
