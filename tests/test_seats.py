"""The seat model (gateway.seats): included seats and allowances, the admission rule, the
429 body, and ``SeatBook`` — the in-process holder cache in front of the store, its events,
its behaviour across two gateways and through a store outage (a real ``redis-server``).

Times are passed in (``now``), so nothing here waits for a clock."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from gateway.config import SeatSettings
from gateway.events import EventLog
from gateway.license import KeyRing, Seats
from gateway.matrix import TierMatrix
from gateway.metrics import Metrics
from gateway.seats import (
    KNOWN,
    NEED_ADMISSION,
    OUTAGE_RETRY_SECONDS,
    REFUSAL_TTL_SECONDS,
    SEAT_KINDS,
    Admission,
    SeatBook,
    SeatLimits,
    emit_seat_events,
    judge,
    seat_limits,
    seat_problem,
    tier_with_more_seats,
)
from gateway.store import SeatAdmission, SeatKind, TenantStore
from gateway.store.memory import MemoryStore
from gateway.store.redis_store import RedisStore
from gateway.store.sqlite import SqliteStore
from tests.harness import Gateway
from tests.redis_server import RedisServer
from tests.stores import DEADLINE

T0 = 1_700_000_000.0
DAY = 86400.0
DEFAULT = SeatSettings(mode="active_users")


# -- included seats and the allowance -----------------------------------------------------------

LIMITS: list[Any] = [
    # tier, kind, license seats, extra seats, settings -> included, allowance, warn_at
    pytest.param("fleet", "ops_users", None, None, DEFAULT, (5, 6, 5), id="fleet"),
    pytest.param("core", "drivers", None, None, DEFAULT, (1, 1, 1), id="core-one"),
    pytest.param("enterprise", "drivers", None, None, DEFAULT, (10, 12, 9), id="enterprise"),
    pytest.param("fleet", "drivers", Seats(12, 40), None, DEFAULT, (40, 50, 36), id="license"),
    pytest.param("fleet", "ops_users", Seats(12, 40), None, DEFAULT, (12, 15, 11), id="ops-claim"),
    pytest.param("fleet", "ops_users", None, Seats(3, 0), DEFAULT, (8, 10, 8), id="extra"),
    pytest.param("core", "drivers", Seats(2, 4), Seats(0, 6), DEFAULT, (10, 12, 9), id="both"),
    pytest.param(
        "fleet",
        "ops_users",
        None,
        None,
        SeatSettings(tier_overage={"fleet": 1.0}),
        (5, 5, 5),
        id="no-overage-for-fleet",
    ),
    pytest.param(
        "core",
        "ops_users",
        None,
        None,
        SeatSettings(tier_overage={"fleet": 1.0}, overage=2.0),
        (1, 2, 1),
        id="other-tier-default",
    ),
    pytest.param(
        "enterprise",
        "ops_users",
        Seats(100, 100),
        None,
        SeatSettings(overage=1.15, warning_ratio=0.8),
        (100, 115, 80),
        id="float-noise",
    ),
    pytest.param("fleet", "ops_users", Seats(0, 0), None, DEFAULT, (0, 0, 1), id="zero"),
]


@pytest.mark.parametrize(("tier", "kind", "claim", "extra", "settings", "expected"), LIMITS)
def test_seat_limits(
    matrix: TierMatrix,
    tier: str,
    kind: SeatKind,
    claim: Seats | None,
    extra: Seats | None,
    settings: SeatSettings,
    expected: tuple[int, int, int],
) -> None:
    limits = seat_limits(matrix, settings, tier, kind, claim, extra)
    assert (limits.included, limits.allowance, limits.warn_at) == expected
    assert (limits.kind, limits.tier) == (kind, tier)


def test_seat_kinds_are_per_listener() -> None:
    assert SEAT_KINDS == {"operations": "ops_users", "driver_app": "drivers"}


# -- the admission rule --------------------------------------------------------------------------

FLEET = SeatLimits("ops_users", "fleet", included=5, allowance=6, warn_at=5)

JUDGE: list[Any] = [
    # store result -> allowed, X-Seat-Warning?, events
    pytest.param(SeatAdmission(True, False, 6), True, False, (), id="holder-in-overage"),
    pytest.param(SeatAdmission(True, True, 1), True, False, (), id="first-user"),
    pytest.param(SeatAdmission(True, True, 4), True, False, (), id="below-warning"),
    pytest.param(SeatAdmission(True, True, 5), True, False, ("seat_warning",), id="last-included"),
    pytest.param(
        SeatAdmission(True, True, 6),
        True,
        True,
        ("seat_overage", "seat_warning"),
        id="overage",
    ),
    pytest.param(SeatAdmission(False, True, 6), False, False, (), id="refused"),
]


@pytest.mark.parametrize(("result", "allowed", "warned", "events"), JUDGE)
def test_judge(result: SeatAdmission, allowed: bool, warned: bool, events: tuple[str, ...]) -> None:
    admission = judge(result, FLEET)
    assert admission.allowed is allowed
    assert (admission.warning is not None) is warned
    assert admission.events == events
    assert (admission.used, admission.limits, admission.recorded) == (result.used, FLEET, True)


def test_overage_warning_text() -> None:
    admission = judge(SeatAdmission(True, True, 6), FLEET)
    assert admission.warning == "ops_users: 6 in use, 5 included, 6 allowed; add seats or upgrade"
    assert admission.warning.isascii()


@pytest.mark.parametrize(
    ("tier", "kind", "included", "expected"),
    [
        pytest.param("core", "ops_users", 1, "fleet", id="core"),
        pytest.param("fleet", "drivers", 5, "enterprise", id="fleet"),
        pytest.param("core", "drivers", 7, "enterprise", id="core-with-seats-bought"),
        pytest.param("fleet", "ops_users", 12, None, id="more-than-any-tier"),
        pytest.param("enterprise", "ops_users", 10, None, id="top-tier"),
    ],
)
def test_tier_with_more_seats(
    matrix: TierMatrix, tier: str, kind: SeatKind, included: int, expected: str | None
) -> None:
    assert tier_with_more_seats(matrix, tier, kind, included) == expected


@pytest.mark.parametrize(
    ("role", "upsell"),
    [
        pytest.param("owner", True, id="owner"),
        pytest.param("admin", True, id="admin"),
        pytest.param("standard", False, id="standard"),
        pytest.param("dispatch_only", False, id="dispatch_only"),
        pytest.param(None, False, id="no-role"),
    ],
)
def test_seat_problem(matrix: TierMatrix, role: str | None, upsell: bool) -> None:
    refused = judge(SeatAdmission(False, True, 6), FLEET)
    detail, fields = seat_problem(refused, matrix, role, "/_entitlements/ui")
    assert detail == "6 ops_users seats in use: 5 included, 6 allowed with overage"
    expected: dict[str, Any] = {
        "seat": "ops_users",
        "used": 6,
        "included": 5,
        "allowance": 6,
        "tier": "fleet",
    }
    if upsell:
        expected.update(required_tier="enterprise", addon=None, upgrade="/_entitlements/ui")
    assert fields == expected


# -- SeatBook -------------------------------------------------------------------------------------


class OneGateway:
    """One gateway's seat book over a store, admitting Fleet users of tenant acme."""

    def __init__(self, store: TenantStore, matrix: TierMatrix, **options: Any) -> None:
        self.store = store
        self.matrix = matrix
        self.metrics = Metrics()
        self.book = SeatBook(store, options.pop("settings", DEFAULT), self.metrics, **options)

    def store_errors(self) -> float | None:
        labels = {"op": "seats"}
        return self.metrics.registry.get_sample_value("gateway_store_errors_total", labels)

    async def request(
        self, user: str, now: float, kind: SeatKind = "ops_users", tier: str = "fleet"
    ) -> Admission | None:
        """What the request path does: None for a known holder, else the admission."""
        if self.book.check("acme", kind, user, now) == KNOWN:
            return None
        return await self.book.admit(
            "acme", kind, user, matrix=self.matrix, tier=tier, seats=None, now=now
        )


