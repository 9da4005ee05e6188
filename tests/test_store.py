"""The tenant store: one behavioural suite over the three engines (memory, SQLite on a file,
Redis against a real ``redis-server``), then what only one engine promises (SQLite: data
survives a restart, a bad path is a clear ``StoreError``; Redis: changes reach every
instance, an outage is a ``StoreError`` and the store recovers when Redis is back).

Nothing asserts a duration: waits are deadlines for something to happen."""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from redis.asyncio import Redis

from gateway.errors import LicenseError
from gateway.license import KeyRing, License, Seats
from gateway.store import StoredKeys, StoreError, TenantStore, open_store
from gateway.store.memory import MemoryStore
from gateway.store.redis_store import RedisStore, redacted
from gateway.store.sqlite import SqliteStore, sqlite_path
from tests.conftest import IssueKey, sign_key
from tests.redis_server import RedisServer
from tests.stores import DEADLINE, Backend, fresh_prefix, watching

# The engines (``store``, ``backend``, ``shared``) and servers (``redis_server``, ``redis``)
# are fixtures of tests/conftest.py, shared with tests/test_store_seats.py.

# -- the behaviour every engine shares ------------------------------------------------------


async def test_unknown_tenant_is_none(store: TenantStore) -> None:
    assert await store.get("nobody") is None
    assert await store.tenants() == []
    assert await store.ping()


async def test_put_license_stores_the_verified_license(
    store: TenantStore, issue_key: IssueKey
) -> None:
    token = issue_key(sub="acme", tier="fleet", addons=["sms_messaging"], serial=3)
    lic = await store.put_license(token)
    assert lic is not None
    assert (lic.claims.sub, lic.claims.tier, lic.claims.serial) == ("acme", "fleet", 3)
    assert lic.kid == "test"

    record = await store.get("acme")
    assert record is not None
    assert record.tenant == "acme"
    assert record.licenses == (lic,)
    assert record.licenses[0].claims.addons == ("sms_messaging",)
    assert not record.suspended
    assert record.revoked == frozenset()
    assert record.min_serial == 0
    assert record.usage is None
    assert await store.tenants() == ["acme"]


async def test_older_or_equal_serial_is_refused(store: TenantStore, issue_key: IssueKey) -> None:
    current = await store.put_license(issue_key(sub="acme", tier="fleet", serial=5))
    assert current is not None
    assert await store.put_license(issue_key(sub="acme", tier="core", serial=5)) is None
    assert await store.put_license(issue_key(sub="acme", tier="core", serial=2)) is None
    record = await store.get("acme")
    assert record is not None
    assert record.licenses == (current,)


async def test_the_same_key_twice_is_refused(store: TenantStore, issue_key: IssueKey) -> None:
    token = issue_key(sub="acme", serial=1)
    assert await store.put_license(token) is not None
    assert await store.put_license(token) is None
    record = await store.get("acme")
    assert record is not None and len(record.licenses) == 1


async def test_current_and_scheduled_licenses_are_kept_newest_first(
    store: TenantStore, issue_key: IssueKey
) -> None:
    now = int(time.time())
    first = await store.put_license(issue_key(sub="acme", tier="core", serial=1))
    upgrade = await store.put_license(issue_key(sub="acme", tier="fleet", serial=2))
    downgrade = await store.put_license(
        issue_key(sub="acme", tier="core", serial=7, nbf=now + 30 * 86400, exp=now + 90 * 86400)
    )
    assert first and upgrade and downgrade
    record = await store.get("acme")
    assert record is not None
    assert record.licenses == (downgrade, upgrade, first)
    assert [lic.claims.serial for lic in record.licenses] == [7, 2, 1]


