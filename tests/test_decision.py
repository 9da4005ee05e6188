"""The decision: reason order, expiry strategies, grandfathering, upsell, current license,
seats (docs/design.md §4 and §5). ``decide`` is pure, so every case runs at a fixed ``NOW``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import msgspec
import pytest

from gateway.decision import (
    PUBLIC,
    STATUS,
    TITLES,
    Decision,
    Policy,
    TenantRecord,
    current_license,
    decide,
    expiry_state,
)
from gateway.errors import LicenseError
from gateway.license import KeyRing, License, LicenseClaims, Seats
from gateway.matrix import AppName, TierMatrix
from gateway.routes import Match, RouteTable

IssueKey = Callable[..., str]

NOW = 1_800_000_000
DAY = 86400
TENANT = "tenant-1"
JTI = "lic-1"

# Requests used below: (app, method, path).
Request = tuple[AppName, str, str]
OPTIMIZE: Request = ("operations", "POST", "/api/v1/shipments/1/optimize")  # fleet feature
SHIPMENTS: Request = ("operations", "GET", "/api/v1/shipments")  # core feature
ITINERARIES: Request = ("operations", "GET", "/api/v1/itineraries")  # enterprise / add-on
PHI: Request = ("operations", "GET", "/api/v1/phi/records/7")  # enterprise only
SMS: Request = ("operations", "POST", "/api/v1/sms/messages")  # fleet / core add-on
OPS_ROUTES: Request = ("operations", "GET", "/api/v1/routes")  # fleet / core R&D add-on
EMERGENCY: Request = ("operations", "POST", "/api/v1/support/emergency")  # ent / fleet add-on
REGIONS: Request = ("operations", "GET", "/api/v1/availability/regions")  # owner/admin, ent
ADD_USER: Request = ("operations", "POST", "/api/v1/users")  # owner/admin, quota ops_users
ADD_DRIVER: Request = ("operations", "POST", "/api/v1/drivers")  # quota drivers
ACCOUNT: Request = ("operations", "GET", "/api/v1/account")  # ungated
HEALTH: Request = ("operations", "GET", "/api/v1/health")  # public
VANITY: Request = ("client_portal", "GET", "/api/v1/vanity-url")  # owner/admin, ent / add-on
PORTAL_ROUTES: Request = ("client_portal", "GET", "/api/v1/routes")  # fleet / core R&D add-on
DEPOT: Request = ("driver_app", "POST", "/api/v1/scans/depot")  # fleet


def make_license(**overrides: Any) -> License:
    """A verified-looking license (as ``KeyRing.verify`` would return), valid at ``NOW``."""
    fields: dict[str, Any] = {
        "iss": "tests",
        "sub": TENANT,
        "jti": JTI,
        "iat": NOW - 30 * DAY,
        "nbf": NOW - 30 * DAY,
        "exp": NOW + 335 * DAY,
        "tier": "core",
        "serial": 1,
    }
    fields.update(overrides)
    return License(LicenseClaims(**fields), kid="test", fingerprint="0123456789ab")


def tenant_record(**fields: Any) -> TenantRecord:
    return TenantRecord(tenant=fields.pop("tenant", TENANT), **fields)


@pytest.fixture(scope="module")
def policy(matrix: TierMatrix) -> Policy:
    return Policy(matrix=matrix)


Decide = Callable[..., Decision]


@pytest.fixture(scope="module")
def run(policy: Policy, route_table: RouteTable) -> Decide:
    """``run(request, license, tenant=None, role="owner", now=NOW)`` with the shipped routes."""

    def call(
        request: Request,
        presented: License | LicenseError | None,
        tenant: TenantRecord | None = None,
        role: str | None = "owner",
        now: float = NOW,
    ) -> Decision:
        app, method, path = request
        found = route_table.match(app, method, path)
        unmatched = route_table.apps[app].unmatched
        return decide(policy, found, unmatched, presented, tenant, role, now)

    return call


def assert_denied(decision: Decision, code: str, status: int) -> None:
    assert (decision.allowed, decision.code, decision.status) == (False, code, status)
    assert STATUS[code] == status
    assert decision.title == TITLES[code]
    assert decision.entitlement is None


def test_requests_used_here_match_the_routes_they_are_meant_for(route_table: RouteTable) -> None:
    gated = {
        OPTIMIZE: "ops.basic_shipment_optimization",
        SHIPMENTS: "ops.on_demand",
        ITINERARIES: "ops.advanced_shipment_optimization",
        PHI: "ops.health_data_protection",
        SMS: "ops.sms_messaging",
        OPS_ROUTES: "ops.route_distribution",
        EMERGENCY: "ops.emergency_support",
        REGIONS: "ops.multi_region_ha",
        VANITY: "portal.personalized_url",
        PORTAL_ROUTES: "portal.route_distribution",
        DEPOT: "driver.depot_scanning",
        ADD_USER: None,
        ADD_DRIVER: None,
        ACCOUNT: None,
    }
    for (app, method, path), feature in gated.items():
        found = route_table.match(app, method, path)
        assert found.kind is Match.FULL and found.route is not None, path
        assert found.route.feature == feature, path
        assert not found.route.public
    health = route_table.match(*HEALTH)
    assert health.route is not None and health.route.public


# --------------------------------------------------------------------------- reason order

ORDER: list[Any] = [
    pytest.param(
        {"nbf": NOW + DAY, "tier": "nonsense"},
        {"suspended": True},
        OPTIMIZE,
        "owner",
        "license_malformed",
        id="unknown-tier-first",
    ),
    pytest.param(
        {"nbf": NOW + DAY},
        {"revoked": frozenset({JTI}), "suspended": True},
        OPTIMIZE,
        "owner",
        "license_not_yet_valid",
        id="not-yet-valid+revoked+suspended",
    ),
    pytest.param(
        {"iat": NOW + 301, "nbf": NOW - DAY},
        {"revoked": frozenset({JTI})},
        SHIPMENTS,
        "owner",
        "license_not_yet_valid",
        id="issued-in-the-future+revoked",
    ),
    pytest.param(
        {"serial": 1},
        {"min_serial": 2, "revoked": frozenset({JTI}), "suspended": True},
        SHIPMENTS,
        "owner",
        "license_superseded",
        id="superseded+revoked+suspended",
    ),
    pytest.param(
        {},
        {"revoked": frozenset({JTI}), "suspended": True},
        SHIPMENTS,
        "owner",
        "license_revoked",
        id="revoked+suspended",
    ),
    pytest.param(
        {"trial": True, "exp": NOW - DAY},
        {"suspended": True},
        SHIPMENTS,
        "owner",
        "tenant_suspended",
        id="suspended+expired",
    ),
    pytest.param(
        {"trial": True, "exp": NOW - 1},
        None,
        OPTIMIZE,
        "owner",
        "license_expired",
        id="expired(revoke)+feature-missing",
    ),
    pytest.param(
        {"expiry": "revoke", "exp": NOW - 1},
        {"usage": Seats(ops_users=99, drivers=99)},
        ADD_USER,
        "standard",
        "license_expired",
        id="expired(revoke)+role+seats",
    ),
    pytest.param(
        {"tier": "core"},
        None,
        REGIONS,
        "standard",
        "feature_not_entitled",
        id="feature-missing+role-forbidden",
    ),
    pytest.param(
        {"tier": "fleet"},
        None,
        VANITY,
        "dispatch_only",
        "feature_not_entitled",
        id="feature-missing+role-forbidden-portal",
    ),
    pytest.param(
        {"tier": "core"},
        {"usage": Seats(ops_users=1, drivers=0)},
        ADD_USER,
        "standard",
        "role_forbidden",
        id="role-forbidden+seat-limit",
    ),
    pytest.param(
        {"tier": "core"},
        {"usage": Seats(ops_users=1, drivers=0)},
        ADD_USER,
        None,
        "role_forbidden",
        id="no-role+seat-limit",
    ),
    pytest.param(
        {"tier": "core"},
        {"usage": Seats(ops_users=1, drivers=0)},
        ADD_USER,
        "admin",
        "seat_limit_exceeded",
        id="seat-limit-alone",
    ),
]


@pytest.mark.parametrize(("claims", "record", "request_", "role", "code"), ORDER)
def test_first_failing_check_wins(
    run: Decide,
    claims: dict[str, Any],
    record: dict[str, Any] | None,
    request_: Request,
    role: str | None,
    code: str,
) -> None:
    tenant = tenant_record(**record) if record is not None else None
    decision = run(request_, make_license(**claims), tenant, role)
    assert_denied(decision, code, STATUS[code])
    assert decision.license is not None and decision.license.claims.jti == JTI


def test_status_codes_by_reason_family() -> None:
    license_problems = [
        "license_missing",
        "license_malformed",
        "license_unknown_key",
        "license_bad_signature",
        "license_not_yet_valid",
        "license_superseded",
        "license_revoked",
        "tenant_suspended",
        "license_expired",
    ]
    assert {code: STATUS[code] for code in license_problems} == dict.fromkeys(license_problems, 401)
    assert STATUS["feature_not_entitled"] == STATUS["role_forbidden"] == 403
    assert STATUS["route_unmatched"] == 403
    assert STATUS["seat_limit_exceeded"] == 429
    assert set(TITLES) == set(STATUS)


def test_clock_skew_tolerates_a_slightly_early_key(run: Decide) -> None:
    early = make_license(iat=NOW + 299, nbf=NOW + 299)
    assert run(SHIPMENTS, early).allowed
    late = make_license(iat=NOW - DAY, nbf=NOW + 301)
    assert_denied(run(SHIPMENTS, late), "license_not_yet_valid", 401)


def test_not_yet_valid_says_from_when(run: Decide) -> None:
    decision = run(SHIPMENTS, make_license(nbf=NOW + DAY))
    assert decision.detail.startswith("valid from ")


def test_a_record_of_another_tenant_vouches_for_nothing(run: Decide) -> None:
    other = tenant_record(tenant="someone-else", suspended=True, revoked=frozenset({JTI}))
    decision = run(SHIPMENTS, make_license(), other)
    assert decision.allowed and decision.code == "allowed"


# --------------------------------------------------------------------------- route kinds


def test_public_route_needs_no_license(run: Decide) -> None:
    assert run(HEALTH, None) is PUBLIC
    assert run(("operations", "HEAD", "/api/v1/health"), None) is PUBLIC
    assert run(("operations", "POST", "/api/v1/auth/login"), None) is PUBLIC
    assert PUBLIC.allowed and PUBLIC.status == 200 and PUBLIC.code == "public"


def test_public_route_ignores_a_bad_or_expired_key(run: Decide) -> None:
    assert run(HEALTH, LicenseError("license_bad_signature", "x")) is PUBLIC
    expired = make_license(trial=True, exp=NOW - DAY)
    assert run(HEALTH, expired, tenant_record(suspended=True)) is PUBLIC


def test_unmatched_allow_still_needs_a_license(run: Decide) -> None:
    request: Request = ("operations", "GET", "/api/v2/something/new")
    assert_denied(run(request, None), "license_missing", 401)
    decision = run(request, make_license(tier="core"))
    assert decision.allowed and decision.code == "allowed"
    assert decision.feature is None and decision.tier == "core"
    assert_denied(run(request, make_license(trial=True, exp=NOW - 1)), "license_expired", 401)


def test_unmatched_deny_refuses_even_a_good_license(run: Decide) -> None:
    request: Request = ("driver_app", "GET", "/api/v1/unmapped")
    decision = run(request, make_license(tier="enterprise"))
    assert_denied(decision, "route_unmatched", 403)
    assert_denied(run(request, None), "route_unmatched", 403)


def test_wrong_method_under_unmatched_deny_is_refused(run: Decide) -> None:
    request: Request = ("driver_app", "GET", "/api/v1/scans/depot")  # the route is POST only
    assert_denied(run(request, make_license(tier="enterprise")), "route_unmatched", 403)


def test_ungated_route_needs_only_a_valid_license(run: Decide) -> None:
    decision = run(ACCOUNT, make_license(tier="core"), role="dispatch_only")
    assert decision.allowed and decision.feature is None
    assert_denied(run(ACCOUNT, None), "license_missing", 401)


@pytest.mark.parametrize(
    "reason", ["license_malformed", "license_unknown_key", "license_bad_signature"]
)
def test_license_error_passes_through_with_its_reason(run: Decide, reason: str) -> None:
    error = LicenseError(reason, "details of the failure")
    # even a tenant record with a good license does not rescue a bad presented key
    tenant = tenant_record(licenses=(make_license(tier="enterprise", serial=5),))
    decision = run(SHIPMENTS, error, tenant)
    assert_denied(decision, reason, 401)
    assert decision.detail == "details of the failure"


def test_missing_license(run: Decide) -> None:
    assert_denied(run(SHIPMENTS, None), "license_missing", 401)
    assert_denied(run(SHIPMENTS, None, tenant_record()), "license_missing", 401)


def test_allowed_decision_carries_the_entitlement(run: Decide) -> None:
    decision = run(OPTIMIZE, make_license(tier="fleet", addons=("personalized_url",)))
    assert decision.allowed and decision.status == 200 and decision.code == "allowed"
    assert decision.title == "Allowed"
    assert decision.feature == "ops.basic_shipment_optimization"
    assert decision.tier == "fleet"
    assert decision.warning is None
    entitlement = decision.entitlement
    assert entitlement is not None
    assert entitlement.addons == ("personalized_url",)
    assert "portal.personalized_url" in entitlement.features
    assert entitlement.features_header.split(",") == sorted(entitlement.features)
    assert entitlement.addons_header == "personalized_url"


# --------------------------------------------------------------------------- expiry strategies


def test_restrict_within_grace_keeps_the_plan_with_a_warning(run: Decide) -> None:
    lic = make_license(tier="fleet", addons=("personalized_url",), exp=NOW - DAY)
    decision = run(OPTIMIZE, lic)
    assert decision.allowed and decision.tier == "fleet"
    assert decision.warning is not None and "grace period ends" in decision.warning
    assert run(VANITY, lic).allowed  # add-ons too


def test_restrict_after_grace_falls_back_to_the_lowest_tier(run: Decide) -> None:
    lic = make_license(tier="fleet", addons=("personalized_url",), exp=NOW - 8 * DAY)

    fleet_feature = run(OPTIMIZE, lic)
    assert_denied(fleet_feature, "feature_not_entitled", 403)
    assert fleet_feature.tier == "core"
    assert fleet_feature.required_tier == "fleet"
    assert fleet_feature.warning is not None and "restricted" in fleet_feature.warning

    core_feature = run(SHIPMENTS, lic)
    assert core_feature.allowed and core_feature.tier == "core"
    assert core_feature.warning is not None and "restricted" in core_feature.warning
    assert_denied(run(VANITY, lic), "feature_not_entitled", 403)  # add-ons are gone


def test_restrict_drops_core_add_ons_too(run: Decide) -> None:
    lic = make_license(tier="core", addons=("sms_messaging",), exp=NOW - 30 * DAY)
    assert_denied(run(SMS, lic), "feature_not_entitled", 403)
    assert run(SMS, make_license(tier="core", addons=("sms_messaging",))).allowed


def test_grace_boundary(run: Decide, policy: Policy) -> None:
    exp = NOW - policy.grace_seconds
    assert run(OPTIMIZE, make_license(tier="fleet", exp=exp + 1)).allowed
    assert_denied(run(OPTIMIZE, make_license(tier="fleet", exp=exp)), "feature_not_entitled", 403)


def test_revoke_is_the_trial_default(run: Decide) -> None:
    trial = make_license(tier="enterprise", trial=True, exp=NOW)
    assert run(SHIPMENTS, trial, now=NOW - 1).allowed
    decision = run(SHIPMENTS, trial, now=NOW)
    assert_denied(decision, "license_expired", 401)
    assert decision.detail.startswith("expired ")
    assert_denied(run(SHIPMENTS, trial, now=NOW + 1), "license_expired", 401)


def test_revoke_can_be_chosen_for_a_paid_license(run: Decide) -> None:
    assert_denied(
        run(SHIPMENTS, make_license(expiry="revoke", exp=NOW - 1)), "license_expired", 401
    )


def test_trial_can_be_issued_with_restrict(run: Decide) -> None:
    trial = make_license(tier="fleet", trial=True, expiry="restrict", exp=NOW - DAY)
    assert run(OPTIMIZE, trial).allowed


def test_maintain_keeps_entitlements_with_a_warning(run: Decide) -> None:
    lic = make_license(tier="enterprise", expiry="maintain", exp=NOW - 365 * DAY)
    decision = run(PHI, lic)
    assert decision.allowed and decision.tier == "enterprise"
    assert decision.warning is not None and "renew" in decision.warning


def test_no_warning_while_valid(run: Decide) -> None:
    assert run(SHIPMENTS, make_license(exp=NOW + 1)).warning is None


@pytest.mark.parametrize(
    ("claims", "now", "state"),
    [
        pytest.param({"exp": NOW + 1}, NOW, "valid", id="valid"),
        pytest.param({"exp": NOW}, NOW, "grace", id="grace-at-exp"),
        pytest.param({"exp": NOW - 7 * DAY + 1}, NOW, "grace", id="grace-last-second"),
        pytest.param({"exp": NOW - 7 * DAY}, NOW, "restricted", id="restricted"),
        pytest.param({"exp": NOW, "trial": True}, NOW, "expired", id="trial-expired"),
        pytest.param({"exp": NOW - DAY, "expiry": "maintain"}, NOW, "maintained", id="maintain"),
    ],
)
def test_expiry_state(claims: dict[str, Any], now: int, state: str) -> None:
    found, warning = expiry_state(make_license(**claims).claims, now, 7 * DAY)
    assert found == state
    assert (warning is None) == (state in ("valid", "expired"))


# --------------------------------------------------------------------------- grandfathering


def grandfathered(until: int, **overrides: Any) -> License:
    fields: dict[str, Any] = {
        "tier": "core",
        "grandfather_tier": "enterprise",
        "grandfather_until": until,
    }
    fields.update(overrides)
    return make_license(**fields)


def test_grandfather_window_grants_the_old_tier(run: Decide) -> None:
    lic = grandfathered(NOW + 90 * DAY)
    for request in (PHI, OPTIMIZE, ITINERARIES, VANITY):
        decision = run(request, lic)
        assert decision.allowed, request
        assert decision.tier == "enterprise"


def test_grandfather_window_ends(run: Decide) -> None:
    lic = grandfathered(NOW)
    decision = run(PHI, lic)
    assert_denied(decision, "feature_not_entitled", 403)
    assert decision.tier == "core"
    assert run(SHIPMENTS, lic).allowed


def test_grandfather_never_lowers_a_tier(run: Decide) -> None:
    lic = make_license(tier="enterprise", grandfather_tier="core", grandfather_until=NOW + DAY)
    decision = run(PHI, lic)
    assert decision.allowed and decision.tier == "enterprise"


def test_grandfather_to_an_unknown_tier_is_ignored(run: Decide) -> None:
    lic = grandfathered(NOW + DAY, grandfather_tier="platinum")
    assert_denied(run(PHI, lic), "feature_not_entitled", 403)
    assert run(SHIPMENTS, lic).allowed


def test_grandfather_keeps_add_ons(run: Decide) -> None:
    lic = grandfathered(
        NOW + DAY, grandfather_tier="fleet", addons=("advanced_shipment_optimization",)
    )
    decision = run(ITINERARIES, lic)
    assert decision.allowed and decision.tier == "fleet"


def test_grandfather_holds_through_grace(run: Decide) -> None:
    lic = grandfathered(NOW + 30 * DAY, exp=NOW - DAY)
    decision = run(PHI, lic)
    assert decision.allowed and decision.tier == "enterprise"
    assert decision.warning is not None


def test_grandfather_does_not_lift_an_expiry_restriction(run: Decide) -> None:
    """Past grace a license is restricted to the lowest tier, window or not (the warning
    says "restricted to the lowest tier": the decision must agree with it)."""
    lic = grandfathered(NOW + 30 * DAY, exp=NOW - 30 * DAY)
    decision = run(PHI, lic)
    assert_denied(decision, "feature_not_entitled", 403)
    assert decision.tier == "core"


# --------------------------------------------------------------------------- upsell fields

UPSELL: list[Any] = [
    pytest.param("core", OPTIMIZE, "fleet", "advanced_shipment_optimization", id="core-optimize"),
    pytest.param("core", SMS, "fleet", "sms_messaging", id="core-sms"),
    pytest.param("core", OPS_ROUTES, "fleet", "route_distribution", id="core-ops-routes"),
    pytest.param("core", PORTAL_ROUTES, "fleet", "route_distribution", id="core-portal-routes"),
    pytest.param(
        "core", ITINERARIES, "enterprise", "advanced_shipment_optimization", id="core-itinerary"
    ),
    pytest.param("core", PHI, "enterprise", None, id="core-phi"),
    pytest.param("core", VANITY, "enterprise", None, id="core-vanity"),
    pytest.param("core", DEPOT, "fleet", None, id="core-depot"),
    pytest.param("fleet", VANITY, "enterprise", "personalized_url", id="fleet-vanity"),
    pytest.param("fleet", PHI, "enterprise", None, id="fleet-phi"),
    pytest.param("fleet", EMERGENCY, "enterprise", "emergency_support", id="fleet-emergency"),
    pytest.param(
        "fleet", ITINERARIES, "enterprise", "advanced_shipment_optimization", id="fleet-itinerary"
    ),
]


@pytest.mark.parametrize(("tier", "request_", "required_tier", "addon"), UPSELL)
def test_denial_names_the_cheapest_tier_and_the_add_on(
    run: Decide,
    matrix: TierMatrix,
    tier: str,
    request_: Request,
    required_tier: str,
    addon: str | None,
) -> None:
    decision = run(request_, make_license(tier=tier))
    assert_denied(decision, "feature_not_entitled", 403)
    assert decision.tier == tier
    assert decision.required_tier == required_tier
    assert decision.addon == addon
    assert decision.upsell is True
    assert decision.feature is not None
    assert decision.detail == (
        f"{matrix.features[decision.feature].title} is not in the {matrix.tiers[tier].title} plan"
    )
    # and what the denial recommends does unlock it
    assert run(request_, make_license(tier=required_tier)).allowed
    if addon is not None:
        assert run(request_, make_license(tier=tier, addons=(addon,))).allowed


def test_enterprise_is_never_blocked_on_a_feature(run: Decide, route_table: RouteTable) -> None:
    lic = make_license(tier="enterprise")
    for route in route_table.routes():
        if route.feature is None:
            continue
        request: Request = (route.app, sorted(route.methods or {"GET"})[0], _concrete(route.path))
        decision = run(request, lic, role="owner")
        assert decision.allowed, route.key


def _concrete(pattern: str) -> str:
    parts = []
    for segment in pattern.split("/"):
        if segment.startswith("{") and segment.endswith(":path}"):
            parts.append("a/b")
        elif segment.startswith("{"):
            parts.append("1")
        else:
            parts.append(segment)
    return "/".join(parts)


@pytest.mark.parametrize("role", ["owner", "admin", "standard", None])
def test_upsell_for_every_role_but_dispatch_only(run: Decide, role: str | None) -> None:
    assert run(OPTIMIZE, make_license(tier="core"), role=role).upsell is True


def test_dispatch_only_gets_no_upsell(run: Decide) -> None:
    decision = run(OPTIMIZE, make_license(tier="core"), role="dispatch_only")
    assert_denied(decision, "feature_not_entitled", 403)
    assert decision.upsell is False
    role_denial = run(ADD_USER, make_license(tier="core"), role="dispatch_only")
    assert_denied(role_denial, "role_forbidden", 403)
    assert role_denial.upsell is False
    assert run(SHIPMENTS, make_license(tier="core"), role="dispatch_only").upsell is False


# --------------------------------------------------------------------------- current license


def test_upgrade_in_the_store_applies_at_once(run: Decide, policy: Policy) -> None:
    presented = make_license(tier="core", serial=1)
    upgrade = make_license(tier="fleet", serial=2, jti="lic-2", nbf=NOW - 10, iat=NOW - 10)
    tenant = tenant_record(licenses=(upgrade,))

    assert current_license(presented, tenant, NOW, policy.clock_skew_seconds) is upgrade
    decision = run(OPTIMIZE, presented, tenant)
    assert decision.allowed and decision.tier == "fleet"
    assert decision.license is upgrade


def test_downgrade_waits_for_its_nbf_without_a_gap(run: Decide, policy: Policy) -> None:
    period_end = NOW + 10 * DAY
    presented = make_license(tier="fleet", serial=1, exp=period_end)
    downgrade = make_license(tier="core", serial=2, jti="lic-2", iat=NOW, nbf=period_end)
    tenant = tenant_record(licenses=(downgrade,))
    skew = policy.clock_skew_seconds

    assert current_license(presented, tenant, NOW, skew) is presented
    assert current_license(presented, tenant, period_end - skew - 1, skew) is presented
    assert current_license(presented, tenant, period_end, skew) is downgrade

    before = run(OPTIMIZE, presented, tenant, now=period_end - skew - 1)
    assert before.allowed and before.tier == "fleet" and before.warning is None
    for now in (period_end - skew, period_end - 1, period_end, period_end + DAY):
        after = run(SHIPMENTS, presented, tenant, now=now)
        assert after.allowed and after.tier == "core" and after.warning is None, now
        assert_denied(run(OPTIMIZE, presented, tenant, now=now), "feature_not_entitled", 403)


def test_a_revoked_newer_license_is_ignored(run: Decide, policy: Policy) -> None:
    presented = make_license(tier="core", serial=1)
    revoked = make_license(tier="enterprise", serial=2, jti="lic-2")
    tenant = tenant_record(licenses=(revoked,), revoked=frozenset({"lic-2"}))
    assert current_license(presented, tenant, NOW, policy.clock_skew_seconds) is presented
    decision = run(OPTIMIZE, presented, tenant)
    assert_denied(decision, "feature_not_entitled", 403)
    assert decision.tier == "core"


def test_an_older_license_in_the_store_does_not_replace_the_key(
    run: Decide, policy: Policy
) -> None:
    presented = make_license(tier="fleet", serial=5)
    older = make_license(tier="enterprise", serial=4, jti="lic-0")
    tenant = tenant_record(licenses=(older,))
    assert current_license(presented, tenant, NOW, policy.clock_skew_seconds) is presented
    assert run(OPTIMIZE, presented, tenant).tier == "fleet"


def test_a_store_license_of_another_tenant_is_ignored(policy: Policy) -> None:
    presented = make_license(tier="core", serial=1)
    foreign = make_license(tier="enterprise", serial=9, sub="someone-else", jti="lic-9")
    tenant = tenant_record(licenses=(foreign,))
    assert current_license(presented, tenant, NOW, policy.clock_skew_seconds) is presented


def test_the_newest_eligible_store_license_wins(policy: Policy) -> None:
    licenses = (
        make_license(tier="fleet", serial=2, jti="lic-2"),
        make_license(tier="enterprise", serial=4, jti="lic-4"),
        make_license(tier="core", serial=3, jti="lic-3"),
        make_license(tier="core", serial=5, jti="lic-5", nbf=NOW + DAY),
    )
    tenant = tenant_record(licenses=licenses)
    found = current_license(None, tenant, NOW, policy.clock_skew_seconds)
    assert found is licenses[1]


def test_the_tenant_record_alone_is_enough(run: Decide) -> None:
    stored = make_license(tier="fleet", serial=3)
    decision = run(OPTIMIZE, None, tenant_record(licenses=(stored,)))
    assert decision.allowed and decision.license is stored and decision.tier == "fleet"


def test_a_scheduled_store_license_alone_is_not_yet_a_license(run: Decide) -> None:
    scheduled = make_license(tier="fleet", serial=3, nbf=NOW + DAY)
    assert_denied(
        run(SHIPMENTS, None, tenant_record(licenses=(scheduled,))), "license_missing", 401
    )


def test_superseded_key(run: Decide) -> None:
    decision = run(SHIPMENTS, make_license(serial=3), tenant_record(min_serial=4))
    assert_denied(decision, "license_superseded", 401)
    assert run(SHIPMENTS, make_license(serial=4), tenant_record(min_serial=4)).allowed


def test_a_superseded_key_is_replaced_by_the_newer_stored_one(run: Decide) -> None:
    newer = make_license(tier="fleet", serial=4, jti="lic-4")
    tenant = tenant_record(min_serial=4, licenses=(newer,))
    decision = run(OPTIMIZE, make_license(serial=3), tenant)
    assert decision.allowed and decision.license is newer


def test_keys_from_the_real_codec_decide_the_same(
    run: Decide, keyring: KeyRing, issue_key: IssueKey
) -> None:
    core = keyring.verify(issue_key(tier="core", serial=1))
    fleet = keyring.verify(issue_key(tier="fleet", serial=2))
    now = float(fleet.claims.iat + 60)
    assert_denied(run(OPTIMIZE, core, now=now), "feature_not_entitled", 403)
    decision = run(OPTIMIZE, core, tenant_record(licenses=(fleet,)), now=now)
    assert decision.allowed and decision.license is fleet


# --------------------------------------------------------------------------- seats

SEATS: list[Any] = [
    # license seats override the tier's quotas, in both directions
    pytest.param("fleet", Seats(2, 2), ADD_USER, Seats(2, 0), False, id="license-seats-full"),
    pytest.param("fleet", Seats(2, 2), ADD_USER, Seats(1, 0), True, id="license-seats-free"),
    pytest.param("fleet", None, ADD_USER, Seats(2, 0), True, id="tier-quota-free"),
    pytest.param("fleet", None, ADD_USER, Seats(4, 0), True, id="tier-quota-last-seat"),
    pytest.param("fleet", None, ADD_USER, Seats(5, 0), False, id="tier-quota-full"),
    pytest.param("core", Seats(10, 10), ADD_USER, Seats(5, 0), True, id="core-bought-seats"),
    pytest.param("core", None, ADD_USER, Seats(1, 0), False, id="core-one-user"),
    pytest.param("core", None, ADD_DRIVER, Seats(0, 1), False, id="core-one-driver"),
    pytest.param("core", None, ADD_DRIVER, Seats(9, 0), True, id="drivers-not-users"),
    pytest.param("enterprise", Seats(3, 3), ADD_DRIVER, Seats(0, 3), False, id="ent-overridden"),
    pytest.param("core", None, ACCOUNT, Seats(9, 9), True, id="no-quota-on-route"),
]


@pytest.mark.parametrize(("tier", "seats", "request_", "usage", "allowed"), SEATS)
def test_seat_limits(
    run: Decide,
    tier: str,
    seats: Seats | None,
    request_: Request,
    usage: Seats,
    allowed: bool,
) -> None:
    lic = make_license(tier=tier, seats=seats)
    decision = run(request_, lic, tenant_record(usage=usage), role="admin")
    if allowed:
        assert decision.allowed, decision.detail
    else:
        assert_denied(decision, "seat_limit_exceeded", 429)
        assert decision.upsell is True


def test_no_usage_known_means_no_seat_check(run: Decide) -> None:
    assert run(ADD_USER, make_license(tier="core"), tenant_record(), role="owner").allowed
    assert run(ADD_USER, make_license(tier="core"), None, role="owner").allowed


def test_active_users_mode_leaves_seats_to_the_seat_book(
    policy: Policy, route_table: RouteTable
) -> None:
    """With seats counted by the gateway, usage an operator recorded limits nothing here;
    the allowed decision carries the license's seats claim for the seat book."""
    counted = msgspec.structs.replace(policy, seat_mode="active_users")
    app, method, path = ADD_USER
    found = route_table.match(app, method, path)
    full = tenant_record(usage=Seats(99, 99))
    for seats in (None, Seats(2, 3)):
        lic = make_license(tier="core", seats=seats)
        decision = decide(counted, found, "deny", lic, full, "owner", NOW)
        assert decision.allowed and decision.seats == seats
        recorded = decide(policy, found, "deny", lic, full, "owner", NOW)
        assert_denied(recorded, "seat_limit_exceeded", 429)


