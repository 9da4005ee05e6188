"""The issuer's ledger: every license it minted, its orders, serials and deliveries (SQLite).

One file, written by the issuing service and by ``gateway license issue --issuer-config``
alike; every change is one ``BEGIN IMMEDIATE`` transaction, so two processes never hand out
the same serial. Serials are monotonic per tenant and never below the issuing time in
microseconds, so they stay above every serial handed out before the ledger existed (the CLI
used the time in seconds) and a tenant's newer license always carries the higher serial.

    ledger = Ledger(Path("issuer.db"))
    row, created = ledger.mint("acme", build, order=("ord-1", digest), targets=["gw-a"])

The audit line of a new license is written inside the same transaction (``build`` and
``record`` run before COMMIT): a license is never in the ledger without its audit line.
"""

from __future__ import annotations

import contextlib
import sqlite3
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Literal, TypeVar

import msgspec

from gateway.license import Seats

SCHEMA = """
CREATE TABLE IF NOT EXISTS licenses (
    license_id  TEXT PRIMARY KEY,
    tenant      TEXT NOT NULL,
    serial      INTEGER NOT NULL,
    kid         TEXT NOT NULL,
    tier        TEXT NOT NULL,
    addons      TEXT NOT NULL,
    seats       TEXT,
    trial       INTEGER NOT NULL,
    iat         INTEGER NOT NULL,
    nbf         INTEGER NOT NULL,
    exp         INTEGER NOT NULL,
    token       TEXT NOT NULL,
    fingerprint TEXT NOT NULL,
    change      TEXT NOT NULL,
    actor       TEXT NOT NULL,
    order_id    TEXT,
    UNIQUE (tenant, serial)
);
CREATE INDEX IF NOT EXISTS licenses_by_kid ON licenses (kid, exp);
CREATE TABLE IF NOT EXISTS serials (
    tenant TEXT PRIMARY KEY,
    last   INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS orders (
    order_id   TEXT PRIMARY KEY,
    digest     TEXT NOT NULL,
    license_id TEXT NOT NULL,
    created    REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS deliveries (
    license_id   TEXT NOT NULL,
    target       TEXT NOT NULL,
    state        TEXT NOT NULL,
    attempts     INTEGER NOT NULL DEFAULT 0,
    next_attempt REAL NOT NULL,
    last_error   TEXT,
    delivered_at REAL,
    PRIMARY KEY (license_id, target)
);
"""

_T = TypeVar("_T")
DeliveryState = Literal["pending", "delivered", "dead"]
Change = Literal["new", "upgrade", "downgrade", "renewal"]


class LedgerLicense(msgspec.Struct, frozen=True):
    license_id: str
    tenant: str
    serial: int
    kid: str
    tier: str
    addons: tuple[str, ...]
    seats: Seats | None
    trial: bool
    iat: int
    nbf: int
    exp: int
    token: str
    fingerprint: str
    change: Change
    actor: str
    order_id: str | None = None


class Delivery(msgspec.Struct, frozen=True):
    license_id: str
    target: str
    state: DeliveryState
    attempts: int
    next_attempt: float
    last_error: str | None
    delivered_at: float | None


class OrderConflict(Exception):
    """An order id already used for a different order body."""


class LedgerError(Exception):
    """The ledger file cannot be opened or written."""


Build = Callable[[int, tuple[LedgerLicense, ...]], LedgerLicense]
Record = Callable[[LedgerLicense], object]

_LICENSE_COLUMNS = (
    "license_id, tenant, serial, kid, tier, addons, seats, trial, iat, nbf, exp, token, "
    "fingerprint, change, actor, order_id"
)


def serial_floor(now: float) -> int:
    """The lowest serial a license issued at ``now`` may get (microseconds)."""
    return int(now * 1_000_000)


