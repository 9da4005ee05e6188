"""The decision: a pure function of (route, license, tenant record, role, now).

No I/O and no aiohttp here, so every branch is unit-testable and ``gateway explain`` shows
exactly what the proxy would do. Reasons come in the fixed order of docs/design.md §4:

``license_missing`` → ``license_malformed`` → ``license_unknown_key`` →
``license_bad_signature`` (those three come from ``KeyRing.verify``) →
``license_not_yet_valid`` → ``license_superseded`` / ``license_revoked`` →
``tenant_suspended`` → ``license_expired`` → per route ``feature_not_entitled``,
``role_forbidden``, ``seat_limit_exceeded``.

    decision = decide(ctx, found, app_routes.unmatched, presented, tenant, role, now)
    decision.allowed, decision.status, decision.code
"""

from __future__ import annotations

import time
from typing import Final, Literal

import msgspec

from gateway.errors import LicenseError
from gateway.license import License, LicenseClaims, Seats
from gateway.matrix import Entitlement, TierMatrix
from gateway.routes import ROLES, Match, RouteMatch

TITLES: dict[str, str] = {
    "license_missing": "License required",
    "license_malformed": "License key malformed",
    "license_unknown_key": "License signed by an unknown key",
    "license_bad_signature": "License signature invalid",
    "license_not_yet_valid": "License not yet valid",
    "license_superseded": "License superseded",
    "license_revoked": "License revoked",
    "tenant_suspended": "Account suspended",
    "license_expired": "License expired",
    "feature_not_entitled": "Feature not in plan",
    "role_forbidden": "Role not allowed",
    "seat_limit_exceeded": "Seat limit reached",
    "route_unmatched": "Endpoint not available",
    "license_check_busy": "License check busy, retry",
    "tenant_mismatch": "License is for another tenant",
    "store_unavailable": "Tenant store unavailable",
}

STATUS: dict[str, int] = {
    **dict.fromkeys(
        (
            "license_missing",
            "license_malformed",
            "license_unknown_key",
            "license_bad_signature",
            "license_not_yet_valid",
            "license_superseded",
            "license_revoked",
            "tenant_suspended",
            "license_expired",
        ),
        401,
    ),
    "feature_not_entitled": 403,
    "role_forbidden": 403,
    "route_unmatched": 403,
    "seat_limit_exceeded": 429,
    "license_check_busy": 503,
    "tenant_mismatch": 403,
    "store_unavailable": 503,
}


class TenantRecord(msgspec.Struct, frozen=True):
    """What the tenant store knows of one tenant (docs/design.md §7)."""

    tenant: str
    suspended: bool = False
    revoked: frozenset[str] = frozenset()  # license ids (jti)
    min_serial: int = 0  # keys with a lower serial are superseded
    licenses: tuple[License, ...] = ()  # verified keys, current and scheduled
    usage: Seats | None = None  # seats in use


class Policy(msgspec.Struct, frozen=True):
    """The settings a decision depends on (from ``gateway.toml``)."""

    matrix: TierMatrix
    grace_seconds: int = 7 * 86400
    clock_skew_seconds: int = 300
    upgrade_url: str = "/_entitlements/ui"
    # "active_users": seats are counted by the gateway (gateway.seats), not from the
    # usage an operator recorded, so the recorded check below is skipped.
    seat_mode: Literal["recorded", "active_users"] = "recorded"


class Decision(msgspec.Struct, frozen=True):
    """Allow or deny, with everything the proxy, the metrics and ``explain`` report."""

    allowed: bool
    status: int
    code: str  # "allowed", "public", or a reason code
    detail: str = ""
    feature: str | None = None
    tier: str | None = None
    required_tier: str | None = None
    addon: str | None = None
    upsell: bool = True  # False for dispatch_only: no upsell fields in the answer
    entitlement: Entitlement | None = None
    license: License | None = None
    warning: str | None = None  # X-License-Warning
    seats: Seats | None = None  # the license's seats claim in force (None: the tier's)
    # active_users mode: the seat admission behind a seat_limit_exceeded (gateway.seats)
    seat: object = None

    @property
    def title(self) -> str:
        return TITLES.get(self.code, "Allowed")


PUBLIC = Decision(allowed=True, status=200, code="public")
_NOT_ENTITLED: Final = STATUS["feature_not_entitled"]


def _deny(code: str, detail: str, **fields: object) -> Decision:
    return Decision(allowed=False, status=STATUS[code], code=code, detail=detail, **fields)  # type: ignore[arg-type]


def _when(ts: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(ts))