async def test_tenants_are_kept_apart(store: TenantStore, issue_key: IssueKey) -> None:
    acme = await store.put_license(issue_key(sub="acme", serial=9))
    globex = await store.put_license(issue_key(sub="globex", serial=1))
    assert acme and globex
    acme_record, globex_record = await store.get("acme"), await store.get("globex")
    assert acme_record is not None and acme_record.licenses == (acme,)
    assert globex_record is not None and globex_record.licenses == (globex,)


async def test_a_key_that_does_not_verify_raises_and_stores_nothing(
    store: TenantStore, issue_key: IssueKey
) -> None:
    impostor = Ed25519PrivateKey.generate()
    bad_signature = sign_key(impostor, "test", sub="acme")
    unknown_kid = sign_key(impostor, "elsewhere", sub="acme")
    header, payload, _ = issue_key(sub="acme").split(".")
    for token, reason in [
        (bad_signature, "license_bad_signature"),
        (unknown_kid, "license_unknown_key"),
        (f"{header}.{payload}.AAAA", "license_bad_signature"),
        ("not-a-key", "license_malformed"),
    ]:
        with pytest.raises(LicenseError) as caught:
            await store.put_license(token)
        assert caught.value.reason == reason
    assert await store.get("acme") is None
    assert await store.tenants() == []


async def test_suspend_and_reinstate(store: TenantStore, issue_key: IssueKey) -> None:
    lic = await store.put_license(issue_key(sub="acme"))
    assert await store.set_suspended("acme", True) is True
    assert await store.set_suspended("acme", True) is False
    record = await store.get("acme")
    assert record is not None and record.suspended and record.licenses == (lic,)
    assert await store.set_suspended("acme", False) is True
    assert await store.set_suspended("acme", False) is False
    record = await store.get("acme")
    assert record is not None and not record.suspended


async def test_suspending_an_unknown_tenant_creates_it(store: TenantStore) -> None:
    assert await store.set_suspended("newco", True) is True
    record = await store.get("newco")
    assert record is not None and record.suspended and record.licenses == ()
    # Reinstating a tenant never heard of is a change too: the tenant becomes known.
    assert await store.set_suspended("other", False) is True
    assert await store.set_suspended("other", False) is False
    assert await store.tenants() == ["newco", "other"]


async def test_revoke(store: TenantStore, issue_key: IssueKey) -> None:
    lic = await store.put_license(issue_key(sub="acme", jti="lic-1"))
    assert lic is not None
    assert await store.revoke("acme", "lic-1") is True
    assert await store.revoke("acme", "lic-1") is False
    assert await store.revoke("acme", "lic-0") is True
    record = await store.get("acme")
    assert record is not None
    assert record.revoked == frozenset({"lic-0", "lic-1"})
    assert record.licenses == (lic,)  # revoking keeps the key; the decision refuses it
    # Revocations are per tenant.
    assert await store.revoke("globex", "lic-1") is True
    globex = await store.get("globex")
    assert globex is not None and globex.revoked == frozenset({"lic-1"})


async def test_set_usage(store: TenantStore, issue_key: IssueKey) -> None:
    await store.set_usage("acme", 3, 40)
    record = await store.get("acme")
    assert record is not None and record.usage == Seats(ops_users=3, drivers=40)
    await store.put_license(issue_key(sub="acme"))
    await store.set_usage("acme", 4, 0)
    record = await store.get("acme")
    assert record is not None and record.usage == Seats(ops_users=4, drivers=0)
    assert len(record.licenses) == 1 and not record.suspended


async def test_claim_event_once(store: TenantStore) -> None:
    assert await store.claim_event("evt_1") is True
    assert await store.claim_event("evt_1") is False
    assert await store.claim_event("evt_2") is True
    assert await store.tenants() == []  # an event id is not a tenant


async def test_release_event_lets_a_retry_claim_it_again(store: TenantStore) -> None:
    assert await store.claim_event("evt_failed") is True
    await store.release_event("evt_failed")
    assert await store.claim_event("evt_failed") is True
    await store.release_event("evt_never_claimed")  # harmless


