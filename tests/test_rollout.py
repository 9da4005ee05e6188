"""Rolling enforcement out (README, Rolling out): shadow and off modes, the cohort enforced on
a shadow app, a candidate configuration decided alongside, host-based features, and the
requests no route matched."""

from __future__ import annotations

import re
from pathlib import Path

import aiohttp
import pytest

from gateway.cli import main
from gateway.config import Config, load_config
from gateway.enforcer import FORWARD, RESPOND
from gateway.errors import ConfigError
from gateway.rollout import path_shape
from tests.conftest import IssueKey
from tests.enforcing import WorldFactory, body
from tests.harness import EchoUpstream, running_gateway, write_candidate_matrix

OPTIMIZE = "/api/v1/shipments/7/optimize"  # ops.basic_shipment_optimization: Fleet and up


def configured(config_dir: Path, **apps: str) -> Config:
    """The shipped config with lines added to ``[apps.<name>]`` (and ``extra`` at the end)."""
    path = config_dir / "gateway.toml"
    text = path.read_text()
    extra = apps.pop("extra", "")
    for app, lines in apps.items():
        text = text.replace(f"[apps.{app}]\n", f"[apps.{app}]\n{lines}\n")
    path.write_text(text + extra)
    return load_config(path)


# ------------------------------------------------------------------ shadow, cohort, off


async def test_shadow_forwards_what_on_would_block_and_reports_it(
    config_dir: Path, make_world: WorldFactory, issue_key: IssueKey
) -> None:
    world = make_world(configured(config_dir, operations='enforce = "shadow"'))
    head = world.head("POST", OPTIMIZE, key=issue_key(sub="acme", tier="core"), request_id="s1")
    verdict = await world.decide("operations", head)
    assert (verdict.kind, verdict.outcome, verdict.code) == (
        FORWARD,
        "shadow_blocked",
        "feature_not_entitled",
    )
    assert b"X-Entitlement-Tier: core\r\n" in verdict.upstream_headers
    assert verdict.response_headers == b""  # no X-License-Warning
    [event] = world.events("feature_block")
    assert (event["shadow"], event["request_id"], event["tenant"]) == (True, "s1", "acme")
    labels = {"app": "operations", "feature": "ops.basic_shipment_optimization", "tier": "core"}
    assert world.sample("gateway_shadow_block_total", **labels) == 1
    assert world.sample("gateway_feature_block_total", **labels) == 0
    unlicensed = await world.decide("operations", world.head("POST", OPTIMIZE))
    assert (unlicensed.kind, unlicensed.outcome, unlicensed.upstream_headers) == (
        FORWARD,
        "shadow_blocked",
        b"",
    )


async def test_tenants_in_enforce_tenants_are_enforced_on_a_shadow_app(
    config_dir: Path, make_world: WorldFactory, issue_key: IssueKey
) -> None:
    cohort = '\n[rollout]\nenforce_tenants = ["acme"]\n'
    world = make_world(configured(config_dir, operations='enforce = "shadow"', extra=cohort))
    acme = world.head("POST", OPTIMIZE, key=issue_key(sub="acme", tier="core"))
    assert (await world.decide("operations", acme)).status == 403
    globex = world.head("POST", OPTIMIZE, key=issue_key(sub="globex", tier="core"))
    assert (await world.decide("operations", globex)).outcome == "shadow_blocked"


async def test_off_forwards_undecided(
    config_dir: Path, make_world: WorldFactory, issue_key: IssueKey
) -> None:
    world = make_world(configured(config_dir, operations='enforce = "off"'))
    verdict = await world.decide("operations", world.head("POST", OPTIMIZE))
    assert (verdict.kind, verdict.outcome, verdict.upstream_headers) == (
        FORWARD,
        "unenforced",
        b"",
    )
    assert verdict.route == "/api/v1/shipments/{id}/optimize"
    classic = await world.decide("operations", world.head("GET", "/xdispatch/x"))
    assert classic.outcome == "classic"


