"""The enforcer without sockets: its caches (verified keys, refused keys, the signature-check
budget, tenant records) and its answers for one ``RequestHead``."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import msgspec

from gateway.caches import OUTAGE_RETRY_SECONDS, bounded_put
from gateway.config import Config
from gateway.enforcer import CLASSIC, FORWARD, NEED_TENANT, LicenseCache
from gateway.errors import LicenseError
from gateway.events import EventLog
from gateway.license import KeyRing, License
from gateway.metrics import Metrics
from gateway.store import open_store
from gateway.verdict import Verdict
from tests.conftest import IssueKey
from tests.enforcing import EnforcerWorld, WorldFactory, body
from tests.redis_server import RedisServer


def _forged(issue_key: IssueKey, n: int) -> bytes:
    """Well formed, a known kid, a wrong signature: only an Ed25519 check can tell."""
    header, payload, signature = issue_key(serial=n).split(".")
    other = issue_key(serial=n + 1000).split(".")[2]
    return f"{header}.{payload}.{other}".encode()


def _resigned(key: bytes, *, same_tag: bool, start: int = 0) -> bytes:
    """``key``'s claims with other signature bytes whose 8-bit tag (``LicenseCache``'s
    keyed hash of the signature) is the key's own, or not."""
    cut = key.rindex(b".")
    tag = hash(key[cut:]) & 0xFF
    for n in itertools.count(start):
        other = key[:cut] + b"." + f"{n:086d}".encode()
        if other != key and (hash(other[cut:]) & 0xFF == tag) is same_tag:
            return other
    raise AssertionError("unreachable")


def test_signature_checks_of_new_keys_are_budgeted(keyring: KeyRing, issue_key: IssueKey) -> None:
    metrics = Metrics()
    cache = LicenseCache(keyring, metrics, verifications_per_second=3)
    valid = issue_key().encode()
    assert isinstance(cache.resolve(valid), License)  # spends one check
    results = [cache.resolve(_forged(issue_key, n)) for n in range(5)]
    reasons = [r.reason for r in results if isinstance(r, LicenseError)]
    assert reasons[:2] == ["license_bad_signature"] * 2
    assert set(reasons[2:]) == {"license_check_busy"}
    # A key verified before the flood is never affected by it.
    assert isinstance(cache.resolve(valid), License)
    # A busy answer is not cached: once the budget refills, the key is checked.
    time.sleep(0.4)
    assert cache.resolve(_forged(issue_key, 4)).reason == "license_bad_signature"  # type: ignore[union-attr]


def test_failed_signatures_are_remembered_and_garbage_is_cheap(
    keyring: KeyRing, issue_key: IssueKey
) -> None:
    metrics = Metrics()
    cache = LicenseCache(keyring, metrics, verifications_per_second=1)
    forged = _forged(issue_key, 1)
    first = cache.resolve(forged)
    assert cache.resolve(forged) is first  # no second Ed25519 check, no budget spent
    for garbage in (b"", b"x.y", b"not-a-key", b"a.b.c"):
        assert cache.resolve(garbage).reason == "license_malformed"  # type: ignore[union-attr]
    metrics.flush()
    checks = metrics.registry.get_sample_value(
        "gateway_license_checks_total", {"result": "license_bad_signature"}
    )
    assert checks == 1


def test_license_invalid_events_are_sampled() -> None:
    metrics = Metrics()
    log = EventLog("stdout:", metrics, per_second={"license_invalid": 5})
    for _ in range(50):
        log.emit("license_invalid", reason="license_malformed")
    log.emit("feature_block", feature="x")  # other kinds are not sampled
    assert log.pending() == 6
    metrics.flush()
    assert (
        metrics.registry.get_sample_value("gateway_events_dropped_total", {"sink": "stdout"}) == 45
    )
    log._queue.clear()
    log.close()


async def test_concurrent_lookups_of_one_tenant_share_one_store_read(
    keyring: KeyRing, issue_key: IssueKey
) -> None:
    import asyncio

    from gateway.decision import TenantRecord
    from gateway.enforcer import TenantCache
    from gateway.store.memory import MemoryStore

    class CountingStore(MemoryStore):
        reads = 0

        async def get(self, tenant: str) -> TenantRecord | None:
            self.reads += 1
            await asyncio.sleep(0.05)  # a store round trip
            return await super().get(tenant)

    store = CountingStore("memory://", keyring)
    await store.put_license(issue_key(sub="acme"))
    cache = TenantCache(store, Metrics())
    waiters = [asyncio.get_running_loop().create_task(cache.fetch("acme")) for _ in range(20)]
    waiters[0].cancel()  # one client goes away: the others still get the record
    await asyncio.gather(*waiters, return_exceptions=True)
    assert store.reads == 1
    record = cache.cached("acme")
    assert isinstance(record, TenantRecord) and record.tenant == "acme"