async def test_claim_event_concurrently(store: TenantStore) -> None:
    results = await asyncio.gather(*(store.claim_event("evt_race") for _ in range(20)))
    assert sorted(results) == [False] * 19 + [True]


async def test_classic_keys(store: TenantStore) -> None:
    assert await store.is_classic_key("ABCDE-FGHIJ-KLMNO-PQRST-UVWXY") is False
    await store.import_classic_key("acme", "ABCDE-FGHIJ-KLMNO-PQRST-UVWXY")
    await store.import_classic_key("acme", "ABCDE-FGHIJ-KLMNO-PQRST-UVWXY")  # idempotent
    assert await store.is_classic_key("ABCDE-FGHIJ-KLMNO-PQRST-UVWXY") is True
    assert await store.is_classic_key("ZZZZZ-FGHIJ-KLMNO-PQRST-UVWXY") is False
    assert await store.remove_classic_key("ZZZZZ-FGHIJ-KLMNO-PQRST-UVWXY") is False
    # A classic key alone does not make a tenant record (like the reference engine).
    assert await store.tenants() == []
    assert await store.remove_classic_key("ABCDE-FGHIJ-KLMNO-PQRST-UVWXY") is True
    assert await store.is_classic_key("ABCDE-FGHIJ-KLMNO-PQRST-UVWXY") is False


async def test_tenants_lists_every_known_tenant_sorted(
    store: TenantStore, issue_key: IssueKey
) -> None:
    await store.put_license(issue_key(sub="zeta"))
    await store.set_suspended("alpha", True)
    await store.revoke("mid", "lic-9")
    await store.set_usage("beta", 1, 1)
    assert await store.put_license(issue_key(sub="zeta", serial=1)) is None
    assert await store.tenants() == ["alpha", "beta", "mid", "zeta"]


async def test_list_tenants_reads_every_record_as_get_would(
    store: TenantStore, issue_key: IssueKey
) -> None:
    assert await store.list_tenants() == []
    await store.put_license(issue_key(sub="zeta", tier="core", serial=1))
    await store.put_license(issue_key(sub="zeta", tier="fleet", serial=4, jti="zeta-4"))
    await store.revoke("zeta", "zeta-4")
    await store.set_suspended("alpha", True)
    await store.set_usage("beta", 2, 7)
    await store.revoke("mid", "lic-9")
    await store.import_classic_key("classic-only", "ABCDE-FGHIJ-KLMNO-PQRST-UVWXY")

    listed = await store.list_tenants()
    assert [record.tenant for record in listed] == ["alpha", "beta", "mid", "zeta"]
    assert listed == [await store.get(tenant) for tenant in await store.tenants()]
    zeta = listed[-1]
    assert [lic.claims.serial for lic in zeta.licenses] == [4, 1]
    assert zeta.revoked == frozenset({"zeta-4"}) and not zeta.suspended
    assert listed[0].suspended and listed[1].usage == Seats(ops_users=2, drivers=7)


async def test_list_tenants_reads_more_tenants_than_one_batch(
    store: TenantStore, issue_key: IssueKey
) -> None:
    from gateway.store.redis_store import LIST_BATCH

    names = [f"t{index:04d}" for index in range(LIST_BATCH + 3)]
    for name in names:
        await store.set_usage(name, 1, 2)
    listed = await store.list_tenants()
    assert [record.tenant for record in listed] == names
    assert {record.usage for record in listed} == {Seats(ops_users=1, drivers=2)}


