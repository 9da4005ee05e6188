"""Seats and usage in the tenant store, over the three engines (memory, SQLite on a file,
Redis against a real ``redis-server``): admission up to a hard limit, window expiry, release,
extra seats, usage buckets; then what a fleet needs: two store objects (two gateways) on one
SQLite file or one Redis never admit more users than the limit between them, and a restart
loses nothing.

Times are passed in (``now``), so window expiry is tested without waiting."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from gateway.license import KeyRing, Seats
from gateway.store import SeatAdmission, SeatHolder, StoreError, TenantStore, UsageCount
from gateway.store.redis_store import RedisStore
from gateway.store.sqlite import SqliteStore
from tests.conftest import IssueKey
from tests.redis_server import RedisServer
from tests.stores import DEADLINE, Backend, watching

T0 = 1_700_000_000.0
DAY = 86400.0
WINDOW = 30 * DAY


# -- admission --------------------------------------------------------------------------------


async def test_new_users_take_seats_up_to_the_hard_limit(store: TenantStore) -> None:
    assert await store.admit_seat("acme", "ops_users", "u1", T0, WINDOW, 2) == (True, True, 1)
    assert await store.admit_seat("acme", "ops_users", "u2", T0 + 1, WINDOW, 2) == (True, True, 2)
    refused = await store.admit_seat("acme", "ops_users", "u3", T0 + 2, WINDOW, 2)
    assert refused == SeatAdmission(admitted=False, new=True, used=2)
    # A holder is admitted whatever the limit (even one lowered below the seats held).
    assert await store.admit_seat("acme", "ops_users", "u1", T0 + 3, WINDOW, 1) == (True, False, 2)
    assert await store.seat_holders("acme", "ops_users", T0 + 3, WINDOW) == [
        SeatHolder("u1", T0 + 3),
        SeatHolder("u2", T0 + 1),
    ]


async def test_tenants_and_seat_kinds_are_counted_apart(store: TenantStore) -> None:
    assert await store.admit_seat("acme", "ops_users", "u1", T0, WINDOW, 1) == (True, True, 1)
    assert await store.admit_seat("acme", "drivers", "u1", T0, WINDOW, 1) == (True, True, 1)
    assert await store.admit_seat("globex", "ops_users", "u1", T0, WINDOW, 1) == (True, True, 1)
    assert await store.admit_seat("acme", "drivers", "u2", T0, WINDOW, 1) == (False, True, 1)
    # Seat state alone does not make a tenant known to the license side of the store.
    assert await store.tenants() == []
    assert await store.get("acme") is None


async def test_window_expiry_frees_seats(store: TenantStore) -> None:
    await store.admit_seat("acme", "drivers", "old", T0, WINDOW, 2)
    await store.admit_seat("acme", "drivers", "busy", T0, WINDOW, 2)
    # "busy" comes back ten days later: its last-seen time moves on, "old"'s does not.
    assert await store.admit_seat("acme", "drivers", "busy", T0 + 10 * DAY, WINDOW, 2) == (
        True,
        False,
        2,
    )
    assert await store.admit_seat("acme", "drivers", "new", T0 + WINDOW - 1, WINDOW, 2) == (
        False,
        True,
        2,
    )
    # A full window after "old" was last seen, its seat is free again.
    assert await store.admit_seat("acme", "drivers", "new", T0 + WINDOW, WINDOW, 2) == (
        True,
        True,
        2,
    )
    holders = await store.seat_holders("acme", "drivers", T0 + WINDOW, WINDOW)
    assert [holder.user for holder in holders] == ["new", "busy"]
    # And once "busy" has been away for a whole window, only "new" is left.
    later = T0 + 10 * DAY + WINDOW
    assert [h.user for h in await store.seat_holders("acme", "drivers", later, WINDOW)] == ["new"]
    assert await store.admit_seat("acme", "drivers", "busy", later, WINDOW, 2) == (True, True, 2)


async def test_an_old_timestamp_never_moves_last_seen_back(store: TenantStore) -> None:
    # Two gateways with clocks a little apart: the later sighting wins.
    await store.admit_seat("acme", "ops_users", "u1", T0 + 60, WINDOW, 5)
    assert await store.admit_seat("acme", "ops_users", "u1", T0, WINDOW, 5) == (True, False, 1)
    assert await store.seat_holders("acme", "ops_users", T0 + 60, WINDOW) == [
        SeatHolder("u1", T0 + 60)
    ]


async def test_release_frees_one_seat_and_names_the_tenant(store: TenantStore) -> None:
    await store.admit_seat("acme", "ops_users", "u1", T0, WINDOW, 1)
    async with watching(store) as changes:
        assert await store.release_seat("acme", "ops_users", "u1") is True
        assert await changes.next() == "acme"
        assert await store.release_seat("acme", "ops_users", "u1") is False
        assert await store.release_seat("acme", "drivers", "nobody") is False
        await store.set_extra_seats("globex", 2, 3)
        assert await changes.next() == "globex"  # releasing nothing named nobody
    assert await store.admit_seat("acme", "ops_users", "u2", T0, WINDOW, 1) == (True, True, 1)


async def test_extra_seats(store: TenantStore) -> None:
    assert await store.extra_seats("acme") is None
    await store.set_extra_seats("acme", 3, 10)
    assert await store.extra_seats("acme") == Seats(ops_users=3, drivers=10)
    await store.set_extra_seats("acme", 0, 4)  # replaces, does not add
    assert await store.extra_seats("acme") == Seats(ops_users=0, drivers=4)
    assert await store.extra_seats("globex") is None


# -- usage ------------------------------------------------------------------------------------

# 00:00 UTC two days ago: recent, since the stores forget usage after a retention period.
M0 = int(time.time()) // 86400 * 86400 - 2 * 86400
ONE_DAY = 86400


async def test_usage_buckets_add_up_across_batches(store: TenantStore) -> None:
    await store.add_usage(
        [
            UsageCount("acme", M0, "ops.on_demand", "", 3),
            UsageCount("acme", M0, "ops.on_demand", "erp", 2),
            UsageCount("acme", M0 + 60, "ops.sms_messaging", "", 1),
            UsageCount("globex", M0, "ops.on_demand", "", 7),
        ]
    )
    await store.add_usage(
        [
            UsageCount("acme", M0, "ops.on_demand", "", 4),
            UsageCount("acme", M0 + ONE_DAY, "", "", 5),  # the next day, ungated route
        ]
    )
    await store.add_usage([])
    assert await store.usage("acme", M0) == [
        UsageCount("acme", M0, "ops.on_demand", "", 7),
        UsageCount("acme", M0, "ops.on_demand", "erp", 2),
        UsageCount("acme", M0 + 60, "ops.sms_messaging", "", 1),
        UsageCount("acme", M0 + ONE_DAY, "", "", 5),
    ]
    assert await store.usage("acme", M0 + 60, M0 + ONE_DAY) == [
        UsageCount("acme", M0 + 60, "ops.sms_messaging", "", 1)
    ]
    assert await store.usage("acme", M0 + ONE_DAY + 60) == []
    assert await store.usage("globex", M0 - 3 * ONE_DAY) == [
        UsageCount("globex", M0, "ops.on_demand", "", 7)
    ]
    assert await store.usage("initech", M0) == []
    assert await store.tenants() == []


# -- a fleet: two store objects on one SQLite file or one Redis -------------------------------


async def test_concurrent_new_users_never_exceed_the_limit(store: TenantStore) -> None:
    results = await asyncio.gather(
        *(store.admit_seat("acme", "ops_users", f"user-{n}", T0, WINDOW, 10) for n in range(50))
    )
    assert sum(result.admitted for result in results) == 10
    assert len(await store.seat_holders("acme", "ops_users", T0, WINDOW)) == 10


async def test_two_gateways_admit_no_more_than_the_limit_between_them(shared: Backend) -> None:
    """Two store objects (two gateways) sharing one SQLite file or one Redis, 50 new users
    at once against a limit of 10: exactly 10 are admitted."""
    one, two = shared.open(), shared.open()
    results = await asyncio.gather(
        *(
            (one if n % 2 else two).admit_seat("acme", "drivers", f"driver-{n}", T0, WINDOW, 10)
            for n in range(50)
        )
    )
    admitted = {f"driver-{n}" for n, result in enumerate(results) if result.admitted}
    assert len(admitted) == 10
    assert all(result.new for result in results)
    # What every admission saw is consistent: each admitted user was one of the first 10.
    assert sorted(result.used for result in results if result.admitted) == list(range(1, 11))
    for store_ in (one, two):
        holders = await store_.seat_holders("acme", "drivers", T0, WINDOW)
        assert {holder.user for holder in holders} == admitted


async def test_seats_and_usage_survive_a_restart(shared: Backend) -> None:
    """A gateway restart (a new store object on the same SQLite file, or the same Redis)
    keeps the seat holders, the extra seats and the usage."""
    before = shared.open()
    await before.admit_seat("acme", "ops_users", "u1", T0, WINDOW, 2)
    await before.admit_seat("acme", "ops_users", "u2", T0 + 5, WINDOW, 2)
    await before.set_extra_seats("acme", 1, 2)
    await before.add_usage([UsageCount("acme", M0, "ops.on_demand", "erp", 9)])
    await before.close()

    after = shared.open()
    assert await after.seat_holders("acme", "ops_users", T0 + 10, WINDOW) == [
        SeatHolder("u2", T0 + 5),
        SeatHolder("u1", T0),
    ]
    assert await after.admit_seat("acme", "ops_users", "u3", T0 + 10, WINDOW, 2) == (
        False,
        True,
        2,
    )
    assert await after.extra_seats("acme") == Seats(1, 2)
    assert await after.usage("acme", M0) == [UsageCount("acme", M0, "ops.on_demand", "erp", 9)]


async def test_sqlite_adds_the_seat_tables_to_an_existing_file(
    tmp_path: Path, keyring: KeyRing, issue_key: IssueKey
) -> None:
    import sqlite3

    path = tmp_path / "tenants.db"
    old = SqliteStore(f"sqlite://{path}", keyring)
    await old.put_license(issue_key(sub="acme"))
    await old.close()
    with sqlite3.connect(path) as conn:  # a file from before seats existed
        for table in ("seats", "extra_seats", "usage"):
            conn.execute(f"DROP TABLE {table}")
    conn.close()
    reopened = SqliteStore(f"sqlite://{path}", keyring)
    try:
        assert await reopened.admit_seat("acme", "ops_users", "u1", T0, WINDOW, 1) == (
            True,
            True,
            1,
        )
        record = await reopened.get("acme")
        assert record is not None and len(record.licenses) == 1
    finally:
        await reopened.close()


async def test_redis_outage_is_a_store_error_for_seats_and_usage(
    redis: RedisServer, keyring: KeyRing
) -> None:
    redis_store = RedisStore(redis.url, keyring)
    try:
        await redis_store.admit_seat("acme", "ops_users", "u1", T0, WINDOW, 5)
        redis.stop(kill=True)
        async with asyncio.timeout(DEADLINE):
            with pytest.raises(StoreError, match="admit_seat"):
                await redis_store.admit_seat("acme", "ops_users", "u2", T0, WINDOW, 5)
            with pytest.raises(StoreError, match="add_usage"):
                await redis_store.add_usage([UsageCount("acme", M0, "", "", 1)])
            with pytest.raises(StoreError, match="seat_holders"):
                await redis_store.seat_holders("acme", "ops_users", T0, WINDOW)
    finally:
        await redis_store.close()