# ------------------------------------------------------------------ one request, one look-up


async def test_a_license_lookup_is_counted_once_when_the_tenant_is_not_cached(
    config: Config, make_world: WorldFactory, issue_key: IssueKey
) -> None:
    world = make_world(config)
    head = world.head("GET", "/api/v1/shipments", key=issue_key(sub="acme", tier="fleet"))
    enforcer = world.enforcer("operations")
    assert enforcer.check(head).kind == NEED_TENANT  # acme not cached yet
    await enforcer.prefetch(head)
    assert enforcer.check(head, fetched=True).kind == FORWARD
    lookups = world.sample("gateway_license_cache_total", result="hit") + world.sample(
        "gateway_license_cache_total", result="miss"
    )
    assert lookups == 1
    assert world.sample("gateway_license_checks_total", result="valid") == 1


# ------------------------------------------------------------------ a store outage


@asynccontextmanager
async def stored_world(
    config: Config, make_world: WorldFactory, redis: RedisServer, key: str
) -> AsyncIterator[EnforcerWorld]:
    """A world on a real Redis holding ``key``'s tenant; the server is down when it yields."""
    store = open_store(redis.url, config.keyring)
    await store.put_license(key)
    world = make_world(config, store)
    redis.stop(kill=True)
    try:
        yield world
    finally:
        await store.close()


async def test_a_stored_tenant_is_503_store_unavailable_while_the_store_cannot_answer(
    config: Config, make_world: WorldFactory, redis: RedisServer, issue_key: IssueKey
) -> None:
    async with stored_world(config, make_world, redis, issue_key(sub="acme")) as world:
        head = world.head("GET", "/api/v1/shipments", tenant="acme", request_id="rid-1")
        verdict = await world.decide("operations", head)
        assert (verdict.status, body(verdict)["code"]) == (503, "store_unavailable")
        assert b"Retry-After: 1\r\n" in verdict.response_headers
        assert body(verdict)["request_id"] == "rid-1"


async def test_an_absence_learned_during_a_store_outage_is_not_remembered(
    config: Config, make_world: WorldFactory, redis: RedisServer, issue_key: IssueKey
) -> None:
    key = issue_key(sub="acme", tier="fleet")
    async with stored_world(config, make_world, redis, key) as world:
        shipments = world.head("GET", "/api/v1/shipments", tenant="acme")
        assert (await world.decide("operations", shipments)).status == 503
        redis.restart()  # the test server keeps nothing: store the tenant again
        while not await world.store.ping():
            await asyncio.sleep(0.05)
        await world.store.put_license(key)
        await asyncio.sleep(OUTAGE_RETRY_SECONDS + 0.1)
        shipments = world.head("GET", "/api/v1/shipments", tenant="acme")
        after = await world.decide("operations", shipments)
        assert (after.kind, after.tenant) == (FORWARD, "acme")


async def test_a_verified_key_is_decided_on_its_own_while_the_store_cannot_answer(
    config: Config, make_world: WorldFactory, redis: RedisServer, issue_key: IssueKey
) -> None:
    key = issue_key(sub="acme", tier="fleet")
    async with stored_world(config, make_world, redis, key) as world:
        verdict = await world.decide("operations", world.head("GET", "/api/v1/shipments", key=key))
        assert (verdict.kind, verdict.tier) == (FORWARD, "fleet")


# ------------------------------------------------------------------ request ids


async def test_problem_bodies_and_events_carry_the_request_id_of_the_head(
    config: Config, make_world: WorldFactory, issue_key: IssueKey
) -> None:
    world = make_world(config)
    blocked = world.head(
        "POST", "/api/v1/shipments/7/optimize", key=issue_key(tier="core"), request_id="front-42"
    )
    verdict = await world.decide("operations", blocked)
    assert (verdict.status, body(verdict)["request_id"]) == (403, "front-42")
    assert [e["request_id"] for e in world.events("feature_block")] == ["front-42"]
    bad = world.head("GET", "/api/v1/shipments", key="a.b.c", request_id="front-43")
    verdict = await world.decide("operations", bad)
    assert (verdict.status, body(verdict)["request_id"]) == (401, "front-43")
    assert [e["request_id"] for e in world.events("license_invalid")] == ["front-43"]
    path = world.head("GET", "/api/v1/a;b", request_id="front-44")
    assert body(await world.decide("operations", path))["request_id"] == "front-44"
    unnamed = world.head("GET", "/api/v1/shipments")  # no id from the relay: one is made
    assert body(await world.decide("operations", unnamed))["request_id"]


