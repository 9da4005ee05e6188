"""Generated coverage of the shipped configuration: every route × every tier × every add-on
combination a tier can buy is decided exactly as the tier matrix says, and every feature of
the matrix is reachable through some route.

The expectation is computed from the raw TOML files (``tomllib``, no gateway code), so a
mistake in the matrix compiler, the route compiler or the decision shows up here.
"""

from __future__ import annotations

import itertools
import re
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from gateway.decision import Decision, Policy, decide
from gateway.license import License, LicenseClaims
from gateway.matrix import TierMatrix
from gateway.routes import ROLES, Match, RouteMatch, RouteTable

REPO = Path(__file__).resolve().parent.parent
NOW = 1_800_000_000


def _load(name: str) -> dict[str, Any]:
    with open(REPO / name, "rb") as handle:
        return tomllib.load(handle)


RAW_MATRIX = _load("tier_matrix.toml")
RAW_ROUTES = _load("routes.toml")


# --------------------------------------------------------------------------- the reference


def _implied(names: list[str]) -> set[str]:
    """``names`` with everything they imply (Advanced Shipment Optimization implies Basic)."""
    result: set[str] = set()
    stack = list(names)
    while stack:
        name = stack.pop()
        if name not in result:
            result.add(name)
            stack.extend(RAW_MATRIX["features"][name].get("implies", []))
    return result


def _tier_features(name: str) -> set[str]:
    spec = RAW_MATRIX["tiers"][name]
    own = _implied(spec.get("features", []))
    parent = spec.get("inherits")
    return own | _tier_features(parent) if parent else own


TIERS: list[str] = sorted(RAW_MATRIX["tiers"], key=lambda name: RAW_MATRIX["tiers"][name]["rank"])
TIER_FEATURES: dict[str, set[str]] = {tier: _tier_features(tier) for tier in TIERS}
ADDON_FEATURES: dict[str, set[str]] = {
    name: _implied(spec["features"]) for name, spec in RAW_MATRIX["addons"].items()
}
ALL_FEATURES: set[str] = set(RAW_MATRIX["features"])


def addon_combinations(tier: str) -> list[tuple[str, ...]]:
    """What a tier can buy: nothing, each available add-on alone, and all of them together."""
    available = sorted(
        name for name, spec in RAW_MATRIX["addons"].items() if tier in spec["available_to"]
    )
    combinations: list[tuple[str, ...]] = [()]
    combinations += [(name,) for name in available]
    if len(available) > 1:
        combinations.append(tuple(available))
    return combinations


def expected_allowed(feature: str | None, tier: str, addons: tuple[str, ...]) -> bool:
    if feature is None:
        return True
    granted = set(TIER_FEATURES[tier])
    for addon in addons:
        granted |= ADDON_FEATURES[addon]
    return feature in granted


# --------------------------------------------------------------------------- requests


def concrete_path(pattern: str) -> str:
    """A request path for ``pattern``: "1" for ``{name}``, "a/b" for ``{name:path}``."""
    path = re.sub(r"\{[A-Za-z_][A-Za-z0-9_]*:path\}", "a/b", pattern)
    return re.sub(r"\{[A-Za-z_][A-Za-z0-9_]*\}", "1", path)


def method_of(route: dict[str, Any]) -> str:
    methods: list[str] = route.get("methods", ["GET"])
    return methods[0]


def role_for(route: dict[str, Any]) -> str:
    """A role the route admits: "standard" where every role may call it."""
    roles: list[str] | None = route.get("roles")
    if roles is None:
        return "standard"
    assert set(roles) <= set(ROLES)
    return roles[0]


def license_for(tier: str, addons: tuple[str, ...]) -> License:
    claims = LicenseClaims(
        iss="tests",
        sub="tenant-1",
        jti="lic-1",
        iat=NOW - 86400,
        nbf=NOW - 86400,
        exp=NOW + 86400,
        tier=tier,
        serial=1,
        addons=addons,
    )
    return License(claims, kid="test", fingerprint="-")


ROUTES: list[dict[str, Any]] = RAW_ROUTES["routes"]
GATED = [route for route in ROUTES if route.get("feature") is not None]


def route_id(index: int, route: dict[str, Any]) -> str:
    return f"{route['app']}:{method_of(route)}:{route['path']}#{index}"


def cases() -> Iterator[Any]:
    for index, route in enumerate(ROUTES):
        if route.get("public"):
            continue
        for tier in TIERS:
            for addons in addon_combinations(tier):
                label = "+".join((tier, *addons))
                yield pytest.param(index, tier, addons, id=f"{route_id(index, route)}-{label}")


def lookup(route_table: RouteTable, index: int) -> RouteMatch:
    """The table's answer for a concrete request to ``routes[index]``: that very route."""
    raw = ROUTES[index]
    method, path = method_of(raw), concrete_path(raw["path"])
    found = route_table.match(raw["app"], method, path)
    assert found.kind is Match.FULL, f"{method} {path} does not reach routes[{index}]"
    assert found.route is not None
    assert found.route.key == f"routes[{index}]", f"{method} {path} reached {found.route.key}"
    assert found.route.path == raw["path"] and found.route.feature == raw.get("feature")
    return found


