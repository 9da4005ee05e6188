"""Usage metering (gateway.usage): per-minute buckets in memory, batches to the store, counts
kept through a store failure, and the grouping ``gateway usage report`` prints."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from gateway.license import KeyRing
from gateway.metrics import Metrics
from gateway.store import UsageCount
from gateway.store.memory import MemoryStore
from gateway.store.sqlite import SqliteStore
from gateway.usage import INVALID_CLIENT, Grouping, UsageMeter, client_id, report
from tests.harness import running_gateway
from tests.stores import DEADLINE

# A minute boundary, two days ago (the stores forget usage after a retention period).
M0 = int(time.time()) // 86400 * 86400 - 2 * 86400


@pytest.fixture
def memory(keyring: KeyRing) -> MemoryStore:
    return MemoryStore("memory://", keyring)


async def test_calls_are_counted_per_minute_feature_and_client(memory: MemoryStore) -> None:
    meter = UsageMeter(memory)
    for offset in (0, 1, 59.9):
        meter.count("acme", "ops.on_demand", "", M0 + offset)
    meter.count("acme", "ops.on_demand", "erp", M0 + 5)
    meter.count("acme", "ops.on_demand", "", M0 + 60)
    meter.count("acme", None, "", M0 + 61)  # an ungated route
    meter.count("globex", "ops.on_demand", "", M0)
    assert meter.pending() == 5
    assert await meter.flush() is True
    assert meter.pending() == 0
    assert await memory.usage("acme", M0) == [
        UsageCount("acme", M0, "ops.on_demand", "", 3),
        UsageCount("acme", M0, "ops.on_demand", "erp", 1),
        UsageCount("acme", M0 + 60, "", "", 1),
        UsageCount("acme", M0 + 60, "ops.on_demand", "", 1),
    ]
    # A later flush adds to the same buckets.
    meter.count("acme", "ops.on_demand", "", M0 + 2)
    assert await meter.flush() is True
    assert (await memory.usage("acme", M0, M0 + 60))[0].calls == 4
    assert await meter.flush() is True  # nothing to do


async def test_counts_are_kept_while_the_store_cannot_take_them(
    tmp_path: Path, keyring: KeyRing
) -> None:
    folder = tmp_path / "not-yet"
    store = SqliteStore(f"sqlite://{folder / 'tenants.db'}", keyring)
    metrics = Metrics()
    meter = UsageMeter(store, metrics)
    try:
        meter.count("acme", "ops.on_demand", "", M0)
        assert await meter.flush() is False
        meter.count("acme", "ops.on_demand", "", M0 + 1)  # the same bucket, meanwhile
        meter.count("acme", "ops.sms_messaging", "", M0)
        assert meter.pending() == 2
        errors = metrics.registry.get_sample_value("gateway_store_errors_total", {"op": "usage"})
        assert errors == 1
        folder.mkdir()  # the store is back
        assert await meter.flush() is True
        assert await store.usage("acme", M0) == [
            UsageCount("acme", M0, "ops.on_demand", "", 2),
            UsageCount("acme", M0, "ops.sms_messaging", "", 1),
        ]
    finally:
        await store.close()


async def test_buckets_are_bounded(memory: MemoryStore) -> None:
    meter = UsageMeter(memory, max_buckets=2)
    meter.count("acme", "a", "", M0)
    meter.count("acme", "b", "", M0)
    meter.count("acme", "c", "", M0)  # a third bucket: not counted
    meter.count("acme", "a", "", M0)  # an existing one still is
    assert (meter.pending(), meter.dropped) == (2, 1)
    assert await meter.flush()
    assert meter.dropped == 0
    assert [(c.feature, c.calls) for c in await memory.usage("acme", M0)] == [("a", 2), ("b", 1)]


async def test_buckets_are_bounded_across_minutes_and_a_clock_going_back(
    memory: MemoryStore,
) -> None:
    meter = UsageMeter(memory, max_buckets=2)
    meter.count("acme", "a", "", M0)
    meter.count("acme", "a", "", M0 + 60)  # the next minute: a second bucket
    meter.count("acme", "b", "", M0 + 1)  # the clock went back: a third, not counted
    meter.count("acme", "a", "", M0 + 2)  # a bucket of that minute still is
    assert (meter.pending(), meter.dropped) == (2, 1)
    assert await meter.flush()
    assert [(c.minute, c.calls) for c in await memory.usage("acme", M0)] == [
        (M0, 2),
        (M0 + 60, 1),
    ]


async def test_the_background_task_flushes_and_close_sends_the_rest(memory: MemoryStore) -> None:
    meter = UsageMeter(memory, flush_interval=0.01)
    meter.count("acme", "ops.on_demand", "", M0)
    async with asyncio.timeout(DEADLINE), asyncio.TaskGroup() as group:
        task = group.create_task(meter.run())
        while not await memory.usage("acme", M0):
            await asyncio.sleep(0.01)
        task.cancel()
    meter.count("acme", "ops.on_demand", "", M0)
    await meter.close()
    assert [c.calls for c in await memory.usage("acme", M0)] == [2]


async def test_the_runtime_flushes_usage_when_it_stops(
    tmp_path: Path, key_dir: Path, upstream_ports: dict[str, int]
) -> None:
    async with running_gateway(tmp_path, key_dir, upstream_ports) as gateway:
        gateway.runtime.usage.count("acme", "ops.on_demand", "erp", M0)
    store = gateway.runtime.store  # memory://: still readable after the stop
    assert await store.usage("acme", M0) == [UsageCount("acme", M0, "ops.on_demand", "erp", 1)]


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        pytest.param(None, "", id="absent"),
        pytest.param(b"erp-connector", "erp-connector", id="token"),
        pytest.param(b"  zapier:v2 ", "zapier:v2", id="trimmed"),
        pytest.param(b"acme/shop@1.0+build", "acme/shop@1.0+build", id="punctuation"),
        pytest.param(b"", INVALID_CLIENT, id="empty"),
        pytest.param(b"two words", INVALID_CLIENT, id="space"),
        pytest.param(b"x" * 65, INVALID_CLIENT, id="too-long"),
        pytest.param("caf\u00e9".encode(), INVALID_CLIENT, id="non-ascii"),
        pytest.param(b"a,b", INVALID_CLIENT, id="comma"),
    ],
)
def test_client_id(raw: bytes | None, expected: str) -> None:
    assert client_id(raw) == expected


COUNTS = [
    UsageCount("acme", M0, "ops.on_demand", "", 3),
    UsageCount("acme", M0, "ops.on_demand", "erp", 2),
    UsageCount("acme", M0 + 60, "", "", 1),
    UsageCount("acme", M0 + 86400, "ops.sms_messaging", "erp", 4),
]


@pytest.mark.parametrize(
    ("by", "expected"),
    [
        pytest.param(
            "feature",
            [("(ungated)", 1), ("ops.on_demand", 5), ("ops.sms_messaging", 4)],
            id="feature",
        ),
        pytest.param("client", [("(none)", 4), ("erp", 6)], id="client"),
        pytest.param(
            "day",
            [
                (time.strftime("%Y-%m-%d", time.gmtime(M0)), 6),
                (time.strftime("%Y-%m-%d", time.gmtime(M0 + 86400)), 4),
            ],
            id="day",
        ),
    ],
)
def test_report(by: Grouping, expected: list[tuple[str, int]]) -> None:
    assert report(COUNTS, by) == expected