# ------------------------------------------------------------------ key floods


def test_a_refused_key_is_checked_once(keyring: KeyRing) -> None:
    metrics = Metrics()
    cache = LicenseCache(keyring, metrics)
    for _ in range(3):
        assert cache.resolve(b"e30.e30.e30").reason == "license_malformed"  # type: ignore[union-attr]
    metrics.flush()
    registry = metrics.registry
    assert (
        registry.get_sample_value("gateway_license_checks_total", {"result": "license_malformed"})
        == 1
    )
    assert registry.get_sample_value("gateway_license_cache_total", {"result": "hit"}) == 2


def test_other_signature_bytes_on_verified_claims_are_refused_without_a_signature_check(
    keyring: KeyRing, issue_key: IssueKey
) -> None:
    cache = LicenseCache(keyring, Metrics(), verifications_per_second=1)
    valid = issue_key()
    assert isinstance(cache.resolve(valid.encode()), License)  # the one check of the budget
    head, payload, _ = valid.split(".")
    other = issue_key(serial=99).split(".")[2]
    forged = f"{head}.{payload}.{other}".encode()
    # The budget is spent: a key that needed a check would be license_check_busy.
    assert cache.resolve(forged).reason == "license_bad_signature"  # type: ignore[union-attr]


async def test_a_refused_key_gets_the_same_answer_whether_or_not_the_target_was_seen(
    config: Config, make_world: WorldFactory
) -> None:
    world = make_world(config)
    answers = []
    for n in range(3):  # the first one decides the long way, the others need not
        head = world.head("GET", "/api/v1/shipments?x=1", key=f"not-a-key-{n}", request_id=f"r{n}")
        verdict = await world.decide("operations", head)
        answers.append((verdict.status, verdict.outcome, {**body(verdict), "request_id": None}))
    assert answers[0] == answers[1] == answers[2]
    assert answers[0][:2] == (401, "unlicensed")
    assert world.sample("gateway_requests_total", app="operations", outcome="unlicensed") == 3
    events = world.events("license_invalid")
    assert [e["request_id"] for e in events] == ["r0", "r1", "r2"]
    assert {e["route"] for e in events} == {"/api/v1/shipments"}
    # A public route and a classic path stay what they are, whatever key comes along.
    health = await world.decide("operations", world.head("GET", "/api/v1/health", key="bad"))
    assert health.outcome == "public"
    classic = world.head("GET", "/xdispatch/orders", key="bad")
    assert (await world.decide("operations", classic)).kind == CLASSIC


def _answer(verdict: Verdict) -> tuple[Any, ...]:
    """Every field of a verdict, the body without its request id."""
    fields = msgspec.structs.asdict(verdict)
    fields["body"] = {**body(verdict), "request_id": None}
    return tuple(sorted(fields.items()))


def _counts(world: EnforcerWorld) -> tuple[float, ...]:
    return tuple(
        world.sample(name, **labels)
        for name, labels in [
            ("gateway_license_cache_total", {"result": "hit"}),
            ("gateway_license_cache_total", {"result": "miss"}),
            ("gateway_license_checks_total", {"result": "license_malformed"}),
            ("gateway_license_checks_total", {"result": "license_bad_signature"}),
            ("gateway_requests_total", {"app": "operations", "outcome": "unlicensed"}),
        ]
    )


async def test_a_flood_key_gets_the_long_paths_answer_counts_and_event(
    config: Config, make_world: WorldFactory, issue_key: IssueKey
) -> None:
    """Keys refused at a target already known to refuse them (the flood path) get the
    verdict, metrics and license_invalid event the long path gives the same key."""
    valid = issue_key()
    signing_input, _, _ = valid.rpartition(".")
    kinds = {
        "forged on verified claims": f"{signing_input}.{'A' * 86}",
        "no dot": "Z" * 40,
        "too long": "a.b." + "c" * 5000,
        "not base64": "a.b.c",
    }
    target = "/api/v1/shipments?x=1"
    for kind, key in kinds.items():
        long_way, flood = make_world(config), make_world(config)
        for world in (long_way, flood):
            allowed = await world.decide("operations", world.head("GET", target, key=valid))
            assert allowed.kind == FORWARD
        # The flood world has seen a refused key at this target: the next one is a flood key.
        seen = flood.head("GET", target, key="not-a-key", request_id="r0")
        await flood.decide("operations", seen)
        assert flood.shared.rules.refusals, kind
        before = [_counts(long_way), _counts(flood)]
        answers = [
            await world.decide("operations", world.head("GET", target, key=key, request_id="r1"))
            for world in (long_way, flood)
        ]
        assert _answer(answers[0]) == _answer(answers[1]), kind
        assert answers[0].status == 401
        deltas = [
            tuple(a - b for a, b in zip(_counts(world), then, strict=True))
            for world, then in zip((long_way, flood), before, strict=True)
        ]
        assert deltas[0] == deltas[1], kind
        events = [
            [
                {k: v for k, v in e.items() if k not in ("ts", "time")}
                for e in world.events("license_invalid")
                if e["request_id"] == "r1"
            ]
            for world in (long_way, flood)
        ]
        assert events[0] == events[1] and len(events[0]) == 1, kind


