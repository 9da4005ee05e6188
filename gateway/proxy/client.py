"""The client side: one ``Downstream`` protocol per client connection. It parses requests
(httptools), queues pipelined ones, begins each ``Exchange`` in turn, owns the connection's
``FlowControl`` and watchdog, and turns a tunnel on after a 101. What happens to one request
lives in ``exchange``; the bytes it writes come from ``framing``.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable
from time import perf_counter
from typing import cast

import httptools

from gateway.accesslog import AccessLog
from gateway.enforcer import PROBLEM_JSON, RESPOND, Enforcer, RequestHead, Verdict, request_id
from gateway.proxy import framing
from gateway.proxy.exchange import Exchange
from gateway.proxy.flow import FlowControl, Pause
from gateway.proxy.pool import Upstream, UpstreamPool
from gateway.proxy.request import Reject, read_head
from gateway.proxy.settings import MAX_PIPELINE, UPGRADE_HIGH_WATER, ProxySettings
from gateway.proxy.state import UPSTREAM_OWES

log = logging.getLogger(__name__)


class Tracker:
    """Open client connections of one process, so shutdown can drain them."""

    def __init__(self) -> None:
        self.connections: set[Downstream] = set()
        self.closing = False
        self.idle_event = asyncio.Event()


class Downstream(asyncio.Protocol):
    """One client connection: parse, enforce, answer or relay, in order."""

    def __init__(
        self,
        enforcer: Enforcer,
        pool: UpstreamPool,
        settings: ProxySettings,
        tracker: Tracker,
        access_log: AccessLog | None = None,
    ) -> None:
        self.loop = asyncio.get_running_loop()
        self.enforcer = enforcer
        # Only an enabled log: a disabled one is not worth a call per request.
        self.access_log = access_log if access_log is not None and access_log.enabled else None
        self.pool = pool
        self.settings = settings
        self.metrics = enforcer.metrics
        self.decision_duration = enforcer.shared.metrics.decision_timer
        self.tracker = tracker
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.flow: FlowControl
        self.peer = b""
        self.parsing: Exchange | None = None  # the request whose head or body is being read
        self.active: Exchange | None = None  # the request being answered
        self.pipeline: deque[Exchange] = deque()  # parsed requests waiting behind it
        self.tunnel: Upstream | None = None
        self.upgrade_buffer: list[bytes] | None = None  # client bytes before the 101
        self.upgrade_buffered = 0
        self.out: list[bytes] | None = None  # corked output, see write()
        self.refusal: bytes | None = None  # the answer to a malformed request, sent last
        self.failed_keys = 0  # license keys refused (401) on this connection
        # One watchdog per connection, ticking lazily: cheaper than a timer per request.
        self.watchdog: asyncio.TimerHandle | None = None
        self.last_active = self.loop.time()
        self.in_message = False
        self.headers_done = False
        self.message_started = 0.0
        self.last_body = 0.0
        self.last_tick = self.last_active
        self.body_received = 0
        # the head being parsed
        self._url = b""
        self._headers: list[tuple[bytes, bytes, bytes]] = []
        self._header_bytes = 0

    # ------------------------------------------------------------ asyncio callbacks
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.flow = FlowControl(self.transport)
        peer = transport.get_extra_info("peername")
        if peer:
            self.peer = str(peer[0]).encode()
        self.tracker.connections.add(self)
        self.watchdog = self.loop.call_later(self.settings.tick, self._tick)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self.tracker.connections.discard(self)
        if self.watchdog is not None:
            self.watchdog.cancel()
            self.watchdog = None
        if self.tunnel is not None:
            self.tunnel.close()
            self.tunnel = None
        for ex in (self.active, *self.pipeline):
            if ex is not None:
                ex.abandon()
        self.active = None
        self.pipeline.clear()
        if self.tracker.closing and not self.tracker.connections:
            self.tracker.idle_event.set()

    def data_received(self, data: bytes) -> None:
        if self.tunnel is not None:
            self.tunnel.send(data)
            return
        if self.refusal is not None:
            return  # read before reading paused: after a malformed request, nothing counts
        if self.upgrade_buffer is not None:
            self._buffer_upgrade(data)
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as upgrade:
            rest = data[upgrade.args[0] :]
            if self.closing:
                return  # the upgrade was refused and the connection is closing
            # The upgrade request is the last one parsed (it may be queued behind others).
            ex = self.pipeline[-1] if self.pipeline else self.active
            if ex is not None and ex.framing.upgrade:
                self.upgrade_buffer = []
                self._buffer_upgrade(rest)
            else:  # an upgrade we refused: carry on with HTTP/1.1 on a fresh parser
                self.parser = httptools.HttpRequestParser(self)
                if rest:
                    self.data_received(rest)
        except (httptools.HttpParserError, Reject) as exc:
            self._bad_request(exc)
        except Exception:  # a bug of ours: answer 500 and keep the process serving
            log.exception("request handling failed")
            self._bad_request(Reject(500, "internal_error", "Internal gateway error"))

    def _buffer_upgrade(self, data: bytes) -> None:
        """Hold what the client sends after an upgrade head until the upstream's 101 opens
        the tunnel; past a small mark, stop reading (the kernel buffers, not we)."""
        assert self.upgrade_buffer is not None
        if data:
            self.upgrade_buffer.append(data)
            self.upgrade_buffered += len(data)
        if self.upgrade_buffered > UPGRADE_HIGH_WATER:
            self.flow.pause_reading(Pause.UPGRADE)

    def pause_writing(self) -> None:
        self.flow.pause_writing()

    def resume_writing(self) -> None:
        self.flow.resume_writing()

    @property
    def closing(self) -> bool:
        return self.transport is None or self.transport.is_closing()

    # ------------------------------------------------------------ httptools callbacks
    def on_message_begin(self) -> None:
        self.in_message = True
        self.headers_done = False
        self.message_started = self.loop.time()
        self.body_received = 0
        self._url = b""
        self._headers = []
        self._header_bytes = 0

    def on_url(self, url: bytes) -> None:
        self._url += url
        if len(self._url) > self.settings.max_header_bytes:
            raise Reject(414, "uri_too_long", "Request target too long")

    def on_header(self, name: bytes, value: bytes) -> None:
        headers = self._headers
        self._header_bytes += len(name) + len(value) + 4
        if self._header_bytes > self.settings.max_header_bytes:
            raise Reject(431, "headers_too_large", "Request headers too large")
        if len(headers) >= self.settings.max_headers:
            raise Reject(431, "headers_too_large", "Too many request headers")
        headers.append((name, value, name.lower()))

    def on_headers_complete(self) -> None:
        self.headers_done = True
        self.last_body = self.loop.time()
        transport = self.transport
        if transport is None or transport.is_closing():  # self.closing, without a call
            return  # answered and closing: nothing after that is served
        parser = self.parser
        head, request = read_head(
            parser.get_method().decode("ascii"),
            self._url,
            self._headers,
            parser.get_http_version(),
            self.settings,
            upgrade=parser.should_upgrade(),
            peer=self.peer,
        )
        ex = Exchange(self, head, request, parser.should_keep_alive())
        self.parsing = ex
        if self.active is None:
            self.active = ex
            ex.begin()
        else:
            self.pipeline.append(ex)
            if len(self.pipeline) > MAX_PIPELINE:
                self.flow.pause_reading(Pause.PIPELINE)

    def on_body(self, body: bytes) -> None:
        self.body_received += len(body)
        self.last_body = self.loop.time()
        if self.body_received > self.settings.max_body_bytes:  # chunked bodies end here
            raise Reject(413, "body_too_large", "Request body too large")
        ex = self.parsing
        if ex is not None:
            ex.receive(body)

    def on_message_complete(self) -> None:
        self.in_message = False
        ex = self.parsing
        if ex is None:
            return
        self.parsing = None
        ex.body_end()

    # ------------------------------------------------------------ exchanges in turn
    def serving(self, ex: Exchange) -> bool:
        """``ex`` is still the one being answered on an open connection."""
        return self.transport is not None and self.active is ex

    def finished(self, ex: Exchange) -> None:
        """``ex`` is answered and its request read: on to the next one."""
        if self.active is not ex:
            return
        self.active = None
        if self.pipeline:
            nxt = self.pipeline.popleft()
            if len(self.pipeline) <= MAX_PIPELINE:
                self.flow.resume_reading(Pause.PIPELINE)
            self.active = nxt
            nxt.begin()
            return
        if self.refusal is not None:
            self._refuse()
            return
        if self.tracker.closing:
            self.close()
            return
        self.last_active = self.loop.time()

    def open_tunnel(self, conn: Upstream, rest: bytes) -> None:
        """The upstream answered 101: ``conn`` and this connection are a byte tunnel. Its
        timeouts are the WebSocket's own business (ping/pong), not the keep-alive or read
        timeouts of HTTP: the watchdog stops; a drain waits for it until the deadline."""
        self.tunnel = conn
        if self.watchdog is not None:
            self.watchdog.cancel()
            self.watchdog = None
        if rest:
            self.write(rest)
        for chunk in self.upgrade_buffer or ():
            conn.send(chunk)
        self.upgrade_buffer = None
        self.upgrade_buffered = 0
        self.active = None
        self.flow.resume_reading(Pause.UPGRADE)

    # ------------------------------------------------------------ timeouts
    def _tick(self) -> None:
        """Watchdog: client and upstream read timeouts, idle keep-alive connections."""
        now = self.loop.time()
        settings = self.settings
        self.watchdog = self.loop.call_later(settings.tick, self._tick)
        if self.flow.paused:
            # We stopped reading (a slow upstream, a full queue): the client cannot send,
            # so that time never counts towards its head or body deadline.
            held = now - self.last_tick
            self.message_started += held
            self.last_body += held
        self.last_tick = now
        if self.in_message:
            # Slow clients cannot hold a connection: the head and the body each have a
            # deadline (a slow-loris head, a stalled upload).
            if not self.headers_done and now - self.message_started > settings.header_timeout:
                self._client_timeout("request head not received in time")
                return
            if self.headers_done and now - self.last_body > settings.body_timeout:
                self._client_timeout("request body stalled")
                return
        ex = self.active
        if ex is not None:
            if ex.state in UPSTREAM_OWES and now - ex.last_activity > settings.read_timeout:
                ex.read_timeout()
        elif not self.in_message and now - self.last_active > settings.keepalive_timeout:
            self.close()

    def _client_timeout(self, why: str) -> None:
        self._bad_request(Reject(408, "client_timeout", why))

    # ------------------------------------------------------------ refusing
    def _bad_request(self, exc: Exception) -> None:
        """Refuse what could not be parsed (or arrived too slowly) with a 4xx and close;
        nothing after it is read, and requests not yet answered are not. A response already
        being written is finished first (rather than cut short), unless it belongs to the
        request whose body was malformed: then the connection just closes, as an answer
        cannot follow part of a response."""
        if isinstance(exc, Reject):
            status, code, title = exc.status, exc.code, exc.title
        elif isinstance(exc.__cause__, Reject) or isinstance(exc.__context__, Reject):
            inner = exc.__cause__ or exc.__context__
            assert isinstance(inner, Reject)
            status, code, title = inner.status, inner.code, inner.title
        else:
            status, code, title = 400, "bad_request", "Malformed HTTP request"
        if self.refusal is not None or self.closing:
            return
        self.metrics.outcome["rejected"].inc()
        broken = self.parsing
        rid = broken.head.request_id if broken is not None else request_id()
        detail = str(exc) if status == 400 else ""
        body = framing.problem_body(status, code, title, detail, rid)
        self.refusal = framing.answer(status, body, PROBLEM_JSON, b"", close=True, request_id=rid)
        self.report("request_rejected", code, status, rid, broken.head if broken else None)
        if self.access_log is not None:
            method = broken.head.method if broken is not None else "-"
            self.access_log.record(
                self.enforcer.app, method, None, None, None, "rejected", status, None,
                0.0 if broken is None else perf_counter() - broken.started,
                len(self.refusal), rid, None, None,
            )  # fmt: skip
        self.flow.pause_reading(Pause.REFUSED)
        self.in_message = False
        self.parsing = None
        for queued in self.pipeline:
            queued.abandon()
        self.pipeline.clear()
        active = self.active
        if active is not None and (active is broken or not active.response_started):
            active.abandon()  # its upstream may have part of a request: never reused
            self.active = None
            if active.response_started:
                self.close()
                return
        if self.active is None:
            self._refuse()

    def report(
        self, kind: str, code: str, status: int | None, rid: str, head: RequestHead | None
    ) -> None:
        """One sampled event for an answer the relay gives itself (the enforcer reports its
        own refusals): support finds every answered status by the request id the client saw
        in ``X-Request-Id``. ``status`` None: a response cut short (aborted)."""
        shared = self.enforcer.shared
        events = shared.events
        if not events.admit(kind):
            return
        events.emit_admitted(
            kind,
            app=self.enforcer.app,
            code=code,
            status=status,
            method=head.method if head is not None else None,
            request_id=rid,
            revision=shared.rules.revision,
        )

    def _refuse(self) -> None:
        """Everything before the refused request is answered: the refusal, then close."""
        refusal, self.refusal = self.refusal, None
        if refusal is not None:
            self.write(refusal)
        self.close()

    # ------------------------------------------------------------ accounting
    def key_refused(self) -> bool:
        """A license key was refused (401) on this connection: True once the connection's
        budget is spent, and the answer then closes it. A key flood then pays for a new
        connection every ``max_failed_keys`` keys; a client with a valid key never gets
        here."""
        self.failed_keys += 1
        return self.failed_keys >= self.settings.max_failed_keys

    def log_access(self, ex: Exchange, outcome: str | None, duration: float) -> None:
        """One access-log line for a finished exchange. Route, feature, tenant and tier
        come from the verdict (none for a request refused before a verdict)."""
        assert self.access_log is not None
        verdict = ex.verdict or _NO_VERDICT
        if outcome is None:  # a RESPOND verdict: the enforcer counted its outcome itself
            outcome = _outcome_of(ex.verdict, ex.status)
        self.access_log.record(
            self.enforcer.app, ex.head.method, verdict.route, verdict.route_name,
            verdict.feature, outcome, ex.status, ex.upstream_status,
            duration, ex.sent, ex.head.request_id, verdict.tenant, verdict.tier,
        )  # fmt: skip

    # ------------------------------------------------------------ writing
    def cork(self) -> None:
        """Collect writes until ``uncork``: what one upstream read produces goes out in one
        write."""
        self.out = []

    def uncork(self) -> None:
        out = self.out
        self.out = None
        if out and self.transport is not None:
            self.transport.write(out[0] if len(out) == 1 else b"".join(out))

    def write(self, data: bytes) -> None:
        out = self.out
        if out is not None:
            out.append(data)
        elif self.transport is not None:
            self.transport.write(data)

    def close(self) -> None:
        """Close after what is queued has been written."""
        self.uncork()
        if self.transport is not None:
            self.transport.close()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    def close_if_idle(self) -> None:
        """Close a keep-alive connection between requests (shutdown begins); a tunnel is
        in-flight work, cut at the drain deadline (docs/operations.md)."""
        if self.active is None and self.parsing is None and self.tunnel is None:
            self.close()


_NO_VERDICT = Verdict(RESPOND)  # a request refused while parsing: nothing decided


def _outcome_of(verdict: Verdict | None, status: int) -> str:
    """The outcome of an answer the enforcer gave: the verdict's when it names one, else
    the one its status implies (as the enforcer counts it)."""
    if verdict is not None and verdict.outcome != "allowed":
        return verdict.outcome
    if verdict is None or verdict.kind != RESPOND or status < 400:
        return "allowed"
    if status == 401:
        return "unlicensed"
    if status == 400 or status >= 500:
        return "rejected"
    return "blocked"


def downstream_factory(
    enforcer: Enforcer,
    pool: UpstreamPool,
    settings: ProxySettings,
    tracker: Tracker,
    access_log: AccessLog | None = None,
) -> Callable[[], Downstream]:
    def make() -> Downstream:
        return Downstream(enforcer, pool, settings, tracker, access_log)

    return make
