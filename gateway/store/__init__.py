"""The tenant store: current licenses, suspensions and revocations per tenant (docs/design.md §7),
and the seats and usage counted by the gateway (README "Seats and usage").

One interface, engines chosen by URL (``open_store``), like uvicorn's ``LOOP_FACTORIES``:
``memory://`` (tests, demos), ``sqlite:///path`` (the embedded default) and
``redis://host:port/db`` (fleets of sidecars sharing state). Stores keep raw license keys;
records handed to the decision carry verified ``License`` objects, so a key the key ring no
longer trusts never counts.

    store = open_store("memory://", keyring)
    await store.put_license(token)
    record = await store.get("acme")

Every write names the tenant it changed on ``changes()``, so caches in front of the store
(in this process, or in every process sharing a Redis) drop that tenant at once.
"""

from __future__ import annotations

import abc
import asyncio
import hashlib
import logging
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from typing import NamedTuple

import cachetools
import msgspec

from gateway.decision import TenantRecord
from gateway.errors import LicenseError
from gateway.license import KeyRing, License, Seats
from gateway.routes import QuotaName

log = logging.getLogger(__name__)

VERDICTS_SIZE = 100_000  # stored keys whose verdict is remembered (like the tenant cache)


class StoreError(Exception):
    """The store could not answer (unreachable, timed out); never a reason to revoke."""


SeatKind = QuotaName  # "ops_users" (the Operations app) or "drivers" (the Driver App)


class SeatAdmission(NamedTuple):
    """What ``admit_seat`` did: ``admitted`` (the user holds a seat now), ``new`` (the user
    held none before this call) and ``used`` (seats held after it)."""

    admitted: bool
    new: bool
    used: int


class SeatHolder(msgspec.Struct, frozen=True):
    user: str
    last_seen: float  # unix seconds


class UsageCount(msgspec.Struct, frozen=True, order=True):
    """Allowed calls of one tenant in one minute, per feature and API client."""

    tenant: str
    minute: int  # unix seconds at the start of the minute (a multiple of 60)
    feature: str  # "" for an ungated route
    client: str  # "" when the request named no client
    calls: int


def by_last_seen(holders: list[SeatHolder]) -> list[SeatHolder]:
    """Most recently seen first (then by user id, so the order is stable)."""
    return sorted(holders, key=lambda holder: (-holder.last_seen, holder.user))


USAGE_RETENTION_SECONDS = 400 * 86400  # a year of monthly invoices, and a margin