@pytest.mark.parametrize(
    ("lines", "key", "fragment"),
    [
        pytest.param('enforce = "audit"', "apps.operations.enforce", "audit", id="mode"),
        pytest.param(
            'host_feature = "portal.personalized_url"',
            "apps.operations.host_feature",
            "needs default_hosts",
            id="no-default-hosts",
        ),
        pytest.param(
            'default_hosts = ["a.example"]\nhost_feature = "portal.nope"',
            "apps.operations.host_feature",
            "unknown feature",
            id="unknown-feature",
        ),
        pytest.param(
            'default_hosts = ["a.example"]\nhost_feature = "portal.personalized_url"',
            "apps.operations.host_feature",
            "not a feature of operations",
            id="other-app",
        ),
        pytest.param(
            'default_hosts = ["bad host!"]', "apps.operations.default_hosts", "host", id="host"
        ),
    ],
)
def test_gateway_check_refuses_bad_rollout_settings(
    config_dir: Path, lines: str, key: str, fragment: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        configured(config_dir, operations=lines)
    found = [p for p in caught.value.problems if p.key == key]
    assert found and fragment in found[0].message, caught.value.problems


def test_gateway_check_reads_the_cohort_file_and_the_candidate(config_dir: Path) -> None:
    extra = (
        '\n[rollout]\nenforce_tenants_file = "cohort.txt"\n'
        '[candidate]\ntier_matrix = "tier_matrix.next.toml"\n'
    )
    with pytest.raises(ConfigError) as caught:
        configured(config_dir, extra=extra)
    keys = {p.key for p in caught.value.problems}
    assert "rollout.enforce_tenants_file" in keys
    assert any("tier_matrix.next.toml" in p.file for p in caught.value.problems)


def test_gateway_check_shows_the_modes_the_cohort_and_the_candidate(
    config_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (config_dir / "cohort.txt").write_text("acme\nglobex\n")
    write_candidate_matrix(config_dir)
    extra = (
        '\n[rollout]\nenforce_tenants_file = "cohort.txt"\n'
        '[candidate]\ntier_matrix = "tier_matrix.next.toml"\n'
    )
    config = configured(config_dir, client_portal='enforce = "shadow"', extra=extra)
    assert main(["check", "--config", str(config.path)]) == 0
    out = capsys.readouterr().out
    assert (
        "  enforce           operations=on,client_portal=shadow,driver_app=on; "
        "2 tenants enforced on shadow apps\n"
    ) in out
    assert f"  candidate         tier_matrix.next.toml, revision {config.routes.sha}/" in out


# ------------------------------------------------------------------ a real gateway


async def test_a_tenant_listed_in_the_cohort_file_is_enforced_after_the_reload(
    tmp_path: Path,
    key_dir: Path,
    upstream_ports: dict[str, int],
    upstreams: dict[str, EchoUpstream],
    client: aiohttp.ClientSession,
    issue_key: IssueKey,
) -> None:
    (tmp_path / "cohort.txt").write_text("# first adopters\nglobex\n")
    extra = '\n[rollout]\nenforce_tenants_file = "cohort.txt"\n'
    headers = {"X-License-Key": issue_key(sub="acme", tier="core"), "X-Request-Id": "rq-1"}
    async with running_gateway(
        tmp_path, key_dir, upstream_ports, app_extra='enforce = "shadow"\n', extra=extra
    ) as gw:
        url = gw.url("operations", OPTIMIZE)
        async with client.post(url, headers=headers) as response:
            assert response.status == 200  # from the upstream
        [event] = [e for e in gw.events() if e["event"] == "feature_block"]
        assert event["shadow"] is True
        (tmp_path / "cohort.txt").write_text("globex\nacme\n")
        assert await gw.runtime.reload("test")
        async with client.post(url, headers=headers) as response:
            assert response.status == 403
        async with client.get(gw.admin_url("/metrics")) as response:
            text = await response.text()
        assert re.search(
            r'gateway_requests_total\{app="operations",outcome="shadow_blocked"\} 1', text
        )
        assert 'enforce="operations=shadow,client_portal=shadow,driver_app=shadow"' in text
        async with client.get(gw.admin_url("/admin/config")) as response:
            dump = await response.json()
        assert dump["apps"]["operations"]["enforce"] == "shadow"
        assert dump["rollout"]["enforce_tenants"] == 2
    assert len(upstreams["operations"].requests) == 1


# ------------------------------------------------------------------ candidate


async def test_a_candidate_matrix_is_decided_alongside_and_only_counted(
    config_dir: Path, make_world: WorldFactory, issue_key: IssueKey
) -> None:
    write_candidate_matrix(config_dir)  # basic shipment optimization moves down into Core
    extra = '\n[candidate]\ntier_matrix = "tier_matrix.next.toml"\n'
    world = make_world(configured(config_dir, extra=extra))
    core = issue_key(sub="acme", tier="core")
    verdict = await world.decide("operations", world.head("POST", OPTIMIZE, key=core))
    assert verdict.status == 403  # the live matrix decides
    assert (
        world.sample("gateway_candidate_diff_total", app="operations", change="newly_allowed") == 1
    )
    [diff] = world.events("decision_diff")
    assert (diff["change"], diff["decision"]["code"], diff["candidate"]["code"]) == (
        "newly_allowed",
        "feature_not_entitled",
        "allowed",
    )
    same = await world.decide("operations", world.head("GET", "/api/v1/shipments", key=core))
    assert same.kind == FORWARD and len(world.events("decision_diff")) == 1


# ------------------------------------------------------------------ host features


async def test_a_personalized_host_needs_its_feature(
    config_dir: Path, make_world: WorldFactory, issue_key: IssueKey
) -> None:
    lines = 'default_hosts = ["portal.example.com"]\nhost_feature = "portal.personalized_url"'
    world = make_world(configured(config_dir, client_portal=lines))
    core = issue_key(sub="acme", tier="core")
    on_default = world.head("GET", "/api/v1/orders", key=core, host=b"Portal.Example.com:443")
    assert (await world.decide("client_portal", on_default)).kind == FORWARD
    custom = world.head("GET", "/api/v1/orders", key=core, host=b"acme.example.net")
    refused = await world.decide("client_portal", custom)
    assert (refused.status, body(refused)["feature"]) == (403, "portal.personalized_url")
    assert body(refused)["code"] == "feature_not_entitled"
    enterprise = issue_key(sub="initech", tier="enterprise")
    head = world.head("GET", "/api/v1/orders", key=enterprise, host=b"initech.example.net")
    assert (await world.decide("client_portal", head)).kind == FORWARD


# ------------------------------------------------------------------ unmatched, allowed


async def test_requests_no_route_matched_are_counted_and_sampled_with_their_shape(
    config: Config, make_world: WorldFactory, issue_key: IssueKey
) -> None:
    world = make_world(config)
    head = world.head("GET", "/api/v9/widgets/12345/parts", key=issue_key(), request_id="u1")
    verdict = await world.decide("operations", head)
    assert (verdict.kind, verdict.outcome) == (FORWARD, "unmatched_allowed")
    [event] = world.events("unmatched_allowed")
    assert (event["path_shape"], event["method"], event["request_id"]) == (
        "/api/v9/widgets/{id}/parts",
        "GET",
        "u1",
    )
    assert verdict.kind != RESPOND


@pytest.mark.parametrize(
    ("path", "shape"),
    [
        ("/api/v1/orders/42", "/api/v1/orders/{id}"),
        ("/api/v1/x/550e8400-e29b-41d4-a716-446655440000", "/api/v1/x/{id}"),
        ("/a/deadbeefcafe/b", "/a/{id}/b"),
        ("/a/ord_12ab34/b", "/a/{id}/b"),
        ("/api/v12/items", "/api/v12/items"),
    ],
)
def test_path_shape_replaces_ids(path: str, shape: str) -> None:
    assert path_shape(path) == shape
