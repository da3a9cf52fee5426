"""One closed error hierarchy and one renderer.

Every non-2xx body the node sends is OpenAI's shape
``{"error": {"message", "type", "param", "code"}}`` with a string ``code``. After SSE headers
went out, the same body travels as a ``data:`` event followed by ``data: [DONE]``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

from starlette.responses import JSONResponse
from starlette.types import Receive, Scope, Send

from node.sse import sse_data


class NodeError(Exception):
    """Base of every error a client may see. Subclasses fix status, type and code."""

    status: int = 500
    type: str = "server_error"
    code: str = "internal_error"

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        retry_after_s: float | None = None,
        should_retry: bool | None = None,
        status: int | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code
        if status is not None:
            self.status = status
        self.retry_after_s = retry_after_s
        self.should_retry = should_retry
        self.extra_headers: dict[str, str] = {}  # set by a route that describes every answer

    def body(self) -> dict:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }

    def headers(self) -> dict[str, str]:
        """Retry hints openai-python reads (retry-after-ms, Retry-After, x-should-retry), and
        whatever the route added."""
        out: dict[str, str] = {}
        if self.retry_after_s is not None:
            seconds = max(1, math.ceil(self.retry_after_s))
            out["Retry-After"] = str(seconds)
            out["retry-after-ms"] = str(max(1, math.ceil(self.retry_after_s * 1000)))
        if self.should_retry is not None:
            out["x-should-retry"] = "true" if self.should_retry else "false"
        return out | self.extra_headers


class InvalidRequest(NodeError):
    status = 400
    type = "invalid_request_error"
    code = "invalid_request"


class ContextLengthExceeded(InvalidRequest):
    code = "context_length_exceeded"


class WrongModelKind(InvalidRequest):
    code = "model_not_supported"


class Unauthorized(NodeError):
    status = 401
    type = "authentication_error"
    code = "invalid_api_key"


class ModelNotFound(NodeError):
    status = 404
    type = "invalid_request_error"
    code = "model_not_found"


class NotFound(NodeError):
    status = 404
    type = "invalid_request_error"
    code = "not_found"


class MethodNotAllowed(NodeError):
    status = 405
    type = "invalid_request_error"
    code = "method_not_allowed"


class PayloadTooLarge(NodeError):
    status = 413
    type = "invalid_request_error"
    code = "file_too_large"


class StreamStalled(NodeError):
    """The client stopped reading its stream; the node let go of the work behind it."""

    status = 408
    type = "timeout_error"
    code = "stream_stalled"


class ClientClosedRequest(NodeError):
    """The client hung up before its request was whole: nobody reads the answer, and the
    metrics count it as the client's doing (nginx's 499), not the server's."""

    status = 499
    type = "invalid_request_error"
    code = "client_closed_request"


class UnsupportedMediaType(NodeError):
    status = 415
    type = "invalid_request_error"
    code = "unsupported_media_type"


class RateLimited(NodeError):
    """429: a model's slots are all busy (transient) or a key's quota is spent."""

    status = 429
    type = "rate_limit_error"
    code = "model_busy"


class InsufficientQuota(RateLimited):
    type = "insufficient_quota"
    code = "insufficient_quota"


class Unavailable(NodeError):
    """503: model loading, failed, restarting, node shutting down, store unreachable."""

    status = 503
    type = "server_error"
    code = "model_unavailable"


class EngineError(NodeError):
    status = 500
    type = "server_error"
    code = "engine_error"


def invalid_from_validation(exc: Any) -> InvalidRequest:
    """The most telling problem pydantic found, as a 400 naming the field."""
    problem = _telling(exc.errors())
    loc = param_path(problem.get("loc", ()))
    msg = problem.get("msg", "invalid value")
    return InvalidRequest(f"Invalid field '{loc}': {msg}" if loc else msg, param=loc or None)


def _telling(errors: list[dict[str, Any]]) -> dict[str, Any]:
    """The first error, unless it only says the value is not of the union's first member's
    type while another member names the real problem in the same field: ``stop`` with five
    strings is "too long" as a list, not "should be a valid string"."""
    first = errors[0]
    if not _wrong_member(first):
        return first
    field = param_path(first.get("loc", ()))
    for other in errors[1:]:
        path = param_path(other.get("loc", ()))
        same = path == field or path.startswith((f"{field}[", f"{field}."))
        if same and not _wrong_member(other):
            return other
    return first


def _wrong_member(error: dict[str, Any]) -> bool:
    """A type error at the root of a union member: the value is of another member's type."""
    loc = error.get("loc", ())
    last = loc[-1] if loc else None
    return (
        str(error.get("type", "")).endswith("_type")
        and isinstance(last, str)
        and (last in _TYPE_TAGS or not _is_field_name(last))
    )


def param_path(loc: Iterable[str | int]) -> str:
    """pydantic's error location as OpenAI names a parameter (``messages[0].role``), without
    the union members and type tags pydantic inserts (``ChatCompletionUserMessageParam``,
    ``str``, ``list[...]``): a client's field names are lower-case identifiers or keys."""
    path = ""
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        elif part == "body" or part in _TYPE_TAGS or not _is_field_name(part):
            continue
        else:
            path += f".{part}" if path else part
    return path


_TYPE_TAGS = frozenset({"str", "int", "float", "bool", "list", "dict", "none"})


def _is_field_name(part: str) -> bool:
    return part.isdigit() or (part[:1].islower() and part.replace("_", "").isalnum())


ERROR_CODE_KEY = "error_code"  # where an error answer notes its code in the request's scope


class ErrorResponse(JSONResponse):
    """An error answer in OpenAI's shape. It notes its code in the request's scope, where the
    metrics read it: a 429 ``model_busy`` (capacity) and a 429 ``insufficient_quota`` (a key's
    plan) call for different actions by an operator."""

    def __init__(self, err: NodeError, headers: Mapping[str, str] | None = None) -> None:
        merged = dict(err.headers())
        if headers:
            merged.update(headers)
        super().__init__(err.body(), status_code=err.status, headers=merged)
        self.code = err.code

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        scope.setdefault("state", {})[ERROR_CODE_KEY] = self.code
        await super().__call__(scope, receive, send)


def error_response(err: NodeError, headers: Mapping[str, str] | None = None) -> ErrorResponse:
    return ErrorResponse(err, headers)


def sse_error_event(err: NodeError) -> str:
    """The error as it travels inside a stream that already started, with the closing [DONE]."""
    return sse_data(err.body()) + "data: [DONE]\n\n"
