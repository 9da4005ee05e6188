"""Where JSON lines go, and the bounded spool in front of them (events and the access log).

A ``Spool`` keeps records in a bounded in-memory queue: ``put`` never blocks and never
raises; a record that finds the queue full is dropped and counted in
``gateway_events_dropped_total{sink}``. The spool's flusher task takes batches, encodes
them as JSON lines and hands each batch to its sink:

- ``FileSink`` (``file:///path``, ``stdout:``): appended by one writer thread per sink, so a
  slow or stuck disk (or a stdout pipe nobody reads) never stalls the event loop; the file
  is reopened on ``reopen()`` (SIGUSR1, for logrotate) and when someone else renamed it,
  and rotated past ``max_bytes``.
- ``HttpSink`` (``http://`` / ``https://``): each batch is one POST of JSON lines, retried
  with exponential backoff until the collector accepts it (at-least-once: a batch whose
  answer was lost is sent again, with the same ``Idempotency-Key``).

    sink = open_sink("file:///var/log/gateway/events.jsonl", dropped)
    spool = Spool(sink, dropped, max_queue=10_000)
    spool.start()
    spool.put({"event": "feature_block", "ts": 1.0})
    await spool.aclose(deadline=5.0)
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import sys
import uuid
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import IO, Any, Protocol

import aiohttp
import msgspec
from yarl import URL

from gateway.metrics import Tally
from gateway.tasks import finish_within

log = logging.getLogger(__name__)

SINK_SCHEMES = (
    "stdout:, file:///path (or file://relative/path), http://host[:port]/path or https://"
)
# The 4xx answers that mean "later"; any other 4xx would refuse the same batch again, so it
# is dropped (and counted) rather than retried for ever.
_RETRYABLE_STATUS = frozenset({408, 425, 429})


def sink_problem(url: str) -> str | None:
    """Why ``url`` is not a sink this module can open, or None (for ``gateway check``)."""
    if url == "stdout:":
        return None
    if url.startswith("file://"):
        return None if url[len("file://") :].strip("/") else "file:// needs a path"
    if url.startswith(("http://", "https://")):
        try:
            parsed = URL(url)
        except ValueError as exc:
            return f"not a URL: {exc}"
        return None if parsed.host else "the collector URL needs a host"
    return f"expected {SINK_SCHEMES}"


def resolve_sink(url: str, base: Path) -> str:
    """``file://relative/path`` is relative to ``base`` (the config file's folder)."""
    if url.startswith("file://") and not url.startswith("file:///"):
        return "file://" + str((base / url[len("file://") :]).resolve())
    return url


def sink_kind(url: str) -> str:
    """The ``sink`` label of a sink URL: ``file``, ``stdout`` or ``http`` (also for https)."""
    scheme = url.split(":", 1)[0]
    return "http" if scheme == "https" else scheme


class Sink(Protocol):
    async def write(self, body: bytes, count: int) -> None:
        """Deliver one batch of ``count`` JSON lines; what is lost the sink counts itself."""

    def write_blocking(self, body: bytes, count: int) -> None:
        """The same without an event loop to wait in (a synchronous close)."""

    def reopen(self) -> None:
        """Let go of the current file and open the path again (after logrotate)."""

    async def aclose(self) -> None: ...

    def close(self) -> None: ...


def open_sink(
    url: str,
    dropped: Tally,
    *,
    max_bytes: int = 0,
    backups: int = 5,
    http_timeout: float = 5.0,
    retry_max_backoff: float = 30.0,
) -> Sink:
    """The sink for ``url``; ``ValueError`` for a URL ``sink_problem`` refuses."""
    problem = sink_problem(url)
    if problem is not None:
        raise ValueError(f"sink {url!r}: {problem}")
    if url == "stdout:":
        return FileSink(None, dropped)
    if url.startswith("file://"):
        return FileSink(Path(url[len("file://") :]), dropped, max_bytes=max_bytes, backups=backups)
    return HttpSink(url, dropped, timeout=http_timeout, max_backoff=retry_max_backoff)