@pytest.fixture
def memory(keyring: KeyRing) -> MemoryStore:
    return MemoryStore("memory://", keyring)


async def test_fleet_five_included_six_allowed(memory: MemoryStore, matrix: TierMatrix) -> None:
    """The issue's scenario: users 1-5 are admitted, 6 with a warning and a seat_overage
    event, 7 is refused with used/included, and user 1 still gets through."""
    gateway = OneGateway(memory, matrix)
    answers = [await gateway.request(f"user-{n}", T0 + n) for n in range(1, 8)]
    for n, admission in enumerate(answers[:5], start=1):
        assert admission is not None and admission.allowed and admission.new
        assert admission.used == n and admission.warning is None
        assert "seat_overage" not in admission.events
    assert answers[4] is not None and answers[4].events == ("seat_warning",)  # 5 of 5: 100 %
    sixth, seventh = answers[5], answers[6]
    assert sixth is not None and sixth.allowed and sixth.warning is not None
    assert sixth.events == ("seat_overage",)  # seat_warning went out once this window
    assert seventh is not None and not seventh.allowed
    _, body = seat_problem(seventh, matrix, "owner", "/_entitlements/ui")
    assert (body["used"], body["included"], body["allowance"]) == (6, 5, 6)
    # Holders are answered from memory from now on; user 7 stays refused.
    assert await gateway.request("user-1", T0 + 10) is None
    assert await gateway.request("user-6", T0 + 10) is None
    again = await gateway.request("user-7", T0 + 10)
    assert again is not None and not again.allowed


