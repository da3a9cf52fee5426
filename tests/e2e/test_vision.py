"""Images on the real vision stand-in (gemma4:31b): data: and URL images reach the model and
count in the prompt; text-only models refuse them; unsafe URLs are refused before any fetch."""

from __future__ import annotations

import base64
import io
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import openai
import pytest
from PIL import Image

pytestmark = pytest.mark.e2e


def _png(size: tuple[int, int] = (96, 64)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (200, 30, 30)).save(buf, format="PNG")
    return buf.getvalue()


class _Server:
    """A loopback HTTP server counting hits; /img.png serves a PNG, /to/<url> redirects."""

    def __init__(self) -> None:
        hits = self.hits = []

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802
                hits.append(self.path)
                if self.path.startswith("/to/"):
                    self.send_response(302)
                    self.send_header("Location", self.path[4:])
                    self.end_headers()
                    return
                body = _png()
                self.send_response(200)
                self.send_header("Content-Type", "image/png")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.httpd.server_address[1]
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()


@pytest.fixture
def servers() -> Iterator[tuple[_Server, _Server]]:
    images, canary = _Server(), _Server()
    yield images, canary
    images.httpd.shutdown()
    canary.httpd.shutdown()


def _ask(client: openai.OpenAI, model: str, url: str):  # type: ignore[no-untyped-def]
    return client.chat.completions.create(
        model=model,
        max_tokens=8,
        messages=[
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": url}},
                    {"type": "text", "text": "What is in the image?"},
                ],
            }
        ],
    )


DATA_URL = "data:image/png;base64," + base64.b64encode(_png()).decode()


def test_data_image_reaches_the_vision_model_and_counts_in_the_prompt(
    client: openai.OpenAI,
) -> None:
    text_only = client.chat.completions.create(
        model="gemma4:31b",
        max_tokens=8,
        messages=[{"role": "user", "content": [{"type": "text", "text": "What is in the image?"}]}],
    )
    with_image = _ask(client, "gemma4:31b", DATA_URL)
    assert with_image.choices[0].message.content is not None
    assert with_image.usage and text_only.usage
    assert with_image.usage.prompt_tokens > text_only.usage.prompt_tokens  # image tokens


def test_text_only_model_refuses_images_naming_itself(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        _ask(client, "qwen3.5:9b", DATA_URL)
    assert "qwen3.5:9b" in str(info.value.body["message"])  # type: ignore[index]


def test_url_image_from_an_allowed_host(
    client: openai.OpenAI, servers: tuple[_Server, _Server]
) -> None:
    images, _ = servers
    reply = _ask(client, "gemma4:31b", f"http://localhost:{images.port}/img.png")
    assert reply.usage and reply.usage.prompt_tokens > 0
    assert images.hits == ["/img.png"]


def test_unsafe_urls_are_refused_and_the_canary_is_never_hit(
    client: openai.OpenAI, servers: tuple[_Server, _Server]
) -> None:
    images, canary = servers
    target = f"127.0.0.1:{canary.port}/secret"
    for url in (
        f"http://{target}",
        f"http://[::1]:{canary.port}/secret",
        f"http://localhost:{images.port}/to/http://{target}",  # a redirect to loopback
        "file:///etc/passwd",
        "http://169.254.169.254/latest/meta-data/",
    ):
        with pytest.raises(openai.BadRequestError) as info:
            _ask(client, "gemma4:31b", url)
        assert info.value.code == "invalid_image_url", url
    assert canary.hits == []


def test_undecodable_image_is_400(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        _ask(client, "gemma4:31b", "data:image/png;base64," + base64.b64encode(b"junk").decode())
    assert info.value.code == "invalid_image"


def _send_part(client: openai.OpenAI, model: str, part: dict) -> None:
    text = {"type": "text", "text": "What is in the image?"}
    client.chat.completions.create(
        model=model,
        max_tokens=8,
        messages=[{"role": "user", "content": [part, text]}],  # type: ignore[list-item]
    )


@pytest.mark.parametrize("model", ["gemma4:31b", "qwen3.5:9b"])
def test_other_part_shapes_cannot_carry_a_url_past_the_checks(
    client: openai.OpenAI, servers: tuple[_Server, _Server], model: str
) -> None:
    """vLLM parses more part shapes than OpenAI's and would fetch their URLs itself, past the
    node's checks: only text, image_url and refusal parts get through, and no cache uuid."""
    _, canary = servers
    url = f"http://127.0.0.1:{canary.port}/secret"
    cases = [
        ({"type": "input_image", "image_url": url}, "invalid_value", ".type"),
        ({"type": "video_url", "video_url": {"url": url}}, "invalid_value", ".type"),
        ({"type": "audio_url", "audio_url": {"url": url}}, "invalid_value", ".type"),
        ({"image_url": {"url": url}}, "missing_required_parameter", ".type"),
        ({"type": "image_url", "image_url": {"url": DATA_URL}, "uuid": "x"}, None, ".uuid"),
    ]
    for part, code, param in cases:
        with pytest.raises(openai.BadRequestError) as info:
            _send_part(client, model, part)
        assert info.value.param == f"messages[0].content[0]{param}", part
        assert code is None or info.value.code == code, part
    assert canary.hits == []


def test_a_url_with_a_control_character_is_400(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        _ask(client, "gemma4:31b", "http://8.8.8.8/a\u0001b")
    assert info.value.code == "invalid_image_url"
