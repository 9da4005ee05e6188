"""Every route of the shipped ``routes.toml`` through the running proxy, and the HTTP
contract around it (docs/design.md §5): license sources, header hygiene, Host and X-Forwarded-For,
grace warnings, and what never leaks into events."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import aiohttp
import pytest
from multidict import CIMultiDict

from gateway.matrix import TierMatrix
from gateway.routes import Match, Route, RouteTable
from tests.conftest import IssueKey
from tests.harness import EchoUpstream, Gateway, running_gateway

CLASSIC_KEY = "ABCDE-12345-FGHIJ-67890-KLMNO"
PROBLEM_JSON = "application/problem+json"
UPGRADE_URL = "/_entitlements/ui"
UPSELL_FIELDS = ("required_tier", "addon", "upgrade")

_PARAM = re.compile(r"\{[A-Za-z_][A-Za-z0-9_]*(:path)?\}")


# --------------------------------------------------------------------------- fixtures


# --------------------------------------------------------------------------- helpers


def concrete_path(pattern: str) -> str:
    """A path the pattern matches: ``{x}`` → ``1``, ``{x:path}`` → ``a/b``."""
    return _PARAM.sub(lambda m: "a/b" if m.group(1) else "1", pattern)


def method_for(route: Route) -> str:
    if route.methods is None or "GET" in route.methods:
        return "GET"
    return sorted(route.methods)[0]


def role_for(route: Route) -> str:
    if route.roles is None or "owner" in route.roles:
        return "owner"
    return sorted(route.roles)[0]


def request_for(route_table: RouteTable, route: Route) -> tuple[str, str]:
    """(method, path) that the route table resolves to exactly ``route``."""
    method, path = method_for(route), concrete_path(route.path)
    found = route_table.apps[route.app].match(method, path)
    assert found.kind is Match.FULL and found.route is not None, (route.key, method, path)
    assert found.route.key == route.key, f"{path} resolves to {found.route.key}, not {route.key}"
    return method, path


def lowest_tier_with(matrix: TierMatrix, feature: str) -> str | None:
    for name in matrix.tiers:  # rank order
        if feature in matrix.entitlement(name).features:
            return name
    return None


def addons_unlocking(matrix: TierMatrix, tier: str, feature: str) -> set[str]:
    return {
        name
        for name, addon in matrix.addons.items()
        if tier in addon.available_to and feature in matrix.entitlement(tier, (name,)).features
    }


async def raw_exchange(port: int, request: bytes) -> tuple[int, dict[str, str], bytes]:
    """Send exact bytes, read one response (status, lower-cased headers, body)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        await writer.drain()
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        status_line, *lines = head.decode("latin-1").split("\r\n")
        headers: dict[str, str] = {}
        for line in lines:
            if line:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
        length = int(headers.get("content-length", "0"))
        body = await asyncio.wait_for(reader.readexactly(length), 10)
        return int(status_line.split()[1]), headers, body
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


def entitlement_headers(seen: dict[str, Any]) -> dict[str, str]:
    return {
        name: value
        for name, value in seen["headers"].items()
        if name.lower().startswith("x-entitlement-")
    }


# --------------------------------------------------------------------------- the table


