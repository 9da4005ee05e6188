"""The migration of classic X Dispatch customers to the new tiers (``gateway migrate``).

A plan file (CSV: ``tenant, classic_key, tier, addons, ops_users, drivers,
grandfather_days``) names each customer's plan after the grandfather window. Each gets one
license: the purchased tier and add-ons, raised to the top tier (the all-inclusive product
they had) until ``grandfather_until``, and their classic keys are imported into the store
(for ``license.classic_keys = "store"``). The license is signed here (``--signing-key``) or
ordered from the issuing service (``--issuer``: ``order_for`` turns the plan into SKUs and
a grandfather window, under an ``order_id`` derived from the plan).

    customers = read_plan(Path("customers.csv"), config.matrix, config.classic)
    plan = plan_customer(customer, matrix, start=start, exp=start + 365 * DAY)
    step = next_step(plan, await store.get(customer.tenant), now)  # issue, unchanged, ...
    signed = sign_steps(steps, signer, config.keyring, now)       # every key, before writing
    outcome = await apply_step(step, store_license(store, token), line, store, audit)

Per customer, ``apply_step`` writes the audit line first, then imports the classic keys,
then puts the license in force (the one step that cannot be taken back once the issuer has
minted it); when the keys or the license fail, the keys it imported are removed again, so
a customer is either fully migrated or untouched, and never migrated unrecorded.

Re-running is idempotent: a customer whose newest license is a migration license with the
same plan is left alone, and the window is anchored on the first migration (the previous
license's ``nbf``), so a re-run on a later day changes nothing (and an order placed again
is the same order, which the issuer answers with the same license). A customer whose newest
license was issued outside the migration (billing sold them something since) is never
overwritten: that is a conflict for a person to resolve.
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Literal

import msgspec

from gateway.audit import AuditError, AuditRecord
from gateway.csvrows import CsvError, Row, read_rows, utc_day
from gateway.decision import TenantRecord
from gateway.errors import LicenseError
from gateway.issuing import Order, order_digest
from gateway.license import ClassicKeys, KeyRing, License, LicenseClaims, Seats
from gateway.matrix import TierMatrix
from gateway.skus import OrderRefused, SkuLine, check_plan
from gateway.store import StoreError, TenantStore

DEFAULT_GRANDFATHER_DAYS = 90
DEFAULT_TERM_DAYS = 365
ISSUER = "gateway-migrate"  # the ``iss`` of licenses signed here: how a re-run recognises them
ORDER_PREFIX = "migrate-"  # of order ids: how a re-run recognises what the issuer minted
PLAN_COLUMNS = ("tenant", "classic_key", "tier", "addons", "ops_users", "drivers")
OPTIONAL_COLUMNS = ("grandfather_days",)
DAY = 86400

# "refused": the issuing service could not be asked for this plan (no SKUs express it).
Action = Literal["issue", "reissue", "unchanged", "conflict", "refused"]
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


class Issued(msgspec.Struct, frozen=True):
    """The license a step put in force: stored here, or minted by the issuing service."""

    license_id: str
    fingerprint: str
    how: str  # "stored"; "ordered (migrate-...): delivered to gw-a" for the issuer


class Outcome(msgspec.Struct, frozen=True):
    tenant: str
    action: Action
    applied: bool
    issued: Issued | None = None
    classic_imported: int = 0
    error: str | None = None


class NotIssued(Exception):
    """The license was not put in force (a newer one meanwhile, the issuer refused or did
    not answer); the message says what to do."""


IssueLicense = Callable[[], Awaitable[Issued]]
Audit = Callable[[AuditRecord], Awaitable[None]]  # appends one line or raises AuditError


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


def migration_start(
    record: TenantRecord | None, migrated: frozenset[str] = frozenset()
) -> int | None:
    """The start of this tenant's earlier migration, if any: a re-run keeps its window.
    ``migrated``: license ids the issuing service minted for migration orders."""
    newest = newest_license(record)
    if newest is not None and _ours(newest, migrated):
        return newest.claims.nbf
    return None


def _ours(lic: License, migrated: frozenset[str]) -> bool:
    return lic.claims.iss == ISSUER or lic.claims.jti in migrated


def newest_license(record: TenantRecord | None) -> License | None:
    """The tenant's newest license that is not revoked (records are newest first)."""
    if record is None:
        return None
    return next((lic for lic in record.licenses if lic.claims.jti not in record.revoked), None)


def next_step(
    plan: Plan, record: TenantRecord | None, now: float, migrated: frozenset[str] = frozenset()
) -> Step:
    """Issue, re-issue (the plan changed), leave alone, or refuse (not ours to change)."""
    held = max((lic.claims.serial for lic in record.licenses), default=0) if record else 0
    serial = max(int(now), held + 1)  # put_license refuses anything not above every held serial
    newest = newest_license(record)
    if newest is None:
        return Step(plan, "issue", "no license yet", serial)
    if not _ours(newest, migrated):
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


