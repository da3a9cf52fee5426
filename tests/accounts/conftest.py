"""Fixtures: a real redis-server for the session, and a store factory per backend."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from node.accounts.redis import RedisStore
from node.accounts.sqlite import SQLiteStore

from .support import Runner, StoreFactory, run_with


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