async def test_every_gated_route_for_every_tier(
    gateway: Gateway,
    client: aiohttp.ClientSession,
    issue_key: IssueKey,
    matrix: TierMatrix,
    route_table: RouteTable,
) -> None:
    gated = [r for r in route_table.routes() if r.feature is not None and not r.public]
    assert len(gated) > 30, "the shipped routes.toml should gate most endpoints"
    keys = {tier: issue_key(tier=tier, sub=f"tenant-{tier}") for tier in matrix.tiers}
    assert set(keys) == {"core", "fleet", "enterprise"}
    mismatches: list[str] = []
    checked = 0
    for route in gated:
        assert route.feature is not None
        method, path = request_for(route_table, route)
        for tier, key in keys.items():
            label = f"{tier} {route.app} {method} {path} ({route.feature})"
            headers = {"X-License-Key": key, "X-User-Role": role_for(route)}
            async with client.request(
                method, gateway.url(route.app, path), headers=headers
            ) as response:
                status = response.status
                content_type = response.headers.get("Content-Type", "")
                body: dict[str, Any] = await response.json(content_type=None)
            checked += 1
            if route.feature in matrix.entitlement(tier).features:
                if status != 200:
                    mismatches.append(f"{label}: expected 200, got {status} {body}")
                    continue
                problems = []
                if body.get("app") != route.app or body.get("path") != path:
                    problems.append(f"upstream saw {body.get('app')} {body.get('path')}")
                ent = entitlement_headers(body)
                if ent.get("X-Entitlement-Tier") != tier:
                    problems.append(f"X-Entitlement-Tier {ent.get('X-Entitlement-Tier')}")
                if route.feature not in ent.get("X-Entitlement-Features", "").split(","):
                    problems.append("feature missing from X-Entitlement-Features")
                if ent.get("X-Entitlement-Tenant") != f"tenant-{tier}":
                    problems.append(f"X-Entitlement-Tenant {ent.get('X-Entitlement-Tenant')}")
                if problems:
                    mismatches.append(f"{label}: {'; '.join(problems)}")
                continue
            rid = body.get("request_id")
            expected = {
                "status": 403,
                "code": "feature_not_entitled",
                "feature": route.feature,
                "app": route.app,
                "tier": tier,
                "required_tier": lowest_tier_with(matrix, route.feature),
                # the plan page, told which request and feature sent the tenant there
                "upgrade": f"{UPGRADE_URL}?{urlencode({'from': rid, 'feature': route.feature})}",
            }
            actual = {name: body.get(name) for name in expected}
            actual["status"] = status
            if actual != expected or content_type != PROBLEM_JSON:
                mismatches.append(f"{label}: expected {expected}, got {actual} ({content_type})")
            unlocking = addons_unlocking(matrix, tier, route.feature)
            if (body.get("addon") is None) != (not unlocking) or (
                unlocking and body.get("addon") not in unlocking
            ):
                mismatches.append(f"{label}: addon {body.get('addon')}, expected {unlocking}")
    assert checked == len(gated) * 3
    assert not mismatches, "\n".join(mismatches)


async def test_ungated_routes_need_a_license(
    gateway: Gateway,
    client: aiohttp.ClientSession,
    issue_key: IssueKey,
    route_table: RouteTable,
) -> None:
    ungated = [r for r in route_table.routes() if r.feature is None and not r.public]
    assert ungated
    key = issue_key(tier="core")
    mismatches: list[str] = []
    for route in ungated:
        method, path = request_for(route_table, route)
        role = {"X-User-Role": role_for(route)}
        async with client.request(method, gateway.url(route.app, path), headers=role) as response:
            body = await response.json(content_type=None)
            if response.status != 401 or body.get("code") != "license_missing":
                mismatches.append(f"{route.app} {method} {path} without a key: {body}")
        async with client.request(
            method, gateway.url(route.app, path), headers={"X-License-Key": key, **role}
        ) as response:
            if response.status != 200:
                mismatches.append(f"{route.app} {method} {path} with a core key: {response.status}")
    assert not mismatches, "\n".join(mismatches)


async def test_public_routes_need_no_license(
    gateway: Gateway, client: aiohttp.ClientSession, route_table: RouteTable
) -> None:
    public = [r for r in route_table.routes() if r.public]
    assert len(public) >= 6  # health and login on each app
    for route in public:
        method, path = request_for(route_table, route)
        async with client.request(method, gateway.url(route.app, path)) as response:
            assert response.status == 200, (route.app, method, path)
            seen = await response.json()
        assert seen["path"] == path
        assert entitlement_headers(seen) == {}


# --------------------------------------------------------------------------- roles


@pytest.mark.parametrize(
    ("tier", "method", "path", "code"),
    [
        pytest.param(
            "core", "POST", "/api/v1/shipments/1/optimize", "feature_not_entitled", id="feature"
        ),
        pytest.param("fleet", "GET", "/api/v1/account/billing", "role_forbidden", id="role"),
        pytest.param(
            "fleet", "GET", "/api/v1/availability/regions", "feature_not_entitled", id="addon"
        ),
    ],
)
async def test_dispatch_only_role_gets_no_upsell_fields(
    gateway: Gateway,
    client: aiohttp.ClientSession,
    issue_key: IssueKey,
    tier: str,
    method: str,
    path: str,
    code: str,
) -> None:
    headers = {"X-License-Key": issue_key(tier=tier), "X-User-Role": "dispatch_only"}
    async with client.request(method, gateway.url("operations", path), headers=headers) as response:
        assert response.status == 403
        assert response.headers["Content-Type"] == PROBLEM_JSON
        body = await response.json(content_type=None)
    assert body["code"] == code
    if code == "feature_not_entitled":
        assert body["tier"] == tier
    for field in UPSELL_FIELDS:
        assert field not in body, field


