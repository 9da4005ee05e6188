"""The enforcer's caches: verified keys, failed keys, and the signature-check budget."""

from __future__ import annotations

import time

from gateway.enforcer import LicenseCache
from gateway.errors import LicenseError
from gateway.events import EventLog
from gateway.license import KeyRing, License
from gateway.metrics import Metrics
from tests.conftest import IssueKey


def _forged(issue_key: IssueKey, n: int) -> bytes:
    """Well formed, a known kid, a wrong signature: only an Ed25519 check can tell."""
    header, payload, signature = issue_key(serial=n).split(".")
    other = issue_key(serial=n + 1000).split(".")[2]
    return f"{header}.{payload}.{other}".encode()


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
