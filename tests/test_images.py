"""image_url inlining: SSRF refusals, size/pixel limits, streaming caps. Loopback only."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime
import io
import ipaddress
import random
import socket
import ssl
import struct
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from PIL import Image

from node import images
from node.errors import InvalidRequest
from node.images import ImagePolicy, count_images, inline_images, is_public_address

LOCAL = ImagePolicy(allowed_hosts=frozenset({"localhost"}))


def _png(size: tuple[int, int] = (4, 4), noise: bool = False) -> bytes:
    if noise:
        img = Image.frombytes("RGB", size, random.Random(0).randbytes(size[0] * size[1] * 3))
    else:
        img = Image.new("RGB", size, (200, 30, 30))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def _png_claiming(width: int, height: int) -> bytes:
    """A valid-looking PNG whose header claims width x height (no pixel data to speak of)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 16)
    sig = b"\x89PNG\r\n\x1a\n"
    return sig + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")


def _messages(*urls: str) -> list[dict]:
    parts: list[dict] = [{"type": "text", "text": "what is this?"}]
    parts += [{"type": "image_url", "image_url": {"url": u, "detail": "low"}} for u in urls]
    return [{"role": "system", "content": "be brief"}, {"role": "user", "content": parts}]


def _inline(url: str, policy: ImagePolicy = LOCAL) -> str:
    out = asyncio.run(inline_images(_messages(url), policy))
    return out[1]["content"][1]["image_url"]["url"]


def _refused(url: str, policy: ImagePolicy = LOCAL, code: str = "invalid_image_url") -> str:
    with pytest.raises(InvalidRequest) as info:
        asyncio.run(inline_images(_messages(url), policy))
    assert (info.value.code, info.value.param) == (code, "messages"), info.value.message
    return info.value.message


# --- loopback HTTP servers ------------------------------------------------------------------


class _Handler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.server.hits += 1  # type: ignore[attr-defined]
        self.server.hosts.append(self.headers.get("Host"))  # type: ignore[attr-defined]
        self.server.behave(self)  # type: ignore[attr-defined]

    def log_message(self, *args: object) -> None:
        pass


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, addr: tuple[str, int], behave: Callable[[_Handler], None]) -> None:
        super().__init__(addr, _Handler)
        self.behave, self.hits, self.hosts = behave, 0, []
        self.release = threading.Event()

    @property
    def port(self) -> int:
        return self.server_address[1]

    def handle_error(self, request: object, client_address: object) -> None:
        pass  # clients that hang up mid-body are the point of some tests


class _Server6(_Server):
    address_family = socket.AF_INET6


@pytest.fixture
def serve() -> Iterator[Callable[..., _Server]]:
    started: list[_Server] = []

    def start(behave: Callable[[_Handler], None], host: str = "127.0.0.1") -> _Server:
        server = (_Server6 if ":" in host else _Server)((host, 0), behave)
        threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
        started.append(server)
        return server

    yield start
    for server in started:
        server.release.set()
        server.shutdown()
        server.server_close()


def _send_png(h: _Handler) -> None:
    body = _png()
    h.send_response(200)
    h.send_header("Content-Type", "image/png")
    h.send_header("Content-Length", str(len(body)))
    h.end_headers()
    h.wfile.write(body)


def _redirect_to(location: str) -> Callable[[_Handler], None]:
    def behave(h: _Handler) -> None:
        h.send_response(302)
        h.send_header("Location", location)
        h.send_header("Content-Length", "0")
        h.end_headers()

    return behave


@pytest.fixture
def open_ports(monkeypatch: pytest.MonkeyPatch) -> Callable[[int], None]:
    """Let a test port pass the port rule, so the address check is what must refuse."""

    def allow(port: int) -> None:
        monkeypatch.setattr(images, "_PUBLIC_PORTS", images._PUBLIC_PORTS | {port})

    return allow


# --- is_public_address ---------------------------------------------------------------------

PRIVATE = [
    "127.0.0.1",
    "10.1.2.3",
    "172.16.0.1",
    "192.168.1.1",
    "169.254.169.254",
    "100.64.0.1",
    "0.0.0.0",
    "::1",
    "fe80::1",
    "fc00::1",
    "::ffff:127.0.0.1",
    "::ffff:10.0.0.1",
    "224.0.0.1",
    "ff02::1",
    "fd00:ec2::254",
    "::",
    "2002:7f00:1::",
    "2002:a9fe:a9fe::",
    "64:ff9b::a9fe:a9fe",
    "64:ff9b::7f00:1",
    "::7f00:1",
    "240.0.0.1",
    "255.255.255.255",
    "198.18.0.1",
    "192.0.0.192",
    "2001:db8::1",
    "fec0::1",
]
PUBLIC = ["8.8.8.8", "1.1.1.1", "2606:4700:4700::1111", "2002:808:808::", "64:ff9b::808:808"]


@pytest.mark.parametrize("addr", PRIVATE)
def test_non_public_addresses(addr: str) -> None:
    assert is_public_address(ipaddress.ip_address(addr)) is False


