"""The tenant-store engines the store suites run over, and a watcher of ``changes()``.

The fixtures built on these (``backend``, ``shared``, ``store``, ``redis_server``) live in
tests/conftest.py, so every suite that runs over the engines (tests/test_store.py,
tests/test_store_seats.py) asks for them by name:

    async def test_x(store: TenantStore) -> None:          # each engine in turn
    async def test_y(shared: Backend) -> None:             # SQLite and Redis: shared data
        one, two = shared.open(), shared.open()
        async with watching(two, writer=one) as changes:
            ...
            assert await changes.next() == "acme"

Nothing asserts a duration: waits are deadlines for something to happen."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from gateway.license import KeyRing
from gateway.store import StoreError, TenantStore
from gateway.store.memory import MemoryStore
from gateway.store.redis_store import RedisStore
from gateway.store.sqlite import SqliteStore
from tests.redis_server import RedisServer

DEADLINE = 15.0  # seconds to wait for something that should happen (never asserted)
PROBE = "_probe"  # the tenant written until a changes() iterator is known to be listening


def fresh_prefix() -> str:
    """A Redis key prefix of its own, so tests sharing one server do not see each other."""
    return f"test-{uuid.uuid4().hex[:12]}:"


class Backend:
    """Opens store objects on one backend: the same data for SQLite (one file) and Redis (one
    server, one prefix); a fresh, unrelated store each time for memory."""

    def __init__(self, engine: str, make: Callable[[KeyRing], TenantStore], keyring: KeyRing):
        self.engine = engine
        self._make = make
        self._keyring = keyring
        self._opened: list[TenantStore] = []

    def open(self, keyring: KeyRing | None = None) -> TenantStore:
        store = self._make(keyring or self._keyring)
        self._opened.append(store)
        return store

    async def close(self) -> None:
        for store in self._opened:
            await store.close()


def make_backend(
    engine: str, request: pytest.FixtureRequest, tmp_path: Path, keyring: KeyRing
) -> Backend:
    if engine == "memory":
        return Backend(engine, lambda ring: MemoryStore("memory://", ring), keyring)
    if engine == "sqlite":
        url = f"sqlite://{tmp_path / 'tenants.db'}"
        return Backend(engine, lambda ring: SqliteStore(url, ring), keyring)
    assert engine == "redis"
    server: RedisServer = request.getfixturevalue("redis_server")
    prefix = fresh_prefix()
    return Backend(engine, lambda ring: RedisStore(server.url, ring, prefix=prefix), keyring)


class Watcher:
    """The tenant ids a ``changes()`` iterator yields, collected by a background task."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[str] = asyncio.Queue()

    async def next(self) -> str:
        """The next change that is not a probe (fails after the deadline)."""
        async with asyncio.timeout(DEADLINE):
            while True:
                tenant = await self.queue.get()
                if tenant != PROBE:
                    return tenant

    async def until_seen(self, tenant: str, write: Callable[[], Awaitable[object]]) -> None:
        """Repeat ``write`` until ``tenant`` shows up (for iterators that are reconnecting)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + DEADLINE
        while True:
            try:
                await write()
            except StoreError:
                pass  # the backend is not back yet
            try:
                async with asyncio.timeout(0.2):
                    while await self.queue.get() != tenant:
                        pass
                return
            except TimeoutError:
                if loop.time() > deadline:
                    raise AssertionError(f"{tenant!r} never showed up on changes()") from None


@asynccontextmanager
async def watching(store: TenantStore, writer: TenantStore | None = None) -> AsyncIterator[Watcher]:
    """Iterate ``store.changes()`` in the background; returns once it is known to listen
    (a probe written through ``writer`` came through)."""
    watcher = Watcher()

    async def pump() -> None:
        async for tenant in store.changes():
            watcher.queue.put_nowait(tenant)

    async with asyncio.TaskGroup() as group:
        task = group.create_task(pump())
        try:
            await watcher.until_seen(PROBE, lambda: (writer or store).set_usage(PROBE, 0, 0))
            yield watcher
        finally:
            task.cancel()