def test_a_forgery_whose_tag_matches_is_still_refused_without_a_signature_check(
    keyring: KeyRing, issue_key: IssueKey
) -> None:
    """One forged signature in 256 carries the verified key's 8-bit tag: the flood path
    leaves it to resolve, which refuses it by its signing input, with no Ed25519 check."""
    cache = LicenseCache(keyring, Metrics(), verifications_per_second=1)
    valid = issue_key().encode()
    assert isinstance(cache.resolve(valid), License)  # the one check of the budget
    assert cache.quick_refusal(valid) is True
    forged = _resigned(valid, same_tag=True)
    assert cache.quick_refusal(forged) is True  # looks like the verified key to the flood path
    assert cache.resolve(forged).reason == "license_bad_signature"  # type: ignore[union-attr]
    other = _resigned(valid, same_tag=False)
    assert cache.quick_refusal(other).reason == "license_bad_signature"  # type: ignore[union-attr]


def test_forgeries_on_several_verified_claims_each_meet_their_own_tag(
    keyring: KeyRing, issue_key: IssueKey
) -> None:
    """The flood path remembers the last forged signing input: forgeries alternating
    between two tenants' claims, the verified keys between them, and a key whose only dot
    comes first are each told apart as the long path would."""
    cache = LicenseCache(keyring, Metrics(), verifications_per_second=1000)
    valid = [issue_key(serial=n).encode() for n in (1, 2)]
    for key in valid:
        assert isinstance(cache.resolve(key), License)
    for n in range(6):
        for key in valid:
            forged = _resigned(key, same_tag=False, start=n * 1000)
            assert cache.quick_refusal(forged).reason == "license_bad_signature"  # type: ignore[union-attr]
            assert cache.quick_refusal(key) is True
    assert cache.quick_refusal(b".abc") is None  # for resolve: malformed, not a forgery
    assert cache.resolve(b".abc").reason == "license_malformed"  # type: ignore[union-attr]
    cache.clear()  # a new key ring: nothing is known to be forged any more
    assert cache.quick_refusal(_resigned(valid[0], same_tag=False)) is None


async def test_a_flood_samples_its_events_and_counts_the_rest_as_dropped(
    config: Config, make_world: WorldFactory
) -> None:
    """At the sampled rate, as the long path does: the rest counted in
    ``gateway_events_dropped_total``, none lost from the count."""
    world = make_world(config, per_second=5)
    target = "/api/v1/shipments"
    for n in range(40):
        head = world.head("GET", target, key=f"not-a-key-{n}", request_id=f"r{n}")
        assert (await world.decide("operations", head)).status == 401
    assert world.shared.rules.refusals  # all but the first took the flood path
    written = world.events("license_invalid")
    assert 1 <= len(written) <= 6
    dropped = world.sample("gateway_events_dropped_total", sink="file")
    assert len(written) + dropped == 40


def test_a_verified_key_dropped_from_a_full_cache_verifies_again(
    keyring: KeyRing, issue_key: IssueKey
) -> None:
    """The verified keys and their signing inputs leave the cache together: a key pushed
    out is checked again, never taken for a forgery of itself."""
    cache = LicenseCache(keyring, Metrics(), size=8, verifications_per_second=1000)
    keys = [issue_key(serial=n).encode() for n in range(20)]
    for key in keys:
        assert isinstance(cache.resolve(key), License)
    assert len(cache) <= 8
    assert cache.quick_refusal(keys[0]) is None  # forgotten: resolve decides
    assert isinstance(cache.resolve(keys[0]), License)
    assert isinstance(cache.resolve(keys[-1]), License)


def test_bounded_put_keeps_the_newest_entries_within_the_bound() -> None:
    mapping: dict[int, int] = {}
    for n in range(1000):
        bounded_put(mapping, n, n, 100)
        assert len(mapping) <= 100
    assert 999 in mapping and 0 not in mapping
    assert min(mapping) > 1000 - 100 - 100 // 8  # only the oldest were dropped
    bounded_put(mapping, 999, -1, 100)  # an update keeps its place and drops nothing
    assert mapping[999] == -1 and len(mapping) == len(set(mapping))
