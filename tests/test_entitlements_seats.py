"""The entitlements API's seats with ``[seats] mode = "active_users"`` (README, Entitlements
API and plan page; Seats and usage): ``used`` is what the seat book counts in the tenant
store, ``included`` and ``allowance`` are admission's numbers, a polling UI is answered from
a short-lived count, and a store outage answers from the last count (else the recorded
usage). ``recorded`` mode keeps the recorded usage and has no ``allowance``."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from gateway.cli import main
from gateway.config import SeatSettings, load_config
from gateway.decision import Plan
from gateway.enforcer import FORWARD, NEED_TENANT, RESPOND
from gateway.entitlements import SeatCount, SeatsView
from gateway.license import KeyRing, Seats
from gateway.matrix import TierMatrix
from gateway.seats import OUTAGE_RETRY_SECONDS, HeldSeats, SeatBook, seats_view
from gateway.store.memory import MemoryStore
from gateway.store.redis_store import RedisStore
from tests.conftest import IssueKey
from tests.enforcing import EnforcerWorld, WorldFactory, body
from tests.harness import Gateway, running_gateway, two_gateways
from tests.redis_server import RedisServer
from tests.stores import DEADLINE

T0 = 1_700_000_000.0
DAY = 86400.0
ACTIVE = SeatSettings(mode="active_users")
SHIPMENTS = "/api/v1/shipments"


# -- the seats of the body (pure) -----------------------------------------------------------


def plan(tier: str, seats: Seats) -> Plan:
    return Plan(tier, (), seats, "valid", None)


@pytest.mark.parametrize(
    ("plan_", "held", "recorded", "expected"),
    [
        pytest.param(
            plan("fleet", Seats(5, 5)), HeldSeats(Seats(3, 0), None), Seats(9, 9),
            SeatsView(SeatCount(5, 3, 6), SeatCount(5, 0, 6)), id="fleet-counted",
        ),
        pytest.param(
            plan("fleet", Seats(5, 5)), HeldSeats(Seats(1, 2), Seats(2, 0)), None,
            SeatsView(SeatCount(7, 1, 8), SeatCount(5, 2, 6)), id="extra-seats-bought",
        ),
        pytest.param(
            plan("fleet", Seats(12, 40)), HeldSeats(Seats(0, 0), None), None,
            SeatsView(SeatCount(12, 0, 15), SeatCount(40, 0, 50)), id="license-seats-claim",
        ),
        pytest.param(
            plan("core", Seats(1, 1)), HeldSeats(None, None), Seats(1, 4),
            SeatsView(SeatCount(1, 1, 1), SeatCount(1, 4, 1)), id="never-counted-recorded",
        ),
        pytest.param(
            plan("core", Seats(1, 1)), HeldSeats(None, None), None,
            SeatsView(SeatCount(1, 0, 1), SeatCount(1, 0, 1)), id="never-counted-nothing",
        ),
    ],
)  # fmt: skip
def test_seats_view_has_admissions_numbers(
    matrix: TierMatrix, plan_: Plan, held: HeldSeats, recorded: Seats | None, expected: SeatsView
) -> None:
    assert seats_view(matrix, ACTIVE, plan_, held, recorded) == expected


# -- SeatBook: the count kept per tenant ----------------------------------------------------


@pytest.fixture
def memory(keyring: KeyRing) -> MemoryStore:
    return MemoryStore("memory://", keyring)


async def admit(book: SeatBook, matrix: TierMatrix, user: str, now: float) -> None:
    admission = await book.admit(
        "acme", "ops_users", user, matrix=matrix, tier="fleet", seats=None, now=now
    )
    assert admission.allowed


async def test_the_count_is_kept_briefly_and_counted_again_after_a_change(
    memory: MemoryStore, matrix: TierMatrix
) -> None:
    book = SeatBook(memory, ACTIVE, count_seconds=5.0)
    for user in ("u1", "u2"):
        await admit(book, matrix, user, T0)
    assert book.held("acme", T0) is None  # never counted: ask the store
    assert await book.count_held("acme", T0) == HeldSeats(Seats(2, 0), None)
    assert book.held("acme", T0 + 4.9) == HeldSeats(Seats(2, 0), None)  # from memory
    assert book.held("acme", T0 + 5) is None  # expired
    await book.count_held("acme", T0 + 5)
    await admit(book, matrix, "u1", T0 + 6)  # a holder confirmed: the count stands
    assert book.held("acme", T0 + 6) == HeldSeats(Seats(2, 0), None)
    await admit(book, matrix, "u3", T0 + 6)  # this process admitted a new user
    assert book.held("acme", T0 + 6) is None
    assert await book.count_held("acme", T0 + 6) == HeldSeats(Seats(3, 0), None)
    assert await memory.release_seat("acme", "ops_users", "u1")
    await memory.set_extra_seats("acme", 2, 0)
    book.invalidate("acme")  # the runtime does this when changes() names acme
    assert book.held("acme", T0 + 7) is None
    assert await book.count_held("acme", T0 + 7) == HeldSeats(Seats(2, 0), Seats(2, 0))
    book.invalidate()
    assert book.held("acme", T0 + 7) is None


async def test_a_count_under_way_when_the_tenant_changes_is_not_kept(
    memory: MemoryStore, matrix: TierMatrix
) -> None:
    book = SeatBook(memory, ACTIVE)
    await admit(book, matrix, "u1", T0)
    async with asyncio.TaskGroup() as group:
        under_way = group.create_task(book.count_held("acme", T0))
        await asyncio.sleep(0)  # the count has started...
        book.invalidate("acme")  # ...when the store names the tenant
    assert under_way.result() == HeldSeats(Seats(1, 0), None)  # its callers get its answer
    assert book.held("acme", T0) is None  # but the next request counts again
    both = await asyncio.gather(book.count_held("acme", T0), book.count_held("acme", T0))
    assert list(both) == [HeldSeats(Seats(1, 0), None)] * 2
    assert book.held("acme", T0) == HeldSeats(Seats(1, 0), None)


async def test_a_store_outage_answers_from_the_last_count(
    redis: RedisServer, keyring: KeyRing, matrix: TierMatrix
) -> None:
    store = RedisStore(redis.url, keyring)
    try:
        book = SeatBook(store, ACTIVE)
        for user in ("u1", "u2", "u3"):
            await admit(book, matrix, user, T0)
        await book.count_held("acme", T0)
        redis.stop(kill=True)
        async with asyncio.timeout(DEADLINE):
            # Counted again (the count expired): the store cannot answer, the last count stands...
            assert await book.count_held("acme", T0 + 60) == HeldSeats(Seats(3, 0), None)
            # ...and a tenant never counted has no count: the recorded usage stands in.
            assert await book.count_held("globex", T0 + 60) == HeldSeats(None, None)
        # Meanwhile nobody waits for the dead store: answered from memory at once.
        assert book.held("acme", T0 + 61) == HeldSeats(Seats(3, 0), None)
        assert book.held("globex", T0 + 61) == HeldSeats(None, None)
        assert book.held("acme", T0 + 60 + OUTAGE_RETRY_SECONDS) is None  # then asks again
    finally:
        await store.close()


# -- the enforcer: GET {prefix} waits for the count once ------------------------------------


def world_with(config_dir: Path, make_world: WorldFactory, seats: str) -> EnforcerWorld:
    path = config_dir / "gateway.toml"
    path.write_text(path.read_text() + f"\n[seats]\n{seats}\n")
    return make_world(load_config(path))


async def entitlements(world: EnforcerWorld, key: str) -> dict[str, Any]:
    verdict = await world.decide("operations", world.head("GET", "/_entitlements", key=key))
    assert (verdict.kind, verdict.status) == (RESPOND, 200)
    seats: dict[str, Any] = body(verdict)["seats"]
    return seats


async def test_the_plan_shows_the_users_admission_counts_and_waits_only_for_a_new_count(
    config_dir: Path, make_world: WorldFactory, issue_key: IssueKey
) -> None:
    world = world_with(config_dir, make_world, 'mode = "active_users"')
    key = issue_key(sub="acme", tier="fleet")
    await world.store.set_usage("acme", 4, 4)  # recorded: not what this mode shows
    for user in ("u1", "u2", "u3"):
        head = world.head("GET", SHIPMENTS, key=key, user=user)
        assert (await world.decide("operations", head)).kind == FORWARD
    assert await entitlements(world, key) == {
        "ops_users": {"included": 5, "used": 3, "allowance": 6},
        "drivers": {"included": 5, "used": 0, "allowance": 6},
    }
    # Polled again: answered from the count, without a wait.
    again = world.enforcer("operations").check(world.head("GET", "/_entitlements", key=key))
    assert (again.kind, body(again)["seats"]["ops_users"]["used"]) == (RESPOND, 3)
    # Extra seats bought through billing count, as in admission.
    await world.store.set_extra_seats("acme", 1, 0)
    world.shared.seats.invalidate("acme")  # the runtime, on the store's change feed
    first = world.enforcer("operations").check(world.head("GET", "/_entitlements", key=key))
    assert first.kind == NEED_TENANT
    assert (await entitlements(world, key))["ops_users"] == {
        "included": 6,
        "used": 3,
        "allowance": 7,
    }


async def test_recorded_mode_shows_the_recorded_usage_without_an_allowance(
    config_dir: Path, make_world: WorldFactory, issue_key: IssueKey
) -> None:
    world = world_with(config_dir, make_world, 'mode = "recorded"')
    key = issue_key(sub="acme", tier="fleet")
    await world.store.set_usage("acme", 4, 2)
    head = world.head("GET", SHIPMENTS, key=key, user="u1")
    assert (await world.decide("operations", head)).kind == FORWARD
    assert await entitlements(world, key) == {
        "ops_users": {"included": 5, "used": 4},
        "drivers": {"included": 5, "used": 2},
    }


# -- a real gateway -------------------------------------------------------------------------


async def call(session: aiohttp.ClientSession, gateway: Gateway, key: str, user: str) -> int:
    headers = {"X-License-Key": key, "X-User-Id": user}
    async with session.get(gateway.url("operations", SHIPMENTS), headers=headers) as response:
        return response.status


async def seats_of(
    session: aiohttp.ClientSession, gateway: Gateway, key: str, app: str = "operations"
) -> dict[str, Any]:
    url = gateway.url(app, "/_entitlements")
    async with session.get(url, headers={"X-License-Key": key}) as response:
        assert response.status == 200
        seats: dict[str, Any] = json.loads(await response.read())["seats"]
        return seats


async def release(config: Path, user: str) -> None:
    """``gateway tenant seats acme --release USER``, as an operator runs it (its own store
    object: another process, for the store)."""
    argv = ["tenant", "seats", "acme", "--release", user, "--config", str(config)]
    assert await asyncio.to_thread(main, argv) == 0


async def used_becomes(
    session: aiohttp.ClientSession, gateway: Gateway, key: str, used: int
) -> dict[str, Any]:
    async with asyncio.timeout(DEADLINE):
        while (seats := await seats_of(session, gateway, key))["ops_users"]["used"] != used:
            await asyncio.sleep(0.05)
    return seats


async def test_a_gateway_on_sqlite_shows_the_seats_its_users_hold(
    tmp_path: Path, key_dir: Path, upstream_ports: dict[str, int], issue_key: IssueKey
) -> None:
    extra = (
        f'\n[store]\nurl = "sqlite://{tmp_path / "tenants.db"}"\n\n[seats]\nmode = "active_users"\n'
    )
    key = issue_key(sub="acme", tier="fleet")
    async with (
        running_gateway(tmp_path, key_dir, upstream_ports, extra=extra) as gateway,
        aiohttp.ClientSession() as session,
    ):
        assert (await seats_of(session, gateway, key))["ops_users"]["used"] == 0
        for user in ("u1", "u2", "u3"):
            assert await call(session, gateway, key, user) == 200
        # At once, though 0 was counted just before: this gateway's admissions recount.
        assert await seats_of(session, gateway, key) == {
            "ops_users": {"included": 5, "used": 3, "allowance": 6},
            "drivers": {"included": 5, "used": 0, "allowance": 6},
        }
        assert (await seats_of(session, gateway, key, "driver_app"))["ops_users"]["used"] == 3
        await release(tmp_path / "gateway.toml", "u1")
        # SQLite's change feed is per process: the CLI's release shows when the count
        # expires (COUNT_TTL_SECONDS).
        await used_becomes(session, gateway, key, 2)


async def test_a_fleet_on_redis_shares_the_count_and_a_release_shows_through_the_change_feed(
    tmp_path: Path,
    key_dir: Path,
    upstream_ports: dict[str, int],
    issue_key: IssueKey,
    redis: RedisServer,
) -> None:
    extra = f'\n[store]\nurl = "{redis.url}"\n\n[seats]\nmode = "active_users"\n'
    key = issue_key(sub="acme", tier="fleet")
    async with (
        two_gateways(tmp_path, key_dir, upstream_ports, extra=extra) as (a, b),
        aiohttp.ClientSession() as session,
    ):
        # B keeps a count for an hour: only the change feed can make it count again.
        b.runtime.seats.count_seconds = 3600.0
        for user in ("u1", "u2", "u3"):
            assert await call(session, a, key, user) == 200  # users of gateway A
        assert (await seats_of(session, b, key))["ops_users"] == {
            "included": 5,
            "used": 3,
            "allowance": 6,
        }
        await release(a.folder / "gateway.toml", "u1")
        await used_becomes(session, b, key, 2)