class FileSink:
    """JSON lines appended to a file (``path``) or to stdout (``path=None``) by one thread.

    One thread per sink keeps batches in order and puts every reopen and rotation between
    two whole batches; the event loop only waits for the thread's answer."""

    def __init__(
        self, path: Path | None, dropped: Tally, *, max_bytes: int = 0, backups: int = 5
    ) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self.backups = backups
        self._dropped = dropped
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sink-writer")
        self._stream: IO[bytes] = sys.stdout.buffer
        if path is not None:
            # At start-up, in the caller: an unwritable path fails the start, loudly.
            path.parent.mkdir(parents=True, exist_ok=True)
            self._stream = open(path, "ab")  # noqa: SIM115 - closed in close()

    async def write(self, body: bytes, count: int) -> None:
        loop = asyncio.get_running_loop()
        lost = await loop.run_in_executor(self._executor, self._write, body, count)
        if lost:
            self._dropped.inc(lost)

    def write_blocking(self, body: bytes, count: int) -> None:
        # Through the thread all the same, so it lands after what is already in flight.
        lost = self._executor.submit(self._write, body, count).result()
        if lost:
            self._dropped.inc(lost)

    def reopen(self) -> None:
        if self.path is not None:
            with contextlib.suppress(RuntimeError):  # a signal after close: nothing to reopen
                self._executor.submit(self._reopen_logged)

    async def aclose(self) -> None:
        await asyncio.to_thread(self.close)

    def close(self) -> None:
        self._executor.shutdown(wait=True)
        if self.path is not None:
            self._stream.close()

    # ---------------------------------------------------------------- the writer thread
    def _write(self, body: bytes, count: int) -> int:
        """Append one batch; the number of lines lost (0 when written)."""
        try:
            if self.path is not None:
                self._follow(len(body))
            self._stream.write(body)
            self._stream.flush()
        except (OSError, ValueError) as exc:  # ValueError: the stream was closed
            log.warning("writing %d lines to %s failed: %s", count, self._name(), exc)
            return count
        return 0

    def _follow(self, incoming: int) -> None:
        """Reopen when the path no longer names our file (logrotate moved it, or another
        worker rotated it); rotate when this batch would pass ``max_bytes``."""
        assert self.path is not None
        ours = os.fstat(self._stream.fileno())
        try:
            current = os.stat(self.path)
        except FileNotFoundError:
            self._reopen()
            return
        if (current.st_ino, current.st_dev) != (ours.st_ino, ours.st_dev):
            self._reopen()
        elif self.max_bytes and 0 < current.st_size and current.st_size + incoming > self.max_bytes:
            self._rotate()

    def _rotate(self) -> None:
        assert self.path is not None
        base = str(self.path)
        for n in range(self.backups - 1, 0, -1):
            with contextlib.suppress(FileNotFoundError):
                os.replace(f"{base}.{n}", f"{base}.{n + 1}")
        os.replace(base, f"{base}.1")
        self._reopen()

    def _reopen(self) -> None:
        assert self.path is not None
        fresh = open(self.path, "ab")  # noqa: SIM115 - closed by the next reopen or close()
        old, self._stream = self._stream, fresh
        old.close()

    def _reopen_logged(self) -> None:
        try:
            self._reopen()
        except OSError as exc:  # keep writing to the old file rather than to nothing
            log.error("reopening %s failed: %s", self.path, exc)

    def _name(self) -> str:
        return "stdout" if self.path is None else str(self.path)


