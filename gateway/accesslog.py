"""The JSON access log: one line per request, to stdout or a file, never blocking a request.

Lines go through the same spool and sinks as the analytics events (``gateway.sinks``):
``record`` builds one small struct and queues it; encoding and writing happen in the
flusher, off the event loop. Forwarded requests (``allowed``, ``classic``, ``public``)
answered below 500 are sampled at ``sample_allowed``; refusals and 5xx answers are always
kept. Lines that do not fit the queue are counted in
``gateway_events_dropped_total{sink="access_log"}``.

    access = AccessLog.from_settings("stdout:", settings.access_log, metrics)
    access.start()
    access.record("operations", "GET", "/api/v1/shipments/{id}", "shipment", None,
                  "allowed", 200, 200, 0.0031, 512, "req-1", "acme", "fleet")
    await access.aclose(deadline=5.0)
"""

from __future__ import annotations

import random
import time
from typing import TYPE_CHECKING

import msgspec

from gateway.events import dropped_counter
from gateway.metrics import Metrics
from gateway.sinks import Sink, Spool, open_sink

if TYPE_CHECKING:
    from gateway.config import AccessLogSettings

# Outcomes of requests that reached the upstream: the bulk of the traffic, so sampled.
SAMPLED_OUTCOMES = frozenset({"allowed", "classic", "public"})


class AccessRecord(msgspec.Struct, gc=False):
    """One request, as written (field order is the line's key order)."""

    ts: float
    app: str
    method: str
    route: str | None  # the routes.toml pattern, never the raw path (ids stay out)
    route_name: str | None
    feature: str | None
    outcome: str
    status: int
    upstream_status: int | None  # None when the gateway answered itself
    duration: float  # seconds, request head to response end
    size: int = msgspec.field(name="bytes")  # response bytes sent to the client
    request_id: str | None = None
    tenant: str | None = None
    tier: str | None = None


class AccessLog(Spool):
    """The access log; with ``enabled = false`` every call is a cheap no-op."""

    def __init__(
        self,
        sink: Sink,
        metrics: Metrics,
        *,
        enabled: bool = True,
        sample_allowed: float = 1.0,
        max_queue: int = 10_000,
        flush_interval: float = 0.05,
    ) -> None:
        super().__init__(
            sink,
            dropped_counter(metrics, "access_log"),
            max_queue=max_queue,
            flush_interval=flush_interval,
            name="access_log",
        )
        self.enabled = enabled
        self.sample_allowed = sample_allowed

    @classmethod
    def from_settings(cls, url: str, settings: AccessLogSettings, metrics: Metrics) -> AccessLog:
        """``url`` is ``settings.sink`` with a relative file path resolved
        (``gateway.sinks.resolve_sink``); disabled, nothing is opened."""
        sink: Sink = _Closed()
        if settings.enabled:
            sink = open_sink(
                url,
                dropped_counter(metrics, "access_log"),
                max_bytes=settings.max_bytes,
                backups=settings.backups,
            )
        return cls(
            sink,
            metrics,
            enabled=settings.enabled,
            sample_allowed=settings.sample_allowed,
            max_queue=settings.max_queue,
        )

    def record(
        self,
        app: str,
        method: str,
        route: str | None,
        route_name: str | None,
        feature: str | None,
        outcome: str,
        status: int,
        upstream_status: int | None,
        duration: float,
        size: int,
        request_id: str | None,
        tenant: str | None,
        tier: str | None,
    ) -> None:
        """Log one finished request (plain values: the proxy calls this per request)."""
        if not self.enabled:
            return
        if (
            outcome in SAMPLED_OUTCOMES
            and status < 500
            and self.sample_allowed < 1.0
            and random.random() >= self.sample_allowed
        ):
            return
        self.put(
            AccessRecord(
                time.time(), app, method, route, route_name, feature, outcome, status,
                upstream_status, round(duration, 6), size, request_id, tenant, tier,
            )
        )  # fmt: skip

    def start(self) -> None:
        if self.enabled:
            super().start()


class _Closed:
    """The sink of a disabled access log: nothing is ever queued, so nothing arrives."""

    async def write(self, body: bytes, count: int) -> None:
        pass

    def write_blocking(self, body: bytes, count: int) -> None:
        pass

    def reopen(self) -> None:
        pass

    async def aclose(self) -> None:
        pass

    def close(self) -> None:
        pass
