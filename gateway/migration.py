"""The migration of classic X Dispatch customers to the new tiers (``gateway migrate``).

A plan file (CSV: ``tenant, classic_key, tier, addons, ops_users, drivers,
grandfather_days``) names each customer's plan after the grandfather window. Each gets one
license: the purchased tier and add-ons, raised to the top tier (the all-inclusive product
they had) until ``grandfather_until``, and their classic keys are imported into the store
(for ``license.classic_keys = "store"``).

    customers = read_plan(Path("customers.csv"), config.matrix, config.classic)
    plan = plan_customer(customer, matrix, start=start, exp=start + 365 * DAY)
    step = next_step(plan, await store.get(customer.tenant), now)  # issue, unchanged, ...
    tokens = sign_steps(steps, signer, config.keyring, now)       # every key, before writing
    outcome = await apply_step(step, tokens.get(customer.tenant), store)  # not in dry runs

Re-running is idempotent: a customer whose newest license is a migration license with the
same plan is left alone, and the window is anchored on the first migration (the previous
license's ``nbf``), so a re-run on a later day changes nothing. A customer whose newest
license was issued outside the migration (billing sold them something since) is never
overwritten: that is a conflict for a person to resolve.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import msgspec

from gateway.csvrows import CsvError, Row, read_rows, utc_day
from gateway.decision import TenantRecord
from gateway.errors import LicenseError
from gateway.license import ClassicKeys, KeyRing, License, LicenseClaims, Seats
from gateway.matrix import TierMatrix
from gateway.skus import OrderRefused, check_plan
from gateway.store import StoreError, TenantStore

log = logging.getLogger(__name__)

DEFAULT_GRANDFATHER_DAYS = 90
DEFAULT_TERM_DAYS = 365
ISSUER = "gateway-migrate"  # the ``iss`` of migration licenses: how a re-run recognises them
PLAN_COLUMNS = ("tenant", "classic_key", "tier", "addons", "ops_users", "drivers")
OPTIONAL_COLUMNS = ("grandfather_days",)
DAY = 86400

Action = Literal["issue", "reissue", "unchanged", "conflict"]
Signer = Callable[[LicenseClaims], str]


class Customer(msgspec.Struct, frozen=True):
    """One line of the plan file, checked against the matrix."""

    tenant: str
    tier: str
    addons: tuple[str, ...]
    seats: Seats | None  # None: the tier's included seats
    grandfather_days: int
    classic_keys: tuple[str, ...]
    line: int


class Plan(msgspec.Struct, frozen=True):
    """What the customer gets: now, during the window, after it."""

    customer: Customer
    nbf: int
    exp: int
    grandfather_tier: str | None  # None: no window (the plan already has everything)
    grandfather_until: int | None
    keeps: tuple[str, ...]  # features the window keeps that the plan lacks (lost after)
    seats_during: Seats
    seats_after: Seats


class Step(msgspec.Struct, frozen=True):
    """What applying a plan does to the store, decided from the tenant's record."""

    plan: Plan
    action: Action
    why: str
    serial: int  # the serial a new license gets (above every serial the tenant has)


class Outcome(msgspec.Struct, frozen=True):
    tenant: str
    action: Action
    applied: bool
    license: License | None = None
    classic_imported: int = 0
    error: str | None = None


def read_plan(path: Path, matrix: TierMatrix, classic: ClassicKeys) -> list[Customer]:
    """Every customer of the plan file; ``CsvError`` listing every bad line at once."""
    customers: list[Customer] = []
    problems: list[str] = []
    seen: dict[str, int] = {}
    for row in read_rows(path, required=PLAN_COLUMNS, optional=OPTIONAL_COLUMNS):
        try:
            customer = _customer(row, matrix, classic)
        except CsvError as exc:
            problems.append(str(exc))
            continue
        if customer.tenant in seen:
            problems.append(
                str(
                    row.error(
                        "tenant", f"{customer.tenant!r} is also on line {seen[customer.tenant]}"
                    )
                )
            )
            continue
        seen[customer.tenant] = row.line
        customers.append(customer)
    if problems:
        raise CsvError("\n".join(problems))
    return customers