# --------------------------------------------------------------------------- tenant store


async def test_tenant_id_alone_is_decided_on_the_stored_license(
    tmp_path: Path,
    key_dir: Path,
    upstream_ports: dict[str, int],
    upstreams: dict[str, EchoUpstream],
    client: aiohttp.ClientSession,
    issue_key: IssueKey,
) -> None:
    fleet_key = issue_key(tier="fleet", sub="acme", serial=7)
    (tmp_path / "tenants.toml").write_text(f'[[tenants]]\nid = "acme"\nkeys = ["{fleet_key}"]\n')
    extra = '\n[store]\nurl = "memory://"\nseed = "tenants.toml"\n'
    async with running_gateway(tmp_path, key_dir, upstream_ports, extra=extra) as gw:
        tenant = {"X-Tenant-Id": "acme"}
        async with client.post(
            gw.url("operations", "/api/v1/shipments/1/optimize"), headers=tenant
        ) as response:
            assert response.status == 200  # fleet has basic optimisation
            seen = await response.json()
        assert entitlement_headers(seen)["X-Entitlement-Tier"] == "fleet"
        assert entitlement_headers(seen)["X-Entitlement-Tenant"] == "acme"

        async with client.get(gw.url("operations", "/api/v1/phi/a/b"), headers=tenant) as response:
            assert response.status == 403
            body = await response.json(content_type=None)
        assert body["code"] == "feature_not_entitled"
        assert (body["tier"], body["required_tier"]) == ("fleet", "enterprise")

        async with client.get(
            gw.url("operations", "/api/v1/shipments"), headers={"X-Tenant-Id": "nobody"}
        ) as response:
            assert response.status == 401
            assert (await response.json(content_type=None))["code"] == "license_missing"
    assert len(upstreams["operations"].requests) == 1
    assert fleet_key not in (tmp_path / "events.jsonl").read_text()


# --------------------------------------------------------------------------- header hygiene


async def test_duplicate_license_headers_are_400(
    gateway: Gateway,
    client: aiohttp.ClientSession,
    issue_key: IssueKey,
    upstreams: dict[str, EchoUpstream],
) -> None:
    key = issue_key(tier="enterprise")
    headers: CIMultiDict[str] = CIMultiDict([("X-License-Key", key), ("X-License-Key", key)])
    async with client.get(
        gateway.url("operations", "/api/v1/shipments"), headers=headers
    ) as response:
        assert response.status == 400
        assert response.headers["Content-Type"] == PROBLEM_JSON
        assert (await response.json(content_type=None))["code"] == "bad_header"
    assert upstreams["operations"].requests == []


@pytest.mark.parametrize(
    ("app", "path", "license_key"),
    [
        pytest.param("operations", "/api/v1/shipments", "tier:core", id="licensed"),
        pytest.param("operations", "/api/v1/shipments/1", CLASSIC_KEY, id="classic-key"),
        pytest.param("client_portal", "/xdispatch/orders", None, id="classic-path"),
        pytest.param("driver_app", "/api/v1/health", None, id="public"),
    ],
)
async def test_inbound_entitlement_headers_never_reach_the_upstream(
    gateway: Gateway,
    client: aiohttp.ClientSession,
    issue_key: IssueKey,
    app: str,
    path: str,
    license_key: str | None,
) -> None:
    headers = {
        "X-Entitlement-Tier": "enterprise",
        "x-entitlement-features": "ops.health_data_protection",
        "X-ENTITLEMENT-TENANT": "someone-else",
        "X-Entitlement-Custom": "spoofed",
    }
    if license_key is not None:
        key = issue_key(tier="core") if license_key == "tier:core" else license_key
        headers["X-License-Key"] = key
    async with client.get(gateway.url(app, path), headers=headers) as response:
        assert response.status == 200
        seen = await response.json()
    assert seen["path"] == path
    forwarded = entitlement_headers(seen)
    if license_key == "tier:core":
        assert forwarded["X-Entitlement-Tier"] == "core"
        assert forwarded["X-Entitlement-Tenant"] == "tenant-1"
        assert "ops.health_data_protection" not in forwarded["X-Entitlement-Features"]
        assert "X-Entitlement-Custom" not in forwarded
    else:
        assert forwarded == {}