@pytest.mark.parametrize("addr", PUBLIC)
def test_public_addresses(addr: str) -> None:
    assert is_public_address(ipaddress.ip_address(addr)) is True


# --- SSRF refusals: the canary must never be hit -----------------------------------------


@pytest.mark.parametrize("ports_open", [False, True])
def test_loopback_urls_refused(serve, open_ports, ports_open: bool) -> None:
    canary = serve(_send_png)
    if ports_open:
        open_ports(canary.port)
    for url in (f"http://127.0.0.1:{canary.port}/x.png", f"http://localhost:{canary.port}/x.png"):
        message = _refused(url, ImagePolicy())
        if ports_open:
            assert "public address" in message
            literal = "127.0.0.1" in url
            assert ("is not a public" if literal else "resolves to a non-public") in message
        if "localhost" in url:
            assert "127.0.0.1" not in message  # resolution results stay private
    assert canary.hits == 0


def test_ipv6_loopback_refused(serve, open_ports) -> None:
    try:
        canary = serve(_send_png, "::1")
    except OSError:
        _refused("http://[::1]:8080/", ImagePolicy())
        return
    open_ports(canary.port)
    assert "public address" in _refused(f"http://[::1]:{canary.port}/", ImagePolicy())
    assert canary.hits == 0


@pytest.mark.parametrize(
    "url",
    [
        "file:///etc/passwd",
        "ftp://example.com/x.png",
        "gopher://example.com/x",
        "javascript:alert(1)",
        "//example.com/x.png",
        "http://user:pw@example.com/x.png",
        "http://example.com:8080/x.png",
        "http://example.com:99999/x.png",
        "http:///x.png",
    ],
)
def test_bad_urls_refused_without_network(url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    async def no_dns(host: str, port: int) -> list[str]:
        raise AssertionError("must be refused before resolving")

    monkeypatch.setattr(images, "_resolve", no_dns)
    _refused(url, ImagePolicy())


def test_redirect_to_loopback_refused(serve, open_ports) -> None:
    canary = serve(_send_png)
    open_ports(canary.port)
    hop = serve(_redirect_to(f"http://127.0.0.1:{canary.port}/x.png"))
    # The allow-list names "localhost"; the 127.0.0.1 literal is the same IP but not allowed.
    assert "public address" in _refused(f"http://localhost:{hop.port}/start", LOCAL)
    assert (hop.hits, canary.hits) == (1, 0)


def test_redirect_to_other_scheme_refused(serve) -> None:
    hop = serve(_redirect_to("file:///etc/passwd"))
    assert "'file:'" in _refused(f"http://localhost:{hop.port}/start", LOCAL)


def test_too_many_redirects(serve) -> None:
    hop = serve(_redirect_to("/again"))
    policy = ImagePolicy(max_redirects=2, allowed_hosts=frozenset({"localhost"}))
    assert "redirects" in _refused(f"http://localhost:{hop.port}/", policy)
    assert hop.hits == 3


def test_every_resolved_address_is_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    async def mixed(host: str, port: int) -> list[str]:
        return ["93.184.216.34", "10.0.0.7"]

    monkeypatch.setattr(images, "_resolve", mixed)
    message = _refused("http://rebind.example/x.png", ImagePolicy())
    assert "'rebind.example' resolves to a non-public address" in message
    assert "10.0.0.7" not in message


def test_connects_to_the_checked_ip_with_host_header(serve, monkeypatch) -> None:
    server = serve(_send_png)
    seen: list[str] = []

    async def pinned(host: str, port: int) -> list[str]:
        seen.append(host)
        return ["127.0.0.1"]

    monkeypatch.setattr(images, "_resolve", pinned)
    policy = ImagePolicy(allowed_hosts=frozenset({"images.test"}))
    assert _inline(f"http://images.test:{server.port}/x.png", policy).startswith("data:image/png")
    assert seen == ["images.test"] and server.hosts == [f"images.test:{server.port}"]


def _self_signed(tmp_path: Path, name: str) -> tuple[Path, Path]:
    pytest.importorskip("cryptography")
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(datetime.datetime(2020, 1, 1))
        .not_valid_after(datetime.datetime(2100, 1, 1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


def test_https_sends_sni_for_the_name_and_verifies(tmp_path: Path, monkeypatch) -> None:
    """The TCP connection goes to the checked IP; TLS still names (and verifies) the host."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(*_self_signed(tmp_path, "images.test"))
    sni: list[str | None] = []
    ctx.sni_callback = lambda _sock, name, _ctx: sni.append(name)
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(5)

    def accept_one() -> None:
        with contextlib.suppress(OSError):
            conn, _ = listener.accept()
            with contextlib.suppress(OSError), conn, ctx.wrap_socket(conn, server_side=True):
                pass

    thread = threading.Thread(target=accept_one, daemon=True)
    thread.start()

    async def pinned(host: str, port: int) -> list[str]:
        return ["127.0.0.1"]

    monkeypatch.setattr(images, "_resolve", pinned)
    policy = ImagePolicy(allowed_hosts=frozenset({"images.test"}))
    try:
        # Self-signed, so verification must fail: the fetch is refused, not trusted.
        url = f"https://images.test:{listener.getsockname()[1]}/x.png"
        assert "'images.test' (TLS handshake or certificate" in _refused(url, policy)
        thread.join(5)
    finally:
        listener.close()
    assert sni == ["images.test"]


# --- fetching -------------------------------------------------------------------------------


def test_allowed_host_is_inlined(serve) -> None:
    server = serve(_send_png)
    messages = _messages(f"http://localhost:{server.port}/x.png")
    out = asyncio.run(inline_images(messages, LOCAL))
    part = out[1]["content"][1]
    assert (
        part["image_url"]["detail"] == "low" and out[1]["content"][0] == messages[1]["content"][0]
    )
    head, b64 = part["image_url"]["url"].split(",", 1)
    assert head == "data:image/png;base64"
    assert Image.open(io.BytesIO(base64.b64decode(b64))).size == (4, 4)
    assert messages[1]["content"][1]["image_url"]["url"].startswith("http://")  # not mutated
    assert out[0] is messages[0]


def test_slow_server_times_out(serve) -> None:
    def slow(h: _Handler) -> None:
        h.server.release.wait(5)  # type: ignore[attr-defined]

    server = serve(slow)
    policy = ImagePolicy(timeout_s=0.5, allowed_hosts=frozenset({"localhost"}))
    started = time.monotonic()
    assert "timed out" in _refused(f"http://localhost:{server.port}/x.png", policy)
    assert time.monotonic() - started < 1.5


def test_streamed_body_over_limit(serve) -> None:
    def endless(h: _Handler) -> None:
        h.send_response(200)  # HTTP/1.0, no Content-Length: body ends when the socket closes
        h.end_headers()
        for _ in range(64):
            h.wfile.write(b"\x00" * 16384)

    server = serve(endless)
    policy = ImagePolicy(max_bytes=50_000, allowed_hosts=frozenset({"localhost"}))
    message = _refused(f"http://localhost:{server.port}/big", policy, code="invalid_image")
    assert "50000-byte limit" in message


def test_non_image_body_and_http_errors(serve) -> None:
    def text(h: _Handler) -> None:
        h.send_response(200)
        h.send_header("Content-Length", "5")
        h.end_headers()
        h.wfile.write(b"hello")

    def missing(h: _Handler) -> None:
        h.send_error(404)

    url = f"http://localhost:{serve(text).port}/"
    assert "not a valid image" in _refused(url, code="invalid_image")
    assert "HTTP 404" in _refused(f"http://localhost:{serve(missing).port}/")


# --- data: URLs and counts -----------------------------------------------------------------


def test_valid_data_url_is_kept() -> None:
    url = _data_url(_png())
    assert _inline(url, ImagePolicy()) == url


def test_data_url_with_wrong_mime_is_relabelled() -> None:
    assert _inline(_data_url(_png(), "image/jpeg"), ImagePolicy()).startswith("data:image/png;")


@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("data:image/png;base64,!!!not*base64", "base64"),
        ("data:image/png;base64,aGVsbG8gd29ybGQ=", "not a valid image"),
        ("data:image/png,rawbytes", "base64"),
        (_data_url(_png_claiming(100_000, 100_000)), "far over the pixel limit"),
        (_data_url(_png_claiming(8_000, 8_000)), "8000x8000"),
    ],
)
def test_bad_data_urls(url: str, why: str) -> None:
    assert why in _refused(url, ImagePolicy(), code="invalid_image")


def test_data_url_limits() -> None:
    big = _png((64, 64), noise=True)
    assert len(big) > 1000
    _refused(_data_url(big), ImagePolicy(max_bytes=1000), code="invalid_image")
    _refused(_data_url(big), ImagePolicy(max_bytes=len(big) - 1), code="invalid_image")
    assert "20x20" in _refused(
        _data_url(_png((20, 20))), ImagePolicy(max_pixels=100), "invalid_image"
    )
    assert _inline(_data_url(_png((10, 10))), ImagePolicy(max_pixels=100)).startswith("data:")


def test_too_many_images() -> None:
    messages = _messages(*[_data_url(_png())] * 3)
    assert count_images(messages) == 3 and count_images([{"content": "text"}]) == 0
    with pytest.raises(InvalidRequest) as info:
        asyncio.run(inline_images(messages, ImagePolicy(max_images=2)))
    assert (
        info.value.code == "invalid_image"
        and "too many images (3); the limit is 2" in info.value.message
    )
    assert len(asyncio.run(inline_images(messages, ImagePolicy(max_images=3)))) == 2


def test_a_control_character_in_a_public_url_is_refused_not_raised() -> None:
    """httpx rejects it when building the request, with an error that is no HTTPError."""
    assert "not valid" in _refused("http://8.8.8.8/a\x01b", ImagePolicy())