async def test_changes_name_the_tenant_of_every_write(
    store: TenantStore, issue_key: IssueKey
) -> None:
    async with watching(store) as changes:
        await store.put_license(issue_key(sub="acme", serial=2))
        assert await changes.next() == "acme"
        await store.set_suspended("globex", True)
        assert await changes.next() == "globex"
        await store.revoke("acme", "lic-1")
        assert await changes.next() == "acme"
        await store.set_usage("initech", 1, 2)
        assert await changes.next() == "initech"
        # Writes that change nothing name nobody: the next change is the next real one.
        assert await store.put_license(issue_key(sub="acme", serial=1)) is None
        assert await store.set_suspended("globex", True) is False
        assert await store.revoke("acme", "lic-1") is False
        await store.claim_event("evt_1")
        await store.import_classic_key("acme", "ABCDE-FGHIJ-KLMNO-PQRST-UVWXY")
        await store.set_suspended("hooli", False)
        assert await changes.next() == "hooli"


async def test_every_changes_iterator_sees_every_change(store: TenantStore) -> None:
    async with watching(store) as first, watching(store) as second:
        await store.set_usage("acme", 1, 1)
        assert await first.next() == "acme"
        assert await second.next() == "acme"


# -- two store objects on the same data (two processes) ---------------------------------------


async def test_claim_event_from_two_instances(shared: Backend) -> None:
    one, two = shared.open(), shared.open()
    ids = [f"evt_{n}" for n in range(10)]
    results = await asyncio.gather(
        *(store.claim_event(event_id) for event_id in ids for store in (one, two, one, two))
    )
    for n in range(len(ids)):
        assert sorted(results[4 * n : 4 * n + 4]) == [False, False, False, True]


async def test_put_license_from_two_instances_never_goes_backwards(
    shared: Backend, issue_key: IssueKey
) -> None:
    one, two = shared.open(), shared.open()
    serials = [4, 9, 1, 7, 12, 3, 12, 8, 2, 11, 6, 10, 5]
    tokens = [issue_key(sub="acme", serial=serial) for serial in serials]
    results = await asyncio.gather(
        *((one if n % 2 else two).put_license(token) for n, token in enumerate(tokens))
    )
    assert any(lic is not None and lic.claims.serial == 12 for lic in results)
    for store in (one, two):
        record = await store.get("acme")
        assert record is not None
        held = [lic.claims.serial for lic in record.licenses]
        assert held[0] == 12
        assert held == sorted(set(held), reverse=True)
        accepted = sorted((lic.claims.serial for lic in results if lic is not None), reverse=True)
        assert held == accepted


async def test_stored_keys_that_no_longer_verify_are_skipped_and_logged_once(
    shared: Backend, keyring: KeyRing, issue_key: IssueKey, caplog: pytest.LogCaptureFixture
) -> None:
    retired = Ed25519PrivateKey.generate()
    before_rotation = KeyRing({**keyring.keys, "retired": retired.public_key()})
    old = await shared.open(before_rotation).put_license(
        sign_key(retired, "retired", sub="acme", serial=1)
    )
    current = await shared.open(before_rotation).put_license(issue_key(sub="acme", serial=2))
    assert old and current

    after_rotation = shared.open(keyring)  # the retired key is gone from the ring
    with caplog.at_level(logging.WARNING, logger="gateway.store"):
        for _ in range(3):
            record = await after_rotation.get("acme")
            assert record is not None and record.licenses == (current,)
    warnings = [r for r in caplog.records if "no longer verifies" in r.getMessage()]
    assert len(warnings) == 1
    assert "acme" in warnings[0].getMessage()
    # The stored serial still counts: an older key cannot come back after a rotation.
    assert await after_rotation.put_license(issue_key(sub="acme", serial=1)) is None


class CountingKeyRing(KeyRing):
    """The real key ring, counting its signature checks."""

    __slots__ = ("checks",)

    def __init__(self, ring: KeyRing) -> None:
        super().__init__(ring.keys)
        self.checks = 0

    def verify(self, token: str) -> License:
        self.checks += 1
        return super().verify(token)