async def test_connection_header_naming_the_license_header_does_not_hide_the_key(
    gateway: Gateway, issue_key: IssueKey, upstreams: dict[str, EchoUpstream]
) -> None:
    key = issue_key(tier="fleet")
    status, _, body = await raw_exchange(
        gateway.listen["operations"],
        b"POST /api/v1/shipments/1/optimize HTTP/1.1\r\nHost: ops.example\r\n"
        b"Connection: X-License-Key\r\nX-License-Key: " + key.encode() + b"\r\n"
        b"Content-Length: 0\r\n\r\n",
    )
    assert status == 200, body
    seen = json.loads(body)
    assert entitlement_headers(seen)["X-Entitlement-Tier"] == "fleet"


@pytest.mark.parametrize(
    ("app_extra", "rewritten"),
    [
        pytest.param("", False, id="preserve"),
        pytest.param('host = "rewrite"\n', True, id="rewrite"),
    ],
)
async def test_host_header_preserved_or_rewritten(
    tmp_path: Path,
    key_dir: Path,
    upstream_ports: dict[str, int],
    issue_key: IssueKey,
    app_extra: str,
    rewritten: bool,
) -> None:
    key = issue_key(tier="core")
    async with running_gateway(tmp_path, key_dir, upstream_ports, app_extra=app_extra) as gw:
        for app, path in (("operations", "/api/v1/shipments"), ("driver_app", "/api/v1/health")):
            status, _, body = await raw_exchange(
                gw.listen[app],
                f"GET {path} HTTP/1.1\r\nHost: api.customer.example\r\n"
                f"X-License-Key: {key}\r\nConnection: close\r\n\r\n".encode(),
            )
            assert status == 200
            host = json.loads(body)["headers"]["Host"]
            expected = f"127.0.0.1:{upstream_ports[app]}" if rewritten else "api.customer.example"
            assert host == expected, app


async def test_x_forwarded_for_is_appended(
    gateway: Gateway, client: aiohttp.ClientSession, issue_key: IssueKey
) -> None:
    headers = {"X-License-Key": issue_key(tier="core"), "X-Forwarded-For": "203.0.113.9"}
    async with client.get(
        gateway.url("operations", "/api/v1/shipments"), headers=headers
    ) as response:
        assert response.status == 200
        seen = await response.json()
    assert seen["headers"]["X-Forwarded-For"] == "203.0.113.9, 127.0.0.1"


async def test_expired_key_in_grace_period_carries_a_warning(
    gateway: Gateway, client: aiohttp.ClientSession, issue_key: IssueKey
) -> None:
    now = int(time.time())
    key = issue_key(tier="fleet", iat=now - 30 * 86400, nbf=now - 30 * 86400, exp=now - 86400)
    headers = {"X-License-Key": key}
    async with client.post(
        gateway.url("operations", "/api/v1/shipments/1/optimize"), headers=headers
    ) as response:
        assert response.status == 200  # still fleet during the grace period
        assert "grace" in response.headers["X-License-Warning"]
        seen = await response.json()
    assert entitlement_headers(seen)["X-Entitlement-Tier"] == "fleet"
    fresh = {"X-License-Key": issue_key(tier="fleet")}
    async with client.get(
        gateway.url("operations", "/api/v1/shipments"), headers=fresh
    ) as response:
        assert response.status == 200
        assert "X-License-Warning" not in response.headers


async def test_license_keys_never_appear_in_events(
    gateway: Gateway, client: aiohttp.ClientSession, issue_key: IssueKey
) -> None:
    now = int(time.time())
    core = issue_key(tier="core", sub="acme")
    expired_trial = issue_key(tier="fleet", sub="acme", trial=True, exp=now - 3600)
    header, payload, signature = core.split(".")
    forged = f"{header}.{payload}.{signature[:-4]}AAAA"
    sent = [
        ("POST", "/api/v1/shipments/1/optimize", core),  # feature_block
        ("GET", "/api/v1/shipments", expired_trial),  # license_invalid (expired)
        ("GET", "/api/v1/shipments", forged),  # license_invalid (bad signature)
        ("GET", "/api/v1/shipments", "not-a-key"),  # license_invalid (malformed)
    ]
    for method, path, key in sent:
        async with client.request(
            method, gateway.url("operations", path), headers={"X-License-Key": key}
        ) as response:
            assert response.status in (401, 403)
    events = gateway.events()
    kinds = [event["event"] for event in events]
    assert kinds.count("feature_block") == 1
    assert kinds.count("license_invalid") == 3
    text = (gateway.folder / "events.jsonl").read_text()
    for _, _, key in sent:
        assert key not in text
    for token in (core, expired_trial):
        for part in token.split("."):
            assert part not in text  # not even the signed payload or signature