@pytest.fixture(scope="module")
def policy(matrix: TierMatrix) -> Policy:
    return Policy(matrix=matrix)


def run(
    policy: Policy, route_table: RouteTable, index: int, tier: str, addons: tuple[str, ...]
) -> Decision:
    raw = ROUTES[index]
    found = lookup(route_table, index)
    unmatched = route_table.apps[raw["app"]].unmatched
    return decide(policy, found, unmatched, license_for(tier, addons), None, role_for(raw), NOW)


# --------------------------------------------------------------------------- the generated test


@pytest.mark.parametrize(("index", "tier", "addons"), list(cases()))
def test_route_tier_addons(
    policy: Policy, route_table: RouteTable, index: int, tier: str, addons: tuple[str, ...]
) -> None:
    feature: str | None = ROUTES[index].get("feature")
    decision = run(policy, route_table, index, tier, addons)
    if expected_allowed(feature, tier, addons):
        assert decision.allowed, decision.detail
        assert (decision.status, decision.code) == (200, "allowed")
        assert decision.feature == feature and decision.tier == tier
        assert decision.entitlement is not None
        if feature is not None:
            assert feature in decision.entitlement.features_header.split(",")
    else:
        assert not decision.allowed
        assert (decision.status, decision.code) == (403, "feature_not_entitled")
        assert decision.feature == feature and decision.tier == tier


def test_every_gated_route_was_walked() -> None:
    walked = {index for index, _, _ in (case.values for case in cases())}
    gated = {index for index, route in enumerate(ROUTES) if route.get("feature") is not None}
    assert gated and gated <= walked  # 100 % of the gated routes
    public = {index for index, route in enumerate(ROUTES) if route.get("public")}
    assert walked | public == set(range(len(ROUTES)))


def test_every_compiled_route_is_in_the_walk(route_table: RouteTable) -> None:
    compiled = {route.key for route in route_table.routes()}
    assert compiled == {f"routes[{index}]" for index in range(len(ROUTES))}


def test_public_routes_need_nothing(route_table: RouteTable, policy: Policy) -> None:
    for index, raw in enumerate(ROUTES):
        if not raw.get("public"):
            continue
        decision = decide(policy, lookup(route_table, index), "deny", None, None, None, NOW)
        assert decision.allowed and decision.code == "public", raw["path"]


def test_add_on_combinations_are_what_each_tier_can_buy() -> None:
    assert addon_combinations("enterprise") == [()]
    assert ("route_distribution",) in addon_combinations("core")
    assert ("personalized_url",) not in addon_combinations("core")
    assert ("personalized_url",) in addon_combinations("fleet")
    assert addon_combinations("fleet")[-1] == (
        "advanced_shipment_optimization",
        "emergency_support",
        "multi_region_ha",
        "personalized_url",
        "soc2_end_to_end",
    )


def test_the_reference_agrees_with_the_product_table() -> None:
    """A few cells of docs/design.md §3's table, so the reference itself is anchored."""
    assert TIERS == ["core", "fleet", "enterprise"]
    assert TIER_FEATURES["enterprise"] == ALL_FEATURES
    assert "ops.basic_shipment_optimization" not in TIER_FEATURES["core"]
    assert "ops.basic_shipment_optimization" in ADDON_FEATURES["advanced_shipment_optimization"]
    assert "portal.personalized_url" not in TIER_FEATURES["fleet"]
    assert ADDON_FEATURES["route_distribution"] >= {
        "ops.route_distribution",
        "portal.route_distribution",
        "driver.route_distribution",
    }


# --------------------------------------------------------------------------- matrix ⊆ routes


def test_every_matrix_feature_has_a_route() -> None:
    routed = {route["feature"] for route in GATED}
    assert sorted(ALL_FEATURES - routed) == []


def test_every_gated_feature_routes_in_its_own_app() -> None:
    for route in GATED:
        assert RAW_MATRIX["features"][route["feature"]]["app"] == route["app"], route["path"]


def test_every_feature_above_the_lowest_tier_is_reachable(
    policy: Policy, route_table: RouteTable
) -> None:
    """For each tier above the lowest, each feature it adds has a route that the tier is
    allowed and the lowest tier (without add-ons) is refused."""
    lowest = TIERS[0]
    missing: list[str] = []
    for tier in TIERS[1:]:
        for feature in sorted(TIER_FEATURES[tier] - TIER_FEATURES[lowest]):
            reachable = False
            for index, route in enumerate(ROUTES):
                if route.get("feature") != feature:
                    continue
                upper = run(policy, route_table, index, tier, ())
                base = run(policy, route_table, index, lowest, ())
                if upper.allowed and base.code == "feature_not_entitled":
                    reachable = True
                    break
            if not reachable:
                missing.append(f"{tier}:{feature}")
    assert missing == []


def test_each_tier_strictly_adds_features() -> None:
    for lower, higher in itertools.pairwise(TIERS):
        assert TIER_FEATURES[lower] < TIER_FEATURES[higher]
