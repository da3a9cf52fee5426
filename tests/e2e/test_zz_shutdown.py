"""SIGTERM with streams in flight: they complete, new requests get 503, the node exits and
leaves no child process. Runs last in the session (the name sorts last) because it stops the
session's node."""

from __future__ import annotations

import threading
import time

import httpx
import psutil
import pytest

from tests.e2e.node_process import NodeProcess

pytestmark = pytest.mark.e2e


def test_sigterm_drains_streams_then_exits_without_children(node: NodeProcess) -> None:
    assert node.proc is not None
    children = psutil.Process(node.proc.pid).children(recursive=True)
    assert children  # the vLLM engine processes
    auth = {"Authorization": f"Bearer {node.key}"}
    started = threading.Barrier(4)
    endings: list[str] = []

    def stream() -> None:
        body = {
            "model": "qwen3.6:35b-a3b",
            # ignore_eos: long enough to be surely in flight when SIGTERM comes, short enough
            # to end well inside the session node's drain deadline on a slow CPU
            "max_tokens": 150,
            "ignore_eos": True,
            "stream": True,
            "messages": [{"role": "user", "content": "Write a long essay about Sweden."}],
        }
        with httpx.stream(
            "POST", node.base_url + "/v1/chat/completions", headers=auth, json=body, timeout=180
        ) as r:
            lines = r.iter_lines()
            next(line for line in lines if line.startswith("data: {"))
            started.wait()
            tail = [line for line in lines if line]
        endings.append(tail[-1] if tail else "")

    threads = [threading.Thread(target=stream) for _ in range(3)]
    for t in threads:
        t.start()
    started.wait()
    node.proc.send_signal(15)
    signalled_at = time.monotonic()
    refused, failures = _first_answer(node, auth)
    if refused is None:  # say what happened instead of only that nothing answered
        for t in threads:
            t.join(30)
        raise AssertionError(
            f"the draining node answered no request in {time.monotonic() - signalled_at:.1f} s "
            f"after SIGTERM: {failures}; node exit code {node.proc.poll()}; stream endings "
            f"{endings}\nnode log:\n{node.tail()}"
        )
    assert refused.status_code == 503
    assert refused.json()["error"]["code"] == "shutting_down"
    for t in threads:
        t.join()
    assert endings == ["data: [DONE]"] * 3
    assert node.proc.wait(120) == 0
    time.sleep(1)
    alive = [c.pid for c in children if c.is_running() and c.status() != psutil.STATUS_ZOMBIE]
    assert alive == []


def _first_answer(
    node: NodeProcess, auth: dict[str, str]
) -> tuple[httpx.Response | None, list[str]]:
    """The draining node's answer to a new request, tried while the node lives: a connection
    attempt can fail transiently in this sandbox. Also the failures seen on the way."""
    failures: list[str] = []
    started = time.monotonic()
    while time.monotonic() < started + 10 and node.proc is not None and node.proc.poll() is None:
        time.sleep(0.2)
        try:
            answer = httpx.post(
                node.base_url + "/v1/chat/completions",
                headers=auth,
                timeout=10,
                json={"model": "qwen3.5:9b", "messages": []},
            )
            return answer, failures
        except httpx.ConnectError as e:
            failures.append(f"+{time.monotonic() - started:.2f} s: {e!r}")
    return None, failures