class TenantStore(abc.ABC):
    """What every engine offers. Engines answer for themselves; caching is the caller's.

    Engines raise ``StoreError`` (and only that) when the backend cannot answer."""

    url: str
    keys: StoredKeys  # verifies what is written and what is read, with the current ring

    def use_keyring(self, keyring: KeyRing) -> None:
        """Verify with ``keyring`` from now on (a reload replaced a public key)."""
        self.keys.use(keyring)

    @abc.abstractmethod
    async def get(self, tenant: str) -> TenantRecord | None:
        """The tenant's record, or None if the store has never heard of it."""

    @abc.abstractmethod
    async def put_license(self, token: str) -> License | None:
        """Verify and store a key. Returns the verified license, or None when the tenant
        already holds this or a newer serial (an out-of-order older key never replaces a
        newer one). Raises ``LicenseError`` for a key that does not verify."""

    @abc.abstractmethod
    async def set_suspended(self, tenant: str, suspended: bool) -> bool:
        """Suspend or reinstate; True if that changed anything."""

    @abc.abstractmethod
    async def revoke(self, tenant: str, license_id: str) -> bool:
        """Revoke one license id; True if it was not revoked before."""

    @abc.abstractmethod
    async def set_usage(self, tenant: str, ops_users: int, drivers: int) -> None:
        """Seats in use (reported by the upstream or billing)."""

    @abc.abstractmethod
    async def claim_event(self, event_id: str) -> bool:
        """Record a provisioning event id; False if it was already recorded (atomic)."""

    @abc.abstractmethod
    async def release_event(self, event_id: str) -> None:
        """Forget a claimed event id (its change could not be applied: let a retry in)."""

    @abc.abstractmethod
    async def import_classic_key(self, tenant: str, key: str) -> None:
        """Remember a classic X Dispatch key (for ``license.classic_keys = "store"``)."""

    @abc.abstractmethod
    async def remove_classic_key(self, key: str) -> bool:
        """Forget a classic key again; True if it was known (``gateway migrate`` undoing
        its own import when the customer's license could not be issued)."""

    @abc.abstractmethod
    async def is_classic_key(self, key: str) -> bool: ...

    @abc.abstractmethod
    async def tenants(self) -> list[str]:
        """Every tenant id the store knows (for the CLI)."""

    @abc.abstractmethod
    async def list_tenants(self) -> list[TenantRecord]:
        """Every tenant's record, by tenant id (``gateway tenant list``, reconciliation):
        what ``get`` would answer for each id of ``tenants()``, read in bulk."""

    @abc.abstractmethod
    def changes(self) -> AsyncIterator[str]:
        """Tenant ids as they change, from this process and (Redis) every other one."""

    # -- seats and usage (README "Seats and usage") ----------------------------------------
    #
    # Fail-static: like every method these raise ``StoreError`` when the backend cannot
    # answer, and the caller then ADMITS the user (``gateway.seats.SeatBook.admit``): an
    # outage never blocks anyone; the user is counted at a request after the store is back.

    @abc.abstractmethod
    async def admit_seat(
        self, tenant: str, kind: SeatKind, user: str, now: float, window: float, hard_limit: int
    ) -> SeatAdmission:
        """One atomic step, against every instance sharing the store: forget the holders of
        ``kind`` last seen ``window`` seconds or more before ``now``; then a holder is
        admitted (last seen: ``now``), a new user takes a seat while fewer than
        ``hard_limit`` are held, and is refused otherwise. Raises ``StoreError`` (the
        caller admits: fail-static)."""

    @abc.abstractmethod
    async def seat_holders(
        self, tenant: str, kind: SeatKind, now: float, window: float
    ) -> list[SeatHolder]:
        """Holders seen within ``window`` seconds before ``now``, most recent first."""

    @abc.abstractmethod
    async def release_seat(self, tenant: str, kind: SeatKind, user: str) -> bool:
        """Free one user's seat; True if the user held one. Names the tenant on
        ``changes()``, so holder caches drop the tenant."""

    @abc.abstractmethod
    async def set_extra_seats(self, tenant: str, ops_users: int, drivers: int) -> None:
        """Seats bought on top of the plan's (billing's ``seats`` action); replaces the
        previous numbers. Names the tenant on ``changes()``."""

    @abc.abstractmethod
    async def extra_seats(self, tenant: str) -> Seats | None:
        """The extra seats bought, or None if none were ever set."""

    @abc.abstractmethod
    async def add_usage(self, batch: Sequence[UsageCount]) -> None:
        """Add each count to its (tenant, minute, feature, client) bucket, in one step."""

    @abc.abstractmethod
    async def usage(
        self, tenant: str, since: float, until: float | None = None
    ) -> list[UsageCount]:
        """The tenant's buckets with ``since <= minute < until``, by minute, feature,
        client. Buckets older than ``USAGE_RETENTION_SECONDS`` may be gone."""

    async def ping(self) -> bool:
        """True when the backend answers."""
        return True

    async def close(self) -> None:
        return None


