"""Typed settings (from the environment, read when asked, never at import) and models.yaml."""

from __future__ import annotations

import os
from collections.abc import Mapping
from enum import StrEnum
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

MAX_UPLOAD_BYTES = 25 * 1024 * 1024


class ModelKind(StrEnum):
    CHAT = "chat"
    EMBEDDING = "embedding"
    TRANSCRIPTION = "transcription"


class ModelSpec(BaseModel):
    """One public model of models.yaml. ``engine`` holds engine-specific arguments, passed on
    as given (a chat engine given no dtype gets one for its CPU: ``vllm_chat.cpu_dtype``)."""

    model_config = ConfigDict(extra="forbid")

    name: str
    kind: ModelKind
    path: str = Field(
        description="weights: a hub id (production) or a folder; {models_dir} expands"
    )
    aliases: list[str] = Field(default_factory=list)
    context_window: int | None = None
    default_max_tokens: int | None = None
    vision: bool = False
    dimensions: int | None = None
    slots: int = Field(default=4, ge=1)
    queue_timeout_ms: int = Field(default=0, ge=0)
    owned_by: str = "staik"
    engine: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _chat_needs_window(self) -> ModelSpec:
        if self.kind is ModelKind.CHAT:
            if not self.context_window or not self.default_max_tokens:
                raise ValueError(
                    f"{self.name}: chat models need context_window and default_max_tokens"
                )
            if self.default_max_tokens >= self.context_window:
                raise ValueError(f"{self.name}: default_max_tokens must be below context_window")
        return self

    @property
    def public_names(self) -> list[str]:
        return [self.name, *self.aliases]


class ModelsFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    models: list[ModelSpec]

    @model_validator(mode="after")
    def _unique_names(self) -> ModelsFile:
        seen: set[str] = set()
        for spec in self.models:
            for name in spec.public_names:
                if name in seen:
                    raise ValueError(f"model name {name!r} appears twice")
                seen.add(name)
        return self


class ConfigError(ValueError):
    pass


def load_models(text: str, models_dir: Path) -> list[ModelSpec]:
    """Parse and validate every entry of a models.yaml text; ``{models_dir}`` expands in paths."""
    try:
        raw = yaml.safe_load(text)
        parsed = ModelsFile.model_validate(raw)
    except (yaml.YAMLError, ValidationError) as exc:
        raise ConfigError(f"invalid models file: {exc}") from exc
    for spec in parsed.models:
        spec.path = spec.path.replace("{models_dir}", str(models_dir))
    return parsed.models


def _default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "staik-node"


def _default_data_dir() -> Path:
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "staik-node"


class Settings(BaseModel):
    """Node settings. Built from the environment by :meth:`from_env`, or directly in tests."""

    host: str = "127.0.0.1"
    port: int = 8000
    models_file: Path = Path("models.yaml")
    models_dir: Path = Field(default_factory=lambda: _default_cache_dir() / "models")
    db_path: Path = Field(default_factory=lambda: _default_data_dir() / "node.sqlite3")
    redis_url: str | None = None
    max_upload_bytes: int = MAX_UPLOAD_BYTES
    max_json_bytes: int = 64 * 1024 * 1024  # room for a few inline images
    drain_timeout_s: float = 30.0
    # A stream whose client reads nothing for this long lets go of its slot and engine work.
    stream_stall_timeout_s: float = Field(default=60.0, gt=0)
    daily_reset_tz: str = "Europe/Stockholm"
    image_allowed_hosts: list[str] = Field(default_factory=list)
    # Browsers may call the API from any origin, as OpenAI's: keys are bearer tokens, never
    # cookies. STAIK_CORS_ORIGINS names origins (comma-separated), or "none" for no CORS.
    cors_origins: list[str] = Field(default_factory=lambda: ["*"])
    log_level: str = "info"
    # uvicorn's line per request: off by default, /metrics counts requests instead (the line
    # cost ~0.14 ms of event loop per request, and a flood of 429s a line each).
    access_log: bool = False

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        env = os.environ if env is None else env
        values: dict[str, Any] = {}
        mapping = {
            "STAIK_HOST": "host",
            "STAIK_PORT": "port",
            "STAIK_MODELS_FILE": "models_file",
            "STAIK_MODELS_DIR": "models_dir",
            "STAIK_DB_PATH": "db_path",
            "STAIK_REDIS_URL": "redis_url",
            "STAIK_MAX_UPLOAD_BYTES": "max_upload_bytes",
            "STAIK_MAX_JSON_BYTES": "max_json_bytes",
            "STAIK_DRAIN_TIMEOUT_S": "drain_timeout_s",
            "STAIK_STREAM_STALL_TIMEOUT_S": "stream_stall_timeout_s",
            "STAIK_DAILY_RESET_TZ": "daily_reset_tz",
            "STAIK_LOG_LEVEL": "log_level",
            "STAIK_ACCESS_LOG": "access_log",
        }
        for key, field in mapping.items():
            if env.get(key):
                values[field] = env[key]
        if env.get("STAIK_IMAGE_ALLOWED_HOSTS"):
            values["image_allowed_hosts"] = [
                h.strip() for h in env["STAIK_IMAGE_ALLOWED_HOSTS"].split(",") if h.strip()
            ]
        if env.get("STAIK_CORS_ORIGINS"):
            origins = [o.strip() for o in env["STAIK_CORS_ORIGINS"].split(",") if o.strip()]
            values["cors_origins"] = [] if origins == ["none"] else origins
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls.model_validate(values)