def test_restricted_license_loses_its_seats_claim(run: Decide) -> None:
    lic = make_license(tier="fleet", seats=Seats(20, 20), exp=NOW - 30 * DAY)
    decision = run(ACCOUNT, lic)
    assert decision.allowed and (decision.tier, decision.seats) == ("core", None)


def test_seat_limit_detail(run: Decide) -> None:
    decision = run(ADD_USER, make_license(tier="core"), tenant_record(usage=Seats(1, 0)))
    assert decision.detail == "1 of 1 ops_users seats in use"


def test_explicit_role_list_admits_its_roles(run: Decide) -> None:
    lic = make_license(tier="enterprise")
    for role in ("owner", "admin"):
        assert run(REGIONS, lic, role=role).allowed
    for other in ("standard", "dispatch_only", None):
        assert_denied(run(REGIONS, lic, role=other), "role_forbidden", 403)


def test_an_ended_trial_never_hides_an_older_paid_license(policy: Policy) -> None:
    paid = make_license(jti="paid", tier="fleet", serial=1)
    trial = make_license(
        jti="trial", tier="enterprise", trial=True, serial=2, nbf=NOW - 20 * DAY, exp=NOW - DAY
    )
    tenant = tenant_record(licenses=(trial, paid))
    skew = policy.clock_skew_seconds
    # Only the tenant id: the paid license governs, not the newer, ended trial.
    assert current_license(None, tenant, NOW, skew) is paid
    # The ended trial presented as a key: the store's working license takes over.
    assert current_license(trial, tenant, NOW, skew) is paid
    # Before the trial ended, it governed (it is newer).
    assert current_license(None, tenant, NOW - 2 * DAY, skew) is trial


def test_only_expired_licenses_leave_the_newest(policy: Policy) -> None:
    old = make_license(jti="old", serial=1, exp=NOW - 2 * DAY)
    newer = make_license(jti="newer", serial=2, exp=NOW - DAY)
    tenant = tenant_record(licenses=(newer, old))
    assert current_license(None, tenant, NOW, policy.clock_skew_seconds) is newer
