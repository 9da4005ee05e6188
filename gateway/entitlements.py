"""The entitlements API: what a tenant's plan holds, for UIs (``GET {prefix}``).

Pure: no aiohttp and no I/O. The caller is identified with the same license resolution as
a normal request (``identify`` runs ``decide`` with no route, so every license check runs
in the same order); the body lists every feature of the matrix as ``enabled``, ``locked``
(with the tier or add-on that would unlock it) or ``hidden``, by the rules of the README's
"Entitlements API" section. The body is encoded once; its ETag is a hash of those bytes.

    caller = identify(policy, presented, record, role, user, now)  # or a denial Decision
    body = build_entitlements(policy, caller, upsell=upsell_modes(settings), app=app,
                              usage=record.usage if record else None)
    encoded = encode_entitlements(body)
    status = 304 if not_modified(request_if_none_match, encoded.etag) else 200
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterable, Mapping
from typing import Annotated, Literal
from urllib.parse import parse_qsl

import msgspec

from gateway.decision import (
    Decision,
    LicenseState,
    Plan,
    Policy,
    TenantRecord,
    decide,
    effective_plan,
)
from gateway.errors import LicenseError, RequestError
from gateway.license import License, Seats
from gateway.matrix import APP_NAMES, AppName, Terms, TierMatrix
from gateway.routes import NO_MATCH

UpsellMode = Literal["hide", "tag"]
FeatureState = Literal["enabled", "locked", "hidden"]

# Roles that may buy: the UI shows them purchase buttons (standard users get "ask your admin").
TRANSACTING_ROLES = frozenset({"owner", "admin"})
# The one role that never sees an upsell (as in the 403 bodies).
NO_UPSELL_ROLE = "dispatch_only"
# A UI polls with If-None-Match; between polls it may reuse the body for this long.
CACHE_CONTROL = "private, max-age=15"


class TierView(msgspec.Struct, frozen=True):
    name: str
    title: str
    rank: int


class AddonView(msgspec.Struct, frozen=True):
    name: str
    title: str


class LicenseView(msgspec.Struct, frozen=True):
    id: str
    state: LicenseState
    expires_at: str  # RFC 3339, UTC
    trial: bool
    grandfather_until: str | None


class FeatureView(msgspec.Struct, frozen=True):
    """One feature of the matrix. required_tier, addon and tag are absent for
    dispatch_only callers, and null where nothing applies (an enabled feature, no
    higher tier or no add-on unlocks it)."""

    name: str
    title: str
    app: AppName
    state: FeatureState
    required_tier: str | None | msgspec.UnsetType = msgspec.UNSET
    addon: str | None | msgspec.UnsetType = msgspec.UNSET
    tag: str | None | msgspec.UnsetType = msgspec.UNSET


class AvailableAddon(msgspec.Struct, frozen=True):
    name: str
    title: str
    price: str
    unlocks: tuple[str, ...]  # features it would add, in matrix order


class SeatCount(msgspec.Struct, frozen=True):
    """Seats of one kind: Operations users or drivers."""

    included: Annotated[
        int,
        msgspec.Meta(
            description="the license's seats claim, else the tier's quota; in active_users "
            "mode plus the extra seats bought"
        ),
    ]
    used: Annotated[
        int,
        msgspec.Meta(
            description="recorded mode: as `gateway tenant usage` recorded; active_users "
            "mode: distinct users seen within [seats] window_days, across the fleet"
        ),
    ]
    allowance: (
        Annotated[
            int,
            msgspec.Meta(
                description="active_users mode only: the hard limit, floor(included x "
                "overage); a new user beyond it is refused (429 seat_limit_exceeded)"
            ),
        ]
        | msgspec.UnsetType
    ) = msgspec.UNSET


class SeatsView(msgspec.Struct, frozen=True):
    ops_users: SeatCount
    drivers: SeatCount


class Entitlements(msgspec.Struct, frozen=True):
    """The body of GET {prefix}: the caller's plan."""

    tenant: str
    tier: TierView
    addons: tuple[AddonView, ...]
    role: str | None
    license: LicenseView
    features: tuple[FeatureView, ...]
    available_addons: tuple[AvailableAddon, ...]
    seats: SeatsView
    terms: Terms
    can_transact: bool