async def test_holders_are_confirmed_with_the_store_after_the_refresh_interval(
    memory: MemoryStore, matrix: TierMatrix
) -> None:
    gateway = OneGateway(memory, matrix, refresh_seconds=60.0)
    assert await gateway.request("alice", T0) is not None
    assert gateway.book.check("acme", "ops_users", "alice", T0 + 59) == KNOWN
    assert gateway.book.check("acme", "ops_users", "alice", T0 + 60) == NEED_ADMISSION
    confirmed = await gateway.request("alice", T0 + 60)
    assert confirmed is not None and confirmed.allowed and not confirmed.new
    assert confirmed.events == ()
    # Confirming moved alice's last-seen time in the store: her seat outlives the window
    # counted from her first request.
    holders = await memory.seat_holders("acme", "ops_users", T0 + 30 * DAY, 30 * DAY)
    assert [holder.user for holder in holders] == ["alice"]


async def test_holders_are_kept_per_tenant_and_kind(
    memory: MemoryStore, matrix: TierMatrix
) -> None:
    gateway = OneGateway(memory, matrix)
    await gateway.request("alice", T0)
    book = gateway.book
    assert book.check("acme", "ops_users", "alice", T0) == KNOWN
    assert book.check("acme", "drivers", "alice", T0) == NEED_ADMISSION
    assert book.check("globex", "ops_users", "alice", T0) == NEED_ADMISSION


async def test_a_release_reaches_the_book_through_invalidate(
    memory: MemoryStore, matrix: TierMatrix
) -> None:
    gateway = OneGateway(memory, matrix, settings=SeatSettings(tier_overage={"core": 1.0}))
    assert await gateway.request("alice", T0, tier="core") is not None
    refused = await gateway.request("bob", T0, tier="core")
    assert refused is not None and not refused.allowed
    assert await memory.release_seat("acme", "ops_users", "alice")
    gateway.book.invalidate("acme")  # the runtime does this when changes() names acme
    assert gateway.book.check("acme", "ops_users", "alice", T0 + 1) == NEED_ADMISSION
    bob = await gateway.request("bob", T0 + 1, tier="core")
    assert bob is not None and bob.allowed and bob.new
    alice = await gateway.request("alice", T0 + 2, tier="core")
    assert alice is not None and not alice.allowed


async def test_a_refusal_is_remembered_briefly(memory: MemoryStore, matrix: TierMatrix) -> None:
    gateway = OneGateway(memory, matrix)
    for n in range(6):
        await gateway.request(f"user-{n}", T0)
    refused = await gateway.request("late", T0)
    assert refused is not None and not refused.allowed
    await memory.release_seat("acme", "ops_users", "user-0")
    # Retries within the refusal's lifetime are answered from memory, not the store...
    soon = await gateway.request("late", T0 + REFUSAL_TTL_SECONDS - 1)
    assert soon is not None and not soon.allowed
    # ...then the store is asked again, and the freed seat is taken.
    later = await gateway.request("late", T0 + REFUSAL_TTL_SECONDS)
    assert later is not None and later.allowed and later.new


async def test_extra_seats_bought_raise_the_limits(memory: MemoryStore, matrix: TierMatrix) -> None:
    await memory.set_extra_seats("acme", 2, 0)
    gateway = OneGateway(memory, matrix)
    answers = [await gateway.request(f"user-{n}", T0) for n in range(9)]
    assert [a is not None and a.allowed for a in answers] == [True] * 8 + [False]
    last = answers[7]
    assert last is not None
    assert (last.limits.included, last.limits.allowance) == (7, 8)


async def test_concurrent_requests_of_one_new_user_share_one_admission(
    memory: MemoryStore, matrix: TierMatrix
) -> None:
    gateway = OneGateway(memory, matrix)
    for n in range(5):
        await gateway.request(f"user-{n}", T0)
    answers = await asyncio.gather(*(gateway.request("sixth", T0) for _ in range(5)))
    assert all(a is not None and a.allowed and a.warning for a in answers)
    # The seat_overage event is for one of them only.
    assert sorted(a.events for a in answers if a is not None) == [()] * 4 + [("seat_overage",)]
    assert len(await memory.seat_holders("acme", "ops_users", T0, 30 * DAY)) == 6


