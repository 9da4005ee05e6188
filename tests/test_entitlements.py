"""The entitlements API body (GET {prefix}): feature states by role and upsell mode,
license states, add-ons for sale, seats, the ETag and 304, the ?app= filter. Pure, so
every case runs at a fixed ``NOW`` against the shipped matrix."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.config import load_config
from gateway.decision import Decision, Policy, TenantRecord, decide
from gateway.entitlements import (
    CACHE_CONTROL,
    Caller,
    Entitlements,
    FeatureView,
    UpsellMode,
    build_entitlements,
    encode_entitlements,
    identify,
    not_modified,
    parse_query,
    response_headers,
    upsell_modes,
)
from gateway.errors import ConfigError, LicenseError, RequestError
from gateway.license import License, Seats
from gateway.matrix import APP_NAMES, AppName, TierMatrix
from gateway.routes import Match, Route, RouteMatch
from tests.test_decision import DAY, NOW, TENANT, make_license

HIDE: dict[AppName, UpsellMode] = dict.fromkeys(APP_NAMES, "hide")
TAG: dict[AppName, UpsellMode] = dict.fromkeys(APP_NAMES, "tag")
BASIC = "ops.basic_shipment_optimization"


@pytest.fixture(scope="module")
def policy(matrix: TierMatrix) -> Policy:
    return Policy(matrix=matrix)


def caller_for(policy: Policy, lic: License, role: str | None = "owner") -> Caller:
    found = identify(policy, lic, None, role, "user-7", NOW)
    assert isinstance(found, Caller), found
    return found


def body_for(
    policy: Policy,
    role: str | None = "owner",
    upsell: dict[AppName, UpsellMode] = HIDE,
    app: AppName | None = None,
    usage: Seats | None = None,
    **claims: Any,
) -> Entitlements:
    caller = caller_for(policy, make_license(**claims), role)
    return build_entitlements(policy, caller, upsell=upsell, app=app, usage=usage)


def feature(body: Entitlements, name: str) -> dict[str, Any]:
    """One feature as the client sees it (absent upsell fields are absent keys)."""
    encoded = msgspec.json.decode(encode_entitlements(body).body)
    found: list[dict[str, Any]] = [f for f in encoded["features"] if f["name"] == name]
    assert len(found) == 1
    return found[0]


# ---------------------------------------------------------------- the "Done when" cases


@pytest.mark.parametrize(
    ("role", "upsell", "expected"),
    [
        pytest.param(
            "owner",
            HIDE,
            {"state": "hidden", "required_tier": "fleet", "tag": "Fleet"},
            id="core-hide-hidden",
        ),
        pytest.param(
            "standard",
            {**HIDE, "operations": "tag"},
            {
                "state": "locked",
                "required_tier": "fleet",
                "tag": "Fleet",
                "addon": "advanced_shipment_optimization",
            },
            id="core-tag-locked-with-fleet",
        ),
        pytest.param(None, TAG, {"state": "locked", "tag": "Fleet"}, id="no-role-gets-upsell"),
    ],
)
def test_a_core_key_sees_basic_optimization(
    policy: Policy, role: str | None, upsell: dict[AppName, UpsellMode], expected: dict[str, Any]
) -> None:
    shown = feature(body_for(policy, role, upsell, tier="core"), BASIC)
    assert shown["app"] == "operations"
    assert shown["title"] == "Basic Shipment Optimization"
    for key, value in expected.items():
        assert shown[key] == value


@pytest.mark.parametrize("upsell", [HIDE, TAG], ids=["hide", "tag"])
def test_dispatch_only_sees_hidden_without_upsell_fields(
    policy: Policy, upsell: dict[AppName, UpsellMode]
) -> None:
    body = body_for(policy, "dispatch_only", upsell, tier="core")
    assert feature(body, BASIC) == {
        "name": BASIC,
        "title": "Basic Shipment Optimization",
        "app": "operations",
        "state": "hidden",
    }
    for shown in msgspec.json.decode(encode_entitlements(body).body)["features"]:
        assert {"required_tier", "addon", "tag"}.isdisjoint(shown)
        assert shown["state"] in ("enabled", "hidden")
    assert body.available_addons == ()
    assert body.can_transact is False


def test_a_repeat_with_the_etag_is_not_modified(policy: Policy) -> None:
    first = encode_entitlements(body_for(policy, tier="core"))
    again = encode_entitlements(body_for(policy, tier="core"))
    assert first.body == again.body and first.etag == again.etag
    assert not_modified(first.etag, again.etag)
    other = encode_entitlements(body_for(policy, tier="fleet"))
    assert other.etag != first.etag
    assert not not_modified(first.etag, other.etag)


# ---------------------------------------------------------------- feature states


@pytest.mark.parametrize(
    ("claims", "name", "upsell", "expected"),
    [
        pytest.param({"tier": "core"}, "ops.on_demand", TAG, ("enabled", None, None, None),
                     id="core-has-on-demand"),
        pytest.param({"tier": "core"}, "ops.route_distribution", TAG,
                     ("locked", "fleet", "route_distribution", "Fleet"),
                     id="core-rd-tier-or-add-on"),
        pytest.param({"tier": "core", "addons": ("route_distribution",)},
                     "portal.rd_driver_tracking", TAG, ("enabled", None, None, None),
                     id="rd-addon-spans-apps"),
        pytest.param({"tier": "fleet"}, "portal.personalized_url", TAG,
                     ("locked", "enterprise", "personalized_url", "Enterprise"),
                     id="fleet-personalized-url"),
        pytest.param({"tier": "fleet"}, "ops.health_data_protection", HIDE,
                     ("hidden", "enterprise", None, "Enterprise"), id="fleet-phi-enterprise-only"),
        pytest.param({"tier": "core", "addons": ("advanced_shipment_optimization",)}, BASIC, TAG,
                     ("enabled", None, None, None), id="advanced-addon-implies-basic"),
        pytest.param({"tier": "enterprise"}, "ops.multi_region_ha", TAG,
                     ("enabled", None, None, None), id="enterprise-has-everything"),
        pytest.param({"tier": "fleet", "exp": NOW - 30 * DAY}, "ops.sms_messaging", TAG,
                     ("locked", "fleet", "sms_messaging", "Fleet"), id="restricted-to-core"),
        pytest.param({"tier": "core", "grandfather_tier": "fleet",
                      "grandfather_until": NOW + DAY}, BASIC, TAG,
                     ("enabled", None, None, None), id="grandfathered-fleet"),
    ],
)  # fmt: skip
def test_feature_state(
    policy: Policy,
    claims: dict[str, Any],
    name: str,
    upsell: dict[AppName, UpsellMode],
    expected: tuple[str, str | None, str | None, str | None],
) -> None:
    shown = feature(body_for(policy, "owner", upsell, **claims), name)
    assert (shown["state"], shown["required_tier"], shown["addon"], shown["tag"]) == expected


def test_upsell_mode_is_the_features_app_setting(policy: Policy) -> None:
    body = body_for(policy, upsell={**HIDE, "client_portal": "tag"}, tier="core")
    assert feature(body, "portal.white_labeling")["state"] == "locked"
    assert feature(body, "ops.sms_messaging")["state"] == "hidden"
    assert feature(body, "driver.depot_scanning")["state"] == "hidden"


def test_an_app_without_a_setting_hides(policy: Policy) -> None:
    body = body_for(policy, upsell={"operations": "tag"}, tier="core")
    assert feature(body, "driver.depot_scanning")["state"] == "hidden"


def test_every_feature_listed_once_in_matrix_order(policy: Policy, matrix: TierMatrix) -> None:
    body = body_for(policy, tier="fleet")
    assert [f.name for f in body.features] == list(matrix.features)


@pytest.mark.parametrize("app", APP_NAMES)
def test_app_filter_keeps_that_apps_features_and_addons(
    policy: Policy, matrix: TierMatrix, app: AppName
) -> None:
    body = body_for(policy, app=app, tier="core")
    assert [f.name for f in body.features] == [
        name for name, spec in matrix.features.items() if spec.app == app
    ]
    for addon in body.available_addons:
        assert any(matrix.features[name].app == app for name in addon.unlocks)


# ---------------------------------------------------------------- the rest of the body


def test_the_whole_body_for_a_core_owner(policy: Policy) -> None:
    body = msgspec.json.decode(
        encode_entitlements(
            body_for(
                policy,
                "owner",
                tier="core",
                addons=("sms_messaging",),
                trial=True,
                expiry="restrict",
                usage=Seats(ops_users=1, drivers=3),
            )
        ).body
    )
    assert body["tenant"] == TENANT
    assert body["tier"] == {"name": "core", "title": "Core", "rank": 1}
    assert body["addons"] == [{"name": "sms_messaging", "title": "SMS Messaging"}]
    assert body["role"] == "owner"
    assert body["license"] == {
        "id": "lic-1",
        "state": "valid",
        "expires_at": "2027-12-16T08:00:00Z",
        "trial": True,
        "grandfather_until": None,
    }
    assert body["seats"] == {
        "ops_users": {"included": 1, "used": 1},
        "drivers": {"included": 1, "used": 3},
    }
    assert body["terms"] == {"retention_years": 4, "support": "none"}
    assert body["can_transact"] is True
    assert body["available_addons"] == [
        {
            "name": "route_distribution",
            "title": "Route & Distribution",
            "price": "$500/mo",
            "unlocks": [
                "ops.route_distribution",
                "portal.route_distribution",
                "portal.rd_driver_tracking",
                "driver.route_distribution",
            ],
        },
        {
            "name": "advanced_shipment_optimization",
            "title": "Advanced Shipment Optimization (Itinerary Planning)",
            "price": "$2.50/driver/mo",
            "unlocks": [BASIC, "ops.advanced_shipment_optimization"],
        },
    ]


@pytest.mark.parametrize(
    ("role", "can_transact"),
    [("owner", True), ("admin", True), ("standard", False), ("dispatch_only", False),
     (None, False), ("Owner", False)],
)  # fmt: skip
def test_only_owners_and_admins_transact(
    policy: Policy, role: str | None, can_transact: bool
) -> None:
    assert body_for(policy, role).can_transact is can_transact


def test_add_ons_for_sale_depend_on_the_tier(policy: Policy) -> None:
    names = [a.name for a in body_for(policy, tier="fleet").available_addons]
    assert names == [
        "advanced_shipment_optimization",
        "personalized_url",
        "emergency_support",
        "soc2_end_to_end",
        "multi_region_ha",
    ]
    prices = {a.name: a.price for a in body_for(policy, tier="fleet").available_addons}
    assert prices["advanced_shipment_optimization"] == "$1.50/driver/mo"
    assert body_for(policy, tier="enterprise").available_addons == ()


def test_seats_follow_the_license_override_and_the_tier(policy: Policy) -> None:
    fleet = body_for(policy, tier="fleet")
    assert (fleet.seats.ops_users.included, fleet.seats.drivers.included) == (5, 5)
    assert (fleet.seats.ops_users.used, fleet.seats.drivers.used) == (0, 0)
    custom = body_for(policy, tier="fleet", seats=Seats(ops_users=12, drivers=40))
    assert (custom.seats.ops_users.included, custom.seats.drivers.included) == (12, 40)
    # Restricted: the lowest tier as sold, no extra seats.
    lapsed = body_for(
        policy, tier="fleet", seats=Seats(ops_users=12, drivers=40), exp=NOW - 30 * DAY
    )
    assert (lapsed.seats.ops_users.included, lapsed.seats.drivers.included) == (1, 1)


@pytest.mark.parametrize(
    ("claims", "state", "tier"),
    [
        pytest.param({}, "valid", "core", id="valid"),
        pytest.param({"tier": "fleet", "exp": NOW - DAY}, "grace", "fleet", id="grace"),
        pytest.param({"tier": "fleet", "exp": NOW - 8 * DAY}, "restricted", "core",
                     id="restricted-after-grace"),
        pytest.param({"tier": "fleet", "exp": NOW - 90 * DAY, "expiry": "maintain"},
                     "maintained", "fleet", id="maintained"),
        pytest.param({"grandfather_tier": "fleet", "grandfather_until": NOW + DAY},
                     "grandfathered", "fleet", id="grandfathered"),
        pytest.param({"grandfather_tier": "fleet", "grandfather_until": NOW - DAY},
                     "valid", "core", id="grandfather-window-over"),
        pytest.param({"grandfather_tier": "fleet", "grandfather_until": NOW + DAY,
                      "exp": NOW - DAY}, "grace", "fleet", id="grandfathered-in-grace"),
    ],
)  # fmt: skip
def test_license_state_and_effective_tier(
    policy: Policy, claims: dict[str, Any], state: str, tier: str
) -> None:
    body = body_for(policy, **claims)
    assert (body.license.state, body.tier.name) == (state, tier)


def test_grandfather_until_is_a_date(policy: Policy) -> None:
    body = body_for(policy, grandfather_tier="fleet", grandfather_until=NOW + DAY)
    assert body.license.grandfather_until == "2027-01-16T08:00:00Z"


# ---------------------------------------------------------------- identifying the caller


@pytest.mark.parametrize(
    ("presented", "record", "code"),
    [
        pytest.param(None, None, "license_missing", id="none"),
        pytest.param(LicenseError("license_bad_signature", "x"), None, "license_bad_signature",
                     id="bad-key"),
        pytest.param(make_license(trial=True, exp=NOW - 1), None, "license_expired",
                     id="trial-over"),
        pytest.param(make_license(nbf=NOW + DAY), None, "license_not_yet_valid", id="early"),
        pytest.param(make_license(), TenantRecord(TENANT, suspended=True), "tenant_suspended",
                     id="suspended"),
        pytest.param(make_license(), TenantRecord(TENANT, revoked=frozenset({"lic-1"})),
                     "license_revoked", id="revoked"),
    ],
)  # fmt: skip
def test_identify_refuses_like_a_normal_request(
    policy: Policy, presented: License | LicenseError | None, record: TenantRecord | None, code: str
) -> None:
    found = identify(policy, presented, record, "owner", None, NOW)
    assert isinstance(found, Decision)
    assert (found.allowed, found.code, found.status) == (False, code, 401)


def test_identify_uses_the_newer_license_in_the_store(policy: Policy) -> None:
    newer = make_license(tier="fleet", serial=2, jti="lic-2")
    found = identify(
        policy, make_license(), TenantRecord(TENANT, licenses=(newer,)), None, None, NOW
    )
    assert isinstance(found, Caller)
    assert (found.license.claims.jti, found.plan.tier) == ("lic-2", "fleet")


def test_identify_by_tenant_record_alone(policy: Policy) -> None:
    record = TenantRecord(TENANT, licenses=(make_license(tier="enterprise"),))
    found = identify(policy, None, record, "admin", "u", NOW)
    assert isinstance(found, Caller) and found.plan.tier == "enterprise"


# ---------------------------------------------------------------- HTTP helpers


@pytest.mark.parametrize(
    ("header", "matches"),
    [
        pytest.param(None, False, id="absent"),
        pytest.param('"abc"', True, id="same"),
        pytest.param('W/"abc"', True, id="weak-compare"),
        pytest.param('"x", "abc"', True, id="in-list"),
        pytest.param("*", True, id="star"),
        pytest.param('"abcd"', False, id="other"),
        pytest.param("abc", False, id="unquoted"),
        pytest.param("", False, id="empty"),
    ],
)
def test_if_none_match(header: str | None, matches: bool) -> None:
    assert not_modified(header, '"abc"') is matches


def test_response_headers() -> None:
    assert dict(response_headers('"t"', ["X-License-Key", "X-User-Role"])) == {
        "ETag": '"t"',
        "Cache-Control": CACHE_CONTROL,
        "Vary": "X-License-Key, X-User-Role",
    }
    assert CACHE_CONTROL.startswith("private, max-age=")


@pytest.mark.parametrize(
    ("query", "app"),
    [("", None), ("?app=driver_app", "driver_app"), ("app=operations&_=17", "operations"),
     ("x=1", None)],
)  # fmt: skip
def test_app_filter_query(query: str, app: str | None) -> None:
    assert parse_query(query) == app


@pytest.mark.parametrize(
    ("query", "detail"),
    [
        ("app=billing", "unknown app 'billing' (expected one of operations, client_portal, "
                        "driver_app)"),
        ("app=operations&app=driver_app", "app given more than once"),
        ("app=", "unknown app ''"),
    ],
)  # fmt: skip
def test_bad_app_filter_is_a_400(query: str, detail: str) -> None:
    with pytest.raises(RequestError) as raised:
        parse_query(query)
    assert (raised.value.status, raised.value.code) == (400, "bad_request")
    assert raised.value.detail.startswith(detail)


# ---------------------------------------------------------------- config


def test_upsell_defaults_to_hide_and_accepts_tag(config_dir: Path) -> None:
    config = load_config(config_dir / "gateway.toml")
    assert upsell_modes(config.settings.apps) == HIDE
    text = (config_dir / "gateway.toml").read_text()
    text = text.replace(
        'classic_path_prefixes = ["/xdispatch/"]\n',
        'classic_path_prefixes = ["/xdispatch/"]\nupsell = "tag"\n',
        1,
    )
    (config_dir / "gateway.toml").write_text(text)
    config = load_config(config_dir / "gateway.toml")
    assert upsell_modes(config.settings.apps) == {**HIDE, "operations": "tag"}


def test_an_unknown_upsell_mode_is_a_config_error(config_dir: Path) -> None:
    path = config_dir / "gateway.toml"
    path.write_text(
        path.read_text().replace("[apps.driver_app]\n", '[apps.driver_app]\nupsell = "show"\n')
    )
    with pytest.raises(ConfigError) as raised:
        load_config(path)
    (problem,) = raised.value.problems
    assert (problem.key, problem.message) == ("apps.driver_app.upsell", "Invalid enum value 'show'")
    assert problem.line is not None


# ---------------------------------------------------------------- property


claims_strategy = st.fixed_dictionaries(
    {
        "tier": st.sampled_from(["core", "fleet", "enterprise"]),
        "addons": st.lists(
            st.sampled_from(
                [
                    "route_distribution",
                    "advanced_shipment_optimization",
                    "sms_messaging",
                    "personalized_url",
                    "emergency_support",
                    "soc2_end_to_end",
                    "multi_region_ha",
                    "not_in_the_matrix",
                ]
            ),
            unique=True,
            max_size=4,
        ).map(tuple),
        "exp": st.integers(NOW - 20 * DAY, NOW + 20 * DAY),
        "expiry": st.sampled_from([None, "restrict", "maintain"]),
        "grandfather_tier": st.sampled_from([None, "fleet", "enterprise"]),
        "grandfather_until": st.integers(NOW - 5 * DAY, NOW + 5 * DAY),
    }
)


@settings(max_examples=150, deadline=None)
@given(
    claims=claims_strategy,
    role=st.sampled_from([None, "owner", "admin", "standard", "dispatch_only"]),
    modes=st.fixed_dictionaries({app: st.sampled_from(["hide", "tag"]) for app in APP_NAMES}),
)
def test_every_feature_once_and_enabled_iff_the_decision_allows_its_route(
    matrix: TierMatrix,
    claims: dict[str, Any],
    role: str | None,
    modes: dict[AppName, UpsellMode],
) -> None:
    policy = Policy(matrix=matrix)
    lic = make_license(**claims)
    caller = identify(policy, lic, None, role, None, NOW)
    assert isinstance(caller, Caller)
    body = build_entitlements(policy, caller, upsell=modes)
    names = [f.name for f in body.features]
    assert sorted(names) == sorted(matrix.features) and len(set(names)) == len(names)
    for shown in body.features:
        spec = matrix.features[shown.name]
        route = Route(spec.app, "/x", None, shown.name, False, None, None, "routes[0]", None)
        decision = decide(policy, RouteMatch(Match.FULL, route), "allow", lic, None, role, NOW)
        assert (shown.state == "enabled") is decision.allowed, shown
        _check_upsell_fields(shown, decision, role, modes)


def _check_upsell_fields(
    shown: FeatureView, decision: Decision, role: str | None, modes: dict[AppName, UpsellMode]
) -> None:
    if role == "dispatch_only":
        assert shown.required_tier is msgspec.UNSET and shown.addon is msgspec.UNSET
        assert shown.state in ("enabled", "hidden")
    elif not decision.allowed:
        # The page and the 403 body name the same way up.
        assert (shown.required_tier, shown.addon) == (decision.required_tier, decision.addon)
        assert shown.state == ("locked" if modes[shown.app] == "tag" else "hidden")
