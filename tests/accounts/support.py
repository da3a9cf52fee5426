"""Helpers shared by the accounts tests."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from node.accounts.store import Store

T = TypeVar("T")
StoreFactory = Callable[..., Store]
Runner = Callable[..., Any]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_with(make_store: StoreFactory, body: Callable[[Store], Awaitable[T]], **kw: Any) -> T:
    """Run ``body(store)`` on a fresh event loop with a fresh store, closing it after."""

    async def main() -> T:
        store = make_store(**kw)
        try:
            return await body(store)
        finally:
            await store.close()

    return asyncio.run(main())


def run_with_store(store: Store, body: Callable[[Store], Awaitable[T]]) -> T:
    """Run ``body(store)`` on a fresh event loop, closing the store after."""

    async def main() -> T:
        try:
            return await body(store)
        finally:
            await store.close()

    return asyncio.run(main())