class HttpSink:
    """Each batch is one POST of JSON lines (``application/x-ndjson``) to a collector.

    A refused connection, a timeout, a 5xx, 408, 425 or 429 is retried with exponential backoff
    (with jitter, so a fleet does not retry in step; a ``Retry-After`` is honoured up to
    ``max_backoff``) until the collector takes the batch — meanwhile new events wait in the
    spool, whose bound counts what no longer fits. Any other 4xx refuses the batch for
    good: it is dropped and counted. Delivery is at-least-once: when an answer is lost the
    batch is sent again with the same ``Idempotency-Key``, by which a collector can tell."""

    def __init__(
        self,
        url: str,
        dropped: Tally,
        *,
        timeout: float = 5.0,
        max_backoff: float = 30.0,
        first_backoff: float = 0.1,
    ) -> None:
        self.url = url
        self._shown = str(URL(url).with_user(None))  # no credentials in logs
        self._dropped = dropped
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._max_backoff = max_backoff
        self._first_backoff = first_backoff
        self._session: aiohttp.ClientSession | None = None
        self._closing: asyncio.Task[None] | None = None
        self.failed_attempts = 0  # since the last delivery (the recovery log line says it)

    async def write(self, body: bytes, count: int) -> None:
        key = uuid.uuid4().hex
        delay = self._first_backoff
        try:
            while True:
                retry_after = await self._post(body, count, key)
                if retry_after is None:
                    return
                # Jitter (half to all of the delay), so a fleet does not retry in step.
                jittered = delay * random.uniform(0.5, 1.0)
                await asyncio.sleep(min(max(jittered, retry_after), self._max_backoff))
                delay = min(delay * 2, self._max_backoff)
        except asyncio.CancelledError:
            # The shutdown deadline passed with this batch not acknowledged.
            self._dropped.inc(count)
            raise

    async def _post(self, body: bytes, count: int, key: str) -> float | None:
        """One attempt: None when the batch is settled (taken or refused for good), else
        the collector's ``Retry-After`` (0 without one) before the next attempt."""
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=self._timeout)
        headers = {"Content-Type": "application/x-ndjson", "Idempotency-Key": key}
        retry_after = 0.0
        try:
            async with self._session.post(self.url, data=body, headers=headers) as response:
                status = response.status
                if 200 <= status < 300:
                    self._recovered()
                    return None
                if 400 <= status < 500 and status not in _RETRYABLE_STATUS:
                    log.error(
                        "collector %s refused %d events with %d; dropped",
                        self._shown, count, status,
                    )  # fmt: skip
                    self._dropped.inc(count)
                    return None
                retry_after = _seconds(response.headers.get("Retry-After"))
                problem = f"HTTP {status}"
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            problem = f"{type(exc).__name__}: {exc}"
        self.failed_attempts += 1
        if self.failed_attempts == 1:
            log.warning(
                "collector %s unavailable (%s); retrying with backoff, lines queue meanwhile",
                self._shown, problem,
            )  # fmt: skip
        return retry_after

    def _recovered(self) -> None:
        if self.failed_attempts:
            log.warning(
                "collector %s reachable again after %d failed attempts",
                self._shown, self.failed_attempts,
            )  # fmt: skip
            self.failed_attempts = 0

    def write_blocking(self, body: bytes, count: int) -> None:
        # A POST needs the event loop; a synchronous close cannot deliver, so it counts.
        log.warning("%d events for %s dropped at a synchronous close", count, self._shown)
        self._dropped.inc(count)

    def reopen(self) -> None:
        pass  # nothing to reopen: every batch is its own request

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def close(self) -> None:
        session, self._session = self._session, None
        if session is None or session.closed:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            session.detach()  # no loop left to close its connections in
            return
        # A synchronous close inside async code: the session finishes closing in the
        # loop, held by reference.
        self._closing = loop.create_task(session.close())


def _seconds(value: str | None) -> float:
    """A ``Retry-After`` in seconds (the HTTP-date form is rare for collectors: ignored)."""
    if value is None:
        return 0.0
    try:
        return max(0.0, float(value))
    except ValueError:
        return 0.0


_encoder = msgspec.json.Encoder()