def _customer(row: Row, matrix: TierMatrix, classic: ClassicKeys) -> Customer:
    tenant = row.required("tenant")
    tier = row.required("tier")
    addons = row.names("addons")
    try:
        check_plan(matrix, tier, addons)
    except OrderRefused as exc:
        raise row.error("tier" if exc.rule == "unknown_tier" else "addons", exc.detail) from exc
    ops_users, drivers = row.count("ops_users"), row.count("drivers")
    if (ops_users is None) != (drivers is None):
        raise row.error("ops_users", "ops_users and drivers go together (or both empty)")
    days = row.count("grandfather_days")
    keys = row.names("classic_key")
    for key in keys:
        if not classic.is_classic(key):
            raise row.error("classic_key", "does not match license.classic_key_pattern")
    return Customer(
        tenant=tenant,
        tier=tier,
        addons=addons,
        seats=Seats(ops_users, drivers) if ops_users is not None and drivers is not None else None,
        grandfather_days=DEFAULT_GRANDFATHER_DAYS if days is None else days,
        classic_keys=keys,
        line=row.line,
    )


def plan_customer(
    customer: Customer,
    matrix: TierMatrix,
    *,
    start: int,
    exp: int,
    grandfather_tier: str | None = None,
) -> Plan:
    """The license for ``customer`` starting at ``start``. The window's tier is the top tier
    (the all-inclusive classic product) unless ``grandfather_tier`` names another."""
    top = matrix.tiers[grandfather_tier] if grandfather_tier else list(matrix.tiers.values())[-1]
    tier = matrix.tiers[customer.tier]
    after = matrix.entitlement(customer.tier, customer.addons).features
    window = customer.grandfather_days > 0 and top.rank > tier.rank
    seats_after = customer.seats or Seats(tier.quotas.ops_users, tier.quotas.drivers)
    seats_during = customer.seats or Seats(top.quotas.ops_users, top.quotas.drivers)
    return Plan(
        customer=customer,
        nbf=start,
        exp=exp,
        grandfather_tier=top.name if window else None,
        grandfather_until=start + customer.grandfather_days * DAY if window else None,
        keeps=tuple(name for name in matrix.features if name in top.features - after)
        if window
        else (),
        seats_during=seats_during if window else seats_after,
        seats_after=seats_after,
    )


def migration_start(record: TenantRecord | None) -> int | None:
    """The start of this tenant's earlier migration, if any: a re-run keeps its window."""
    newest = _newest(record)
    if newest is not None and newest.claims.iss == ISSUER:
        return newest.claims.nbf
    return None


def _newest(record: TenantRecord | None) -> License | None:
    """The tenant's newest license that is not revoked (records are newest first)."""
    if record is None:
        return None
    return next((lic for lic in record.licenses if lic.claims.jti not in record.revoked), None)


def next_step(plan: Plan, record: TenantRecord | None, now: float) -> Step:
    """Issue, re-issue (the plan changed), leave alone, or refuse (not ours to change)."""
    held = max((lic.claims.serial for lic in record.licenses), default=0) if record else 0
    serial = max(int(now), held + 1)  # put_license refuses anything not above every held serial
    newest = _newest(record)
    if newest is None:
        return Step(plan, "issue", "no license yet", serial)
    if newest.claims.iss != ISSUER:
        return Step(
            plan,
            "conflict",
            f"holds license {newest.claims.jti} ({newest.claims.tier}, serial "
            f"{newest.claims.serial}) issued outside the migration: left alone",
            serial,
        )
    changes = _differences(plan, newest.claims)
    if not changes:
        return Step(plan, "unchanged", f"license {newest.claims.jti} already has this plan", serial)
    return Step(plan, "reissue", "; ".join(changes), serial)


def _differences(plan: Plan, claims: LicenseClaims) -> list[str]:
    customer = plan.customer
    pairs: list[tuple[str, object, object]] = [
        ("tier", claims.tier, customer.tier),
        ("add-ons", sorted(claims.addons), sorted(customer.addons)),
        ("seats", _seat_text(claims.seats), _seat_text(customer.seats)),
        ("grandfather tier", claims.grandfather_tier, plan.grandfather_tier),
        ("grandfather until", utc_day(claims.grandfather_until), utc_day(plan.grandfather_until)),
        ("start", utc_day(claims.nbf), utc_day(plan.nbf)),
        ("end", utc_day(claims.exp), utc_day(plan.exp)),
    ]
    return [f"{name} {old} -> {new}" for name, old, new in pairs if old != new]