async def test_each_stored_key_is_verified_once_not_on_every_read(
    backend: Backend, keyring: KeyRing, issue_key: IssueKey
) -> None:
    """A store read used to pay one Ed25519 check per stored key, outside the proxy's
    verification budget; now once per key (and key ring)."""
    counting = CountingKeyRing(keyring)
    store = backend.open(counting)
    for serial in (1, 2, 3):
        assert await store.put_license(issue_key(sub="acme", serial=serial)) is not None
    retired = sign_key(Ed25519PrivateKey.generate(), "test", sub="acme", serial=9)
    with pytest.raises(LicenseError):
        await store.put_license(retired)
    for _ in range(5):
        record = await store.get("acme")
        assert record is not None and len(record.licenses) == 3
    assert counting.checks == 4
    store.use_keyring(counting)  # a new ring (a reload): every verdict is earned again
    assert await store.get("acme") is not None
    assert counting.checks == 7


async def test_stored_key_verdicts_and_warnings_are_bounded(
    keyring: KeyRing, caplog: pytest.LogCaptureFixture
) -> None:
    keys = StoredKeys(keyring, "test", size=8)
    stranger = Ed25519PrivateKey.generate()
    tokens = [sign_key(stranger, "test", sub="acme", serial=n) for n in range(50)]
    with caplog.at_level(logging.WARNING, logger="gateway.store"):
        assert keys.licenses("acme", tokens) == ()
        assert len(keys) == 8
        assert keys.licenses("acme", tokens[-8:]) == ()  # remembered: no second warning
    warnings = [r for r in caplog.records if "no longer verifies" in r.getMessage()]
    assert len(warnings) == 50


# -- SQLite -------------------------------------------------------------------------------------


async def test_sqlite_keeps_everything_across_a_restart(
    tmp_path: Path, keyring: KeyRing, issue_key: IssueKey
) -> None:
    url = f"sqlite://{tmp_path / 'tenants.db'}"
    before = SqliteStore(url, keyring)
    current = await before.put_license(issue_key(sub="acme", tier="fleet", serial=4))
    await before.set_suspended("acme", True)
    await before.revoke("acme", "lic-1")
    await before.set_usage("acme", 2, 30)
    assert await before.claim_event("evt_1")
    await before.import_classic_key("acme", "ABCDE-FGHIJ-KLMNO-PQRST-UVWXY")
    expected = await before.get("acme")
    await before.close()

    after = SqliteStore(url, keyring)
    try:
        assert await after.get("acme") == expected
        assert expected is not None and expected.licenses == (current,)
        assert expected.suspended and expected.revoked == {"lic-1"}
        assert expected.usage == Seats(2, 30)
        assert await after.claim_event("evt_1") is False
        assert await after.is_classic_key("ABCDE-FGHIJ-KLMNO-PQRST-UVWXY")
        assert await after.tenants() == ["acme"]
        assert await after.put_license(issue_key(sub="acme", serial=4)) is None
    finally:
        await after.close()


async def test_sqlite_file_is_in_wal_mode(tmp_path: Path, keyring: KeyRing) -> None:
    path = tmp_path / "tenants.db"
    store = SqliteStore(f"sqlite://{path}", keyring)
    await store.set_usage("acme", 1, 1)
    await store.close()
    import sqlite3

    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone() == ("wal",)
        tables = {name for (name,) in conn.execute("SELECT name FROM sqlite_master")}
    conn.close()
    assert {"licenses", "tenants", "revoked", "events", "classic_keys"} <= tables


async def test_sqlite_path_that_cannot_be_opened_is_a_store_error(
    tmp_path: Path, keyring: KeyRing
) -> None:
    path = tmp_path / "missing-folder" / "tenants.db"
    store = SqliteStore(f"sqlite://{path}", keyring)  # nothing touched yet
    try:
        with pytest.raises(StoreError, match="missing-folder/tenants.db") as caught:
            await store.get("acme")
        assert "cannot open" in str(caught.value)
        with pytest.raises(StoreError, match="missing-folder"):
            await store.set_usage("acme", 1, 1)
        assert await store.ping() is False
        # Fixed by the operator: the next call opens the file.
        path.parent.mkdir()
        assert await store.get("acme") is None
        assert await store.ping() is True
    finally:
        await store.close()


