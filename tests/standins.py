"""The stand-in models' specs, as the node reads them from models.standin.yaml."""

from __future__ import annotations

import os
from pathlib import Path

from node.config import ModelKind, ModelSpec, load_models

ROOT = Path(__file__).resolve().parents[1]


def models_dir() -> str:
    if os.environ.get("STAIK_MODELS_DIR"):
        return os.environ["STAIK_MODELS_DIR"]
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return str(Path(base) / "staik-node" / "models")


def standin_spec(kind: ModelKind) -> ModelSpec:
    specs = load_models((ROOT / "models.standin.yaml").read_text(), Path(models_dir()))
    return next(s for s in specs if s.kind is kind)
