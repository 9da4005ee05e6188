"""Reminders (README "Reminders"): ``license_expiring`` before a license's ``exp``, a trial's
end and a grandfather window's end, once per tenant, license, kind and lead time — by the
pure ``due_reminders`` and by real gateways on SQLite and on a shared Redis."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from gateway.config import MAX_LEAD_DAYS
from gateway.decision import Policy, TenantRecord
from gateway.license import KeyRing
from gateway.matrix import TierMatrix
from gateway.reminders import Reminder, due_reminders
from gateway.store import open_store
from gateway.store.redis_store import EVENT_TTL_SECONDS
from gateway.store.sqlite import EVENT_RETENTION_SECONDS
from tests.conftest import IssueKey
from tests.harness import Gateway, running_gateway, two_gateways
from tests.redis_server import RedisServer

DAY = 86400
NOW = 1_800_000_000
LEAD_DAYS = (30, 7, 1)
DEADLINE = 20.0


def record(keyring: KeyRing, *tokens: str, suspended: bool = False) -> TenantRecord:
    licenses = tuple(keyring.verify(token) for token in tokens)
    return TenantRecord(tenant=licenses[0].claims.sub, suspended=suspended, licenses=licenses)


def key(issue_key: IssueKey, **claims: Any) -> str:
    """A key of tenant ``acme`` in force since a day before ``NOW``."""
    fields: dict[str, Any] = {"sub": "acme", "iat": NOW - DAY, "nbf": NOW - DAY, **claims}
    return issue_key(**fields)


def summary(reminders: Sequence[Reminder]) -> list[tuple[Any, ...]]:
    return [
        (r.kind, r.lead_days, r.days_left, r.tier, r.then, r.then_tier, r.ends_at, r.then_at)
        for r in reminders
    ]


GRACE = 7 * DAY


@pytest.mark.parametrize(
    ("claims", "expected"),
    [
        pytest.param(
            [{"tier": "fleet", "exp": NOW + 29 * DAY}],
            [("license", 30, 29, "fleet", "restrict", "core", NOW + 29 * DAY, NOW + 36 * DAY)],
            id="29-days-then-restricted-to-the-lowest-tier-after-grace",
        ),
        pytest.param(
            [{"tier": "fleet", "exp": NOW + 6 * DAY}],
            [("license", 7, 6, "fleet", "restrict", "core", NOW + 6 * DAY, NOW + 13 * DAY)],
            id="6-days-only-the-7-day-reminder",
        ),
        pytest.param(
            [{"tier": "fleet", "exp": NOW + 3600}],
            [("license", 1, 1, "fleet", "restrict", "core", NOW + 3600, NOW + 3600 + GRACE)],
            id="an-hour-left-a-started-day-counts",
        ),
        pytest.param([{"tier": "fleet", "exp": NOW + 31 * DAY}], [], id="beyond-every-lead-time"),
        pytest.param([{"tier": "fleet", "exp": NOW - DAY}], [], id="lapsed-already"),
        pytest.param(
            [{"tier": "enterprise", "trial": True, "exp": NOW + 3 * DAY}],
            [("trial", 7, 3, "enterprise", "revoke", None, NOW + 3 * DAY, NOW + 3 * DAY)],
            id="trial-alone-is-revoked",
        ),
        pytest.param(
            [
                {"tier": "core", "serial": 1, "exp": NOW + 300 * DAY},
                {"tier": "enterprise", "serial": 2, "trial": True, "exp": NOW + 3 * DAY},
            ],
            [("trial", 7, 3, "enterprise", "revoke", "core", NOW + 3 * DAY, NOW + 3 * DAY)],
            id="trial-over-a-paid-license-falls-back-to-it",
        ),
        pytest.param(
            [
                {
                    "tier": "core",
                    "exp": NOW + 365 * DAY,
                    "grandfather_tier": "fleet",
                    "grandfather_until": NOW + 20 * DAY,
                }
            ],
            [("grandfather", 30, 20, "fleet", "downgrade", "core", NOW + 20 * DAY, NOW + 20 * DAY)],
            id="grandfather-window-ends",
        ),
        pytest.param(
            [
                {
                    "tier": "core",
                    "exp": NOW + 5 * DAY,
                    "grandfather_tier": "fleet",
                    "grandfather_until": NOW + 20 * DAY,
                }
            ],
            [("license", 7, 5, "fleet", "restrict", "core", NOW + 5 * DAY, NOW + 12 * DAY)],
            id="grandfather-window-past-exp-only-the-license-ends",
        ),
        pytest.param(
            [{"tier": "fleet", "expiry": "maintain", "exp": NOW + 6 * DAY}],
            [("license", 7, 6, "fleet", "maintain", "fleet", NOW + 6 * DAY, None)],
            id="maintain-strategy",
        ),
        pytest.param(
            [{"tier": "fleet", "expiry": "revoke", "exp": NOW + 6 * DAY}],
            [("license", 7, 6, "fleet", "revoke", None, NOW + 6 * DAY, NOW + 6 * DAY)],
            id="revoke-strategy",
        ),
        pytest.param(
            [
                {"tier": "fleet", "serial": 1, "exp": NOW + 6 * DAY},
                {"tier": "fleet", "serial": 2, "nbf": NOW + 6 * DAY, "exp": NOW + 371 * DAY},
            ],
            [],
            id="renewal-scheduled-nothing-ends",
        ),
    ],
)
def test_due_reminders(
    matrix: TierMatrix,
    keyring: KeyRing,
    issue_key: IssueKey,
    claims: list[dict[str, Any]],
    expected: list[tuple[Any, ...]],
) -> None:
    tokens = [key(issue_key, jti=f"lic-{n}", **fields) for n, fields in enumerate(claims)]
    policy = Policy(matrix=matrix, grace_seconds=GRACE)
    found = due_reminders(record(keyring, *tokens), policy, LEAD_DAYS, NOW)
    assert summary(found) == expected
    assert all(r.tenant == "acme" for r in found)


def test_a_suspended_tenant_gets_no_reminder(
    matrix: TierMatrix, keyring: KeyRing, issue_key: IssueKey
) -> None:
    token = key(issue_key, tier="fleet", exp=NOW + 6 * DAY)
    tenant = record(keyring, token, suspended=True)
    assert due_reminders(tenant, Policy(matrix=matrix), LEAD_DAYS, NOW) == []


def test_the_claim_id_names_tenant_license_kind_and_lead_time(
    matrix: TierMatrix, keyring: KeyRing, issue_key: IssueKey
) -> None:
    token = key(issue_key, tier="fleet", jti="lic-1", exp=NOW + 6 * DAY)
    (found,) = due_reminders(record(keyring, token), Policy(matrix=matrix), LEAD_DAYS, NOW)
    assert found.claim_id == "reminder:acme:lic-1:license:7"


def test_a_sent_reminder_is_remembered_past_the_end_it_announced() -> None:
    """A claim is made at most the longest lead time before the end; the store keeps claimed
    ids longer than that, so no scan after it can claim the same reminder again."""
    assert EVENT_RETENTION_SECONDS >= MAX_LEAD_DAYS * DAY
    assert EVENT_TTL_SECONDS >= MAX_LEAD_DAYS * DAY


# --------------------------------------------------------------------------- real gateways


def fleet_keys(issue_key: IssueKey) -> list[str]:
    """Four ends within a lead time and one beyond, from now (the gateway's clock)."""
    now = int(time.time())
    return [
        issue_key(sub="soon", jti="lic-soon", tier="fleet", exp=now + 29 * DAY),
        issue_key(sub="week", jti="lic-week", tier="fleet", exp=now + 6 * DAY),
        issue_key(sub="trial", jti="lic-trial", tier="enterprise", trial=True, exp=now + 3 * DAY),
        issue_key(
            sub="old",
            jti="lic-old",
            tier="core",
            exp=now + 365 * DAY,
            grandfather_tier="fleet",
            grandfather_until=now + 20 * DAY,
        ),
        issue_key(sub="later", jti="lic-later", tier="fleet", exp=now + 90 * DAY),
    ]


EXPECTED = Counter(
    {
        ("soon", "lic-soon", "license", 30, 29, "restrict", "core"): 1,
        ("week", "lic-week", "license", 7, 6, "restrict", "core"): 1,
        ("trial", "lic-trial", "trial", 7, 3, "revoke", None): 1,
        ("old", "lic-old", "grandfather", 30, 20, "downgrade", "core"): 1,
    }
)


def reminders_sent(*gateways: Gateway) -> Counter[tuple[Any, ...]]:
    return Counter(
        (
            e["tenant"],
            e["license_id"],
            e["kind"],
            e["lead_days"],
            e["days_left"],
            e["then"],
            e["then_tier"],
        )  # fmt: skip
        for gateway in gateways
        for e in gateway.events()
        if e["event"] == "license_expiring"
    )


async def scanned(gateways: Sequence[Gateway], scans: int) -> None:
    """Until every gateway has finished ``scans`` more scans (fails, never hangs)."""
    targets = [gateway.runtime.reminders.scans + scans for gateway in gateways]
    async with asyncio.timeout(DEADLINE):
        while any(g.runtime.reminders.scans < t for g, t in zip(gateways, targets, strict=True)):
            await asyncio.sleep(0.02)


FAST_SCANS = "\n[reminders]\ninterval_seconds = 0.02\n"


async def put_licenses(url: str, keyring: KeyRing, tokens: Sequence[str]) -> None:
    store = open_store(url, keyring)
    try:
        for token in tokens:
            assert await store.put_license(token) is not None
    finally:
        await store.close()


async def test_a_gateway_on_sqlite_sends_each_due_reminder_once_also_after_a_restart(
    tmp_path: Path,
    key_dir: Path,
    keyring: KeyRing,
    upstream_ports: dict[str, int],
    issue_key: IssueKey,
) -> None:
    await put_licenses(f"sqlite:///{tmp_path}/tenants.db", keyring, fleet_keys(issue_key))
    extra = '\n[store]\nurl = "sqlite://tenants.db"\n' + FAST_SCANS
    async with running_gateway(tmp_path, key_dir, upstream_ports, extra=extra) as gateway:
        await scanned([gateway], 3)
        assert reminders_sent(gateway) == EXPECTED
        (event,) = [e for e in gateway.events() if e.get("kind") == "trial"]
        assert {"event", "ts", "tenant", "tier", "ends_at", "then_at"} <= set(event)
        assert event["tier"] == "enterprise"
    # The next process on the same store finds them claimed: nothing is sent twice.
    async with running_gateway(tmp_path, key_dir, upstream_ports, extra=extra) as again:
        await scanned([again], 3)
        assert again.runtime.reminders.sent == 0
        assert reminders_sent(again) == EXPECTED  # the same file: only the first ones


async def test_two_gateways_sharing_redis_send_each_reminder_once_in_total(
    tmp_path: Path,
    key_dir: Path,
    keyring: KeyRing,
    upstream_ports: dict[str, int],
    issue_key: IssueKey,
    redis: RedisServer,
) -> None:
    await put_licenses(redis.url, keyring, fleet_keys(issue_key))
    extra = f'\n[store]\nurl = "{redis.url}"\n' + FAST_SCANS
    async with two_gateways(tmp_path, key_dir, upstream_ports, extra=extra) as (a, b):
        await scanned([a, b], 3)
        assert reminders_sent(a, b) == EXPECTED
        assert a.runtime.reminders.sent + b.runtime.reminders.sent == len(EXPECTED)


async def test_reminders_disabled_run_no_scan(
    tmp_path: Path, key_dir: Path, upstream_ports: dict[str, int]
) -> None:
    extra = "\n[reminders]\nenabled = false\n"
    async with running_gateway(tmp_path, key_dir, upstream_ports, extra=extra) as gateway:
        assert not gateway.runtime.reminders.running
    assert gateway.runtime.reminders.scans == 0
