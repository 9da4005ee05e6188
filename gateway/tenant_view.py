"""What support and billing see of a tenant: the license in force, the plan it gives, the
state of every stored license, seat limits next to usage, and the drift between billing's
view and the store's.

Pure functions of (record, policy, now): the plan comes from ``decide`` itself, so these
views say exactly what the gateways do.

    view = tenant_view(record, config.policy, time.time())
    view.state, view.tier, view.effective_tier, view.seats
    drift = reconcile(read_billing(Path("export.csv")), views, matrix)
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Literal

import msgspec

from gateway.csvrows import read_rows, utc_day
from gateway.decision import Policy, TenantRecord, current_license, decide, expiry_state
from gateway.license import License, Seats
from gateway.matrix import TierMatrix
from gateway.routes import NO_MATCH

LicenseStatus = Literal["in_force", "scheduled", "superseded", "expired", "revoked"]
TenantState = Literal[
    "active",
    "grace",
    "restricted",
    "maintained",
    "expired",
    "invalid",
    "suspended",
    "scheduled",
    "none",
]


class LicenseView(msgspec.Struct, frozen=True):
    license_id: str
    status: LicenseStatus
    tier: str
    addons: tuple[str, ...]
    serial: int
    not_before: int
    expires: int
    trial: bool
    fingerprint: str
    seats: Seats | None = None
    grandfather_tier: str | None = None
    grandfather_until: int | None = None


SEAT_KINDS = ("ops_users", "drivers")


class SeatView(msgspec.Struct, frozen=True):
    used: int | None  # None: never reported
    included: int


class TenantView(msgspec.Struct, frozen=True):
    tenant: str
    state: TenantState
    suspended: bool
    licenses: tuple[LicenseView, ...]
    revoked: tuple[str, ...]
    current: str | None = None  # license id in force
    tier: str | None = None  # the license's tier
    effective_tier: str | None = None  # what the gateways grant now (grandfathered, restricted)
    addons: tuple[str, ...] = ()  # the add-ons granted now
    expires: int | None = None
    trial: bool = False
    grandfathered_until: int | None = None  # set while a grandfather window raises the tier
    seats: dict[str, SeatView] = {}  # by kind: ops_users, drivers
    note: str | None = None  # the X-License-Warning, or why the license in force is refused


def license_status(
    lic: License, current: License | None, record: TenantRecord, now: float, skew: int
) -> LicenseStatus:
    claims = lic.claims
    if claims.jti in record.revoked:
        return "revoked"
    if current is not None and claims.jti == current.claims.jti:
        return "in_force"
    if claims.nbf > now + skew:
        return "scheduled"
    if claims.exp <= now:
        return "expired"
    return "superseded"  # in its dates, but a newer license governs


def tenant_view(record: TenantRecord, policy: Policy, now: float) -> TenantView:
    skew = policy.clock_skew_seconds
    current = current_license(None, record, now, skew)
    licenses = tuple(
        LicenseView(
            license_id=lic.claims.jti,
            status=license_status(lic, current, record, now, skew),
            tier=lic.claims.tier,
            addons=lic.claims.addons,
            serial=lic.claims.serial,
            not_before=lic.claims.nbf,
            expires=lic.claims.exp,
            trial=lic.claims.trial,
            fingerprint=lic.fingerprint,
            seats=lic.claims.seats,
            grandfather_tier=lic.claims.grandfather_tier,
            grandfather_until=lic.claims.grandfather_until,
        )
        for lic in record.licenses
    )
    base = TenantView(
        tenant=record.tenant,
        state="suspended" if record.suspended else "none",
        suspended=record.suspended,
        licenses=licenses,
        revoked=tuple(sorted(record.revoked)),
    )
    if current is None:
        if not record.suspended and any(view.status == "scheduled" for view in licenses):
            return msgspec.structs.replace(base, state="scheduled")
        return base
    claims = current.claims
    # The plan as the gateways grant it on an ungated route; suspension is reported apart,
    # so the plan a suspended tenant gets back on reinstatement is still shown.
    unsuspended = msgspec.structs.replace(record, suspended=False)
    decision = decide(policy, NO_MATCH, "allow", None, unsuspended, None, now)
    expiry, _ = expiry_state(claims, now, policy.grace_seconds)
    view = msgspec.structs.replace(
        base,
        current=claims.jti,
        tier=claims.tier,
        expires=claims.exp,
        trial=claims.trial,
        note=decision.warning if decision.allowed else decision.detail,
    )
    if not decision.allowed or decision.tier is None or decision.entitlement is None:
        state: TenantState = "expired" if decision.code == "license_expired" else "invalid"
        return msgspec.structs.replace(view, state=base.state if record.suspended else state)
    effective = decision.tier
    restricted = expiry == "restricted"  # the lowest tier as sold: its seats, no add-ons
    limits = (None if restricted else claims.seats) or policy.matrix.tiers[effective].quotas
    used = record.usage
    return msgspec.structs.replace(
        view,
        state=base.state if record.suspended else "active" if expiry == "valid" else expiry,
        effective_tier=effective,
        addons=decision.entitlement.addons,
        grandfathered_until=(
            claims.grandfather_until if effective != claims.tier and not restricted else None
        ),
        seats={
            name: SeatView(getattr(used, name) if used else None, getattr(limits, name))
            for name in SEAT_KINDS
        },
    )


# -- reconciliation with billing ---------------------------------------------------------------

BILLING_COLUMNS = ("tenant", "tier", "addons", "ops_users", "drivers", "ends_at")


class BillingRow(msgspec.Struct, frozen=True):
    tenant: str
    tier: str
    addons: tuple[str, ...]
    ops_users: int | None  # None: the tier's included seats
    drivers: int | None
    ends_at: int | None  # None: not compared
    line: int = 0


class Drift(msgspec.Struct, frozen=True):
    tenant: str
    field: str
    billing: str
    store: str


def read_billing(path: Path) -> list[BillingRow]:
    """Billing's export: ``tenant, tier, addons, ops_users, drivers, ends_at``."""
    rows: list[BillingRow] = []
    seen: dict[str, int] = {}
    for row in read_rows(path, required=("tenant", "tier"), optional=BILLING_COLUMNS[2:]):
        tenant = row.required("tenant")
        if tenant in seen:
            raise row.error("tenant", f"{tenant!r} is also on line {seen[tenant]}")
        seen[tenant] = row.line
        rows.append(
            BillingRow(
                tenant=tenant,
                tier=row.required("tier"),
                addons=row.names("addons"),
                ops_users=row.count("ops_users"),
                drivers=row.count("drivers"),
                ends_at=row.date("ends_at"),
                line=row.line,
            )
        )
    return rows


