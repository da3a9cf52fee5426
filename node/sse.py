"""Server-sent events as the OpenAI streams send them: one ``data:`` line of compact JSON."""

from __future__ import annotations

import json
from typing import Any


def sse_data(obj: Any) -> str:
    return f"data: {json.dumps(obj, separators=(',', ':'), ensure_ascii=False)}\n\n"
