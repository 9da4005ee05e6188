"""The tenant's endpoints, answered by the enforcer on every app listener (README, Entitlements
API and plan page): the plan, the page, the clicks, and the funnel they link."""

from __future__ import annotations

import json
import textwrap
import time
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import aiohttp
import pytest

from gateway.cli import main
from gateway.config import Config, load_config, load_rules
from gateway.enforcer import COLLECT, RESPOND, Verdict
from gateway.provision import ProvisionEvent, apply_event
from tests.conftest import GatewayFactory, IssueKey
from tests.enforcing import EnforcerWorld, WorldFactory, body
from tests.harness import Gateway

OPTIMIZATION = "ops.basic_shipment_optimization"


def configured(config_dir: Path, operations: str = "") -> Config:
    path = config_dir / "gateway.toml"
    text = path.read_text().replace("[apps.operations]\n", f"[apps.operations]\n{operations}\n")
    path.write_text(text)
    return load_config(path)


def feature(answer: dict[str, Any], name: str) -> dict[str, Any]:
    found: dict[str, Any] = next(f for f in answer["features"] if f["name"] == name)
    return found


async def get(world: EnforcerWorld, app: Any, target: str, **fields: Any) -> Verdict:
    return await world.decide(app, world.head("GET", target, **fields))


# ------------------------------------------------------------------ GET {prefix}


