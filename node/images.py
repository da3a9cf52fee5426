"""Turn chat ``image_url`` parts into validated inline ``data:`` URLs before vLLM sees them.

vLLM would otherwise fetch remote URLs itself, from inside the node's network. Here every
fetch is SSRF-checked: the host is resolved by us, every resolved address must be public
(unless the operator allow-listed that exact host name), and the connection goes to the
checked IP (Host header and TLS SNI carry the name), so DNS rebinding cannot slip in between
check and connect. Each redirect hop is checked the same way.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import functools
import io
import ipaddress
import socket
import warnings
from dataclasses import dataclass
from typing import TypeGuard
from urllib.parse import urljoin, urlsplit

import httpx
from PIL import Image

from node.errors import InvalidRequest

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

# Formats vLLM can take; Pillow's exotic plugins (EPS runs Ghostscript) are never tried.
_FORMATS = ("PNG", "JPEG", "GIF", "WEBP", "BMP")
_SCHEME_PORTS = {"http": 80, "https": 443}
_PUBLIC_PORTS = frozenset({80, 443})  # other ports only for allowed_hosts
_REDIRECTS = frozenset({301, 302, 303, 307, 308})

# Spelled out rather than trusting is_global alone, whose meaning changed across 3.11.x.
_BLOCKED = tuple(
    ipaddress.ip_network(n)
    for n in (
        "0.0.0.0/8", "10.0.0.0/8", "100.64.0.0/10", "127.0.0.0/8", "169.254.0.0/16",
        "172.16.0.0/12", "192.0.0.0/24", "192.0.2.0/24", "192.88.99.0/24", "192.168.0.0/16",
        "198.18.0.0/15", "198.51.100.0/24", "203.0.113.0/24", "224.0.0.0/4", "240.0.0.0/4",
        "::/96", "64:ff9b:1::/48", "100::/64", "2001::/23", "2001:db8::/32", "fc00::/7",
        "fe80::/10", "fec0::/10", "ff00::/8",
    )
)  # fmt: skip
_6TO4 = ipaddress.IPv6Network("2002::/16")
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")


@dataclass(frozen=True)
class ImagePolicy:
    max_bytes: int = 10 * 1024 * 1024  # per image, after download / base64 decode
    max_pixels: int = 50_000_000  # decompression-bomb guard
    timeout_s: float = 10.0  # whole fetch of one image, redirects included
    max_redirects: int = 3
    max_images: int = 8  # per request
    # Exact host names (as written in the URL) that may resolve to loopback/private
    # addresses and use any port.
    allowed_hosts: frozenset[str] = frozenset()


def is_public_address(ip: IPAddress) -> bool:
    """True only for globally routable unicast addresses; v4 embedded in v6 is unwrapped."""
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return is_public_address(ip.ipv4_mapped)
        if ip in _6TO4 and ip.sixtofour is not None:
            return is_public_address(ip.sixtofour)
        if ip in _NAT64:
            return is_public_address(ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF))
    if any(ip in net for net in _BLOCKED):
        return False
    return ip.is_global and not (ip.is_multicast or ip.is_reserved)


def _is_image_part(part: object) -> TypeGuard[dict]:
    return isinstance(part, dict) and part.get("type") == "image_url"


def count_images(messages: list) -> int:
    contents = [m.get("content") for m in messages if isinstance(m, dict)]
    return sum(sum(map(_is_image_part, c)) for c in contents if isinstance(c, list))


def _refuse(code: str, where: str, why: str) -> InvalidRequest:
    return InvalidRequest(f"{where}: {why}", param="messages", code=code)


_bad_url = functools.partial(_refuse, "invalid_image_url")  # URL / SSRF problems
_bad_image = functools.partial(_refuse, "invalid_image")  # oversized or undecodable images


def _check_image(data: bytes, policy: ImagePolicy, where: str) -> str:
    """Validate decoded bytes with Pillow; return the detected MIME type."""
    if len(data) > policy.max_bytes:
        raise _bad_image(where, f"image is larger than the {policy.max_bytes}-byte limit")
    try:
        with warnings.catch_warnings():
            # Our own max_pixels check is the guard; Pillow's warning would be noise.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data), formats=_FORMATS) as img:
                (width, height), fmt = img.size, img.format or ""
                if width * height <= policy.max_pixels:
                    img.verify()  # structure/CRC check; vLLM decodes the pixels later
    except Image.DecompressionBombError:
        raise _bad_image(where, "image dimensions are far over the pixel limit") from None
    except Exception:
        allowed = ", ".join(_FORMATS)
        raise _bad_image(where, f"content is not a valid image (accepted: {allowed})") from None
    if width * height > policy.max_pixels:
        why = f"image is {width}x{height} pixels; the limit is {policy.max_pixels}"
        raise _bad_image(where, why)
    return Image.MIME.get(fmt, "application/octet-stream")


def _inline_data_url(url: str, policy: ImagePolicy, where: str) -> str:
    header, sep, payload = url[5:].partition(",")
    params = [p.strip().lower() for p in header.split(";")]
    if not sep or "base64" not in params[1:]:
        raise _bad_image(where, "data: URLs must be base64-encoded (data:image/...;base64,...)")
    payload = "".join(payload.split())
    if len(payload) // 4 * 3 > policy.max_bytes + 3:  # refuse before decoding
        raise _bad_image(where, f"image is larger than the {policy.max_bytes}-byte limit")
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise _bad_image(where, "data: URL payload is not valid base64") from None
    mime = _check_image(data, policy, where)
    if params[0] == mime and payload == url[6 + len(header) :]:
        return url
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


async def _resolve(host: str, port: int) -> list[str]:
    """Addresses for host, in resolver order (a seam for tests)."""
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return [str(info[4][0]) for info in infos]


async def _checked_target(
    url: str, policy: ImagePolicy, where: str
) -> tuple[str, str, int, list[IPAddress], str]:
    """Refuse the URL or return (scheme, host, port, checked addresses, path+query)."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        raise _bad_url(where, "image URL is malformed") from None
    scheme = parts.scheme.lower()
    if scheme not in _SCHEME_PORTS:
        why = f"URL scheme {scheme + ':'!r} is not allowed" if scheme else "URL is not absolute"
        raise _bad_url(where, f"{why}; use an http(s) or data: URL")
    if "@" in parts.netloc:
        raise _bad_url(where, "image URLs must not contain credentials (user@host)")
    host = (parts.hostname or "").rstrip(".")
    if not host:
        raise _bad_url(where, "image URL has no host")
    allowed = host in {h.lower().rstrip(".") for h in policy.allowed_hosts}
    port = _SCHEME_PORTS[scheme] if port is None else port
    if port not in _PUBLIC_PORTS and not allowed:
        raise _bad_url(where, f"port {port} is not allowed; only 80 and 443")
    literal: IPAddress | None = None
    with contextlib.suppress(ValueError):
        literal = ipaddress.ip_address(host)
    if literal is not None:
        addresses, ascii_host = [literal], host
    else:
        try:
            ascii_host = host.encode("idna").decode("ascii")  # for Host and SNI
            addresses = [ipaddress.ip_address(a) for a in await _resolve(host, port)]
        except (OSError, UnicodeError, ValueError):
            raise _bad_url(where, f"host {host!r} could not be resolved") from None
    if not allowed and not all(is_public_address(a) for a in addresses):
        what = "is not a public" if literal is not None else "resolves to a non-public"
        raise _bad_url(where, f"host {host!r} {what} address; refusing to fetch it")
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return scheme, ascii_host, port, addresses, path