async def test_sqlite_file_that_is_not_a_database_is_a_store_error(
    tmp_path: Path, keyring: KeyRing
) -> None:
    path = tmp_path / "tenants.db"
    path.write_bytes(b"this is not an SQLite database\n" * 200)
    store = SqliteStore(f"sqlite://{path}", keyring)
    try:
        with pytest.raises(StoreError, match=str(path)) as caught:
            await store.tenants()
        assert "not a database" in str(caught.value)
    finally:
        await store.close()


async def test_sqlite_folder_as_path_is_a_store_error(tmp_path: Path, keyring: KeyRing) -> None:
    store = SqliteStore(f"sqlite://{tmp_path}", keyring)
    try:
        with pytest.raises(StoreError, match=str(tmp_path)):
            await store.claim_event("evt_1")
    finally:
        await store.close()


async def test_sqlite_in_memory(keyring: KeyRing, issue_key: IssueKey) -> None:
    store = SqliteStore("sqlite:///:memory:", keyring)
    try:
        assert await store.put_license(issue_key(sub="acme")) is not None
        record = await store.get("acme")
        assert record is not None and len(record.licenses) == 1
    finally:
        await store.close()


async def test_sqlite_closed_store_is_a_store_error(tmp_path: Path, keyring: KeyRing) -> None:
    store = SqliteStore(f"sqlite://{tmp_path / 'tenants.db'}", keyring)
    await store.set_usage("acme", 1, 1)
    await store.close()
    await store.close()  # twice is fine
    with pytest.raises(StoreError, match="closed"):
        await store.get("acme")


def test_sqlite_urls() -> None:
    assert sqlite_path("sqlite:///var/lib/gateway/tenants.db") == "/var/lib/gateway/tenants.db"
    assert sqlite_path("sqlite://tenants.db") == "tenants.db"
    assert sqlite_path("sqlite:///:memory:") == ":memory:"
    with pytest.raises(ValueError, match="no database path"):
        sqlite_path("sqlite://")


# -- Redis --------------------------------------------------------------------------------------


async def test_redis_change_through_one_instance_reaches_another(
    redis_server: RedisServer, keyring: KeyRing, issue_key: IssueKey
) -> None:
    prefix = fresh_prefix()
    one = RedisStore(redis_server.url, keyring, prefix=prefix)
    two = RedisStore(redis_server.url, keyring, prefix=prefix)
    try:
        async with watching(two, writer=one) as seen_by_two, watching(one) as seen_by_one:
            upgrade = await one.put_license(issue_key(sub="acme", tier="fleet", serial=2))
            assert await seen_by_two.next() == "acme"
            assert await seen_by_one.next() == "acme"  # the writer hears itself too
            record = await two.get("acme")
            assert record is not None and record.licenses == (upgrade,)
            await two.set_suspended("acme", True)
            assert await seen_by_one.next() == "acme"
            assert await seen_by_two.next() == "acme"
    finally:
        await one.close()
        await two.close()


async def connections_received(client: Redis) -> int:
    stats = await client.info("stats")
    return int(stats["total_connections_received"])


async def test_a_quiet_redis_subscription_is_kept_not_renewed(
    redis_server: RedisServer, keyring: KeyRing
) -> None:
    """Heartbeats on a quiet channel must be answered and seen: a subscription renewed
    after each unanswered PING re-read every tenant (emptying every gateway's tenant
    cache) and lost the changes published meanwhile."""
    prefix = fresh_prefix()
    store = RedisStore(redis_server.url, keyring, prefix=prefix, heartbeat=0.2)
    probe = Redis.from_url(redis_server.url)
    try:
        await store.set_usage("acme", 1, 1)  # a tenant a re-read would name
        async with watching(store) as changes:
            before = await connections_received(probe)
            await asyncio.sleep(3.0)  # fifteen heartbeat intervals of silence
            assert changes.queue.empty(), "the subscription was renewed and re-read"
            assert await connections_received(probe) == before, "a new connection was made"
            await store.set_usage("globex", 1, 1)
            assert await changes.next() == "globex"  # and it still hears changes
    finally:
        await probe.aclose()
        await store.close()


