"""Minting a license from a plan: dates, the upgrade/downgrade rule, claims, signature.

Shared by the issuing service (``gateway.issuer``) and ``gateway license issue``, so an
order and the offline command turn the same SKUs into the same license. Pure but for the
signature (and ``uuid4`` for the license id).

- An upgrade, a renewal or a first license starts now (or at ``starts_at``).
- A downgrade (lower tier, an add-on dropped, fewer seats) starts when the license in force
  ends (or at ``starts_at``), so the customer keeps what they paid for to the period's end.

    order = parse_order(body)
    plan = resolve(catalog, matrix, order.skus)
    lic = build(Terms(...), serial, held, key, kid)
"""

from __future__ import annotations

import hashlib
import uuid
from datetime import UTC, datetime
from typing import Any

import msgspec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from gateway.audit import AuditRecord
from gateway.ledger import Change, LedgerLicense
from gateway.license import ExpiryStrategy, LicenseClaims, Seats, fingerprint, sign_license
from gateway.matrix import TierMatrix
from gateway.provision import field_at_fault
from gateway.skus import Plan, SkuLine

DAY = 86400


class Order(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """``POST /v1/orders``. Dates are unix seconds or ISO 8601 (UTC when no offset)."""

    order_id: str
    tenant: str
    skus: list[str | SkuLine]
    seats: Seats | None = None  # replaces the seats the SKUs give
    starts_at: int | str | None = None
    ends_at: int | str | None = None
    trial: bool = False
    # A window granting a higher tier until a date (the migration of classic customers);
    # both or neither, the tier ranked above the order's (``skus.check_grandfather``).
    grandfather_tier: str | None = None
    grandfather_until: int | str | None = None

    def lines(self) -> list[SkuLine]:
        return [SkuLine(item) if isinstance(item, str) else item for item in self.skus]


class BadOrder(Exception):
    """A body that is not an order: the field at fault and why (400)."""

    def __init__(self, field: str | None, detail: str) -> None:
        self.field = field
        self.detail = detail
        super().__init__(detail)


def parse_when(value: int | str, field: str) -> int:
    """Unix seconds, or ``YYYY-MM-DD[THH:MM[:SS][+HH:MM]]`` (UTC unless an offset is given)."""
    if isinstance(value, int):
        return value
    if value.isdigit():
        return int(value)
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError as exc:
        raise BadOrder(field, f"not a date: {value!r} (unix seconds or ISO 8601)") from exc
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return int(parsed.timestamp())


def parse_order(body: bytes) -> Order:
    try:
        order = msgspec.json.decode(body, type=Order)
    except msgspec.ValidationError as exc:
        raise BadOrder(field_at_fault(exc), str(exc)) from exc
    except (msgspec.DecodeError, UnicodeDecodeError) as exc:
        raise BadOrder(None, f"not JSON: {exc}") from exc
    for name in ("order_id", "tenant"):
        if not getattr(order, name).strip():
            raise BadOrder(name, "must not be empty")
    for name in ("starts_at", "ends_at", "grandfather_until"):
        value = getattr(order, name)
        if value is not None:
            parse_when(value, name)
    if (order.grandfather_tier is None) != (order.grandfather_until is None):
        missing = "grandfather_until" if order.grandfather_until is None else "grandfather_tier"
        raise BadOrder(missing, "grandfather_tier and grandfather_until go together")
    return order


def order_digest(order: Order) -> str:
    """The same order however it is spelled (key order, date format, bare SKU strings)."""
    canonical: dict[str, Any] = {
        "tenant": order.tenant,
        "skus": [msgspec.to_builtins(line) for line in order.lines()],
        "seats": msgspec.to_builtins(order.seats),
        "starts_at": None if order.starts_at is None else parse_when(order.starts_at, ""),
        "ends_at": None if order.ends_at is None else parse_when(order.ends_at, ""),
        "trial": order.trial,
    }
    if order.grandfather_until is not None:  # only when given: older orders keep their digest
        canonical["grandfather_tier"] = order.grandfather_tier
        canonical["grandfather_until"] = parse_when(order.grandfather_until, "")
    return hashlib.sha256(msgspec.json.encode(canonical)).hexdigest()


class Terms(msgspec.Struct, frozen=True, kw_only=True):
    """Everything about a license to mint except its serial and signature."""

    tenant: str
    plan: Plan
    issuer: str
    actor: str
    now: int
    starts_at: int | None = None
    ends_at: int | None = None
    days: int = 365  # when neither ends_at nor the tier SKU's days say
    trial: bool = False
    order_id: str | None = None
    expiry: ExpiryStrategy | None = None
    grandfather_tier: str | None = None
    grandfather_until: int | None = None


def in_force(held: tuple[LedgerLicense, ...], now: float) -> LedgerLicense | None:
    """The tenant's license in force now, by the ledger: started, not ended, newest serial."""
    return next((lic for lic in held if lic.nbf <= now < lic.exp), None)


def classify(matrix: TierMatrix, current: LedgerLicense | None, plan: Plan) -> Change:
    if current is None:
        return "new"
    tiers = matrix.tiers
    old_rank = tiers[current.tier].rank if current.tier in tiers else 0
    new_rank = tiers[plan.tier].rank
    if new_rank != old_rank:
        return "upgrade" if new_rank > old_rank else "downgrade"
    old_seats = current.seats or _included(matrix, current.tier)
    new_seats = plan.seats or _included(matrix, plan.tier)
    fewer = new_seats.ops_users < old_seats.ops_users or new_seats.drivers < old_seats.drivers
    if not set(current.addons) <= set(plan.addons) or fewer:
        return "downgrade"
    more = new_seats.ops_users > old_seats.ops_users or new_seats.drivers > old_seats.drivers
    if set(plan.addons) - set(current.addons) or more:
        return "upgrade"
    return "renewal"


def _included(matrix: TierMatrix, tier: str) -> Seats:
    quotas = matrix.tiers[tier].quotas if tier in matrix.tiers else None
    return Seats(quotas.ops_users, quotas.drivers) if quotas else Seats(0, 0)


def build(
    terms: Terms,
    matrix: TierMatrix | None,
    serial: int,
    held: tuple[LedgerLicense, ...],
    key: Ed25519PrivateKey,
    kid: str,
) -> LedgerLicense:
    """Sign the license ``terms`` describe, with ``serial``, given the tenant's licenses
    (newest first, from the ledger)."""
    current = in_force(held, terms.now)
    # Without a matrix (an unchecked offline key) there is no ledger either, so no current.
    change = classify(matrix, current, terms.plan) if matrix is not None else "new"
    if terms.starts_at is not None:
        nbf = terms.starts_at
    elif change == "downgrade" and current is not None:
        nbf = max(current.exp, terms.now)  # at the end of the period paid for
    else:
        nbf = terms.now
    days = terms.plan.days if terms.plan.days is not None else terms.days
    exp = terms.ends_at if terms.ends_at is not None else nbf + days * DAY
    if exp <= nbf:
        raise BadOrder("ends_at", "the license would expire before it starts")
    if exp <= terms.now:
        raise BadOrder("ends_at", "the license would have ended already")
    claims = LicenseClaims(
        iss=terms.issuer,
        sub=terms.tenant,
        jti=str(uuid.uuid4()),
        iat=terms.now,
        nbf=nbf,
        exp=exp,
        tier=terms.plan.tier,
        serial=serial,
        addons=terms.plan.addons,
        seats=terms.plan.seats,
        trial=terms.trial,
        grandfather_until=terms.grandfather_until,
        grandfather_tier=terms.grandfather_tier,
        expiry=terms.expiry,
    )
    token = sign_license(key, kid, claims)
    return LedgerLicense(
        license_id=claims.jti,
        tenant=terms.tenant,
        serial=serial,
        kid=kid,
        tier=claims.tier,
        addons=claims.addons,
        seats=claims.seats,
        trial=claims.trial,
        iat=claims.iat,
        nbf=nbf,
        exp=exp,
        token=token,
        fingerprint=fingerprint(token),
        change=change,
        actor=terms.actor,
        order_id=terms.order_id,
    )


def license_record(
    lic: LedgerLicense, action: str, actor: str, reason: str | None, detail: dict[str, Any]
) -> AuditRecord:
    """An audit line about one license of the ledger."""
    return AuditRecord(
        actor=actor,
        action=action,
        tenant=lic.tenant,
        license_id=lic.license_id,
        fingerprint=lic.fingerprint,
        kid=lic.kid,
        tier=lic.tier,
        addons=lic.addons,
        reason=reason,
        ref=lic.order_id,
        detail=detail,
    )


def issued_record(lic: LedgerLicense, reason: str | None) -> AuditRecord:
    """The audit line of a minted license."""
    return license_record(
        lic,
        "issue",
        lic.actor,
        reason,
        {
            "serial": lic.serial,
            "nbf": lic.nbf,
            "exp": lic.exp,
            "trial": lic.trial,
            "change": lic.change,
            "seats": msgspec.to_builtins(lic.seats),
        },
    )
