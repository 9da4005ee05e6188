"""The enforcer with ``[identity]``: who is asking decides before any license check, untrusted
identity headers are never forwarded, and every refusal leaves one event a support engineer
can find by the request id the client saw (README, Identity and Events)."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from gateway.config import Config, load_config
from gateway.enforcer import FORWARD, NEED_TENANT, RESPOND
from gateway.license import fingerprint
from tests.conftest import IssueKey
from tests.enforcing import EnforcerWorld, WorldFactory, body
from tests.idp import AUDIENCE, ISSUER, IdentityProvider, SigningKey, make_key

HEADERS = '\n[identity]\nmode = "headers"\ntrusted_peers = ["10.9.9.9/32"]\n'
IDENTITY_HEADERS = frozenset({b"x-tenant-id", b"x-user-id", b"x-user-role"})


def configured(config_dir: Path, extra: str) -> Config:
    path = config_dir / "gateway.toml"
    path.write_text(path.read_text() + extra)
    return load_config(path)


@pytest.fixture
def headers_world(config_dir: Path, make_world: WorldFactory) -> EnforcerWorld:
    return make_world(configured(config_dir, HEADERS))


# ------------------------------------------------------------------ headers mode


async def test_a_tenant_header_alone_from_an_untrusted_peer_is_401_identity_untrusted(
    headers_world: EnforcerWorld,
) -> None:
    world = headers_world
    head = world.head("GET", "/api/v1/shipments", tenant="acme", request_id="r-untrusted")
    verdict = await world.decide("operations", head)
    assert (verdict.status, body(verdict)["code"]) == (401, "identity_untrusted")
    [event] = world.events("identity_untrusted")
    assert (event["request_id"], event["code"], event["app"]) == (
        "r-untrusted",
        "identity_untrusted",
        "operations",
    )
    assert event["route"] == "/api/v1/shipments" and event["route_name"] == "ops.shipments"


async def test_identity_headers_of_an_untrusted_peer_count_for_nothing_and_are_stripped(
    headers_world: EnforcerWorld, issue_key: IssueKey
) -> None:
    world = headers_world
    key = issue_key(sub="acme", tier="enterprise")
    spoofed: dict[str, Any] = {"key": key, "tenant": "acme", "role": "admin", "user": "mallory"}
    billing = await world.decide(
        "operations", world.head("GET", "/api/v1/account/billing", **spoofed)
    )
    assert (billing.status, body(billing)["code"]) == (403, "role_forbidden")
    allowed = await world.decide("operations", world.head("GET", "/api/v1/shipments", **spoofed))
    assert allowed.kind == FORWARD and allowed.strip == IDENTITY_HEADERS
    trusted = world.head("GET", "/api/v1/account/billing", peer=b"10.9.9.9", **spoofed)
    verdict = await world.decide("operations", trusted)
    assert (verdict.kind, verdict.strip) == (FORWARD, frozenset())


async def test_a_trusted_tenant_header_with_another_tenants_key_is_403_tenant_mismatch(
    headers_world: EnforcerWorld, issue_key: IssueKey
) -> None:
    world = headers_world
    key = issue_key(sub="globex", tier="fleet")
    head = world.head("GET", "/api/v1/shipments", key=key, tenant="acme", peer=b"10.9.9.9")
    verdict = await world.decide("operations", head)
    assert (verdict.status, body(verdict)["code"]) == (403, "tenant_mismatch")
    [event] = world.events("tenant_mismatch")
    assert (event["tenant"], event["key_tenant"], event["verified"]) == ("acme", "globex", True)
    assert event["key_fingerprint"] == fingerprint(key)


async def test_a_public_route_needs_no_identity_but_gets_no_untrusted_headers(
    headers_world: EnforcerWorld,
) -> None:
    world = headers_world
    head = world.head("GET", "/api/v1/health", tenant="acme", role="admin")
    verdict = await world.decide("operations", head)
    assert (verdict.outcome, verdict.strip) == ("public", IDENTITY_HEADERS)


# ------------------------------------------------------------------ jwt mode


@pytest.fixture
async def provider() -> AsyncIterator[tuple[IdentityProvider, SigningKey]]:
    idp = IdentityProvider()
    signing = make_key("ES256", "idp-1")
    idp.publish(signing)
    await idp.start()
    yield idp, signing
    await idp.stop()


async def test_a_verified_token_decides_the_tenant_and_reaches_the_upstream_verified(
    config_dir: Path,
    make_world: WorldFactory,
    issue_key: IssueKey,
    provider: tuple[IdentityProvider, SigningKey],
) -> None:
    idp, signing = provider
    extra = (
        f'\n[identity]\nmode = "jwt"\njwks_url = "{idp.url}"\nissuer = "{ISSUER}"\n'
        f'audience = "{AUDIENCE}"\njwks_min_refresh_seconds = 0\n'
    )
    world = make_world(configured(config_dir, extra))
    await world.shared.identifier.start()
    try:
        await world.store.put_license(issue_key(sub="acme", tier="enterprise"))
        token = b"Bearer " + idp.token(signing, tenant="acme", sub="u7", role="admin").encode()
        phi = world.head("GET", "/api/v1/phi/a", token=token, tenant="evil", role="owner")
        verdict = await world.decide("operations", phi)
        assert (verdict.kind, verdict.tenant, verdict.tier) == (FORWARD, "acme", "enterprise")
        assert verdict.strip == IDENTITY_HEADERS
        assert b"X-Tenant-Id: acme\r\n" in verdict.upstream_headers
        assert b"X-User-Role: admin\r\n" in verdict.upstream_headers
        forged = idp.token(make_key("ES256", "not-the-idp"), tenant="acme").encode()
        head = world.head("GET", "/api/v1/phi/a", token=b"Bearer " + forged)
        assert world.enforcer("operations").check(head).kind == NEED_TENANT  # refresh keys
        again = world.head("GET", "/api/v1/phi/a", token=b"Bearer " + forged)
        refused = await world.decide("operations", again)
        assert (refused.status, body(refused)["code"]) == (401, "identity_invalid")
        assert "unknown kid 'not-the-idp'" in body(refused)["detail"]
        missing = await world.decide("operations", world.head("GET", "/api/v1/phi/a"))
        assert body(missing)["detail"] == "missing bearer token (Authorization)"
        health = await world.decide("operations", world.head("GET", "/api/v1/health"))
        assert (health.outcome, health.strip) == ("public", IDENTITY_HEADERS)
        assert len(world.events("identity_invalid")) == 2
    finally:
        await world.shared.identifier.stop()


# ------------------------------------------------------------------ every refusal, traceable


def _only(world: EnforcerWorld, kind: str) -> dict[str, Any]:
    found = world.events(kind)
    assert len(found) == 1, found
    return found[0]


async def test_every_refusal_emits_one_event_with_the_request_id_the_client_saw(
    config: Config, make_world: WorldFactory, issue_key: IssueKey
) -> None:
    world = make_world(config)
    fleet = issue_key(sub="acme", tier="fleet")
    cases: list[tuple[Any, str, str, str, str | None, str]] = [
        ("operations", "GET", "/api/v1/account/billing", fleet, "standard", "role_forbidden"),
        ("driver_app", "GET", "/internal/debug", fleet, None, "route_unmatched"),
        ("operations", "GET", "/api/v1/a;b", fleet, None, "path_rejected"),
        ("operations", "POST", "/api/v1/phi/a", fleet, None, "feature_block"),
    ]
    for n, (app, method, target, key, role, kind) in enumerate(cases):
        head = world.head(method, target, key=key, role=role, request_id=f"rid-{n}")
        verdict = await world.decide(app, head)
        assert verdict.kind == RESPOND
        event = _only(world, kind)
        assert event["request_id"] == body(verdict)["request_id"] == f"rid-{n}"
        assert event["app"] == app and event["code"] == body(verdict)["code"]
    refusal = _only(world, "role_forbidden")
    assert refusal["allowed_roles"] == ["owner", "admin"] and refusal["route_name"]
    assert refusal["verified"] is True and refusal["license_state"] == "valid"
    unmatched = await world.decide("driver_app", world.head("GET", "/internal/debug", key=fleet))
    assert "routes.toml" not in unmatched.body.decode()


async def test_role_forbidden_says_which_roles_may_call(
    config: Config, make_world: WorldFactory, issue_key: IssueKey
) -> None:
    world = make_world(config)
    head = world.head("PUT", "/api/v1/account/billing", key=issue_key(), role="standard")
    answer = body(await world.decide("operations", head))
    assert answer["allowed_roles"] == ["owner", "admin"]
    assert "allowed: owner, admin" in answer["detail"]


async def test_a_key_that_fails_verification_is_reported_with_what_it_claims(
    config: Config, make_world: WorldFactory, issue_key: IssueKey
) -> None:
    world = make_world(config)
    header, payload, signature = issue_key(sub="acme", tier="fleet").split(".")
    forged = f"{header}.{payload}.{signature[:-4]}AAAA"
    head = world.head("GET", "/api/v1/shipments", key=forged, request_id="r-forged")
    verdict = await world.decide("operations", head)
    assert body(verdict)["code"] == "license_bad_signature"
    event = _only(world, "license_invalid")
    assert (event["tenant"], event["kid"], event["verified"]) == ("acme", "test", False)
    assert event["key_fingerprint"] == fingerprint(forged) and event["request_id"] == "r-forged"


async def test_a_lapsed_license_says_its_state_and_expiry_in_the_body_and_the_event(
    config: Config, make_world: WorldFactory, issue_key: IssueKey
) -> None:
    world = make_world(config)
    long_ago = int(time.time()) - 60 * 86400
    key = issue_key(tier="fleet", iat=long_ago - 86400, nbf=long_ago - 86400, exp=long_ago)
    head = world.head("POST", "/api/v1/shipments/1/optimize", key=key)  # Fleet, not Core
    answer = body(await world.decide("operations", head))
    assert (answer["code"], answer["tier"], answer["license_state"]) == (
        "feature_not_entitled",
        "core",
        "restricted",
    )
    assert answer["expires_at"] == time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(long_ago))
    event = _only(world, "feature_block")
    assert (event["license_state"], event["expires_at"]) == ("restricted", answer["expires_at"])


async def test_an_addon_the_tier_cannot_buy_grants_nothing_and_is_reported_once(
    config: Config, make_world: WorldFactory, issue_key: IssueKey
) -> None:
    world = make_world(config)
    # personalized_url is sold to Fleet only; sms_messaging to Core.
    key = issue_key(sub="acme", tier="core", addons=("personalized_url", "sms_messaging"))
    for _ in range(2):
        verdict = await world.decide("operations", world.head("GET", "/api/v1/shipments", key=key))
        assert verdict.kind == FORWARD
    assert b"X-Entitlement-Addons: sms_messaging\r\n" in verdict.upstream_headers
    event = _only(world, "license_invalid")
    assert (event["code"], event["addons"], event["tenant"]) == (
        "addon_not_available",
        ["personalized_url"],
        "acme",
    )


async def test_refusal_events_are_sampled_per_second(
    config: Config, make_world: WorldFactory
) -> None:
    world = make_world(config, per_second=2)
    for n in range(10):
        await world.decide("operations", world.head("GET", f"/api/v1/{n};x"))
    assert len(world.events("path_rejected")) == 2
    assert world.sample("gateway_events_dropped_total", sink="file") == 8
