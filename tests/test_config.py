"""The models files: both profiles validate; bad entries are refused with a clear reason."""

from __future__ import annotations

from pathlib import Path

import pytest

from node.config import ConfigError, ModelKind, Settings, load_models

ROOT = Path(__file__).resolve().parents[1]
DOC_NAMES = {"gemma4:31b", "qwen3.6:35b-a3b", "qwen3.5:9b", "bge-m3:latest", "kb-whisper-large"}


@pytest.mark.parametrize("file", ["models.yaml", "models.standin.yaml"])
def test_both_profiles_serve_the_docs_public_names(file: str) -> None:
    specs = load_models((ROOT / file).read_text(), Path("/models"))
    assert {s.name for s in specs} == DOC_NAMES
    assert "whisper-1" in next(s for s in specs if s.name == "kb-whisper-large").aliases
    gemma = next(s for s in specs if s.name == "gemma4:31b")
    assert gemma.vision and gemma.kind is ModelKind.CHAT


def test_production_windows_match_the_doc() -> None:
    specs = {s.name: s for s in load_models((ROOT / "models.yaml").read_text(), Path("/m"))}
    assert specs["gemma4:31b"].context_window == 98_304
    assert specs["qwen3.6:35b-a3b"].context_window == 262_144
    assert specs["qwen3.5:9b"].context_window == 262_144
    assert specs["bge-m3:latest"].context_window == 8_192
    assert specs["bge-m3:latest"].dimensions == 1024


def test_models_dir_expands_in_paths() -> None:
    specs = load_models((ROOT / "models.standin.yaml").read_text(), Path("/cache/m"))
    assert all(s.path.startswith("/cache/m/") for s in specs)


@pytest.mark.parametrize(
    "text,reason",
    [
        ("models: [{name: a, kind: chat, path: p}]", "context_window"),
        (
            "models: [{name: a, kind: chat, path: p, context_window: 10, default_max_tokens: 20}]",
            "below context_window",
        ),
        ("models: [{name: a, kind: sing, path: p}]", "kind"),
        ("models: [{name: a, kind: embedding, path: p, colour: red}]", "colour"),
        (
            "models: [{name: a, kind: embedding, path: p}, {name: b, kind: embedding, path: p, "
            "aliases: [a]}]",
            "twice",
        ),
        ("models: [{name: a, kind: embedding, path: p, slots: 0}]", "slots"),
        ("models: {", "invalid models file"),
    ],
)
def test_bad_entries_are_refused(text: str, reason: str) -> None:
    with pytest.raises(ConfigError, match=reason):
        load_models(text, Path("/m"))


def test_settings_from_env() -> None:
    s = Settings.from_env({"STAIK_PORT": "9001", "STAIK_IMAGE_ALLOWED_HOSTS": "a.test, b.test"})
    assert s.port == 9001 and s.image_allowed_hosts == ["a.test", "b.test"]
    assert Settings.from_env({}, port=1234).port == 1234


def test_cors_origins_default_to_any_and_can_be_named_or_switched_off() -> None:
    assert Settings.from_env({}).cors_origins == ["*"]
    named = Settings.from_env({"STAIK_CORS_ORIGINS": "https://a.se, https://b.se"})
    assert named.cors_origins == ["https://a.se", "https://b.se"]
    assert Settings.from_env({"STAIK_CORS_ORIGINS": "none"}).cors_origins == []
