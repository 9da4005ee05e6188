"""Seats and usage counted by the enforcer (README, Seats and usage): ``[seats] mode =
"active_users"`` admits new users through the store while holders pass from memory, and
every allowed licensed request is metered."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from gateway.config import Config, load_config
from gateway.enforcer import FORWARD, NEED_TENANT, Verdict
from gateway.usage import report
from tests.conftest import IssueKey
from tests.enforcing import EnforcerWorld, WorldFactory, body

SHIPMENTS = "/api/v1/shipments"


def active_users(config_dir: Path, make_world: WorldFactory, extra: str = "") -> EnforcerWorld:
    path = config_dir / "gateway.toml"
    path.write_text(path.read_text() + '\n[seats]\nmode = "active_users"\n' + extra)
    return make_world(load_config(path))


async def call(world: EnforcerWorld, key: str, user: str | None, **fields: Any) -> Verdict:
    head = world.head("GET", SHIPMENTS, key=key, user=user, **fields)
    return await world.decide("operations", head)


async def test_a_fleet_tenant_gets_five_seats_one_with_a_warning_and_then_429(
    config_dir: Path, make_world: WorldFactory, issue_key: IssueKey
) -> None:
    world = active_users(config_dir, make_world)
    key = issue_key(sub="acme", tier="fleet")
    for n in range(1, 6):
        verdict = await call(world, key, f"u{n}")
        assert (verdict.kind, verdict.response_headers) == (FORWARD, b"")
    sixth = await call(world, key, "u6")
    assert sixth.kind == FORWARD
    assert sixth.response_headers.startswith(b"X-Seat-Warning: ops_users: 6 in use, 5 included")
    [overage] = world.events("seat_overage")
    assert (overage["user"], overage["used"], overage["included"]) == ("u6", 6, 5)
    seventh = await call(world, key, "u7", request_id="r7")
    answer = body(seventh)
    assert (seventh.status, answer["code"]) == (429, "seat_limit_exceeded")
    assert (answer["used"], answer["included"], answer["allowance"]) == (6, 5, 6)
    assert "required_tier" not in answer  # no role: no upsell
    [refusal] = world.events("seat_limit_exceeded")
    assert (refusal["request_id"], refusal["seat"], refusal["used"]) == ("r7", "ops_users", 6)
    assert (await call(world, key, "u1")).kind == FORWARD


async def test_a_seat_holder_passes_from_memory_and_a_new_user_waits_for_the_store(
    config_dir: Path, make_world: WorldFactory, issue_key: IssueKey
) -> None:
    world = active_users(config_dir, make_world)
    key = issue_key(sub="acme", tier="fleet")
    await call(world, key, None)  # the tenant's record is cached now
    enforcer = world.enforcer("operations")
    new = world.head("GET", SHIPMENTS, key=key, user="u1")
    assert enforcer.check(new).kind == NEED_TENANT  # admitted through the store
    await enforcer.prefetch(new)
    assert enforcer.check(new, fetched=True).kind == FORWARD
    again = world.head("GET", SHIPMENTS, key=key, user="u1")
    assert enforcer.check(again).kind == FORWARD  # a holder: no wait
    no_user = world.head("GET", SHIPMENTS, key=key)
    assert enforcer.check(no_user).kind == FORWARD  # no user id: holds no seat


async def test_owners_are_shown_the_way_to_more_seats_and_dispatchers_are_not(
    config_dir: Path, make_world: WorldFactory, issue_key: IssueKey
) -> None:
    world = active_users(config_dir, make_world)
    key = issue_key(sub="acme", tier="core")  # 1 included, allowance 1
    assert (await call(world, key, "first")).kind == FORWARD
    owner = body(await call(world, key, "second", role="owner"))
    assert (owner["required_tier"], owner["upgrade"]) == ("fleet", "/_entitlements/ui")
    dispatcher = body(await call(world, key, "third", role="dispatch_only"))
    assert dispatcher["code"] == "seat_limit_exceeded" and "required_tier" not in dispatcher


async def test_a_shadow_app_forwards_a_user_beyond_the_allowance(
    config_dir: Path, make_world: WorldFactory, issue_key: IssueKey
) -> None:
    path = config_dir / "gateway.toml"
    path.write_text(
        path.read_text().replace("[apps.operations]\n", '[apps.operations]\nenforce = "shadow"\n')
    )
    world = active_users(config_dir, make_world)
    key = issue_key(sub="acme", tier="core")
    assert (await call(world, key, "first")).kind == FORWARD
    second = await call(world, key, "second")
    assert (second.kind, second.outcome, second.code) == (
        FORWARD,
        "shadow_blocked",
        "seat_limit_exceeded",
    )
    [event] = world.events("seat_limit_exceeded")
    assert event["shadow"] is True


async def test_allowed_calls_are_metered_per_feature_and_client(
    config: Config, make_world: WorldFactory, issue_key: IssueKey
) -> None:
    world = make_world(config)
    key = issue_key(sub="acme", tier="fleet")
    for client in (b"erp", b"erp", None):
        head = world.head("GET", SHIPMENTS, key=key, client_id=client)
        assert (await world.decide("operations", head)).kind == FORWARD
    blocked = world.head("POST", "/api/v1/phi/x", key=key)
    assert (await world.decide("operations", blocked)).status == 403  # not counted
    assert await world.shared.usage.flush()
    counts = await world.store.usage("acme", time.time() - 3600)
    assert report(counts, "feature") == [("ops.on_demand", 3)]
    assert report(counts, "client") == [("(none)", 1), ("erp", 2)]
