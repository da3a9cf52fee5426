"""Servers under test as child processes: started in their own session, bounded in time, and
killed (whole process group, engine children included) however the bench ends."""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import select
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import FrameType
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
PYTHON = sys.executable

_live: list[subprocess.Popen[Any]] = []


def _die_with_parent() -> None:
    """In the child, before exec: SIGTERM it if the bench dies (even by SIGKILL; Linux)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def base_env(workdir: Path) -> dict[str, str]:
    """The environment every server and tool of the bench runs with (offline, loopback)."""
    models_dir = os.environ.get("STAIK_MODELS_DIR") or str(
        Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "staik-node" / "models"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("STAIK_REDIS_URL", "STAIK_MODELS_FILE")}
    return {
        **env,
        "STAIK_MODELS_DIR": models_dir,
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"),
        "VLLM_NO_USAGE_STATS": "1",
        "DO_NOT_TRACK": "1",
        "STAIK_DB_PATH": str(workdir / "node.sqlite3"),
        "STAIK_DRAIN_TIMEOUT_S": "5",
        "NO_PROXY": "127.0.0.1,localhost",
    }


def models_dir(env: dict[str, str]) -> Path:
    return Path(env["STAIK_MODELS_DIR"])


def kill_group(proc: subprocess.Popen[Any], grace_s: float = 20) -> None:
    """SIGTERM the leader (it shuts its engines down), then SIGKILL what is left of its group."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(grace_s)
    # Engine children may outlive their parent: sweep the group in any case.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    if proc.poll() is None:
        proc.wait(10)
    if proc in _live:
        _live.remove(proc)


def kill_all() -> None:
    for proc in list(_live):
        kill_group(proc, grace_s=5)


def _on_signal(signum: int, frame: FrameType | None) -> None:
    kill_all()
    raise SystemExit(128 + signum)


def install_cleanup() -> None:
    atexit.register(kill_all)
    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGHUP, _on_signal)


class Server:
    """One HTTP server process (the node or ``vllm serve``) on a free loopback port."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], log_path: Path) -> None:
        self.name = name
        self.argv = argv
        self.env = env
        self.log_path = log_path
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None
        self.ready_s = 0.0

    def start(self, ready_path: str, timeout_s: float) -> None:
        argv = [a.replace("{port}", str(self.port)) for a in self.argv]
        t0 = time.monotonic()
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                argv,
                cwd=ROOT,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=_die_with_parent,
            )
        _live.append(self.proc)
        deadline = t0 + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"{self.name} exited with {self.proc.returncode}:\n{self.tail()}"
                )
            try:
                if httpx.get(self.base_url + ready_path, timeout=5).status_code == 200:
                    self.ready_s = time.monotonic() - t0
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        self.stop()
        raise TimeoutError(f"{self.name} not ready after {timeout_s:.0f} s:\n{self.tail()}")

    def stop(self) -> None:
        if self.proc is not None:
            kill_group(self.proc)

    def tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class LineChild:
    """A child that answers each JSON line on its stdin with one JSON line on its stdout (an
    in-process reference kept loaded, so its samples can interleave with the node's)."""

    def __init__(self, argv: list[str], env: dict[str, str], log_path: Path) -> None:
        self._log = open(log_path, "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(
            argv,
            cwd=ROOT,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
            text=True,
            start_new_session=True,
            preexec_fn=_die_with_parent,
        )
        _live.append(self.proc)

    def ask(self, request: Any, timeout_s: float = 300) -> Any:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        return self.answer(timeout_s)

    def answer(self, timeout_s: float = 300) -> Any:
        """The child's next line (its greeting first), within ``timeout_s``."""
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout_s)
        line = self.proc.stdout.readline() if ready else ""
        if not line:
            kill_group(self.proc, grace_s=2)
            raise RuntimeError(f"{self.proc.args[:4]} gave no answer (exit {self.proc.returncode})")
        return json.loads(line)

    def __enter__(self) -> LineChild:
        return self

    def __exit__(self, *exc: object) -> None:
        kill_group(self.proc, grace_s=2)
        for pipe in (self.proc.stdin, self.proc.stdout):
            if pipe is not None:
                pipe.close()
        self._log.close()


def node_server(models_file: Path, env: dict[str, str], log_path: Path) -> Server:
    argv = [PYTHON, "-m", "node.cli", "serve", "--models", str(models_file)]
    argv += ["--host", "127.0.0.1", "--port", "{port}"]
    return Server("node", argv, env, log_path)


def refuser_server(env: dict[str, str], log_path: Path, retry_ms: float | None) -> Server:
    """``bench.refuser``: a bare app answering 429 at once, served by uvicorn like the node;
    ``retry_ms`` None keeps its own default."""
    argv = [PYTHON, "-m", "uvicorn", "bench.refuser:app", "--no-access-log"]
    argv += ["--host", "127.0.0.1", "--port", "{port}", "--log-level", "warning"]
    told = {} if retry_ms is None else {"REFUSER_RETRY_MS": f"{retry_ms:.0f}"}
    return Server("refuser", argv, {**env, **told}, log_path)


def create_key(env: dict[str, str], timeout_s: float = 120) -> str:
    """A key with a quota no bench can reach, in the node's store (STAIK_DB_PATH of ``env``)."""
    argv = [PYTHON, "-m", "node.cli", "keys", "create", "--plan", "custom"]
    argv += ["--limit-tokens", "1000000000", "--window", "hour", "--name", "bench"]
    done = run_bounded(argv, env, timeout_s)
    key = done.stdout.strip().splitlines()[0].strip() if done.stdout.strip() else ""
    if not key:
        raise RuntimeError(f"keys create printed no key: {done.stderr[-2000:]}")
    return key


def run_bounded(
    argv: list[str], env: dict[str, str], timeout_s: float, log_path: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """Run a tool to completion in its own session; its whole group dies at the timeout."""
    out = open(log_path, "a") if log_path else subprocess.PIPE  # noqa: SIM115
    try:
        proc = subprocess.Popen(
            argv,
            cwd=ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT if log_path else subprocess.PIPE,
            text=True,
            start_new_session=True,
            preexec_fn=_die_with_parent,
        )
        _live.append(proc)
        try:
            stdout, stderr = proc.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            kill_group(proc, grace_s=2)
            raise TimeoutError(f"{argv[:4]} ran past {timeout_s:.0f} s") from None
        finally:
            if proc in _live:
                kill_group(proc, grace_s=2)
    finally:
        if log_path:
            out.close()  # type: ignore[union-attr]
    if proc.returncode != 0:
        detail = stderr or (log_path.read_text(errors="replace")[-3000:] if log_path else "")
        raise RuntimeError(f"{argv[:4]} exited with {proc.returncode}: {detail}")
    return subprocess.CompletedProcess(argv, proc.returncode, stdout or "", stderr or "")