class Caller(msgspec.Struct, frozen=True):
    """Who asks: the license in force for the request, the plan it grants now, and the
    role and user the request carries."""

    license: License
    plan: Plan
    role: str | None
    user: str | None

    @property
    def upsell(self) -> bool:
        return self.role != NO_UPSELL_ROLE


class EncodedEntitlements(msgspec.Struct, frozen=True):
    body: bytes
    etag: str  # a strong entity tag, quotes included


def identify(
    policy: Policy,
    presented: License | LicenseError | None,
    tenant: TenantRecord | None,
    role: str | None,
    user: str | None,
    now: float,
) -> Caller | Decision:
    """Resolve the caller like a normal request: ``decide`` with no route runs every
    license check (missing, malformed, superseded, revoked, suspended, expired) in the
    usual order. A refusal comes back as that denial ``Decision`` (a 401 to answer)."""
    decision = decide(policy, NO_MATCH, "allow", presented, tenant, role, now)
    if not decision.allowed:
        return decision
    lic = decision.license
    assert lic is not None  # an allowed licensed decision carries its license
    plan = effective_plan(policy, lic.claims, now)
    assert plan is not None  # decide refused expired licenses already
    return Caller(lic, plan, role, user)


def upsell_modes(apps: Mapping[AppName, object]) -> dict[AppName, UpsellMode]:
    """Each configured app's ``upsell`` setting (from ``settings.apps``)."""
    return {name: getattr(app, "upsell", "hide") for name, app in apps.items()}


def parse_query(query: str) -> AppName | None:
    """The ``?app=`` filter of ``GET {prefix}`` (other parameters are ignored, so a UI
    may add a cache buster). An unknown app is a 400 naming the choices."""
    apps = [
        value for key, value in parse_qsl(query.lstrip("?"), keep_blank_values=True) if key == "app"
    ]
    if not apps:
        return None
    if len(apps) > 1:
        raise RequestError(400, "bad_request", "Bad request", "app given more than once")
    for name in APP_NAMES:
        if apps[0] == name:
            return name
    raise RequestError(
        400,
        "bad_request",
        "Bad request",
        f"unknown app {apps[0]!r} (expected one of {', '.join(APP_NAMES)})",
    )