class Spool:
    """A bounded queue of records (anything msgspec encodes) and the task draining it into
    a sink. ``put`` is all a request pays; encoding and writing happen in the flusher."""

    def __init__(
        self,
        sink: Sink,
        dropped: Tally,
        *,
        max_queue: int = 10_000,
        batch_size: int = 1000,
        flush_interval: float = 0.05,
        name: str = "spool",
    ) -> None:
        self.sink = sink
        self.flush_interval = flush_interval
        self.name = name
        self._dropped = dropped
        self._max_queue = max_queue
        self._batch_size = batch_size
        self._queue: deque[Any] = deque()
        self._wakeup = asyncio.Event()
        self._closing = False
        self._task: asyncio.Task[None] | None = None

    def put(self, record: Any) -> bool:
        """Queue one record; never blocks. False (and counted) when the queue is full."""
        if len(self._queue) >= self._max_queue:
            self._dropped.inc()
            return False
        self._queue.append(record)
        self._wakeup.set()
        return True

    def pending(self) -> int:
        return len(self._queue)

    def reopen(self) -> None:
        """Reopen a file sink's file (SIGUSR1 after logrotate moved it)."""
        self.sink.reopen()

    def start(self) -> None:
        """Start the flusher, held here until ``aclose`` ends it."""
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self.run(), name=self.name)

    async def run(self) -> None:
        """Drain the queue in batches until ``aclose`` (or cancellation)."""
        while True:
            await self._wait()
            if not self._closing:
                # Batch: one write per interval under load instead of one per record.
                await asyncio.sleep(self.flush_interval)
            self._wakeup.clear()
            self._on_timer()
            while self._queue:
                body, count = self._take()
                if count:
                    await self.sink.write(body, count)
            if self._closing:
                return

    async def aclose(self, deadline: float) -> None:
        """Deliver what is queued or in flight within ``deadline`` seconds, then close the
        sink; whatever is still undelivered then is dropped and counted."""
        self._closing = True
        self._before_close()
        task = self._task
        if task is None or task.done():  # whoever ran ``run`` has stopped it: drain here
            task = self._task = asyncio.get_running_loop().create_task(self.run(), name=self.name)
        self._wakeup.set()
        try:
            await finish_within(task, deadline)
        finally:
            if self._queue:
                log.warning(
                    "%s: %d records not delivered by the shutdown deadline; dropped",
                    self.name, len(self._queue),
                )  # fmt: skip
                self._dropped.inc(len(self._queue))
                self._queue.clear()
            await self.sink.aclose()

    def flush_now(self) -> None:
        """Write everything queued before returning (tests; a synchronous close)."""
        while self._queue:
            body, count = self._take()
            if count:
                self.sink.write_blocking(body, count)

    def close(self) -> None:
        """Close without an event loop to wait in: write what is queued straight through
        the sink (an HTTP sink cannot: it counts it as dropped) and close it. Prefer
        ``aclose``."""
        self._closing = True
        self._before_close()
        self.flush_now()
        self.sink.close()

    # Periodic work of a subclass (the event log's summaries), run by the flusher.
    def _next_timer(self) -> float | None:
        """Seconds until ``_on_timer`` has work, or None for none."""
        return None

    def _on_timer(self) -> None:
        pass

    def _before_close(self) -> None:
        pass

    async def _wait(self) -> None:
        timeout = self._next_timer()
        if timeout is None:
            await self._wakeup.wait()
            return
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(max(timeout, 0.0)):
                await self._wakeup.wait()

    def _take(self) -> tuple[bytes, int]:
        """Up to ``batch_size`` records as JSON lines, and how many lines."""
        queue = self._queue
        lines: list[bytes] = []
        for _ in range(min(len(queue), self._batch_size)):
            record = queue.popleft()
            try:
                lines.append(_encoder.encode(record))
            except (TypeError, ValueError) as exc:  # a field msgspec cannot encode: a bug
                self._dropped.inc()
                log.error("%s: a record could not be encoded (%s); dropped", self.name, exc)
        if not lines:
            return b"", 0
        lines.append(b"")
        return b"\n".join(lines), len(lines) - 1
