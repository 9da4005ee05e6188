"""Analytics events (DESIGN §6): JSON lines to a file or stdout, never blocking a request.

``EventLog.emit`` appends to a bounded in-memory queue and returns; the ``run`` task, held
by the runtime and stopped in its cleanup, drains the queue in batches. When the queue is
full the event is dropped and counted in ``gateway_events_dropped_total{sink}``. License
keys never appear in events; a fingerprint may.

    log = EventLog("file:///var/log/gateway/events.jsonl", metrics)
    log.emit("feature_block", tenant="acme", tier="core", app="operations", ...)
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from collections import deque
from pathlib import Path
from typing import IO, Any

import msgspec

from gateway.metrics import Metrics
from gateway.ratelimit import TokenBucket

log = logging.getLogger(__name__)

EVENT_KINDS = (
    "feature_block",
    "upgrade_click",
    "upgrade_complete",
    "license_invalid",
    "seat_overage",
    "seat_warning",
    "license_expiring",
)

_encoder = msgspec.json.Encoder()


class EventLog:
    """A bounded queue of events and the sink it drains into."""

    def __init__(
        self,
        sink: str,
        metrics: Metrics,
        max_queue: int = 10_000,
        flush_interval: float = 0.05,
        per_second: dict[str, float] | None = None,
    ) -> None:
        self.sink = sink
        # Kinds a flood could multiply (license_invalid) are sampled; the rest counts as dropped.
        self._limits = {kind: TokenBucket(rate) for kind, rate in (per_second or {}).items()}
        self.flush_interval = flush_interval
        self._sink_kind = sink.split(":", 1)[0]
        self._queue: deque[dict[str, Any]] = deque()
        self._max_queue = max_queue
        self._wakeup = asyncio.Event()
        self._dropped = metrics.tally(metrics.events_dropped.labels(sink=self._sink_kind))
        self._stream: IO[bytes] | None = None
        if sink.startswith("file://"):
            path = Path(sink[len("file://") :])
            path.parent.mkdir(parents=True, exist_ok=True)
            self._stream = open(path, "ab")  # noqa: SIM115 - closed in close()
        elif sink == "stdout:":
            self._stream = sys.stdout.buffer
        else:
            raise ValueError(f"events.sink {sink!r}: expected stdout: or file:///path")

    def emit(self, kind: str, **fields: Any) -> None:
        """Queue one event; never blocks, never raises. ``ts`` is added here."""
        if self.admit(kind):
            self.emit_admitted(kind, **fields)

    def admit(self, kind: str) -> bool:
        """Room in the queue and, for a sampled kind, in its rate? (A refusal is counted
        as a drop.) Lets a caller skip building an event that would be dropped."""
        limit = self._limits.get(kind)
        if len(self._queue) >= self._max_queue or (limit is not None and not limit.take()):
            self._dropped.inc()
            return False
        return True

    def emit_admitted(self, kind: str, **fields: Any) -> None:
        """Queue an event ``admit`` said yes to."""
        fields["event"] = kind
        fields["ts"] = time.time()
        self._queue.append(fields)
        self._wakeup.set()

    def pending(self) -> int:
        return len(self._queue)

    async def run(self) -> None:
        """Drain the queue until cancelled; the runtime starts and stops this task."""
        while True:
            await self._wakeup.wait()
            # Batch: one write per interval under load instead of one per event.
            await asyncio.sleep(self.flush_interval)
            self._wakeup.clear()
            self._flush()

    def _flush(self) -> None:
        if not self._queue or self._stream is None:
            return
        batch = []
        while self._queue:
            batch.append(_encoder.encode(self._queue.popleft()))
        try:
            self._stream.write(b"\n".join(batch) + b"\n")
            self._stream.flush()
        except OSError as exc:
            self._dropped.inc(len(batch))
            log.warning("events: writing to %s failed: %s", self.sink, exc)

    def close(self) -> None:
        """Write what is still queued and close a file sink."""
        self._flush()
        if self._stream is not None and self._stream is not sys.stdout.buffer:
            self._stream.close()
        self._stream = None
