"""GET /v1/models and /v1/models/{id}: OpenAI's list shape plus kind, window and state."""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from node.errors import ModelNotFound
from node.registry import ModelEntry, Registry


def _card(name: str, entry: ModelEntry, created: int) -> dict[str, Any]:
    spec = entry.spec
    card: dict[str, Any] = {
        "id": name,
        "object": "model",
        "created": created,
        "owned_by": spec.owned_by,
        "kind": spec.kind.value,
        "context_window": spec.context_window,
        "vision": spec.vision,
        **entry.describe(),
    }
    if name != spec.name:
        card["alias_of"] = spec.name
    if spec.default_max_tokens:
        card["default_max_tokens"] = spec.default_max_tokens
    if spec.dimensions:
        card["dimensions"] = spec.dimensions
    return card


def _cards(request: Request) -> list[dict[str, Any]]:
    registry: Registry = request.app.state.registry
    created = request.app.state.started_at
    return [
        _card(name, entry, created)
        for entry in registry.entries
        for name in entry.spec.public_names
    ]


async def list_models(request: Request) -> Response:
    return JSONResponse({"object": "list", "data": _cards(request)})


async def get_model(request: Request) -> Response:
    wanted = request.path_params["model"]
    for card in _cards(request):
        if card["id"] == wanted:
            return JSONResponse(card)
    raise ModelNotFound(f"The model '{wanted}' does not exist.", param="model")
