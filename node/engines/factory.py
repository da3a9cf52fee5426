"""Which engine backs which kind of model."""

from __future__ import annotations

from node.config import ModelKind, ModelSpec
from node.engines.base import Engine


def make_engine(spec: ModelSpec) -> Engine:
    if spec.kind is ModelKind.CHAT:
        from node.engines.vllm_chat import VllmChatEngine

        return VllmChatEngine(spec)
    if spec.kind is ModelKind.EMBEDDING:
        from node.engines.st_embed import SentenceTransformerEngine

        return SentenceTransformerEngine(spec)
    from node.engines.whisper import WhisperEngine

    return WhisperEngine(spec)
