"""Identity through a real gateway: the acceptance checks of README, Identity, run against a
running ``Runtime`` with real upstreams and a real JWKS endpoint: the relay captures the
peer and the bearer token, the enforcer identifies, and untrusted identity headers never
reach the upstream."""

from __future__ import annotations

import logging
from pathlib import Path

import aiohttp
import pytest

from tests.conftest import IssueKey
from tests.harness import EchoUpstream, running_gateway
from tests.idp import AUDIENCE, ISSUER, IdentityProvider, make_key

HEADERS_MODE = '\n[identity]\nmode = "headers"\ntrusted_peers = ["10.9.9.9/32"]\n'
SEED = '\n[store]\nurl = "memory://"\nseed = "tenants.toml"\n'


def seed(folder: Path, tenant: str, key: str) -> None:
    (folder / "tenants.toml").write_text(f'[[tenants]]\nid = "{tenant}"\nkeys = ["{key}"]\n')


async def test_a_tenant_header_from_an_untrusted_peer_is_401_identity_untrusted(
    tmp_path: Path,
    key_dir: Path,
    upstream_ports: dict[str, int],
    client: aiohttp.ClientSession,
    issue_key: IssueKey,
) -> None:
    seed(tmp_path, "acme", issue_key(tier="enterprise", sub="acme"))
    extra = SEED + HEADERS_MODE
    async with running_gateway(tmp_path, key_dir, upstream_ports, extra=extra) as gw:
        headers = {"X-Tenant-Id": "acme"}
        async with client.get(gw.url("operations", "/api/v1/phi/a"), headers=headers) as response:
            body = await response.json(content_type=None)
        assert (response.status, body.get("code")) == (401, "identity_untrusted")


async def test_a_role_header_from_an_untrusted_peer_does_not_pass_an_admin_only_route(
    tmp_path: Path,
    key_dir: Path,
    upstream_ports: dict[str, int],
    upstreams: dict[str, EchoUpstream],
    client: aiohttp.ClientSession,
    issue_key: IssueKey,
) -> None:
    headers = {
        "X-License-Key": issue_key(tier="core", sub="acme"),
        "X-Tenant-Id": "acme",
        "X-User-Role": "admin",
    }
    async with running_gateway(tmp_path, key_dir, upstream_ports, extra=HEADERS_MODE) as gw:
        url = gw.url("operations", "/api/v1/account/billing")
        async with client.get(url, headers=headers) as response:
            body = await response.json(content_type=None)
        assert (response.status, body.get("code")) == (403, "role_forbidden")
        async with client.get(gw.url("operations", "/api/v1/shipments"), headers=headers) as ok:
            assert ok.status == 200
        seen = upstreams["operations"].requests[-1]["headers"]
        assert not {"X-Tenant-Id", "X-User-Role"} & set(seen), "spoofed headers forwarded"


async def test_a_license_for_another_tenant_than_the_identified_one_is_403(
    tmp_path: Path,
    key_dir: Path,
    upstream_ports: dict[str, int],
    client: aiohttp.ClientSession,
    issue_key: IssueKey,
) -> None:
    extra = '\n[identity]\nmode = "headers"\ntrusted_peers = ["127.0.0.1", "::1"]\n'
    headers = {"X-License-Key": issue_key(tier="fleet", sub="other"), "X-Tenant-Id": "acme"}
    async with running_gateway(tmp_path, key_dir, upstream_ports, extra=extra) as gw:
        async with client.get(
            gw.url("operations", "/api/v1/shipments"), headers=headers
        ) as response:
            body = await response.json(content_type=None)
        assert (response.status, body.get("code")) == (403, "tenant_mismatch")


async def test_a_verified_token_unlocks_its_tenants_plan_and_an_unknown_key_does_not(
    tmp_path: Path,
    key_dir: Path,
    upstream_ports: dict[str, int],
    client: aiohttp.ClientSession,
    issue_key: IssueKey,
) -> None:
    seed(tmp_path, "acme", issue_key(tier="enterprise", sub="acme"))
    provider = IdentityProvider()
    signing = make_key("ES256", "idp-1")
    provider.publish(signing)
    await provider.start()
    extra = SEED + (
        f'\n[identity]\nmode = "jwt"\njwks_url = "{provider.url}"\n'
        f'issuer = "{ISSUER}"\naudience = "{AUDIENCE}"\n'
    )
    try:
        async with running_gateway(tmp_path, key_dir, upstream_ports, extra=extra) as gw:
            url = gw.url("operations", "/api/v1/phi/a")
            bearer = {"Authorization": "Bearer " + provider.token(signing, tenant="acme")}
            async with client.get(url, headers=bearer) as response:
                assert response.status == 200
            forged = provider.token(make_key("ES256", "not-the-idp"), tenant="acme")
            async with client.get(url, headers={"Authorization": "Bearer " + forged}) as response:
                body = await response.json(content_type=None)
            assert (response.status, body.get("code")) == (401, "identity_invalid")
    finally:
        await provider.stop()


async def test_start_up_warns_without_an_identity_section(
    tmp_path: Path,
    key_dir: Path,
    upstream_ports: dict[str, int],
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.WARNING):
        async with running_gateway(tmp_path, key_dir, upstream_ports):
            pass
    assert any("headers trusted from any peer" in r.getMessage() for r in caplog.records)