def current_license(
    presented: License | None, tenant: TenantRecord | None, now: float, skew: int
) -> License | None:
    """The license that governs the request.

    From the store, only licenses already in force (``nbf``), not revoked and not below
    the tenant's minimum serial count; among them the newest (highest ``serial``) that has
    not expired wins, so an ended trial never hides an older paid license. That store
    license replaces the presented key when it is newer, or when the presented key has
    expired and it has not; an expired newer key never displaces one that still works. A
    downgrade issued with ``nbf`` at the end of the period therefore takes over only then.
    """
    if tenant is None:
        return presented
    if presented is not None and presented.claims.sub != tenant.tenant:
        return presented
    stored: License | None = None  # the best from the store
    stored_live = False
    for candidate in tenant.licenses:  # newest first
        claims = candidate.claims
        if claims.nbf > now + skew or claims.jti in tenant.revoked:
            continue
        if claims.serial < tenant.min_serial or claims.sub != tenant.tenant:
            continue
        live = claims.exp > now
        if (
            stored is None
            or (live and not stored_live)
            or (live == stored_live and claims.serial > stored.claims.serial)
        ):
            stored, stored_live = candidate, live
    if presented is None or stored is None:
        return presented if stored is None else stored
    presented_live = presented.claims.exp > now
    if stored_live != presented_live:
        return stored if stored_live else presented
    return stored if stored.claims.serial > presented.claims.serial else presented


def decide(
    policy: Policy,
    found: RouteMatch,
    unmatched: Literal["allow", "deny"],
    presented: License | LicenseError | None,
    tenant: TenantRecord | None,
    role: str | None,
    now: float,
) -> Decision:
    """Decide one request. ``found`` is the route lookup; ``presented`` the verified key
    from the header, or why it failed verification, or None if there was none."""
    route = found.route
    if found.kind is not Match.FULL:
        if unmatched == "deny":
            return _deny("route_unmatched", "this API has no endpoint for this method and path")
        if route is not None and route.public:
            route = None  # only the listed methods of a public path are public
        # A method the route does not list is still gated by the path's route: leaving a
        # method out of routes.toml must never open a feature to every tier. (A path that
        # several same-shape routes share comes without a route: unmatched decides.)
    elif route is not None and route.public:
        return PUBLIC
    if isinstance(presented, LicenseError):
        return _deny(presented.reason, presented.detail)

    skew = policy.clock_skew_seconds
    lic = current_license(presented, tenant, now, skew)
    if lic is None:
        return _deny("license_missing", "send a license key or a known tenant id")
    claims = lic.claims
    if tenant is not None and tenant.tenant != claims.sub:
        tenant = None  # the record belongs to someone else: it cannot vouch for this key
    matrix = policy.matrix
    if claims.tier not in matrix.tiers:
        return _deny("license_malformed", f"unknown tier {claims.tier!r}", license=lic)
    early = not_yet_valid(claims, now, skew)
    if early is not None:
        return _deny("license_not_yet_valid", early, license=lic)
    if tenant is not None:
        if claims.serial < tenant.min_serial:
            return _deny("license_superseded", "a newer license replaced this key", license=lic)
        if claims.jti in tenant.revoked:
            return _deny("license_revoked", f"license {claims.jti} was revoked", license=lic)
        if tenant.suspended:
            return _deny("tenant_suspended", f"tenant {claims.sub} is suspended", license=lic)

    tier, addons, seats, warning = _effective_plan(policy, claims, now)
    if tier is None:
        return _deny("license_expired", f"expired {_when(claims.exp)}", license=lic)
    entitlement = matrix.entitlement(tier, addons)

    feature = route.feature if route is not None else None
    upsell = role != "dispatch_only"
    if feature is not None and feature not in entitlement.features:
        detail, required_tier, addon = matrix.missing(tier, feature)
        # Positional, every field up to the last set: the blocked path's cheapest Struct.
        return Decision(
            False, _NOT_ENTITLED, "feature_not_entitled", detail, feature, tier,
            required_tier, addon, upsell, None, lic, warning,
        )  # fmt: skip
    if route is not None and route.roles is not None and role not in route.roles:
        return _deny(
            "role_forbidden",
            f"role {role or '(none)'!r} may not call this endpoint "
            f"(allowed: {', '.join(allowed_roles(route.roles))})",
            feature=feature,
            tier=tier,
            upsell=upsell,
            license=lic,
            warning=warning,
        )
    if (
        policy.seat_mode == "recorded"
        and route is not None
        and route.quota is not None
        and tenant is not None
        and tenant.usage
    ):
        limit = getattr(seats or matrix.tiers[tier].quotas, route.quota)
        used = getattr(tenant.usage, route.quota)
        if used >= limit:
            return _deny(
                "seat_limit_exceeded",
                f"{used} of {limit} {route.quota} seats in use",
                feature=feature,
                tier=tier,
                upsell=upsell,
                license=lic,
                warning=warning,
            )
    return Decision(
        allowed=True,
        status=200,
        code="allowed",
        feature=feature,
        tier=tier,
        upsell=upsell,
        entitlement=entitlement,
        license=lic,
        warning=warning,
        seats=seats,
    )