async def _get(
    client: httpx.AsyncClient, url: str, policy: ImagePolicy, where: str
) -> httpx.Response:
    """One hop: connect to a checked IP of the URL's host; return the streaming response."""
    scheme, host, port, addresses, path = await _checked_target(url, policy, where)
    name = f"[{host}]" if ":" in host else host
    headers = {
        "Host": name if port == _SCHEME_PORTS[scheme] else f"{name}:{port}",
        "Accept": "image/*",
        "Accept-Encoding": "identity",  # compressed bodies could expand past max_bytes
    }
    ext = {"sni_hostname": host} if scheme == "https" else {}
    tls = False
    for ip in addresses:
        ip_host = f"[{ip.compressed}]" if ip.version == 6 else str(ip)
        request = client.build_request(
            "GET", f"{scheme}://{ip_host}:{port}{path}", headers=headers, extensions=ext
        )
        try:
            return await client.send(request, stream=True)
        except httpx.ConnectError as exc:  # try the next checked address
            tls = "SSL" in str(exc)
    why = "TLS handshake or certificate check failed" if tls else "connection failed"
    raise _bad_url(where, f"could not connect to host {host!r} ({why})")


async def _read_body(resp: httpx.Response, policy: ImagePolicy, where: str) -> bytes:
    if resp.headers.get("content-encoding", "identity").lower() != "identity":
        raise _bad_image(where, "compressed (Content-Encoding) image responses are not accepted")
    too_big = f"image is larger than the {policy.max_bytes}-byte limit"
    length = resp.headers.get("content-length", "")
    if length.isdigit() and int(length) > policy.max_bytes:
        raise _bad_image(where, too_big)
    body = bytearray()
    async for chunk in resp.aiter_raw():
        body += chunk
        if len(body) > policy.max_bytes:
            raise _bad_image(where, too_big)
    return bytes(body)