class Ledger:
    """A ledger file. Each call opens its own connection, so any thread or process may use it."""

    __slots__ = ("path",)

    def __init__(self, path: Path) -> None:
        self.path = path

    @contextlib.contextmanager
    def _connect(self, write: bool) -> Iterator[sqlite3.Connection]:
        try:
            conn = sqlite3.connect(self.path, timeout=10.0, isolation_level=None)
        except sqlite3.Error as exc:
            raise LedgerError(f"ledger {self.path}: cannot open: {exc}") from exc
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("BEGIN IMMEDIATE" if write else "BEGIN")
            for statement in SCHEMA.split(";"):
                if statement.strip() and write:
                    conn.execute(statement)
            yield conn
            conn.execute("COMMIT")
        except sqlite3.OperationalError as exc:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            if "no such table" in str(exc):  # a read before anything was ever written
                raise _Empty from exc
            raise LedgerError(f"ledger {self.path}: {exc}") from exc
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        finally:
            conn.close()

    def _read(self, job: Callable[[sqlite3.Connection], _T], empty: _T) -> _T:
        try:
            with self._connect(write=False) as conn:
                return job(conn)
        except _Empty:
            return empty

    # -- minting ---------------------------------------------------------------------------

    def mint(
        self,
        tenant: str,
        build: Build,
        record: Record,
        *,
        order: tuple[str, str] | None = None,
        targets: tuple[str, ...] = (),
        now: float | None = None,
        deliver_at: float | None = None,
    ) -> tuple[LedgerLicense, bool]:
        """Allocate the tenant's next serial, ``build`` the license with it (given the
        tenant's licenses, newest first), ``record`` it (the audit line) and store it with
        a pending delivery per target. With ``order`` = (order id, body digest): the same
        id and digest return the license minted before (created False); the same id with
        another digest raises ``OrderConflict``. The deliveries are due at ``deliver_at``
        (default now)."""
        now = time.time() if now is None else now
        with self._connect(write=True) as conn:
            if order is not None:
                row = conn.execute(
                    "SELECT digest, license_id FROM orders WHERE order_id = ?", (order[0],)
                ).fetchone()
                if row is not None:
                    if row[0] != order[1]:
                        raise OrderConflict(order[0])
                    found = _license(conn, row[1])
                    assert found is not None
                    return found, False
            held = _licenses_of(conn, tenant)
            (last,) = conn.execute(
                "SELECT COALESCE(MAX(last), 0) FROM serials WHERE tenant = ?", (tenant,)
            ).fetchone()
            serial = max(last + 1, serial_floor(now))
            lic = build(serial, held)
            conn.execute(
                "INSERT INTO serials (tenant, last) VALUES (?, ?) "
                "ON CONFLICT (tenant) DO UPDATE SET last = excluded.last",
                (tenant, serial),
            )
            conn.execute(
                f"INSERT INTO licenses ({_LICENSE_COLUMNS}) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    lic.license_id, lic.tenant, lic.serial, lic.kid, lic.tier,
                    msgspec.json.encode(lic.addons).decode(),
                    msgspec.json.encode(lic.seats).decode() if lic.seats else None,
                    int(lic.trial), lic.iat, lic.nbf, lic.exp, lic.token, lic.fingerprint,
                    lic.change, lic.actor, lic.order_id,
                ),
            )  # fmt: skip
            if order is not None:
                conn.execute(
                    "INSERT INTO orders (order_id, digest, license_id, created) "
                    "VALUES (?, ?, ?, ?)",
                    (order[0], order[1], lic.license_id, now),
                )
            conn.executemany(
                "INSERT INTO deliveries (license_id, target, state, next_attempt) "
                "VALUES (?, ?, 'pending', ?)",
                [(lic.license_id, target, deliver_at or now) for target in targets],
            )
            record(lic)  # the audit line; if it cannot be written, nothing is committed
            return lic, True

    # -- reads -----------------------------------------------------------------------------

    def existing(self, order_id: str, digest: str) -> LedgerLicense | None:
        """The license of an order placed before with this body; ``OrderConflict`` when
        the id was used for another body; None for a new order id."""

        def job(conn: sqlite3.Connection) -> LedgerLicense | None:
            row = conn.execute(
                "SELECT digest, license_id FROM orders WHERE order_id = ?", (order_id,)
            ).fetchone()
            if row is None:
                return None
            if row[0] != digest:
                raise OrderConflict(order_id)
            return _license(conn, row[1])

        return self._read(job, None)

    def order(self, order_id: str) -> tuple[LedgerLicense, list[Delivery]] | None:
        """The license an order minted, with its deliveries."""

        def job(conn: sqlite3.Connection) -> tuple[LedgerLicense, list[Delivery]] | None:
            row = conn.execute(
                "SELECT license_id FROM orders WHERE order_id = ?", (order_id,)
            ).fetchone()
            return None if row is None else _with_deliveries(conn, row[0])

        return self._read(job, None)

    def license_deliveries(self, license_id: str) -> tuple[LedgerLicense, list[Delivery]] | None:
        """A license by its id, with its deliveries (and its ``order_id``, if an order)."""
        return self._read(lambda conn: _with_deliveries(conn, license_id), None)

    def licenses(self, tenant: str) -> tuple[LedgerLicense, ...]:
        return self._read(lambda conn: _licenses_of(conn, tenant), ())

    def license(self, license_id: str) -> LedgerLicense | None:
        return self._read(lambda conn: _license(conn, license_id), None)

    def signed_with(self, kid: str, valid_after: float) -> tuple[int, int | None]:
        """How many licenses signed with ``kid`` are valid after ``valid_after`` (expiry
        plus grace), and the latest expiry of any license it signed."""

        def job(conn: sqlite3.Connection) -> tuple[int, int | None]:
            (count,) = conn.execute(
                "SELECT COUNT(*) FROM licenses WHERE kid = ? AND exp > ?", (kid, valid_after)
            ).fetchone()
            (latest,) = conn.execute(
                "SELECT MAX(exp) FROM licenses WHERE kid = ?", (kid,)
            ).fetchone()
            return count, latest

        nothing: tuple[int, int | None] = (0, None)
        return self._read(job, nothing)

    def deliveries(self, state: DeliveryState | None = None) -> list[Delivery]:
        where, args = ("WHERE state = ?", (state,)) if state else ("", ())
        return self._read(lambda conn: _deliveries(conn, where, args), [])

    def due(self, now: float) -> list[tuple[Delivery, LedgerLicense]]:
        """Pending deliveries whose next attempt is due, with their licenses."""

        def job(conn: sqlite3.Connection) -> list[tuple[Delivery, LedgerLicense]]:
            found = _deliveries(conn, "WHERE state = 'pending' AND next_attempt <= ?", (now,))
            result = []
            for delivery in found:
                lic = _license(conn, delivery.license_id)
                if lic is not None:
                    result.append((delivery, lic))
            return result

        return self._read(job, [])

    # -- delivery bookkeeping --------------------------------------------------------------

    def delivered(self, license_id: str, target: str, now: float) -> None:
        with self._connect(write=True) as conn:
            conn.execute(
                "UPDATE deliveries SET state = 'delivered', attempts = attempts + 1, "
                "delivered_at = ?, last_error = NULL WHERE license_id = ? AND target = ?",
                (now, license_id, target),
            )

    def failed(self, license_id: str, target: str, error: str, retry_at: float | None) -> None:
        """One failed attempt: retry at ``retry_at``, or dead-lettered when it is None."""
        with self._connect(write=True) as conn:
            conn.execute(
                "UPDATE deliveries SET attempts = attempts + 1, last_error = ?, "
                "state = ?, next_attempt = COALESCE(?, next_attempt) "
                "WHERE license_id = ? AND target = ? AND state = 'pending'",
                (error, "pending" if retry_at is not None else "dead", retry_at, license_id,
                 target),
            )  # fmt: skip

    def retry(self, license_id: str | None = None, now: float | None = None) -> int:
        """Dead letters (of one license, or all) back to pending, due now, attempts reset."""
        now = time.time() if now is None else now
        where, args = ("AND license_id = ?", (license_id,)) if license_id else ("", ())
        with self._connect(write=True) as conn:
            changed: int = conn.execute(
                "UPDATE deliveries SET state = 'pending', attempts = 0, next_attempt = ? "
                f"WHERE state = 'dead' {where}",
                (now, *args),
            ).rowcount
        return changed


