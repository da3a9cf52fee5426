"""Start the real node as a subprocess on a free loopback port and wait until it is ready."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class NodeProcess:
    def __init__(self, workdir: Path, models_file: Path, env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.log_path = workdir / f"node-{self.port}.log"
        self.env = {
            **os.environ,
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"),
            "STAIK_DB_PATH": str(workdir / "node.sqlite3"),
            **(env or {}),
        }
        self.models_file = models_file
        self.proc: subprocess.Popen[bytes] | None = None
        self.key = ""
        self.early_answer: httpx.Response | None = None

    def start(self) -> None:
        log = open(self.log_path, "wb")  # noqa: SIM115 - kept open for the process's life
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "node.cli",
                "serve",
                "--models",
                str(self.models_file),
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
            ],
            cwd=ROOT,
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def wait_listening(self, timeout: float = 60) -> None:
        self._wait(lambda r: r.status_code == 200, "/health/live", timeout)

    def wait_ready(self, timeout: float = 900) -> None:
        self._wait(lambda r: r.status_code == 200, "/health/ready", timeout)

    def _wait(self, ok, path: str, timeout: float) -> None:  # type: ignore[no-untyped-def]
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"node exited with {self.proc.returncode}:\n{self.tail()}")
            try:
                if ok(httpx.get(self.base_url + path, timeout=5)):
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise TimeoutError(f"node not ready on {path} after {timeout}s:\n{self.tail()}")

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        """``staik-node ARGS`` against this node's store."""
        return subprocess.run(
            [sys.executable, "-m", "node.cli", *args],
            cwd=ROOT,
            env=self.env,
            capture_output=True,
            text=True,
            check=True,
            timeout=60,
        )

    def create_key(self, *args: str) -> str:
        return self.cli("keys", "create", *args).stdout.strip()

    def model(self, name: str) -> dict:
        """The model's card from /v1/models (state, slots, engine requests and pids)."""
        r = httpx.get(
            self.base_url + f"/v1/models/{name}",
            headers={"Authorization": f"Bearer {self.key}"},
            timeout=10,
        )
        r.raise_for_status()
        return r.json()

    def used_tokens(self, key: str) -> int:
        """What the key's window holds now, read from the headers of the free /v1/models."""
        r = httpx.get(self.base_url + "/v1/models", headers={"Authorization": f"Bearer {key}"})
        assert r.status_code == 200
        return int(r.headers["X-RateLimit-Used-Tokens"])

    def wait_slots_free(self, name: str, timeout: float = 60) -> int:
        """Wait until the model holds no slot; the slots still held when it gave up."""
        deadline = time.monotonic() + timeout
        while (busy := int(self.model(name)["slots_in_use"])) and time.monotonic() < deadline:
            time.sleep(0.1)
        return busy

    def metrics(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        """GET /metrics as {(sample name, sorted labels): value}."""
        r = httpx.get(self.base_url + "/metrics", timeout=10)
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
        return {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(r.text)
            for s in family.samples
        }

    def tail(self, n: int = 60) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def stop(self, timeout: float = 60) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return None if self.proc is None else self.proc.returncode
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            return self.proc.wait(10)
