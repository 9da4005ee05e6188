"""Spellings of a gated path that lenient upstream routers send to the gated handler, through
the running gateway: a catch-all's bare prefix, case variants (``path_case``) and suffix
variants (not matched: they follow the app's ``unmatched`` policy, as the guides say)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from gateway.routes import Match, RouteTable
from tests.conftest import IssueKey
from tests.harness import EchoUpstream, Gateway, running_gateway

REPO = Path(__file__).resolve().parent.parent


async def fetch(
    client: aiohttp.ClientSession, url: str, key: str, method: str = "GET"
) -> tuple[int, dict[str, Any]]:
    async with client.request(method, url, headers={"X-License-Key": key}) as response:
        body = await response.json(content_type=None)
        return response.status, body


@pytest.fixture
async def folding_gateway(
    tmp_path: Path, key_dir: Path, upstream_ports: dict[str, int]
) -> AsyncIterator[Gateway]:
    """The shipped tables, every app with ``path_case = "insensitive"``."""
    extra = 'path_case = "insensitive"\n'
    async with running_gateway(tmp_path, key_dir, upstream_ports, app_extra=extra) as running:
        yield running


@pytest.mark.parametrize("path", ["/api/v1/phi", "/api/v1/phi/", "/api/v1/phi/records/7"])
async def test_catchall_route_gates_its_bare_prefix_through_the_proxy(
    gateway: Gateway,
    client: aiohttp.ClientSession,
    issue_key: IssueKey,
    upstreams: dict[str, EchoUpstream],
    path: str,
) -> None:
    status, body = await fetch(client, gateway.url("operations", path), issue_key(tier="fleet"))
    assert status == 403, body
    assert (body["code"], body["feature"]) == ("feature_not_entitled", "ops.health_data_protection")
    assert upstreams["operations"].requests == []
    status, _ = await fetch(client, gateway.url("operations", path), issue_key(tier="enterprise"))
    assert status == 200


@pytest.mark.parametrize(
    "path", ["/API/v1/itineraries", "/api/V1/Itineraries/7", "/Api/v1/PHI", "/api/v1/phi/X"]
)
async def test_case_variant_of_a_gated_path_is_gated_when_path_case_is_insensitive(
    folding_gateway: Gateway,
    client: aiohttp.ClientSession,
    issue_key: IssueKey,
    upstreams: dict[str, EchoUpstream],
    path: str,
) -> None:
    url = folding_gateway.url("operations", path)
    status, body = await fetch(client, url, issue_key(tier="core"))
    assert status == 403 and body["code"] == "feature_not_entitled", body
    assert upstreams["operations"].requests == []
    status, seen = await fetch(client, url, issue_key(tier="enterprise"))
    assert status == 200
    assert seen["path"] == path  # the upstream gets the client's spelling, not the fold


async def test_case_variant_is_unmatched_on_a_case_sensitive_app(
    gateway: Gateway, client: aiohttp.ClientSession, issue_key: IssueKey
) -> None:
    """The default: ``/API/...`` is another path, decided by the unmatched policy (allow
    on Operations: a valid license, no feature) — the reason for ``path_case``."""
    url = gateway.url("operations", "/API/v1/itineraries")
    status, _ = await fetch(client, url, issue_key(tier="core"))
    assert status == 200
    status, body = await fetch(
        client, gateway.url("driver_app", "/API/v1/jobs"), issue_key(tier="enterprise")
    )
    assert (status, body["code"]) == (403, "route_unmatched")


async def test_suffix_variant_is_not_gated_by_accident_and_follows_the_unmatched_policy(
    gateway: Gateway,
    client: aiohttp.ClientSession,
    issue_key: IssueKey,
    route_table: RouteTable,
) -> None:
    """``/api/v1/itineraries.json`` is not ``/api/v1/itineraries``: the gateway does no
    suffix matching, so on an ``unmatched = "allow"`` app it passes with any license. An
    upstream that strips suffixes (older Spring) needs ``unmatched = "deny"``; both guides
    say so, naming this path."""
    assert route_table.match("operations", "GET", "/api/v1/itineraries.json").kind is Match.NONE
    key = issue_key(tier="core")
    status, _ = await fetch(client, gateway.url("operations", "/api/v1/itineraries.json"), key)
    assert status == 200  # not gated: documented, not accidental
    status, body = await fetch(client, gateway.url("operations", "/api/v1/itineraries"), key)
    assert (status, body["code"]) == (403, "feature_not_entitled")
    deny = issue_key(tier="enterprise")
    status, body = await fetch(client, gateway.url("driver_app", "/api/v1/jobs.json"), deny)
    assert (status, body["code"]) == (403, "route_unmatched")
    for guide in ("docs/route-authoring.md", "docs/security.md"):
        text = (REPO / guide).read_text()
        assert "/api/v1/itineraries.json" in text and 'unmatched = "deny"' in text, guide