class _Empty(Exception):
    """Read of a ledger whose tables do not exist yet: nothing was ever issued."""


def _row_license(row: tuple[Any, ...]) -> LedgerLicense:
    (license_id, tenant, serial, kid, tier, addons, seats, trial, iat, nbf, exp, token,
     fingerprint, change, actor, order_id) = row  # fmt: skip
    return LedgerLicense(
        license_id=license_id,
        tenant=tenant,
        serial=serial,
        kid=kid,
        tier=tier,
        addons=tuple(msgspec.json.decode(addons, type=list[str])),
        seats=msgspec.json.decode(seats, type=Seats) if seats else None,
        trial=bool(trial),
        iat=iat,
        nbf=nbf,
        exp=exp,
        token=token,
        fingerprint=fingerprint,
        change=change,
        actor=actor,
        order_id=order_id,
    )


def _license(conn: sqlite3.Connection, license_id: str) -> LedgerLicense | None:
    row = conn.execute(
        f"SELECT {_LICENSE_COLUMNS} FROM licenses WHERE license_id = ?", (license_id,)
    ).fetchone()
    return None if row is None else _row_license(row)


def _licenses_of(conn: sqlite3.Connection, tenant: str) -> tuple[LedgerLicense, ...]:
    rows = conn.execute(
        f"SELECT {_LICENSE_COLUMNS} FROM licenses WHERE tenant = ? ORDER BY serial DESC",
        (tenant,),
    ).fetchall()
    return tuple(_row_license(row) for row in rows)


def _with_deliveries(
    conn: sqlite3.Connection, license_id: str
) -> tuple[LedgerLicense, list[Delivery]] | None:
    lic = _license(conn, license_id)
    if lic is None:
        return None
    return lic, _deliveries(conn, "WHERE license_id = ?", (license_id,))


def _deliveries(conn: sqlite3.Connection, where: str, args: tuple[object, ...]) -> list[Delivery]:
    rows = conn.execute(
        "SELECT license_id, target, state, attempts, next_attempt, last_error, delivered_at "
        f"FROM deliveries {where} ORDER BY license_id, target",
        args,
    ).fetchall()
    return [Delivery(*row) for row in rows]
