"""Multipart uploads with a hard size cap that never holds the whole body in memory.

A Content-Length above the cap is refused before reading anything; a chunked body is counted
as it streams and cut off at the cap. python-multipart (through Starlette) spools files to disk.
"""

from __future__ import annotations

from starlette.datastructures import FormData
from starlette.requests import ClientDisconnect, Request
from starlette.types import Message, Receive

from node.errors import (
    ClientClosedRequest,
    InvalidRequest,
    PayloadTooLarge,
    UnsupportedMediaType,
)

_MULTIPART_SLACK = 64 * 1024  # room for boundaries and the small fields beside the file


def _too_large(limit: int) -> PayloadTooLarge:
    return PayloadTooLarge(
        f"The upload is larger than the maximum of {limit // (1024 * 1024)} MB.", param="file"
    )


def _capped(receive: Receive, limit: int) -> Receive:
    seen = 0

    async def capped_receive() -> Message:
        nonlocal seen
        message = await receive()
        if message["type"] == "http.request":
            seen += len(message.get("body", b""))
            if seen > limit:
                raise _too_large(limit - _MULTIPART_SLACK)
        return message

    return capped_receive


async def read_form(request: Request, max_file_bytes: int) -> FormData:
    ctype = request.headers.get("content-type", "")
    if not ctype.startswith("multipart/form-data"):
        raise UnsupportedMediaType(
            "Send the audio as multipart/form-data with a 'file' field.", param="file"
        )
    limit = max_file_bytes + _MULTIPART_SLACK
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise _too_large(max_file_bytes)
    capped = Request(request.scope, _capped(request.receive, limit))
    try:
        return await capped.form(max_files=1, max_fields=32)
    except PayloadTooLarge:
        raise
    except ClientDisconnect:
        raise ClientClosedRequest("The client closed the connection mid-upload.") from None
    except Exception as exc:  # python-multipart / Starlette parse errors
        raise InvalidRequest(f"The multipart body could not be parsed: {exc}") from None
