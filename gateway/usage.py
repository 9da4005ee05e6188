"""Usage metering: allowed calls per tenant, feature and API client, in per-minute buckets.

The request path only adds one to a bucket of the current minute in memory
(``UsageMeter.count``: one tuple and one dict update); a background
task (``run``, held by the runtime) hands the buckets to the store in one batch every
``flush_interval`` seconds (``TenantStore.add_usage``), so there is never a store write per
request and no tenant id in a Prometheus label. When the store cannot take a batch, the
counts are kept and go with the next one (up to ``max_buckets``; beyond that new buckets are
dropped and logged). ``gateway usage report`` reads them back (``report``).

    meter = UsageMeter(store, metrics)
    meter.count("acme", "ops.on_demand", client_id(raw_header_value), time.time())
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Literal

from gateway.metrics import Metrics
from gateway.store import StoreError, TenantStore, UsageCount

log = logging.getLogger(__name__)

FLUSH_SECONDS = 10.0
MAX_BUCKETS = 200_000
MAX_CLIENT_LENGTH = 64
INVALID_CLIENT = "(invalid)"  # a client header value that is not a plain token
_CLIENT = re.compile(rb"[A-Za-z0-9._:@/+-]{1,%d}" % MAX_CLIENT_LENGTH)

Grouping = Literal["feature", "client", "day"]
UNGATED = "(ungated)"  # how a route without a feature is shown in reports
NO_CLIENT = "(none)"  # how a request that named no client is shown


def client_id(raw: bytes | None) -> str:
    """The API client named by the configured header (``[seats] client_header``): a short
    token, or ``(invalid)`` for anything else (a client must not be able to write arbitrary
    text into billing data), or ``""`` when the header is absent."""
    if raw is None:
        return ""
    value = raw.strip()
    if _CLIENT.fullmatch(value):
        return value.decode("ascii")
    return INVALID_CLIENT


class UsageMeter:
    """Per-minute call counts in memory, flushed to the store in batches."""

    def __init__(
        self,
        store: TenantStore,
        metrics: Metrics | None = None,
        *,
        flush_interval: float = FLUSH_SECONDS,
        max_buckets: int = MAX_BUCKETS,
    ) -> None:
        self.store = store
        self.flush_interval = flush_interval
        self.max_buckets = max_buckets
        # Buckets of past minutes, (tenant, feature, client, minute) -> calls, and those of
        # the current minute, [_start, _end), keyed without the minute: the
        # request path then neither works out the minute nor hashes it, only compares the
        # time. Another minute moves the current buckets over (``_roll``).
        self._counts: dict[tuple[str, str, str, int], int] = {}
        self._minute: dict[tuple[str, str | None, str], int] = {}
        self._start = 0.0
        self._end = 0.0  # nothing counted yet: the first call rolls
        self.dropped = 0  # calls not counted because the buckets were full
        self._errors = metrics.store_errors.labels(op="usage") if metrics is not None else None

    def count(self, tenant: str, feature: str | None, client: str, now: float) -> None:
        """One allowed call (the hot path: a time comparison, one tuple, one dict update)."""
        if self._start <= now < self._end:
            minute = self._minute
        else:
            minute = self._roll(now)
        key = (tenant, feature, client)
        calls = minute.get(key)
        if calls is not None:
            minute[key] = calls + 1
        else:
            self._new_bucket(key)

    def _new_bucket(self, key: tuple[str, str | None, str]) -> None:
        """A first call in a bucket of the current minute: counted while under
        ``max_buckets`` (in all, or when that bucket is pending from before the clock went
        back), else dropped."""
        if len(self._counts) + len(self._minute) >= self.max_buckets:
            tenant, feature, client = key
            if (tenant, feature or "", client, int(self._start)) not in self._counts:
                self.dropped += 1
                return
        self._minute[key] = 1

    def _roll(self, now: float) -> dict[tuple[str, str | None, str], int]:
        """``now`` is in another minute (the next one, or an earlier one if the clock went
        back): the current minute's buckets join the past ones."""
        self._fold()
        start = int(now) // 60 * 60
        self._start = float(start)
        self._end = float(start + 60)
        return self._minute

    def _fold(self) -> None:
        """Move the current minute's buckets to the past ones (``_minute`` stays the same
        dict: the request path may hold it)."""
        minute = self._minute
        if not minute:
            return
        start = int(self._start)
        counts = self._counts
        for (tenant, feature, client), calls in minute.items():
            key = (tenant, feature or "", client, start)
            counts[key] = counts.get(key, 0) + calls
        minute.clear()

    def pending(self) -> int:
        """Buckets not yet handed to the store."""
        self._fold()
        return len(self._counts)

    async def flush(self) -> bool:
        """Hand every bucket to the store in one batch; False (and the counts kept for the
        next flush) when the store cannot take it."""
        if self.dropped:
            log.warning(
                "usage: %d calls not counted (over %d buckets)", self.dropped, self.max_buckets
            )
            self.dropped = 0
        self._fold()
        if not self._counts:
            return True
        counts, self._counts = self._counts, {}
        batch = [
            UsageCount(tenant, minute, feature, client, calls)
            for (tenant, feature, client, minute), calls in counts.items()
        ]
        try:
            await self.store.add_usage(batch)
        except StoreError as exc:
            if self._errors is not None:
                self._errors.inc()
            log.warning("tenant store: usage kept for the next flush: %s", exc)
            self._keep(counts)
            return False
        except asyncio.CancelledError:  # stopped mid-flush: the last flush sends them
            self._keep(counts)
            raise
        return True

    def _keep(self, counts: dict[tuple[str, str, str, int], int]) -> None:
        """Merge counts that did not reach the store back into the buckets."""
        for key, calls in counts.items():
            if key in self._counts or len(self._counts) < self.max_buckets:
                self._counts[key] = self._counts.get(key, 0) + calls
            else:
                self.dropped += calls

    async def run(self) -> None:
        """Flush every ``flush_interval`` seconds until cancelled (the runtime holds this
        task and calls ``close`` after cancelling it)."""
        while True:
            await asyncio.sleep(self.flush_interval)
            await self.flush()

    async def close(self) -> None:
        """The last flush, at shutdown."""
        await self.flush()


def report(counts: Iterable[UsageCount], by: Grouping) -> list[tuple[str, int]]:
    """Calls summed by feature, client or UTC day, sorted by that key."""
    sums: dict[str, int] = {}
    for count in counts:
        if by == "feature":
            key = count.feature or UNGATED
        elif by == "client":
            key = count.client or NO_CLIENT
        else:
            key = datetime.fromtimestamp(count.minute, UTC).strftime("%Y-%m-%d")
        sums[key] = sums.get(key, 0) + count.calls
    return sorted(sums.items())