async def test_seat_warning_once_per_window_across_two_gateways(
    tmp_path: Path, keyring: KeyRing, matrix: TierMatrix
) -> None:
    url = f"sqlite://{tmp_path / 'tenants.db'}"
    one_store, two_store = SqliteStore(url, keyring), SqliteStore(url, keyring)
    try:
        one, two = OneGateway(one_store, matrix), OneGateway(two_store, matrix)
        events: list[str] = []
        for n in range(6):  # 5 included: the warning mark is 5; user 6 is an overage seat
            gateway = one if n % 2 else two
            admission = await gateway.request(f"user-{n}", T0)
            assert admission is not None
            events += admission.events
        assert events == ["seat_warning", "seat_overage"]
        # The next window (30 days on, every seat expired): a new warning when reached again.
        later = T0 + 31 * DAY
        events = []
        for n in range(5):
            admission = await (two if n % 2 else one).request(f"next-{n}", later)
            assert admission is not None
            events += admission.events
        assert events == ["seat_warning"]
    finally:
        await one_store.close()
        await two_store.close()


async def test_the_holder_cache_is_bounded(memory: MemoryStore, matrix: TierMatrix) -> None:
    gateway = OneGateway(memory, matrix, max_holders=3)
    for n in range(6):
        await gateway.request(f"user-{n}", T0, kind="drivers", tier="enterprise")
        assert len(gateway.book) <= 3
    assert gateway.book.check("acme", "drivers", "user-5", T0) == KNOWN
    gateway.book.invalidate()
    assert len(gateway.book) == 0
    assert gateway.book.check("acme", "drivers", "user-5", T0) == NEED_ADMISSION


def test_seat_events(tmp_path: Path) -> None:
    log = EventLog(f"file://{tmp_path / 'events.jsonl'}", Metrics())
    admission = judge(SeatAdmission(True, True, 6), FLEET)
    emit_seat_events(
        log, admission, tenant="acme", app="operations", user="u6", request_id="r1", revision="x/y"
    )
    log.close()
    lines = [json.loads(line) for line in (tmp_path / "events.jsonl").read_text().splitlines()]
    common = {
        "tenant": "acme",
        "tier": "fleet",
        "app": "operations",
        "seat": "ops_users",
        "used": 6,
        "included": 5,
        "allowance": 6,
        "request_id": "r1",
        "revision": "x/y",
    }
    assert [line["event"] for line in lines] == ["seat_overage", "seat_warning"]
    assert lines[0] == {**common, "event": "seat_overage", "user": "u6", "ts": lines[0]["ts"]}
    assert lines[1] == {**common, "event": "seat_warning", "user": None, "ts": lines[1]["ts"]}


async def test_the_runtime_drops_a_tenants_holders_when_the_store_names_it(
    gateway: Gateway,
) -> None:
    runtime = gateway.runtime
    book, now = runtime.seats, time.time()
    matrix = runtime.shared.rules.matrix
    await book.admit("acme", "ops_users", "alice", matrix=matrix, tier="fleet", seats=None, now=now)
    assert book.check("acme", "ops_users", "alice", now) == KNOWN
    assert await runtime.store.release_seat("acme", "ops_users", "alice")
    async with asyncio.timeout(DEADLINE):
        while book.check("acme", "ops_users", "alice", now) == KNOWN:
            await asyncio.sleep(0.01)


# -- fail-static: a Redis outage ------------------------------------------------------------------


@pytest.fixture
async def redis_store(redis: RedisServer, keyring: KeyRing) -> AsyncIterator[RedisStore]:
    store = RedisStore(redis.url, keyring)
    yield store
    await store.close()


async def test_a_store_outage_never_blocks_and_new_users_are_counted_once_it_is_back(
    redis: RedisServer, redis_store: RedisStore, matrix: TierMatrix
) -> None:
    gateway = OneGateway(redis_store, matrix, refresh_seconds=60.0)
    for n in range(6):  # Fleet: 5 included, 6 allowed; every seat taken
        assert await gateway.request(f"user-{n}", T0) is not None
    redis.stop(kill=True)
    async with asyncio.timeout(DEADLINE):
        # A holder keeps working from memory...
        assert gateway.book.check("acme", "ops_users", "user-0", T0 + 1) == KNOWN
        # ...and so does a holder due for confirmation, and a new user beyond the limit:
        # an outage never blocks.
        for user in ("user-1", "newcomer"):
            admission = await gateway.request(user, T0 + 61)
            assert admission is not None and admission.allowed and not admission.recorded
    # Within the retry interval the store is not asked (no wait on a dead store).
    assert gateway.store_errors() == 1
    assert await gateway.request("another", T0 + 62) is not None
    assert gateway.store_errors() == 1
    redis.restart()  # the test server keeps nothing: every seat is free again
    back = T0 + 61 + OUTAGE_RETRY_SECONDS
    assert gateway.book.check("acme", "ops_users", "newcomer", back) == NEED_ADMISSION
    counted = await gateway.request("newcomer", back)
    assert counted is not None and counted.allowed and counted.recorded and counted.new
    holders = await redis_store.seat_holders("acme", "ops_users", back, 30 * DAY)
    assert [holder.user for holder in holders] == ["newcomer"]