async def _fetch(url: str, policy: ImagePolicy, where: str) -> bytes:
    for _hop in range(policy.max_redirects + 1):
        # A fresh client per hop: no pooled connection is reused under another Host/SNI.
        async with httpx.AsyncClient(
            follow_redirects=False, trust_env=False, timeout=policy.timeout_s
        ) as client:
            resp = await _get(client, url, policy, where)
            try:
                if resp.status_code in _REDIRECTS:
                    location = resp.headers.get("location")
                    if not location:
                        raise _bad_url(where, "redirect without a Location header")
                    url = urljoin(url, location)
                    continue
                if resp.status_code != 200:
                    raise _bad_url(where, f"image URL returned HTTP {resp.status_code}")
                return await _read_body(resp, policy, where)
            finally:
                await resp.aclose()
    raise _bad_url(where, f"more than {policy.max_redirects} redirects")


async def _inline_remote(url: str, policy: ImagePolicy, where: str) -> str:
    try:
        async with asyncio.timeout(policy.timeout_s):
            data = await _fetch(url, policy, where)
    except (TimeoutError, httpx.TimeoutException):
        raise _bad_url(where, f"image fetch timed out after {policy.timeout_s:g}s") from None
    except httpx.InvalidURL as exc:  # not an HTTPError: e.g. a control character in the path
        raise _bad_url(where, f"the URL is not valid ({exc})") from None
    except httpx.HTTPError as exc:
        raise _bad_url(where, f"fetching the image failed ({type(exc).__name__})") from None
    mime = await asyncio.to_thread(_check_image, data, policy, where)
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


async def _inline_part(part: dict, policy: ImagePolicy, where: str) -> dict:
    spec = part.get("image_url")
    spec = {"url": spec} if isinstance(spec, str) else spec
    url = spec.get("url") if isinstance(spec, dict) else None
    if not isinstance(url, str) or not url.strip():
        raise _bad_url(where, "image_url part needs an image_url.url string")
    url = url.strip()
    if url[:5].lower() == "data:":  # decoding and checking megabytes: off the event loop
        new_url = await asyncio.to_thread(_inline_data_url, url, policy, where)
    else:
        new_url = await _inline_remote(url, policy, where)
    return {**part, "image_url": {**spec, "url": new_url}}


async def inline_images(messages: list[dict], policy: ImagePolicy) -> list[dict]:
    """A new messages list whose image_url parts all carry validated data: URLs.

    Remote images are fetched concurrently; the first refusal cancels the rest and is raised.
    """
    total = count_images(messages)
    if total > policy.max_images:
        raise _bad_image("messages", f"too many images ({total}); the limit is {policy.max_images}")
    out: list[dict] = []
    jobs: dict[tuple[int, int], asyncio.Task[dict]] = {}
    try:
        async with asyncio.TaskGroup() as tg:
            for i, message in enumerate(messages):
                content = message.get("content") if isinstance(message, dict) else None
                if not isinstance(content, list) or not any(map(_is_image_part, content)):
                    out.append(message)
                    continue
                out.append({**message, "content": list(content)})
                for j, part in enumerate(content):
                    if _is_image_part(part):
                        where = f"messages[{i}].content[{j}]"
                        jobs[i, j] = tg.create_task(_inline_part(part, policy, where))
    except BaseExceptionGroup as group:
        raise group.exceptions[0] from None
    for (i, j), task in jobs.items():
        out[i]["content"][j] = task.result()
    return out