class StoredKeys:
    """Stored tokens back to verified licenses, newest serial first.

    Each stored key is verified once per key ring and the verdict (license or error) kept
    by key digest in a bounded LRU: a store read otherwise paid one Ed25519 check per
    stored key, outside the proxy's per-second verification budget. A stored key that no
    longer verifies (its signing key was rotated out) is skipped, and logged when its
    verdict is first reached, so at most once per key while the cache holds it. Used from
    the event loop only."""

    def __init__(self, keyring: KeyRing, engine: str, size: int = VERDICTS_SIZE) -> None:
        self.keyring = keyring
        self._engine = engine
        self._verdicts: cachetools.LRUCache[bytes, License | LicenseError] = cachetools.LRUCache(
            size
        )

    def __len__(self) -> int:
        """How many verdicts are remembered (at most ``size``)."""
        return len(self._verdicts)

    def use(self, keyring: KeyRing) -> None:
        """A new key ring (reload): every verdict is re-earned against it."""
        self.keyring = keyring
        self._verdicts.clear()

    def verify(self, token: str) -> License:
        """``KeyRing.verify``, remembered: raises ``LicenseError``."""
        verdict, _ = self._verdict(token)
        if isinstance(verdict, LicenseError):
            raise LicenseError(verdict.reason, verdict.detail)
        return verdict

    def licenses(self, tenant: str, tokens: Iterable[str]) -> tuple[License, ...]:
        licenses: list[License] = []
        for token in tokens:
            verdict, fresh = self._verdict(token)
            if not isinstance(verdict, LicenseError):
                licenses.append(verdict)
            elif fresh:
                log.warning(
                    "%s store: a stored key of tenant %r no longer verifies (%s); ignored",
                    self._engine,
                    tenant,
                    verdict,
                )
        licenses.sort(key=lambda lic: -lic.claims.serial)
        return tuple(licenses)

    def _verdict(self, token: str) -> tuple[License | LicenseError, bool]:
        """The verdict on ``token`` and whether it was reached just now."""
        digest = hashlib.blake2b(token.encode("utf-8", "surrogateescape"), digest_size=16).digest()
        verdict = self._verdicts.get(digest)
        if verdict is not None:
            return verdict, False
        try:
            verdict = self.keyring.verify(token)
        except LicenseError as exc:
            # Only the reason: the raised error holds a traceback and its chained cause.
            verdict = LicenseError(exc.reason, exc.detail)
        self._verdicts[digest] = verdict
        return verdict, True


class LocalChanges:
    """Fan-out of changed tenant ids to the ``changes()`` iterators of one process."""

    def __init__(self) -> None:
        self._queues: list[asyncio.Queue[str]] = []

    def publish(self, tenant: str) -> None:
        for queue in self._queues:
            queue.put_nowait(tenant)

    async def subscribe(self) -> AsyncIterator[str]:
        queue: asyncio.Queue[str] = asyncio.Queue()
        self._queues.append(queue)
        try:
            while True:
                yield await queue.get()
        finally:
            self._queues.remove(queue)


StoreFactory = Callable[[str, KeyRing], TenantStore]


def _memory(url: str, keyring: KeyRing) -> TenantStore:
    from gateway.store.memory import MemoryStore

    return MemoryStore(url, keyring)


def _sqlite(url: str, keyring: KeyRing) -> TenantStore:
    from gateway.store.sqlite import SqliteStore

    return SqliteStore(url, keyring)


def _redis(url: str, keyring: KeyRing) -> TenantStore:
    try:
        from gateway.store.redis_store import RedisStore
    except ImportError as exc:  # the optional dependency
        raise ValueError(
            f"store.url {url!r} needs the redis package: pip install 'redis>=5'"
        ) from exc
    return RedisStore(url, keyring)


STORE_FACTORIES: dict[str, StoreFactory] = {
    "memory": _memory,
    "sqlite": _sqlite,
    "redis": _redis,
    "rediss": _redis,  # Redis over TLS
}


def per_process(url: str) -> bool:
    """True for a store whose data lives inside one process (``memory://``, SQLite's
    ``:memory:``): other processes (workers, the CLI) cannot see or change it."""
    if url.startswith("memory://"):
        return True
    if url.startswith("sqlite://"):
        from gateway.store.sqlite import sqlite_path

        return sqlite_path(url) == ":memory:"
    return False


def open_store(url: str, keyring: KeyRing) -> TenantStore:
    """The engine for ``url``: ``memory://``, ``sqlite:///path``, ``redis://host:port/db``."""
    scheme = url.split("://", 1)[0]
    factory = STORE_FACTORIES.get(scheme)
    if factory is None:
        known = ", ".join(f"{name}://" for name in STORE_FACTORIES)
        raise ValueError(f"store.url {url!r}: unsupported engine (available: {known})")
    return factory(url, keyring)