def build_entitlements(
    policy: Policy,
    caller: Caller,
    *,
    upsell: Mapping[AppName, UpsellMode],
    app: AppName | None = None,
    usage: Seats | None = None,
    seats: SeatsView | None = None,
) -> Entitlements:
    """The body of ``GET {prefix}`` for ``caller``.

    A feature is ``enabled`` when the plan includes it. Otherwise a ``dispatch_only``
    caller sees it ``hidden`` with no upsell fields; other roles see it ``locked`` when
    the feature's app has ``upsell = "tag"`` and ``hidden`` when it has ``"hide"`` (the
    default), both with ``required_tier`` (the cheapest higher tier that includes it),
    ``addon`` (the add-on this tier can buy for it) and ``tag`` (that tier's title, else
    the add-on's). ``app`` keeps only that app's features and the add-ons that unlock
    one of them.

    ``seats``: as the gateway counts them (``[seats] mode = "active_users"``, built by
    ``gateway.seats.seats_view``); None: the plan's included seats and ``usage`` (recorded)."""
    matrix = policy.matrix
    plan = caller.plan
    claims = caller.license.claims
    tier = matrix.tiers[plan.tier]
    granted = matrix.entitlement(plan.tier, plan.addons).features
    features = tuple(
        _feature_view(matrix, plan.tier, name, granted, caller.upsell, upsell)
        for name, spec in matrix.features.items()
        if app is None or spec.app == app
    )
    held = tuple(AddonView(n, matrix.addons[n].title) for n in plan.addons if n in matrix.addons)
    available: list[AvailableAddon] = []
    if caller.upsell:
        for addon in matrix.addons.values():
            if plan.tier not in addon.available_to or addon.name in plan.addons:
                continue
            unlocks = tuple(
                name
                for name, spec in matrix.features.items()
                if name in addon.features and name not in granted
            )
            if unlocks and (app is None or any(matrix.features[f].app == app for f in unlocks)):
                available.append(
                    AvailableAddon(addon.name, addon.title, addon.prices[plan.tier], unlocks)
                )
    if seats is None:
        used = usage or Seats(ops_users=0, drivers=0)
        seats = SeatsView(
            ops_users=SeatCount(plan.seats.ops_users, used.ops_users),
            drivers=SeatCount(plan.seats.drivers, used.drivers),
        )
    return Entitlements(
        tenant=claims.sub,
        tier=TierView(tier.name, tier.title, tier.rank),
        addons=held,
        role=caller.role,
        license=LicenseView(
            id=claims.jti,
            state=plan.state,
            expires_at=rfc3339(claims.exp),
            trial=claims.trial,
            grandfather_until=(
                rfc3339(claims.grandfather_until) if claims.grandfather_until is not None else None
            ),
        ),
        features=features,
        available_addons=tuple(available),
        seats=seats,
        terms=tier.terms,
        can_transact=caller.role in TRANSACTING_ROLES,
    )


def _feature_view(
    matrix: TierMatrix,
    tier: str,
    name: str,
    granted: frozenset[str],
    upsell: bool,
    modes: Mapping[AppName, UpsellMode],
) -> FeatureView:
    spec = matrix.features[name]
    if not upsell:
        state: FeatureState = "enabled" if name in granted else "hidden"
        return FeatureView(name, spec.title, spec.app, state)
    if name in granted:
        return FeatureView(name, spec.title, spec.app, "enabled", None, None, None)
    required, addon = matrix.upgrade_path(tier, name)
    tag = required.title if required else (addon.title if addon else None)
    return FeatureView(
        name,
        spec.title,
        spec.app,
        "locked" if modes.get(spec.app, "hide") == "tag" else "hidden",
        required.name if required else None,
        addon.name if addon else None,
        tag,
    )


_encoder = msgspec.json.Encoder()


def encode_entitlements(body: Entitlements) -> EncodedEntitlements:
    """Encode once; the ETag is a hash of exactly these bytes (msgspec encodes a Struct's
    fields in declaration order, so equal bodies give equal tags)."""
    encoded = _encoder.encode(body)
    return EncodedEntitlements(encoded, f'"{hashlib.blake2b(encoded, digest_size=16).hexdigest()}"')


def not_modified(if_none_match: str | None, etag: str) -> bool:
    """Does ``If-None-Match`` name ``etag``? (RFC 9110 §13.1.2: ``*`` or a list of tags,
    compared weakly, so a ``W/`` prefix added by an intermediary still matches.) True
    means answer 304 with the same ETag and Cache-Control and no body."""
    if if_none_match is None:
        return False
    value = if_none_match.strip()
    if value == "*":
        return True
    for candidate in value.split(","):
        tag = candidate.strip()
        if tag.startswith("W/"):
            tag = tag[2:]
        if tag == etag:
            return True
    return False


def response_headers(etag: str, vary: Iterable[str]) -> tuple[tuple[str, str], ...]:
    """Headers for the 200 and the 304: the tag, the cache policy, and ``Vary`` on the
    request headers the body depends on (license key, tenant id, role, ...)."""
    return (
        ("ETag", etag),
        ("Cache-Control", CACHE_CONTROL),
        ("Vary", ", ".join(vary)),
    )


def rfc3339(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))