def _seat_text(seats: Seats | None) -> str:
    return "tier's" if seats is None else f"{seats.ops_users}/{seats.drivers}"


def claims_for(step: Step, now: int) -> LicenseClaims:
    plan = step.plan
    customer = plan.customer
    return LicenseClaims(
        iss=ISSUER,
        sub=customer.tenant,
        jti=str(uuid.uuid4()),
        iat=now,
        nbf=plan.nbf,
        exp=plan.exp,
        tier=customer.tier,
        serial=step.serial,
        addons=customer.addons,
        seats=customer.seats,
        grandfather_until=plan.grandfather_until,
        grandfather_tier=plan.grandfather_tier,
    )


def sign_steps(steps: list[Step], sign: Signer, keyring: KeyRing, now: int) -> dict[str, str]:
    """Sign every license to be written and verify it as the gateways will, before anything
    is written: a signing key the gateways do not trust fails the run, not half of it."""
    tokens: dict[str, str] = {}
    for step in steps:
        if step.action not in ("issue", "reissue"):
            continue
        token = sign(claims_for(step, now))
        try:
            keyring.verify(token)
        except LicenseError as exc:
            raise ValueError(
                f"the signing key does not verify with license.public_keys ({exc}): "
                "add its .pub to the gateways' key folder first"
            ) from exc
        tokens[step.plan.customer.tenant] = token
    return tokens


async def apply_step(step: Step, token: str | None, store: TenantStore) -> Outcome:
    """Write one customer: the license, then the classic keys. If the classic keys cannot
    be written, the license just stored is revoked again, so the customer is either fully
    migrated or still on the classic product (a re-run then completes the migration)."""
    customer = step.plan.customer
    tenant = customer.tenant
    stored: License | None = None
    try:
        if token is not None:
            stored = await store.put_license(token)
            if stored is None:
                return Outcome(
                    tenant, step.action, False,
                    error="the store took a newer license meanwhile; re-run to see it",
                )  # fmt: skip
            _audit(
                "migrate.license",
                tenant=tenant,
                license=stored,
                reason=f"{step.action}: {step.why}",
            )
        imported = 0
        for key in customer.classic_keys:
            if not await store.is_classic_key(key):
                await store.import_classic_key(tenant, key)
                imported += 1
        if imported:
            _audit(
                "migrate.classic_keys", tenant=tenant, license=None, reason=f"{imported} imported"
            )
    except StoreError as exc:
        return Outcome(tenant, step.action, False, error=await _undo(store, stored, exc))
    return Outcome(tenant, step.action, True, license=stored, classic_imported=imported)


async def _undo(store: TenantStore, stored: License | None, exc: StoreError) -> str:
    if stored is None:
        return f"nothing written: {exc}"
    try:
        await store.revoke(stored.claims.sub, stored.claims.jti)
    except StoreError as again:
        return (
            f"{exc}; license {stored.claims.jti} was stored and could not be revoked again "
            f"({again}): re-run to complete this customer"
        )
    _audit("migrate.undo", tenant=stored.claims.sub, license=stored, reason=str(exc))
    return f"{exc}; license {stored.claims.jti} revoked again, customer untouched"


def _audit(action: str, *, tenant: str, license: License | None, reason: str) -> None:
    """The migration's one audit call site: every license issued, classic key import and
    undo passes here. To be connected to the audit trail (``gateway.audit``, hash-chained
    JSON lines) when it lands; until then the line goes to the log."""
    claims = license.claims if license is not None else None
    log.info(
        "audit %s tenant=%s license=%s fingerprint=%s tier=%s addons=%s reason=%s",
        action,
        tenant,
        claims.jti if claims else None,
        license.fingerprint if license else None,
        claims.tier if claims else None,
        ",".join(claims.addons) if claims else None,
        reason,
    )