def _names(names: Iterable[str]) -> str:
    return ",".join(sorted(names)) or "-"


def reconcile(
    billing: Iterable[BillingRow], views: Mapping[str, TenantView], matrix: TierMatrix
) -> list[Drift]:
    """Every difference between billing's rows and the licenses in force, tenant by tenant:
    a tenant missing on either side, its tier, add-ons, seats, end date, or a store state
    that denies what billing sells (suspended, expired, nothing in force)."""
    drift: list[Drift] = []
    billed: set[str] = set()
    for row in billing:
        billed.add(row.tenant)
        view = views.get(row.tenant)
        if view is None:
            drift.append(Drift(row.tenant, "tenant", f"{row.tier} (line {row.line})", "absent"))
            continue
        if view.current is None or view.tier is None:
            drift.append(Drift(row.tenant, "license", row.tier, f"none in force ({view.state})"))
            continue
        lic = next(item for item in view.licenses if item.license_id == view.current)
        pairs = [("tier", row.tier, view.tier), ("addons", _names(row.addons), _names(lic.addons))]
        for name in SEAT_KINDS:
            pairs.append(
                (name, str(_seats(row, name, matrix)), str(_held(lic, view.tier, name, matrix)))
            )
        if row.ends_at is not None:
            pairs.append(("ends_at", utc_day(row.ends_at), utc_day(lic.expires)))
        if view.state not in ("active", "grace", "maintained"):
            pairs.append(("state", "active", view.state))
        drift += [Drift(row.tenant, name, want, have) for name, want, have in pairs if want != have]
    for tenant, view in sorted(views.items()):
        if tenant not in billed and view.current is not None:
            drift.append(Drift(tenant, "tenant", "absent", f"{view.tier} ({view.state})"))
    return drift


def _seats(row: BillingRow, name: str, matrix: TierMatrix) -> int | None:
    """What billing sold: its number, or the tier's included seats when it gives none."""
    wanted: int | None = getattr(row, name)
    if wanted is None and row.tier in matrix.tiers:
        wanted = getattr(matrix.tiers[row.tier].quotas, name)
    return wanted


def _held(lic: LicenseView, tier: str, name: str, matrix: TierMatrix) -> int | None:
    """What the license grants: its seats, or its tier's included ones."""
    if lic.seats is not None:
        held: int = getattr(lic.seats, name)
        return held
    return getattr(matrix.tiers[tier].quotas, name) if tier in matrix.tiers else None