async def test_a_core_key_through_running_gateways_with_the_shipped_config(
    gateway_factory: GatewayFactory,
    upstream_ports: dict[str, int],
    issue_key: IssueKey,
    client: aiohttp.ClientSession,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The issue's acceptance end to end: the plan hides, then (upsell "tag") locks and tags
    what Core lacks, never upsells to dispatch_only, answers 304 to its ETag; a click lands
    in the events file stamped with tenant and tier, and ``gateway report funnel`` counts it."""
    hiding = await gateway_factory(upstream_ports, shipped=True)
    tagging = await gateway_factory(
        upstream_ports, shipped=True, app_extra={"operations": 'upsell = "tag"\n'}
    )
    core = {"X-License-Key": issue_key(sub="acme", tier="core")}

    async def plan(gateway: Gateway, **headers: str) -> dict[str, Any]:
        url = gateway.url("operations", "/_entitlements")
        async with client.get(url, headers={**core, **headers}) as response:
            assert (response.status, response.content_type) == (200, "application/json")
            found: dict[str, Any] = await response.json()
            assert response.headers["Cache-Control"].startswith("private, max-age=")
            assert "X-License-Key" in response.headers["Vary"]
            found["ETag"] = response.headers["ETag"]
            return found

    hidden = await plan(hiding)
    assert (hidden["tenant"], hidden["tier"]["name"]) == ("acme", "core")
    assert feature(hidden, OPTIMIZATION)["state"] == "hidden"
    again = {**core, "If-None-Match": hidden["ETag"]}
    async with client.get(hiding.url("operations", "/_entitlements"), headers=again) as response:
        assert (response.status, await response.read()) == (304, b"")
        assert response.headers["ETag"] == hidden["ETag"]

    tagged = feature(await plan(tagging), OPTIMIZATION)
    assert {k: tagged[k] for k in ("state", "required_tier", "tag")} == {
        "state": "locked",
        "required_tier": "fleet",
        "tag": "Fleet",
    }
    dispatcher = feature(await plan(tagging, **{"X-User-Role": "dispatch_only"}), OPTIMIZATION)
    assert dispatcher["state"] == "hidden"
    assert not {"required_tier", "addon", "tag"} & set(dispatcher)

    payload = {"event": "upgrade_click", "feature": OPTIMIZATION, "target": "tier:fleet"}
    url = hiding.url("operations", "/_entitlements/events")
    async with client.post(url, json=payload, headers={**core, "X-User-Id": "u1"}) as response:
        assert response.status == 202
    [clicked] = [e for e in hiding.events() if e["event"] == "upgrade_click"]
    assert (clicked["tenant"], clicked["tier"], clicked["user"], clicked["feature"]) == (
        "acme",
        "core",
        "u1",
        OPTIMIZATION,
    )
    events = str(hiding.folder / "events.jsonl")
    assert main(["report", "funnel", "--events", events, "--json"]) == 0
    [row] = json.loads(capsys.readouterr().out)["features"]
    assert (row["feature"], row["clicks"]) == (OPTIMIZATION, 1)


async def test_the_plan_needs_a_license_and_follows_the_stored_tenant(
    config: Config, make_world: WorldFactory, issue_key: IssueKey
) -> None:
    world = make_world(config)
    missing = await get(world, "operations", "/_entitlements", request_id="r0")
    assert (missing.status, body(missing)["code"]) == (401, "license_missing")
    assert [e["request_id"] for e in world.events("license_invalid")] == ["r0"]
    await world.store.put_license(issue_key(sub="acme", tier="fleet"))
    stored = await get(world, "driver_app", "/_entitlements?app=driver_app", tenant="acme")
    answer = json.loads(stored.body)
    assert answer["tier"]["name"] == "fleet"
    assert {f["app"] for f in answer["features"]} == {"driver_app"}
    bad = await get(world, "driver_app", "/_entitlements?app=nope", tenant="acme")
    assert (bad.status, body(bad)["code"]) == (400, "bad_request")


async def test_the_endpoints_are_answered_in_every_mode_and_nothing_else_under_the_prefix(
    config_dir: Path, make_world: WorldFactory, issue_key: IssueKey
) -> None:
    world = make_world(configured(config_dir, 'enforce = "off"'))
    core = issue_key(sub="acme", tier="core")
    assert (await get(world, "operations", "/_entitlements", key=core)).status == 200
    unknown = await get(world, "operations", "/_entitlements/admin", key=core)
    assert (unknown.kind, unknown.status, body(unknown)["code"]) == (RESPOND, 404, "not_found")
    put = await world.decide("operations", world.head("PUT", "/_entitlements", key=core))
    assert (put.status, put.response_headers) == (405, b"Allow: GET\r\n")
    sneaky = await get(world, "operations", "/api/v1/../../_entitlements/x", key=core)
    assert sneaky.status == 404  # canonicalised first: never forwarded


@pytest.mark.parametrize(
    ("name", "content_type"),
    [
        ("ui", b"text/html; charset=utf-8"),
        ("ui.css", b"text/css; charset=utf-8"),
        ("ui.js", b"text/javascript; charset=utf-8"),
        ("openapi.json", b"application/json"),
    ],
)
async def test_the_page_and_the_api_description_need_no_license(
    config: Config, make_world: WorldFactory, name: str, content_type: bytes
) -> None:
    world = make_world(config)
    verdict = await get(world, "client_portal", f"/_entitlements/{name}")
    assert (verdict.status, verdict.content_type) == (200, content_type)
    assert b"Content-Security-Policy: default-src 'none'" in verdict.response_headers
    assert verdict.body


async def test_the_api_description_follows_a_reloaded_matrix(
    config_dir: Path, make_world: WorldFactory
) -> None:
    """openapi.json lists the features a click may name: after a reload, the new matrix's."""
    world = make_world(load_config(config_dir / "gateway.toml"))

    async def features() -> list[str]:
        verdict = await get(world, "operations", "/_entitlements/openapi.json")
        schema = json.loads(verdict.body)["components"]["schemas"]["ClickBody"]
        names: list[str] = schema["properties"]["feature"]["enum"]
        return names

    assert OPTIMIZATION in await features() and "ops.drone_dispatch" not in await features()
    matrix = config_dir / "tier_matrix.toml"
    added = textwrap.dedent(
        """
        [features."ops.drone_dispatch"]
        app = "operations"
        title = "Drone Dispatch"

        [addons.drones]
        title = "Drones"
        features = ["ops.drone_dispatch"]
        available_to = ["core"]
        price = "contact sales"
        """
    )
    matrix.write_text(matrix.read_text() + added)
    world.shared.swap_rules(*load_rules(world.config))
    assert "ops.drone_dispatch" in await features()


# ------------------------------------------------------------------ POST {prefix}/events


def click(world: EnforcerWorld, key: str, payload: bytes, **fields: Any) -> Verdict:
    head = world.head(
        "POST", "/_entitlements/events", key=key, content_type=b"application/json", **fields
    )
    enforcer = world.enforcer("operations")
    collect = enforcer.check(head)
    assert (collect.kind, collect.max_body) == (COLLECT, 4097)
    return enforcer.answer(head, payload)


async def test_an_upgrade_click_is_collected_stamped_and_emitted(
    config: Config, make_world: WorldFactory, issue_key: IssueKey
) -> None:
    world = make_world(config)
    core = issue_key(sub="acme", tier="core")
    await get(world, "operations", "/_entitlements", key=core)  # acme cached
    payload = json.dumps(
        {"event": "upgrade_click", "feature": OPTIMIZATION, "target": "tier:fleet",
         "source_request_id": "r-403"}
    ).encode()  # fmt: skip
    accepted = click(world, core, payload, user="u1", role="owner", request_id="r-click")
    assert (accepted.kind, accepted.status) == (RESPOND, 202)
    [event] = world.events("upgrade_click")
    assert (event["tenant"], event["tier"], event["user"], event["source_request_id"]) == (
        "acme",
        "core",
        "u1",
        "r-403",
    )
    assert event["request_id"] == "r-click"
    bad = click(world, core, b"{not json")
    assert (bad.status, body(bad)["code"]) == (400, "bad_event")
    dispatcher = click(world, core, payload, role="dispatch_only")
    assert (dispatcher.status, body(dispatcher)["code"]) == (403, "role_forbidden")
    for _ in range(12):
        last = click(world, core, payload)
    assert (last.status, last.response_headers[:13]) == (429, b"Retry-After: ")


async def test_the_403_upgrade_link_names_the_blocked_request_and_feature(
    config: Config, make_world: WorldFactory, issue_key: IssueKey
) -> None:
    world = make_world(config)
    head = world.head(
        "POST", "/api/v1/shipments/1/optimize", key=issue_key(tier="core"), request_id="b-17"
    )
    answer = body(await world.decide("operations", head))
    link = urlsplit(answer["upgrade"])
    assert link.path == "/_entitlements/ui"
    assert parse_qs(link.query) == {"from": ["b-17"], "feature": [OPTIMIZATION]}
    assert answer["request_id"] == "b-17"


# ------------------------------------------------------------------ the funnel, linked


def license_event(key: str) -> ProvisionEvent:
    return ProvisionEvent(event_id=str(uuid.uuid4()), action="license", tenant="acme", key=key)


async def test_a_first_license_is_provisioned_and_a_rise_is_attributed(
    config: Config, make_world: WorldFactory, issue_key: IssueKey
) -> None:
    world = make_world(config)
    shared = world.shared

    async def provision(key: str) -> None:
        assert await apply_event(
            license_event(key), world.store, config.keyring, shared.rules.policy,
            world.log, shared.rules.revision, None, shared.attribution,
        )  # fmt: skip

    trial = issue_key(sub="acme", tier="core", trial=True, serial=1)
    await provision(trial)
    [first] = world.events("license_provisioned")
    assert (first["tier"], first["trial"]) == ("core", True)
    blocked = world.head("POST", "/api/v1/shipments/1/optimize", tenant="acme")
    assert (await world.decide("operations", blocked)).status == 403
    payload = json.dumps(
        {"event": "upgrade_click", "feature": OPTIMIZATION, "target": "tier:fleet"}
    ).encode()
    assert click(world, trial, payload, role="owner").status == 202
    await provision(issue_key(sub="acme", tier="fleet", serial=2, exp=int(time.time()) + 86400))
    [upgrade] = world.events("upgrade_complete")
    assert (upgrade["previous_tier"], upgrade["tier"], upgrade["trial_converted"]) == (
        "core",
        "fleet",
        True,
    )
    assert (upgrade["attributed_clicks"], upgrade["attributed_blocks"]) == (1, 1)
