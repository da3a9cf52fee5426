"""Fixtures: a real redis-server for the session, and a store factory per backend."""

from __future__ import annotations

import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from node.accounts.redis import RedisStore
from node.accounts.sqlite import SQLiteStore

from .support import Runner, StoreFactory, free_port, run_with


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A throwaway redis-server on a free loopback port, killed at the end of the session."""
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.fail(
            "redis-server not found on PATH: the RedisStore tests need a real server "
            "(e.g. `apt-get install -y redis-server`)",
            pytrace=False,
        )
    workdir = tmp_path_factory.mktemp("redis")
    port = free_port()
    log = (workdir / "redis.log").open("wb")
    proc = subprocess.Popen(
        [
            binary,
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(workdir),
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=workdir,
    )
    client = redis.Redis(port=port, socket_connect_timeout=0.2)
    try:
        deadline = time.monotonic() + 10
        while True:
            if proc.poll() is not None:
                pytest.fail(f"redis-server exited: {(workdir / 'redis.log').read_text()}")
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if time.monotonic() > deadline:
                    pytest.fail("redis-server did not answer PING within 10 s")
                time.sleep(0.05)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        client.close()
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


@pytest.fixture(params=["sqlite", "redis"])
def make_store(request: pytest.FixtureRequest, tmp_path: Path) -> StoreFactory:
    """Builds a store of the parametrized backend; every store of one test shares its data."""
    if request.param == "sqlite":
        db = tmp_path / "accounts.db"
        return lambda **kw: SQLiteStore(db, **kw)
    url = request.getfixturevalue("redis_url")
    prefix = f"test:{uuid.uuid4().hex}"
    return lambda **kw: RedisStore(url, prefix=prefix, **kw)


@pytest.fixture
def run(make_store: StoreFactory) -> Runner:
    """``run(body, **store_kwargs)``: ``run_with`` bound to this test's backend."""
    return lambda body, **kw: run_with(make_store, body, **kw)