async def test_redis_prefixes_keep_stores_apart(
    redis_server: RedisServer, keyring: KeyRing
) -> None:
    one = RedisStore(redis_server.url, keyring, prefix="left:")
    two = RedisStore(redis_server.url, keyring, prefix="right:")
    try:
        await one.set_usage("acme", 1, 1)
        assert await two.get("acme") is None
        assert await one.claim_event("evt_shared")
        assert await two.claim_event("evt_shared")
    finally:
        await one.close()
        await two.close()


async def test_redis_outage_is_a_store_error_and_the_store_recovers(
    redis: RedisServer, keyring: KeyRing, issue_key: IssueKey
) -> None:
    store = open_store(redis.url, keyring)
    assert isinstance(store, RedisStore)
    try:
        async with watching(store) as changes:
            await store.set_usage("acme", 1, 1)
            assert await changes.next() == "acme"

            redis.stop(kill=True)
            async with asyncio.timeout(DEADLINE):
                with pytest.raises(StoreError, match=f"127.0.0.1:{redis.port}"):
                    await store.get("acme")
                with pytest.raises(StoreError):
                    await store.put_license(issue_key(sub="acme", serial=2))
                with pytest.raises(StoreError):
                    await store.claim_event("evt_1")
                assert await store.ping() is False

            redis.restart()  # empty: the test server keeps nothing
            loop = asyncio.get_running_loop()
            deadline = loop.time() + DEADLINE
            while not await store.ping():
                assert loop.time() < deadline, "the store never reconnected"
                await asyncio.sleep(0.05)
            assert await store.get("acme") is None
            assert await store.put_license(issue_key(sub="acme", serial=2)) is not None
            # The changes() iterator came back by itself (after its backoff).
            await changes.until_seen("globex", lambda: store.set_usage("globex", 1, 1))
    finally:
        await store.close()


async def test_redis_unreachable_from_the_start(keyring: KeyRing) -> None:
    from tests.harness import free_port

    store = RedisStore(f"redis://127.0.0.1:{free_port()}/0", keyring)
    try:
        async with asyncio.timeout(DEADLINE):
            with pytest.raises(StoreError, match="ConnectionError"):
                await store.tenants()
            assert await store.ping() is False
    finally:
        await store.close()


async def test_redis_changes_iterator_ends_on_close(
    redis_server: RedisServer, keyring: KeyRing
) -> None:
    store = RedisStore(redis_server.url, keyring, prefix=fresh_prefix())
    seen: list[str] = []

    async def pump() -> None:
        async for tenant in store.changes():
            seen.append(tenant)

    async with asyncio.timeout(DEADLINE), asyncio.TaskGroup() as group:
        group.create_task(pump())
        await asyncio.sleep(0)
        await store.close()
    # The TaskGroup returned: the iterator ended instead of reconnecting forever.


def test_redis_url_password_is_redacted() -> None:
    assert redacted("redis://:s3cret@cache:6379/0") == "redis://:***@cache:6379/0"
    assert redacted("redis://gw:s3cret@cache:6379/0") == "redis://gw:***@cache:6379/0"
    assert redacted("redis://cache:6379/0") == "redis://cache:6379/0"


def test_open_store_picks_the_engine(tmp_path: Path, keyring: KeyRing) -> None:
    assert isinstance(open_store("memory://", keyring), MemoryStore)
    assert isinstance(open_store(f"sqlite://{tmp_path / 'x.db'}", keyring), SqliteStore)
    assert isinstance(open_store("redis://127.0.0.1:6379/0", keyring), RedisStore)
