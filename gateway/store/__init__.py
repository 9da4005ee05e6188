"""The tenant store: current licenses, suspensions and revocations per tenant (DESIGN §7).

One interface, engines chosen by URL (``open_store``), like uvicorn's ``LOOP_FACTORIES``.
Stores keep raw license keys; records handed to the decision carry verified ``License``
objects, so a key the key ring no longer trusts never counts.

    store = open_store("memory://", keyring)
    await store.put_license(token)
    record = await store.get("acme")
"""

from __future__ import annotations

import abc
from collections.abc import Callable

from gateway.decision import TenantRecord
from gateway.license import KeyRing


class StoreError(Exception):
    """The store could not answer (unreachable, timed out); never a reason to revoke."""


class TenantStore(abc.ABC):
    """What every engine offers. Engines answer for themselves; caching is the caller's."""

    url: str

    @abc.abstractmethod
    async def get(self, tenant: str) -> TenantRecord | None:
        """The tenant's record, or None if the store has never heard of it."""

    @abc.abstractmethod
    async def put_license(self, token: str) -> bool:
        """Store a (verified) key; False if the tenant already has this or a newer serial."""

    @abc.abstractmethod
    async def set_suspended(self, tenant: str, suspended: bool) -> None: ...

    @abc.abstractmethod
    async def revoke(self, tenant: str, license_id: str) -> None: ...

    async def close(self) -> None:
        return None


StoreFactory = Callable[[str, KeyRing], TenantStore]


def _memory(url: str, keyring: KeyRing) -> TenantStore:
    from gateway.store.memory import MemoryStore

    return MemoryStore(url, keyring)


STORE_FACTORIES: dict[str, StoreFactory] = {"memory": _memory}


def open_store(url: str, keyring: KeyRing) -> TenantStore:
    """The engine for ``url`` (``memory://``; ``sqlite://`` and ``redis://`` come later)."""
    scheme = url.split("://", 1)[0]
    factory = STORE_FACTORIES.get(scheme)
    if factory is None:
        known = ", ".join(f"{name}://" for name in STORE_FACTORIES)
        raise ValueError(f"store.url {url!r}: unsupported engine (available: {known})")
    return factory(url, keyring)
