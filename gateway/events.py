"""Analytics events: JSON lines to a file, stdout or an HTTP collector, never blocking a request.

``EventLog.emit`` appends to a bounded in-memory queue and returns; the flusher (see
``gateway.sinks.Spool``) writes batches off the event loop. When the queue is full the event
is dropped and counted in ``gateway_events_dropped_total{sink}``. License keys never appear
in events; a fingerprint may.

Volume is bounded with exact counts: of the ``feature_block`` events of one (tenant,
feature, tier), the first ``blocks_per_interval`` of each interval are written as they come;
the rest are counted and written as one ``feature_block_summary`` (with that ``count``) when
the interval ends. A block that finds the queue full is counted the same way, so the sum of
``feature_block`` lines and summary counts is the exact number of blocks.

    log = EventLog.from_settings("file:///var/log/gateway/events.jsonl", settings, metrics)
    log.start()
    log.emit("feature_block", tenant="acme", tier="core", app="operations", ...)
    await log.aclose(deadline=5.0)
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from gateway.metrics import Metrics, Tally
from gateway.ratelimit import TokenBucket
from gateway.sinks import Sink, Spool, open_sink, sink_kind

if TYPE_CHECKING:
    from gateway.config import EventSettings

# Past this many (tenant, feature, tier) in one interval, blocks are plain events again
# (bounded by the queue): a flood of made-up tenant ids cannot grow the table without end.
MAX_TRACKED_BLOCKS = 100_000
# The events of the answers the gateway gives itself, other than feature_block (summarised)
# and license_invalid (its own rate): a flood of any of them is one incident, so each kind
# is sampled at [events] refusals_per_second.
REFUSAL_EVENTS = (
    "role_forbidden",
    "seat_limit_exceeded",
    "route_unmatched",
    "path_rejected",
    "identity_untrusted",
    "identity_invalid",
    "tenant_mismatch",
    "bad_header",
    "store_unavailable",
    # the tenant endpoints' (gateway.endpoints)
    "not_found",
    "method_not_allowed",
    "bad_request",
    "bad_event",
    "unsupported_media_type",
    "rate_limited",
    # the relay's own answers (gateway.proxy): malformed or too large requests, upstreams
    # that failed
    "request_rejected",
    "upstream_error",
)


# Sampled at the same rate: what a flood or a rollout could multiply.
SAMPLED_EVENTS = (*REFUSAL_EVENTS, "decision_diff", "unmatched_allowed")


def sampled_rates(settings: EventSettings) -> dict[str, float]:
    """Events per second, per sampled kind (the rest is counted as dropped)."""
    rates = dict.fromkeys(SAMPLED_EVENTS, settings.refusals_per_second)
    rates["license_invalid"] = settings.license_invalid_per_second
    return rates


def dropped_counter(metrics: Metrics, sink: str) -> Tally:
    """The hot-path child of ``gateway_events_dropped_total{sink}``."""
    return metrics.tally(metrics.events_dropped.labels(sink=sink))


class _BlockCount:
    __slots__ = ("app", "written", "folded")

    def __init__(self, app: str | None) -> None:
        self.app = app
        self.written = 0
        self.folded = 0


class EventLog(Spool):
    """The gateway's analytics events: a spool with sampling and block summaries."""

    def __init__(
        self,
        sink: str | Sink,
        metrics: Metrics,
        max_queue: int = 10_000,
        flush_interval: float = 0.05,
        per_second: dict[str, float] | None = None,
        *,
        batch_size: int = 1000,
        blocks_per_interval: int = 10,
        summary_interval: float = 60.0,
        sink_label: str = "file",
    ) -> None:
        """``sink`` is a URL, or an opened sink whose drops count under ``sink_label``."""
        if isinstance(sink, str):
            sink_label = sink_kind(sink)
        dropped = dropped_counter(metrics, sink_label)
        if isinstance(sink, str):
            try:
                sink = open_sink(sink, dropped)
            except ValueError as exc:
                raise ValueError(f"events.sink {exc}") from None
        super().__init__(
            sink,
            dropped,
            max_queue=max_queue,
            batch_size=batch_size,
            flush_interval=flush_interval,
            name="events",
        )
        # Kinds a flood could multiply (license_invalid) are sampled; the rest counts as dropped.
        self._limits = {kind: TokenBucket(rate) for kind, rate in (per_second or {}).items()}
        self._blocks_per_interval = blocks_per_interval
        self._summary_interval = summary_interval
        self._blocks: dict[tuple[str | None, str | None, str | None], _BlockCount] = {}
        self._interval_start = self._interval_end = 0.0
        self._start_interval(time.time())

    @classmethod
    def from_settings(cls, url: str, settings: EventSettings, metrics: Metrics) -> EventLog:
        """The event log ``[events]`` describes; ``url`` is ``settings.sink`` with a
        relative file path resolved (``gateway.sinks.resolve_sink``)."""
        label = sink_kind(url)
        sink = open_sink(
            url,
            dropped_counter(metrics, label),
            max_bytes=settings.max_bytes,
            backups=settings.backups,
            http_timeout=settings.http_timeout,
            retry_max_backoff=settings.retry_max_backoff,
        )
        return cls(
            sink,
            metrics,
            settings.max_queue,
            per_second=sampled_rates(settings),
            batch_size=settings.batch_size,
            blocks_per_interval=settings.feature_blocks_per_interval,
            summary_interval=settings.summary_interval,
            sink_label=label,
        )

    def emit(self, kind: str, /, **fields: Any) -> None:
        """Queue one event; never blocks, never raises. ``ts`` is added here. (``kind`` is
        positional-only: an event may have a field of that name, as ``license_expiring``.)"""
        if kind == "feature_block":
            admitted = self.admit_block(
                fields.get("tenant"), fields.get("feature"), fields.get("app"), fields.get("tier")
            )
        else:
            admitted = self.admit(kind)
        if admitted:
            self.emit_admitted(kind, **fields)

    def admit(self, kind: str) -> bool:
        """Room in the queue and, for a sampled kind, in its rate? (A refusal is counted
        as a drop.) Lets a caller skip building an event that would be dropped."""
        limit = self._limits.get(kind)
        if (limit is None or limit.take()) and len(self._queue) < self._max_queue:
            return True
        self._dropped.n += 1  # Tally.inc, inlined: a flood's refusals are mostly dropped
        return False

    def sampler(self, kind: str) -> tuple[TokenBucket | None, Tally]:
        """A sampled kind's bucket and the drop counter, for a caller asking many times a
        second: while ``monotonic() < bucket.empty_until`` its events are dropped (to be
        counted, ``tally.n += 1``) without asking ``admit``."""
        return self._limits.get(kind), self._dropped

    def admit_block(
        self,
        tenant: str | None,
        feature: str | None,
        app: str | None,
        tier: str | None,
        now: float | None = None,
    ) -> bool:
        """Should this block be written as a ``feature_block`` event? False: it is counted
        into the interval's ``feature_block_summary`` instead (never lost). ``now``: the
        caller's clock reading (wall-clock seconds), if it has one."""
        if now is None:
            now = time.time()
        if now >= self._interval_end:
            self._roll(now)
        key = (tenant, feature, tier)
        count = self._blocks.get(key)
        if count is None:
            if len(self._blocks) >= MAX_TRACKED_BLOCKS:
                return self.admit("feature_block")
            count = self._blocks[key] = _BlockCount(app)
        if count.written < self._blocks_per_interval and len(self._queue) < self._max_queue:
            count.written += 1
            return True
        count.folded += 1
        return False

    def emit_admitted(self, kind: str, /, **fields: Any) -> None:
        """Queue an event ``admit`` (or ``admit_block``) said yes to."""
        fields["event"] = kind
        fields["ts"] = time.time()
        self._queue.append(fields)
        self._wakeup.set()

    # ------------------------------------------------------------------ summaries
    def _start_interval(self, now: float) -> None:
        # Aligned to the wall clock, so the intervals of all workers and instances agree.
        start = now - now % self._summary_interval
        self._interval_start, self._interval_end = start, start + self._summary_interval

    def _roll(self, now: float, *, closing: bool = False) -> None:
        """Write the summaries of the interval that ended (or, closing, of the part of it
        that passed) and start the interval ``now`` falls in."""
        end = now if closing else self._interval_end
        for (tenant, feature, tier), count in self._blocks.items():
            if count.folded:
                # Past the queue bound on purpose: at most one per key per interval, and
                # dropping one would lose an exact count.
                self._queue.append(
                    {
                        "event": "feature_block_summary",
                        "ts": now,
                        "tenant": tenant,
                        "tier": tier,
                        "app": count.app,
                        "feature": feature,
                        "count": count.folded,
                        "interval_start": self._interval_start,
                        "interval_end": end,
                    }
                )
                self._wakeup.set()
        self._blocks.clear()
        self._start_interval(now)

    def _next_timer(self) -> float | None:
        if not self._blocks:
            return None
        return self._interval_end - time.time()

    def _on_timer(self) -> None:
        now = time.time()
        if now >= self._interval_end:
            self._roll(now)

    def _before_close(self) -> None:
        self._roll(time.time(), closing=True)