def allowed_roles(roles: frozenset[str]) -> list[str]:
    """A route's roles in the fixed order of ``routes.ROLES`` (most privileged first)."""
    return [role for role in ROLES if role in roles]


def not_yet_valid(claims: LicenseClaims, now: float, skew: int) -> str | None:
    """Why a license is not valid yet (``nbf`` or ``iat`` beyond the clock skew), or None."""
    if claims.nbf > now + skew:
        return f"valid from {_when(claims.nbf)}"
    if claims.iat > now + skew:
        return f"issued in the future ({_when(claims.iat)})"
    return None


ExpiryState = Literal["valid", "grace", "maintained", "restricted", "expired"]


def expiry_state(
    claims: LicenseClaims, now: float, grace_seconds: int
) -> tuple[ExpiryState, str | None]:
    """Where a license stands against its ``exp`` under its expiry strategy, and the
    ``X-License-Warning`` text that goes with it."""
    if now < claims.exp:
        return "valid", None
    expired = f"license expired {_when(claims.exp)}"
    strategy = claims.expiry_strategy
    if strategy == "revoke":
        return "expired", None
    if strategy == "maintain":
        return "maintained", f"{expired}; renew"
    grace_end = claims.exp + grace_seconds
    if now < grace_end:
        return "grace", f"{expired}; grace period ends {_when(grace_end)}"
    return "restricted", f"{expired}; restricted to the lowest tier"


def _effective_plan(
    policy: Policy, claims: LicenseClaims, now: float
) -> tuple[str | None, tuple[str, ...], Seats | None, str | None]:
    """Tier, add-ons, seat override and warning after the expiry strategy; tier None
    means refused."""
    state, warning = expiry_state(claims, now, policy.grace_seconds)
    if state == "expired":
        return None, (), None, None
    if state == "restricted":
        # Restricted means the lowest tier as sold: no add-ons, no extra seats, and no
        # grandfather window either.
        return policy.matrix.lowest_tier.name, (), None, warning
    # An add-on the license's tier cannot buy grants nothing (the enforcer reports it).
    addons = policy.matrix.usable_addons(claims.tier, claims.addons) if claims.addons else ()
    return _grandfathered(policy.matrix, claims, now), addons, claims.seats, warning


def _grandfathered(matrix: TierMatrix, claims: LicenseClaims, now: float) -> str:
    """The license's tier, raised to ``grandfather_tier`` while its window lasts."""
    grandfather = claims.grandfather_tier
    if (
        grandfather is not None
        and claims.grandfather_until is not None
        and now < claims.grandfather_until
        and grandfather in matrix.tiers
        and matrix.tiers[grandfather].rank > matrix.tiers[claims.tier].rank
    ):
        return grandfather
    return claims.tier


LicenseState = Literal["valid", "grace", "maintained", "restricted", "grandfathered"]
_LAPSED: dict[ExpiryState, LicenseState] = {
    "grace": "grace",
    "maintained": "maintained",
    "restricted": "restricted",
}


class Plan(msgspec.Struct, frozen=True):
    """What a license grants at one moment, by the rules ``decide`` enforces: the
    effective tier and add-ons, the seats included, and the state the license is in."""

    tier: str
    addons: tuple[str, ...]
    seats: Seats
    state: LicenseState
    warning: str | None


def effective_plan(policy: Policy, claims: LicenseClaims, now: float) -> Plan | None:
    """The plan behind ``decide`` for the entitlements API (None: expired under the
    ``revoke`` strategy, which ``decide`` answers with ``license_expired``).

    ``state``: ``grace``, ``maintained`` (expired, kept by the ``maintain`` strategy) and
    ``restricted`` as ``expiry_state`` says; otherwise ``grandfathered`` while a
    grandfather window raises the tier, else ``valid``."""
    tier, addons, seats, warning = _effective_plan(policy, claims, now)
    if tier is None:
        return None
    expiry, _ = expiry_state(claims, now, policy.grace_seconds)
    state = _LAPSED.get(expiry) or ("grandfathered" if tier != claims.tier else "valid")
    quotas = policy.matrix.tiers[tier].quotas
    included = seats or Seats(ops_users=quotas.ops_users, drivers=quotas.drivers)
    return Plan(tier, addons, included, state, warning)
