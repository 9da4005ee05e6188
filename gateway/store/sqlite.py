"""SQLite tenant store: the embedded default, one file that survives restarts (docs/design.md §7).

(Longer than ~500 lines: the whole ``TenantStore`` interface over one schema, each method next
to its SQL; split by method, one table's invariants would be spread over several files.)

``sqlite:///var/lib/gateway/tenants.db`` (an absolute path), ``sqlite://tenants.db``
(relative to the working directory) or ``sqlite:///:memory:`` (one connection, gone on
``close()``). The standard-library ``sqlite3`` runs on one worker thread owned by the store,
so the event loop never waits on the disk; the connection lives on that thread only.

The file is opened (and the schema created) on first use, so a path that cannot be opened is
a ``StoreError`` naming the path from the first call, and the next call tries again. WAL mode
with ``synchronous=NORMAL``: readers never block the writer, and a committed change survives
a crash of the process (a power loss may drop the last transactions, never corrupt the file).
Every write is one ``BEGIN IMMEDIATE`` transaction, so a crash never leaves half a change and
two stores on the same file (two processes) serialise their writes.

Keys are stored raw; ``get`` hands them to ``StoredKeys``, which verifies each once per key
ring, so a key whose signing key was removed from the ring stops counting as soon as the ring
is swapped (logged once per key).

``changes()`` names the tenants changed through this store object only: processes sharing a
file do not see each other's changes (their caches expire them; Redis is the engine for fleets).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
import time
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import msgspec

from gateway.decision import TenantRecord
from gateway.license import KeyRing, License, Seats
from gateway.store import (
    USAGE_RETENTION_SECONDS,
    LocalChanges,
    SeatAdmission,
    SeatHolder,
    SeatKind,
    StoredKeys,
    StoreError,
    TenantStore,
    UsageCount,
)

log = logging.getLogger(__name__)

T = TypeVar("T")

SCHEMA_VERSION = 1
BUSY_TIMEOUT_SECONDS = 5.0  # wait this long for another writer on the same file
EVENT_RETENTION_SECONDS = 30 * 86400  # like the Redis engine's expiry of event ids

SCHEMA = """
CREATE TABLE IF NOT EXISTS tenants (
    tenant    TEXT PRIMARY KEY,
    suspended INTEGER NOT NULL DEFAULT 0,
    ops_users INTEGER,
    drivers   INTEGER
);
CREATE TABLE IF NOT EXISTS licenses (
    tenant     TEXT NOT NULL,
    serial     INTEGER NOT NULL,
    token      TEXT NOT NULL,
    license_id TEXT NOT NULL,
    stored_at  REAL NOT NULL,
    PRIMARY KEY (tenant, serial)
);
CREATE TABLE IF NOT EXISTS revoked (
    tenant     TEXT NOT NULL,
    license_id TEXT NOT NULL,
    revoked_at REAL NOT NULL,
    PRIMARY KEY (tenant, license_id)
);
CREATE TABLE IF NOT EXISTS events (
    event_id   TEXT PRIMARY KEY,
    claimed_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS classic_keys (
    key    TEXT PRIMARY KEY,
    tenant TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS seats (
    tenant    TEXT NOT NULL,
    kind      TEXT NOT NULL,
    user      TEXT NOT NULL,
    last_seen REAL NOT NULL,
    PRIMARY KEY (tenant, kind, user)
);
CREATE TABLE IF NOT EXISTS extra_seats (
    tenant    TEXT PRIMARY KEY,
    ops_users INTEGER NOT NULL,
    drivers   INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS usage (
    tenant  TEXT NOT NULL,
    minute  INTEGER NOT NULL,
    feature TEXT NOT NULL,
    client  TEXT NOT NULL,
    calls   INTEGER NOT NULL,
    PRIMARY KEY (tenant, minute, feature, client)
);
"""


def sqlite_path(url: str) -> str:
    """The database path of a ``sqlite://`` URL (``:memory:`` for an in-memory database)."""
    if not url.startswith("sqlite://"):
        raise ValueError(f"store.url {url!r}: expected sqlite:///path/to/file.db")
    rest = url.removeprefix("sqlite://")
    if rest in ("/:memory:", ":memory:"):
        return ":memory:"
    if not rest or rest == "/":
        raise ValueError(f"store.url {url!r}: no database path (sqlite:///path/to/file.db)")
    return rest


class SqliteStore(TenantStore):
    def __init__(self, url: str, keyring: KeyRing) -> None:
        self.url = url
        self.path = sqlite_path(url)
        self._changes = LocalChanges()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sqlite-store")
        self._closed = False
        # Touched on the worker thread only.
        self._conn: sqlite3.Connection | None = None
        self.keys = StoredKeys(keyring, "sqlite")

    # -- the worker thread ------------------------------------------------------------------

    async def _run(self, op: str, job: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``job`` with the open connection on the worker thread; errors → StoreError."""
        if self._closed:
            raise StoreError(f"sqlite store {self.path}: {op}: the store is closed")
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._executor, self._call, op, job)
        except RuntimeError as exc:  # executor shut down by a concurrent close()
            raise StoreError(f"sqlite store {self.path}: {op}: the store is closed") from exc

    def _call(self, op: str, job: Callable[[sqlite3.Connection], T]) -> T:
        conn = self._connection()
        try:
            return job(conn)
        except sqlite3.Error as exc:
            if conn.in_transaction:  # the job's own rollback failed too
                with contextlib.suppress(sqlite3.Error):
                    conn.rollback()
            raise StoreError(f"sqlite store {self.path}: {op}: {_describe(exc)}") from exc

    def _connection(self) -> sqlite3.Connection:
        if self._conn is not None:
            return self._conn
        try:
            conn = sqlite3.connect(
                self.path,
                timeout=BUSY_TIMEOUT_SECONDS,
                isolation_level=None,  # transactions are explicit: BEGIN … COMMIT
            )  # created on the worker thread, used there only (sqlite3 checks that)
        except sqlite3.Error as exc:
            raise StoreError(
                f"sqlite store {self.path}: cannot open the database: {_describe(exc)}"
            ) from exc
        try:
            # Switching a new file to WAL takes a lock SQLite's busy handler does not wait
            # for: when two stores open the same new file at once, retry for a while.
            deadline = time.monotonic() + BUSY_TIMEOUT_SECONDS
            while True:
                try:
                    self._prepare(conn)
                    break
                except StoreError as exc:
                    locked = isinstance(exc.__cause__, sqlite3.OperationalError) and (
                        "locked" in str(exc.__cause__)
                    )
                    if not locked or time.monotonic() > deadline:
                        raise
                    time.sleep(0.02)
        except BaseException:
            conn.close()
            raise
        self._conn = conn
        return conn

    def _prepare(self, conn: sqlite3.Connection) -> None:
        """Pragmas, schema and housekeeping, once per connection."""
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            with _transaction(conn, "BEGIN IMMEDIATE"):
                (version,) = conn.execute("PRAGMA user_version").fetchone()
                if version > SCHEMA_VERSION:
                    raise StoreError(
                        f"sqlite store {self.path}: schema version {version} is newer than "
                        f"this gateway's ({SCHEMA_VERSION}); upgrade the gateway"
                    )
                for statement in SCHEMA.split(";"):
                    if statement.strip():
                        conn.execute(statement)
                conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
                conn.execute(
                    "DELETE FROM events WHERE claimed_at < ?",
                    (time.time() - EVENT_RETENTION_SECONDS,),
                )
                conn.execute(
                    "DELETE FROM usage WHERE minute < ?",
                    (time.time() - USAGE_RETENTION_SECONDS,),
                )
        except sqlite3.Error as exc:
            raise StoreError(
                f"sqlite store {self.path}: cannot open the database: {_describe(exc)}"
            ) from exc

    def _close_connection(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    # -- reads ------------------------------------------------------------------------------

    async def get(self, tenant: str) -> TenantRecord | None:
        row = await self._run("get", lambda conn: self._get(conn, tenant))
        if row is None:
            return None
        # Verified here, on the event loop, not on the worker thread: the verdict cache
        # of ``self.keys`` is used from the loop only.
        record, tokens = row
        return msgspec.structs.replace(record, licenses=self.keys.licenses(tenant, tokens))

    def _get(self, conn: sqlite3.Connection, tenant: str) -> tuple[TenantRecord, list[str]] | None:
        """The record without its licenses, and the stored keys, newest first."""
        with _transaction(conn, "BEGIN"):
            row = conn.execute(
                "SELECT suspended, ops_users, drivers FROM tenants WHERE tenant = ?", (tenant,)
            ).fetchone()
            if row is None:
                return None
            suspended, ops_users, drivers = row
            tokens = [
                token
                for (token,) in conn.execute(
                    "SELECT token FROM licenses WHERE tenant = ? ORDER BY serial DESC", (tenant,)
                )
            ]
            revoked = frozenset(
                license_id
                for (license_id,) in conn.execute(
                    "SELECT license_id FROM revoked WHERE tenant = ?", (tenant,)
                )
            )
        return self._record(tenant, (suspended, ops_users, drivers), tokens, revoked)

    def _record(
        self,
        tenant: str,
        state: tuple[int, int | None, int | None],
        tokens: list[str],
        revoked: frozenset[str],
    ) -> tuple[TenantRecord, list[str]]:
        """The record without its licenses, and its stored keys (verified on the loop)."""
        suspended, ops_users, drivers = state
        usage = None if ops_users is None or drivers is None else Seats(ops_users, drivers)
        return TenantRecord(tenant, suspended=bool(suspended), revoked=revoked, usage=usage), tokens

    async def list_tenants(self) -> list[TenantRecord]:
        rows = await self._run("list_tenants", self._list)
        return [
            msgspec.structs.replace(record, licenses=self.keys.licenses(record.tenant, tokens))
            for record, tokens in rows
        ]

    def _list(self, conn: sqlite3.Connection) -> list[tuple[TenantRecord, list[str]]]:
        """Three scans in one read transaction, instead of three queries per tenant."""
        tokens: dict[str, list[str]] = {}
        revoked: dict[str, set[str]] = {}
        with _transaction(conn, "BEGIN"):
            states = conn.execute(
                "SELECT tenant, suspended, ops_users, drivers FROM tenants ORDER BY tenant"
            ).fetchall()
            for tenant, token in conn.execute(
                "SELECT tenant, token FROM licenses ORDER BY tenant, serial DESC"
            ):
                tokens.setdefault(tenant, []).append(token)
            for tenant, license_id in conn.execute("SELECT tenant, license_id FROM revoked"):
                revoked.setdefault(tenant, set()).add(license_id)
        return [
            self._record(
                tenant,
                (suspended, ops_users, drivers),
                tokens.get(tenant, []),
                frozenset(revoked.get(tenant, ())),
            )
            for tenant, suspended, ops_users, drivers in states
        ]

    async def is_classic_key(self, key: str) -> bool:
        def job(conn: sqlite3.Connection) -> bool:
            row = conn.execute("SELECT 1 FROM classic_keys WHERE key = ?", (key,)).fetchone()
            return row is not None

        return await self._run("is_classic_key", job)

    async def tenants(self) -> list[str]:
        def job(conn: sqlite3.Connection) -> list[str]:
            rows = conn.execute("SELECT tenant FROM tenants ORDER BY tenant").fetchall()
            return [tenant for (tenant,) in rows]

        return await self._run("tenants", job)

    async def ping(self) -> bool:
        try:
            await self._run("ping", lambda conn: conn.execute("SELECT 1").fetchone())
        except StoreError:
            return False
        return True

    # -- writes -----------------------------------------------------------------------------

    async def put_license(self, token: str) -> License | None:
        lic = self.keys.verify(token)  # LicenseError before anything is stored
        claims = lic.claims

        def job(conn: sqlite3.Connection) -> bool:
            with _transaction(conn, "BEGIN IMMEDIATE"):
                (held,) = conn.execute(
                    "SELECT MAX(serial) FROM licenses WHERE tenant = ?", (claims.sub,)
                ).fetchone()
                if held is not None and held >= claims.serial:
                    return False
                conn.execute(
                    "INSERT INTO licenses (tenant, serial, token, license_id, stored_at) "
                    "VALUES (?, ?, ?, ?, ?)",
                    (claims.sub, claims.serial, token, claims.jti, time.time()),
                )
                conn.execute("INSERT OR IGNORE INTO tenants (tenant) VALUES (?)", (claims.sub,))
                return True

        if not await self._run("put_license", job):
            return None
        self._changes.publish(claims.sub)
        return lic

    async def set_suspended(self, tenant: str, suspended: bool) -> bool:
        def job(conn: sqlite3.Connection) -> bool:
            with _transaction(conn, "BEGIN IMMEDIATE"):
                row = conn.execute(
                    "SELECT suspended FROM tenants WHERE tenant = ?", (tenant,)
                ).fetchone()
                if row is not None and bool(row[0]) == suspended:
                    return False
                conn.execute(
                    "INSERT INTO tenants (tenant, suspended) VALUES (?, ?) "
                    "ON CONFLICT (tenant) DO UPDATE SET suspended = excluded.suspended",
                    (tenant, int(suspended)),
                )
                return True

        changed = await self._run("set_suspended", job)
        if changed:
            self._changes.publish(tenant)
        return changed

    async def revoke(self, tenant: str, license_id: str) -> bool:
        def job(conn: sqlite3.Connection) -> bool:
            with _transaction(conn, "BEGIN IMMEDIATE"):
                inserted = conn.execute(
                    "INSERT OR IGNORE INTO revoked (tenant, license_id, revoked_at) "
                    "VALUES (?, ?, ?)",
                    (tenant, license_id, time.time()),
                ).rowcount
                if not inserted:
                    return False
                conn.execute("INSERT OR IGNORE INTO tenants (tenant) VALUES (?)", (tenant,))
                return True

        changed = await self._run("revoke", job)
        if changed:
            self._changes.publish(tenant)
        return changed

    async def set_usage(self, tenant: str, ops_users: int, drivers: int) -> None:
        def job(conn: sqlite3.Connection) -> None:
            with _transaction(conn, "BEGIN IMMEDIATE"):
                conn.execute(
                    "INSERT INTO tenants (tenant, ops_users, drivers) VALUES (?, ?, ?) "
                    "ON CONFLICT (tenant) DO UPDATE "
                    "SET ops_users = excluded.ops_users, drivers = excluded.drivers",
                    (tenant, ops_users, drivers),
                )

        await self._run("set_usage", job)
        self._changes.publish(tenant)

    async def claim_event(self, event_id: str) -> bool:
        def job(conn: sqlite3.Connection) -> bool:
            with _transaction(conn, "BEGIN IMMEDIATE"):
                inserted: int = conn.execute(
                    "INSERT OR IGNORE INTO events (event_id, claimed_at) VALUES (?, ?)",
                    (event_id, time.time()),
                ).rowcount
            return inserted == 1

        return await self._run("claim_event", job)

    async def release_event(self, event_id: str) -> None:
        def job(conn: sqlite3.Connection) -> None:
            with _transaction(conn, "BEGIN IMMEDIATE"):
                conn.execute("DELETE FROM events WHERE event_id = ?", (event_id,))

        await self._run("release_event", job)

    async def import_classic_key(self, tenant: str, key: str) -> None:
        def job(conn: sqlite3.Connection) -> None:
            with _transaction(conn, "BEGIN IMMEDIATE"):
                conn.execute(
                    "INSERT INTO classic_keys (key, tenant) VALUES (?, ?) "
                    "ON CONFLICT (key) DO UPDATE SET tenant = excluded.tenant",
                    (key, tenant),
                )

        await self._run("import_classic_key", job)

    async def remove_classic_key(self, key: str) -> bool:
        def job(conn: sqlite3.Connection) -> bool:
            with _transaction(conn, "BEGIN IMMEDIATE"):
                return conn.execute("DELETE FROM classic_keys WHERE key = ?", (key,)).rowcount > 0

        return await self._run("remove_classic_key", job)

    def changes(self) -> AsyncIterator[str]:
        return self._changes.subscribe()

    # -- seats and usage: each one transaction on the worker thread ----------------------------

    async def admit_seat(
        self, tenant: str, kind: SeatKind, user: str, now: float, window: float, hard_limit: int
    ) -> SeatAdmission:
        def job(conn: sqlite3.Connection) -> SeatAdmission:
            # BEGIN IMMEDIATE takes the write lock first: two gateways on one file cannot
            # both count the same free seat.
            with _transaction(conn, "BEGIN IMMEDIATE"):
                _forget_expired(conn, tenant, kind, now - window)
                (used,) = conn.execute(
                    "SELECT COUNT(*) FROM seats WHERE tenant = ? AND kind = ?", (tenant, kind)
                ).fetchone()
                touched = conn.execute(
                    "UPDATE seats SET last_seen = MAX(last_seen, ?) "
                    "WHERE tenant = ? AND kind = ? AND user = ?",
                    (now, tenant, kind, user),
                ).rowcount
                if touched:
                    return SeatAdmission(True, False, used)
                if used >= hard_limit:
                    return SeatAdmission(False, True, used)
                conn.execute(
                    "INSERT INTO seats (tenant, kind, user, last_seen) VALUES (?, ?, ?, ?)",
                    (tenant, kind, user, now),
                )
                return SeatAdmission(True, True, used + 1)

        return await self._run("admit_seat", job)

    async def seat_holders(
        self, tenant: str, kind: SeatKind, now: float, window: float
    ) -> list[SeatHolder]:
        def job(conn: sqlite3.Connection) -> list[SeatHolder]:
            rows = conn.execute(
                "SELECT user, last_seen FROM seats "
                "WHERE tenant = ? AND kind = ? AND last_seen > ? "
                "ORDER BY last_seen DESC, user",
                (tenant, kind, now - window),
            ).fetchall()
            return [SeatHolder(user, last_seen) for user, last_seen in rows]

        return await self._run("seat_holders", job)

    async def release_seat(self, tenant: str, kind: SeatKind, user: str) -> bool:
        def job(conn: sqlite3.Connection) -> bool:
            with _transaction(conn, "BEGIN IMMEDIATE"):
                deleted: int = conn.execute(
                    "DELETE FROM seats WHERE tenant = ? AND kind = ? AND user = ?",
                    (tenant, kind, user),
                ).rowcount
            return deleted == 1

        released = await self._run("release_seat", job)
        if released:
            self._changes.publish(tenant)
        return released

    async def set_extra_seats(self, tenant: str, ops_users: int, drivers: int) -> None:
        def job(conn: sqlite3.Connection) -> None:
            with _transaction(conn, "BEGIN IMMEDIATE"):
                conn.execute(
                    "INSERT INTO extra_seats (tenant, ops_users, drivers) VALUES (?, ?, ?) "
                    "ON CONFLICT (tenant) DO UPDATE "
                    "SET ops_users = excluded.ops_users, drivers = excluded.drivers",
                    (tenant, ops_users, drivers),
                )

        await self._run("set_extra_seats", job)
        self._changes.publish(tenant)

    async def extra_seats(self, tenant: str) -> Seats | None:
        def job(conn: sqlite3.Connection) -> Seats | None:
            row = conn.execute(
                "SELECT ops_users, drivers FROM extra_seats WHERE tenant = ?", (tenant,)
            ).fetchone()
            return None if row is None else Seats(*row)

        return await self._run("extra_seats", job)

    async def add_usage(self, batch: Sequence[UsageCount]) -> None:
        rows = [(c.tenant, c.minute, c.feature, c.client, c.calls) for c in batch]

        def job(conn: sqlite3.Connection) -> None:
            with _transaction(conn, "BEGIN IMMEDIATE"):
                conn.executemany(
                    "INSERT INTO usage (tenant, minute, feature, client, calls) "
                    "VALUES (?, ?, ?, ?, ?) ON CONFLICT (tenant, minute, feature, client) "
                    "DO UPDATE SET calls = calls + excluded.calls",
                    rows,
                )

        await self._run("add_usage", job)

    async def usage(
        self, tenant: str, since: float, until: float | None = None
    ) -> list[UsageCount]:
        def job(conn: sqlite3.Connection) -> list[UsageCount]:
            rows = conn.execute(
                "SELECT minute, feature, client, calls FROM usage "
                "WHERE tenant = ? AND minute >= ? AND minute < ? "
                "ORDER BY minute, feature, client",
                (tenant, since, float("inf") if until is None else until),
            ).fetchall()
            return [UsageCount(tenant, *row) for row in rows]

        return await self._run("usage", job)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(self._executor, self._close_connection)
        finally:
            self._executor.shutdown(wait=False)


class _transaction:
    """``with _transaction(conn, "BEGIN IMMEDIATE"):`` commits on success, rolls back on error."""

    __slots__ = ("_conn", "_begin")

    def __init__(self, conn: sqlite3.Connection, begin: str) -> None:
        self._conn = conn
        self._begin = begin

    def __enter__(self) -> None:
        self._conn.execute(self._begin)

    def __exit__(self, exc_type: type[BaseException] | None, *_: object) -> None:
        if exc_type is None:
            self._conn.execute("COMMIT")
        elif self._conn.in_transaction:
            self._conn.execute("ROLLBACK")


def _forget_expired(conn: sqlite3.Connection, tenant: str, kind: str, cutoff: float) -> None:
    conn.execute(
        "DELETE FROM seats WHERE tenant = ? AND kind = ? AND last_seen <= ?",
        (tenant, kind, cutoff),
    )


def _describe(exc: sqlite3.Error) -> str:
    name = getattr(exc, "sqlite_errorname", None)
    return f"{exc} ({name})" if name else str(exc)