def sign_steps(
    steps: list[Step], sign: Signer, keyring: KeyRing, now: int
) -> dict[str, tuple[str, License]]:
    """Sign every license to be written and verify it as the gateways will, before anything
    is written: a signing key the gateways do not trust fails the run, not half of it."""
    signed: dict[str, tuple[str, License]] = {}
    for step in steps:
        if step.action not in ("issue", "reissue"):
            continue
        token = sign(claims_for(step, now))
        try:
            verified = keyring.verify(token)
        except LicenseError as exc:
            raise ValueError(
                f"the signing key does not verify with license.public_keys ({exc}): "
                "add its .pub to the gateways' key folder first"
            ) from exc
        signed[step.plan.customer.tenant] = (token, verified)
    return signed


def order_for(step: Step, skus: list[SkuLine], revoked: frozenset[str] = frozenset()) -> Order:
    """The issuing service's order for a step. Its id is derived from what is ordered, so
    running the same plan again places the same order (answered with the same license) and
    a changed line places a new one. The tenant's ``revoked`` license ids count too: once
    the license of an order was revoked, the same plan needs a new license, not that one."""
    plan = step.plan
    customer = plan.customer
    order = Order(
        order_id="",
        tenant=customer.tenant,
        skus=list(skus),
        seats=customer.seats,
        starts_at=plan.nbf,
        ends_at=plan.exp,
        grandfather_tier=plan.grandfather_tier,
        grandfather_until=plan.grandfather_until,
    )
    digest = order_digest(order)
    if revoked:
        digest = hashlib.sha256("\n".join([digest, *sorted(revoked)]).encode()).hexdigest()
    order_id = f"{ORDER_PREFIX}{customer.tenant}-{digest[:16]}"
    return msgspec.structs.replace(order, order_id=order_id)


def audit_line(
    step: Step,
    *,
    actor: str,
    reason: str | None,
    signed: License | None = None,
    order: Order | None = None,
) -> AuditRecord:
    """The line written before a customer is changed: the plan, and the license signed for
    it (``signed``) or the order placed for it (``order``; the issuer records the license)."""
    plan, customer = step.plan, step.plan.customer
    detail: dict[str, Any] = {
        "step": step.action,
        "why": step.why,
        "nbf": plan.nbf,
        "exp": plan.exp,
        "grandfather_tier": plan.grandfather_tier,
        "grandfather_until": plan.grandfather_until,
        "seats": msgspec.to_builtins(customer.seats),
        "plan_line": customer.line,
    }
    if signed is not None:
        detail["serial"] = signed.claims.serial
    if order is not None:
        detail["skus"] = [line.sku for line in order.lines()]
    return AuditRecord(
        actor=actor,
        action="migrate",
        tenant=customer.tenant,
        license_id=signed.claims.jti if signed else None,
        fingerprint=signed.fingerprint if signed else None,
        kid=signed.kid if signed else None,
        tier=customer.tier,
        addons=customer.addons,
        reason=reason,
        ref=order.order_id if order else None,
        detail=detail,
    )


def store_license(store: TenantStore, token: str) -> IssueLicense:
    """Put a license signed here in force: into the store of gateway.toml."""

    async def put() -> Issued:
        stored = await store.put_license(token)
        if stored is None:
            raise NotIssued("the store took a newer license meanwhile; re-run to see it")
        return Issued(stored.claims.jti, stored.fingerprint, "stored")

    return put


async def apply_step(
    step: Step,
    issue: IssueLicense | None,
    line: AuditRecord,
    store: TenantStore,
    audit: Audit,
) -> Outcome:
    """Migrate one customer: the audit line, the classic keys, then the license (``issue``;
    None when the license is unchanged). The audit line comes first, so a log that cannot
    be written leaves the customer untouched; if the keys or the license then fail, the
    keys imported here are removed again."""
    customer = step.plan.customer
    tenant = customer.tenant
    try:
        missing = [key for key in customer.classic_keys if not await store.is_classic_key(key)]
    except StoreError as exc:
        return Outcome(tenant, step.action, False, error=f"{exc}: nothing written")
    if issue is None and not missing:
        return Outcome(tenant, step.action, True)
    line = msgspec.structs.replace(
        line, detail={**(line.detail or {}), "classic_keys": len(missing)}
    )
    try:
        await audit(line)
    except AuditError as exc:
        return Outcome(tenant, step.action, False, error=f"{exc}: nothing written")
    imported: list[str] = []
    try:
        for key in missing:
            await store.import_classic_key(tenant, key)
            imported.append(key)
        issued = await issue() if issue is not None else None
    except (StoreError, NotIssued) as exc:
        error = await _undo(store, imported, str(exc))
        try:
            await audit(_undo_line(line, error))
        except AuditError as again:
            error += f" (the undo could not be recorded: {again})"
        return Outcome(tenant, step.action, False, error=error)
    return Outcome(tenant, step.action, True, issued=issued, classic_imported=len(imported))


async def _undo(store: TenantStore, imported: list[str], error: str) -> str:
    if not imported:
        return f"{error}: nothing written"
    try:
        for key in imported:
            await store.remove_classic_key(key)
    except StoreError as again:
        return (
            f"{error}; the classic keys imported could not be removed again ({again}): "
            "re-run to complete this customer"
        )
    return f"{error}; {len(imported)} classic keys removed again, customer untouched"


def _undo_line(line: AuditRecord, error: str) -> AuditRecord:
    """The line after a ``migrate`` line whose change did not happen (or only in part)."""
    return msgspec.structs.replace(line, action="migrate_undo", detail={"error": error})
