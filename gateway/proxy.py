"""The reverse proxy: asyncio protocols with httptools (llhttp) on both sides.

aiohttp's high-level request/response machinery costs about 160 µs of CPU per proxied
request; a protocol-level relay with a C parser costs a fraction of that. So a client
connection is a ``Downstream`` protocol that parses requests, asks the ``Enforcer`` for a
verdict, and either answers itself or relays to an ``Upstream`` connection from a keep-alive
``UpstreamPool``. Bodies stream both ways with transport flow control (no buffering beyond
the transports' high-water marks), so a 1 GiB upload or download runs in flat memory.

Pipelined requests are queued and answered in order. An ``Upgrade`` (WebSocket) request that
the upstream accepts with 101 turns both connections into a raw byte tunnel.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections import deque
from collections.abc import Callable
from time import perf_counter
from typing import Any, cast

import httptools

from gateway.enforcer import (
    CLASSIC,
    FORWARD,
    NEED_TENANT,
    RESPOND,
    Enforcer,
    RequestHead,
    Verdict,
    problem,
)
from gateway.metrics import AppMetrics

log = logging.getLogger(__name__)

HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"proxy-authenticate",
        b"proxy-authorization",
    }
)
IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE"})
NO_BODY_STATUS = frozenset({204, 304})
ENTITLEMENT_PREFIX = b"x-entitlement-"
# Client bytes held while an upgrade waits for the upstream's 101: past this, reading pauses.
UPGRADE_HIGH_WATER = 64 * 1024
# What a WebSocket upgrade sends upstream in place of the client's Connection and Upgrade
# headers, whose extra tokens could make a further hop drop the X-Entitlement-* headers.
WEBSOCKET_UPGRADE = b"Connection: Upgrade\r\nUpgrade: websocket\r\n"
# Framing and routing headers a client cannot have dropped by naming them in Connection
# (dropping Content-Length but forwarding the body would smuggle a second request).
PROTECTED = frozenset({b"content-length", b"transfer-encoding", b"host"})


def is_entitlement_header(lname: bytes) -> bool:
    """X-Entitlement-*, also spelled with '_' (CGI/WSGI upstreams map both to the same
    HTTP_X_ENTITLEMENT_* variable)."""
    return lname[:1] == b"x" and lname[:14].replace(b"_", b"-") == ENTITLEMENT_PREFIX


REASONS = {
    100: b"Continue",
    200: b"OK",
    400: b"Bad Request",
    401: b"Unauthorized",
    403: b"Forbidden",
    404: b"Not Found",
    408: b"Request Timeout",
    413: b"Content Too Large",
    429: b"Too Many Requests",
    431: b"Request Header Fields Too Large",
    500: b"Internal Server Error",
    502: b"Bad Gateway",
    503: b"Service Unavailable",
    504: b"Gateway Timeout",
}

# Header kinds the downstream parser notes while it collects headers.
H_LICENSE, H_TENANT, H_ROLE, H_USER, H_CONNECTION = 1, 2, 3, 4, 5
H_TE, H_CL, H_HOST, H_XFF, H_EXPECT, H_UPGRADE = 6, 7, 8, 9, 10, 11


class ProxySettings:
    """Per-app settings the protocols read on every request, resolved once."""

    __slots__ = (
        "watch",
        "host_header",
        "connect_timeout",
        "read_timeout",
        "keepalive_timeout",
        "max_header_bytes",
        "max_headers",
        "max_buffer",
        "max_body_bytes",
        "header_timeout",
        "body_timeout",
        "max_connections",
        "queue_timeout",
        "tick",
    )

    def __init__(
        self,
        *,
        license_header: str,
        tenant_header: str,
        role_header: str,
        user_header: str,
        host_header: bytes | None,
        connect_timeout: float,
        read_timeout: float,
        keepalive_timeout: float = 75.0,
        max_header_bytes: int = 32 * 1024,
        max_headers: int = 100,
        max_body_bytes: int = 4 << 30,
        header_timeout: float = 10.0,
        body_timeout: float = 60.0,
        max_connections: int = 1000,
        queue_timeout: float = 5.0,
    ) -> None:
        self.watch = {
            license_header.lower().encode(): H_LICENSE,
            tenant_header.lower().encode(): H_TENANT,
            role_header.lower().encode(): H_ROLE,
            user_header.lower().encode(): H_USER,
            b"connection": H_CONNECTION,
            b"transfer-encoding": H_TE,
            b"content-length": H_CL,
            b"host": H_HOST,
            b"x-forwarded-for": H_XFF,
            b"expect": H_EXPECT,
            b"upgrade": H_UPGRADE,
        }
        self.host_header = host_header  # None: preserve the client's Host
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.keepalive_timeout = keepalive_timeout
        self.max_header_bytes = max_header_bytes
        self.max_headers = max_headers
        self.max_buffer = 256 * 1024
        self.max_body_bytes = max_body_bytes
        self.header_timeout = header_timeout
        self.body_timeout = body_timeout
        self.max_connections = max_connections
        self.queue_timeout = queue_timeout
        # Watchdog period: timeouts fire at most a quarter late.
        self.tick = min(read_timeout, keepalive_timeout, header_timeout, body_timeout) / 4


class Tracker:
    """Open client connections of one process, so shutdown can drain them."""

    def __init__(self) -> None:
        self.connections: set[Downstream] = set()
        self.closing = False
        self.idle_event = asyncio.Event()

    def busy(self) -> int:
        return sum(1 for conn in self.connections if conn.active is not None)


# ----------------------------------------------------------------------- upstream side


class UpstreamPool:
    """Keep-alive connections to one upstream; idle ones are reused last-in first-out."""

    def __init__(
        self,
        host: str,
        port: int,
        settings: ProxySettings,
        metrics: AppMetrics,
        max_idle: int = 256,
    ) -> None:
        self.host = host
        self.port = port
        self.settings = settings
        self.metrics = metrics
        self.max_idle = max_idle
        self.idle: list[Upstream] = []
        self.open = 0  # connections open or being opened, idle ones included
        self.waiters: deque[asyncio.Future[Upstream | None]] = deque()

    def can_open(self) -> bool:
        return self.open < self.settings.max_connections

    def wait(self) -> asyncio.Future[Upstream | None]:
        """Queue for a connection: resolves to a pooled one, or None (open your own)."""
        waiter: asyncio.Future[Upstream | None] = asyncio.get_running_loop().create_future()
        self.waiters.append(waiter)
        return waiter

    def _wake_one(self, conn: Upstream | None) -> bool:
        while self.waiters:
            waiter = self.waiters.popleft()
            if not waiter.done():
                waiter.set_result(conn)
                return True
        return False

    def take(self) -> Upstream | None:
        idle = self.idle
        while idle:
            conn = idle.pop()
            if conn.transport is not None and not conn.transport.is_closing():
                conn.reused = True
                return conn
        return None

    async def connect(self) -> Upstream:
        loop = asyncio.get_running_loop()
        self.open += 1
        try:
            _, conn = await asyncio.wait_for(
                loop.create_connection(lambda: Upstream(self), self.host, self.port),
                self.settings.connect_timeout,
            )
        except BaseException:
            self.open -= 1
            self._wake_one(None)
            raise
        return conn

    def release(self, conn: Upstream) -> None:
        transport = conn.transport
        if transport is None:
            return
        conn.exchange = None
        if not transport.is_reading():  # paused for a slow client: reset for the next
            transport.resume_reading()
        if self._wake_one(conn):
            conn.reused = True
            return
        if len(self.idle) < self.max_idle:
            self.idle.append(conn)
        else:
            conn.close()

    def lost(self, conn: Upstream) -> None:
        """A connection closed: forget it, and let a queued request open a new one."""
        self.forget(conn)
        self.open -= 1
        self._wake_one(None)

    def forget(self, conn: Upstream) -> None:
        try:
            self.idle.remove(conn)
        except ValueError:
            pass

    async def probe(self) -> bool:
        """Open (and pool) one connection: is the upstream accepting?"""
        try:
            conn = await self.connect()
        except (OSError, TimeoutError):
            return False
        self.release(conn)
        return True

    def close(self) -> None:
        for conn in self.idle:
            conn.close()
        self.idle.clear()


class Upstream(asyncio.Protocol):
    """One connection to the upstream; relays one response at a time to its exchange."""

    def __init__(self, pool: UpstreamPool) -> None:
        self.pool = pool
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.exchange: Exchange | None = None
        self.reused = False
        self.tunnel: Downstream | None = None
        self.finished: bool | None = None  # a response ended in this read: reusable?
        self.stray = False  # the upstream sent bytes no request asked for
        self.close_delimited = False  # the current response ends when the upstream closes
        self._reason = b""
        self._headers: list[tuple[bytes, bytes, bytes]] = []
        self._dropped: list[bytes] = []  # header names the Connection header lists

    # asyncio callbacks
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        if self.tunnel is not None:
            self.tunnel.write_raw(data)
            return
        ex = self.exchange
        if ex is None:  # an idle connection must not talk; it is no longer trustworthy
            self.close()
            return
        ex.last_activity = ex.loop.time()
        downstream = ex.downstream
        # Everything one upstream read produces (head, body, end) goes out in one write.
        downstream.out = []
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as upgrade:
            offset = upgrade.args[0]
            downstream.upstream_upgraded(self, data[offset:])
        except httptools.HttpParserError as exc:
            log.debug("upstream sent a bad response: %s", exc)
            downstream.upstream_failed(ex, "bad_response")
            self.close()
        finally:
            downstream.flush()
            finished, self.finished = self.finished, None
            if finished is not None:
                if finished and not self.stray and self.transport is not None:
                    self.pool.release(self)
                else:
                    self.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self.pool.lost(self)
        if self.tunnel is not None:
            self.tunnel.close()
            self.tunnel = None
            return
        ex = self.exchange
        self.exchange = None
        if ex is not None and not ex.response_done:
            if self.close_delimited and not ex.interim:
                self.exchange = ex
                ex.downstream.response_complete(ex, self)  # the close was its end
                self.exchange = None
                return
            ex.downstream.upstream_failed(ex, "reset")

    def pause_writing(self) -> None:
        ex = self.exchange
        if ex is not None:
            ex.downstream.pause_reading_for_upstream()
        elif self.tunnel is not None:  # a tunnel is flow-controlled like a relayed body
            self.tunnel.pause_reading_for_upstream()

    def resume_writing(self) -> None:
        ex = self.exchange
        if ex is not None:
            ex.downstream.resume_reading_for_upstream()
        elif self.tunnel is not None:
            self.tunnel.resume_reading_for_upstream()

    # httptools callbacks
    def on_message_begin(self) -> None:
        self.close_delimited = False
        if self.exchange is None:
            self.stray = True  # a second response nobody asked for: never reuse this line
        self._headers = []
        self._reason = b""
        self._dropped = []

    def on_status(self, status: bytes) -> None:
        self._reason += status

    def on_header(self, name: bytes, value: bytes) -> None:
        lname = name.lower()
        self._headers.append((name, value, lname))
        if lname == b"connection":  # the headers it names are hop-by-hop too
            self._dropped.extend(t for t in _tokens(value) if t not in PROTECTED)

    def on_headers_complete(self) -> None:
        ex = self.exchange
        if ex is None:
            return
        status = self.parser.get_status_code()
        ex.downstream.response_head(ex, status, self._reason, self._headers, self._dropped)

    def on_body(self, body: bytes) -> None:
        ex = self.exchange
        if ex is not None:
            ex.downstream.response_body(ex, body)

    def on_message_complete(self) -> None:
        ex = self.exchange
        if ex is not None:
            ex.downstream.response_complete(ex, self)

    def send(self, data: bytes) -> None:
        if self.transport is not None:
            self.transport.write(data)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()
            self.transport = None
        self.pool.forget(self)


# ----------------------------------------------------------------------- one request


class Exchange:
    """One request/response pair on a client connection."""

    __slots__ = (
        "downstream",
        "loop",
        "head",
        "version",
        "keep_alive",
        "chunked_in",
        "expect_continue",
        "upgrade",
        "switching",
        "body",
        "body_bytes",
        "body_done",
        "discard",
        "upstream",
        "upstream_head",
        "verdict",
        "started",
        "last_activity",
        "waiting",
        "response_started",
        "response_done",
        "chunked_out",
        "close_after",
        "interim",
        "sent_body",
        "task",
        "retried",
        "drop",
    )

    def __init__(self, downstream: Downstream, head: RequestHead, version: str, keep_alive: bool):
        self.downstream = downstream
        self.loop = downstream.loop
        self.head = head
        self.version = version
        self.keep_alive = keep_alive
        self.chunked_in = False
        self.expect_continue = False
        self.upgrade = False  # a WebSocket upgrade: tunnelled if the upstream answers 101
        self.switching = False  # any Upgrade or CONNECT head: its upstream line is never reused
        self.body: list[bytes] = []  # request body received before the upstream is ready
        self.body_bytes = 0
        self.body_done = False
        self.discard = False  # answered here: drop the request body
        self.upstream: Upstream | None = None
        self.upstream_head = b""
        self.verdict: Verdict | None = None
        self.started = perf_counter()
        self.last_activity = self.loop.time()
        self.waiting = False  # relayed, waiting for the upstream (read timeout applies)
        self.response_started = False
        self.response_done = False
        self.chunked_out = False
        self.close_after = not keep_alive
        self.interim = False
        self.sent_body = False
        self.task: asyncio.Task[None] | None = None
        self.retried = False
        self.drop: list[bytes] = []  # header names this request's Connection header lists


# ----------------------------------------------------------------------- client side


class Downstream(asyncio.Protocol):
    """One client connection: parse, enforce, answer or relay, in order."""

    def __init__(
        self,
        enforcer: Enforcer,
        pool: UpstreamPool,
        settings: ProxySettings,
        tracker: Tracker,
    ) -> None:
        self.loop = asyncio.get_running_loop()
        self.enforcer = enforcer
        self.pool = pool
        self.settings = settings
        self.metrics = enforcer.metrics
        self.decision_duration = enforcer.shared.metrics.decision_timer
        self.tracker = tracker
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.peer = b""
        self.parsing: Exchange | None = None
        self.active: Exchange | None = None
        self.pipeline: deque[Exchange] = deque()
        self.tunnel: Upstream | None = None
        self.upgrade_buffer: list[bytes] | None = None  # client bytes before the 101
        self.upgrade_buffered = 0
        self.out: list[bytes] | None = None  # corked output, see write()
        self.paused_for_upstream = False
        self.paused_for_buffer = False
        # One watchdog per connection, ticking lazily: cheaper than a timer per request.
        self.watchdog: asyncio.TimerHandle | None = None
        self.last_active = self.loop.time()
        self.in_message = False
        self.headers_done = False
        self.message_started = 0.0
        self.last_body = 0.0
        self.body_received = 0
        # per-request parse state
        self._url = b""
        self._headers: list[tuple[bytes, bytes, bytes]] = []
        self._header_bytes = 0
        self._connection_tokens: list[bytes] = []
        self._te: bytes | None = None
        self._upgrade_to = b""  # the Upgrade header's value, lower-cased
        self._expect_continue = False
        self._hosts = 0

    # asyncio callbacks
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
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
            if ex is None:
                continue
            if ex.task is not None:
                ex.task.cancel()
            if ex.upstream is not None and not ex.response_done:
                ex.upstream.exchange = None
                ex.upstream.close()
        self.active = None
        self.pipeline.clear()
        if self.tracker.closing and not self.tracker.connections:
            self.tracker.idle_event.set()

    def data_received(self, data: bytes) -> None:
        if self.tunnel is not None:
            self.tunnel.send(data)
            return
        if self.upgrade_buffer is not None:
            self._buffer_upgrade(data)
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as upgrade:
            rest = data[upgrade.args[0] :]
            if self.transport is None or self.transport.is_closing():
                return  # the upgrade was refused and the connection is closing
            # The upgrade request is the last one parsed (it may be queued behind others).
            ex = self.pipeline[-1] if self.pipeline else self.active
            if ex is not None and ex.upgrade:
                self.upgrade_buffer = []
                self._buffer_upgrade(rest)
            else:  # an upgrade we refused: carry on with HTTP/1.1 on a fresh parser
                self.parser = httptools.HttpRequestParser(self)
                if rest:
                    self.data_received(rest)
        except (httptools.HttpParserError, _Reject) as exc:
            self._bad_request(exc)
        except Exception:  # a bug of ours: answer 500 and keep the process serving
            log.exception("request handling failed")
            self._bad_request(_Reject(500, "internal_error", "Internal gateway error"))

    def _buffer_upgrade(self, data: bytes) -> None:
        """Hold what the client sends after an upgrade head until the upstream's 101 opens
        the tunnel; past a small mark, stop reading (the kernel buffers, not we)."""
        assert self.upgrade_buffer is not None
        if data:
            self.upgrade_buffer.append(data)
            self.upgrade_buffered += len(data)
        if self.upgrade_buffered > UPGRADE_HIGH_WATER and self.transport is not None:
            self.paused_for_buffer = True
            self.transport.pause_reading()

    def pause_writing(self) -> None:
        ex = self.active
        if ex is not None and ex.upstream is not None and ex.upstream.transport is not None:
            ex.upstream.transport.pause_reading()
        elif self.tunnel is not None and self.tunnel.transport is not None:
            self.tunnel.transport.pause_reading()

    def resume_writing(self) -> None:
        ex = self.active
        if ex is not None and ex.upstream is not None and ex.upstream.transport is not None:
            ex.upstream.transport.resume_reading()
        elif self.tunnel is not None and self.tunnel.transport is not None:
            self.tunnel.transport.resume_reading()

    def pause_reading_for_upstream(self) -> None:
        if self.transport is not None and not self.paused_for_upstream:
            self.paused_for_upstream = True
            self.transport.pause_reading()

    def resume_reading_for_upstream(self) -> None:
        if self.transport is not None and self.paused_for_upstream:
            self.paused_for_upstream = False
            if not self.paused_for_buffer:
                self.transport.resume_reading()

    # httptools callbacks: request parsing
    def on_message_begin(self) -> None:
        self.in_message = True
        self.headers_done = False
        self.message_started = self.loop.time()
        self.body_received = 0
        self._url = b""
        self._headers = []
        self._header_bytes = 0
        self._connection_tokens = []
        self._te = None
        self._upgrade_to = b""
        self._expect_continue = False
        self._hosts = 0

    def on_url(self, url: bytes) -> None:
        self._url += url
        if len(self._url) > self.settings.max_header_bytes:
            raise _Reject(414, "uri_too_long", "Request target too long")

    def on_header(self, name: bytes, value: bytes) -> None:
        headers = self._headers
        self._header_bytes += len(name) + len(value) + 4
        if self._header_bytes > self.settings.max_header_bytes:
            raise _Reject(431, "headers_too_large", "Request headers too large")
        if len(headers) >= self.settings.max_headers:
            raise _Reject(431, "headers_too_large", "Too many request headers")
        lname = name.lower()
        headers.append((name, value, lname))

    def on_headers_complete(self) -> None:
        self.headers_done = True
        self.last_body = self.loop.time()
        method = self.parser.get_method().decode("ascii")
        head = RequestHead(method, self._url, self._headers)
        watch = self.settings.watch
        for _, value, lname in self._headers:
            kind = watch.get(lname)
            if kind is not None:
                self._note(head, kind, value)
        version = self.parser.get_http_version()
        if self._hosts != 1 and (self._hosts or version == "1.1"):  # RFC 9112 §3.2
            head.bad_header = "more than one Host header" if self._hosts else "no Host header"
        ex = Exchange(self, head, version, self.parser.should_keep_alive())
        ex.chunked_in = self._te is not None
        if self.parser.should_upgrade():  # Connection: Upgrade + Upgrade, or CONNECT
            # llhttp reads no body after such a head, but an upstream answering at once
            # would wait for the declared one and take it from the next request on that
            # connection, another client's. Such a body is refused, with the connection.
            if self._te is not None or _declares_body(self._headers):
                raise _Reject(400, "bad_request", "Upgrade or CONNECT request with a body")
            ex.switching = True
            # Only WebSocket upgrades are tunnelled. Any other protocol (h2c, ...) would
            # open a tunnel the gateway can no longer check: the request goes on as plain
            # HTTP/1.1, without its Upgrade headers, and parsing restarts after it (see
            # data_received).
            ex.upgrade = self._upgrade_to == b"websocket" and method == "GET"
        ex.expect_continue = self._expect_continue
        # This request's own Connection tokens: by the time it is dispatched (queued behind
        # a pipelined request, or after a tenant look-up) the parser may be on the next one.
        ex.drop = self._connection_tokens
        self.parsing = ex
        if self.active is None:
            self.active = ex
            self._begin(ex)
        else:
            self.pipeline.append(ex)
            if len(self.pipeline) > 16 and self.transport is not None:
                self.paused_for_buffer = True
                self.transport.pause_reading()

    def _note(self, head: RequestHead, kind: int, value: bytes) -> None:
        if kind == H_LICENSE:
            head.license_count += 1
            if head.license_count > 1:
                head.bad_header = "more than one license key header"
            head.license_key = value.strip()
        elif kind == H_TENANT:
            if head.tenant is not None:
                head.bad_header = "more than one tenant id header"
            head.tenant = value.strip()
        elif kind == H_ROLE:
            if head.role is not None:  # upstreams disagree on which one they read
                head.bad_header = "more than one role header"
            head.role = value.strip()
        elif kind == H_USER:
            if head.user is not None:
                head.bad_header = "more than one user id header"
            head.user = value.strip()
        elif kind == H_HOST:
            self._hosts += 1
        elif kind == H_CONNECTION:
            for token in value.split(b","):
                token = token.strip().lower()
                if token and token not in PROTECTED:
                    self._connection_tokens.append(token)
        elif kind == H_UPGRADE:  # several are one list: "h2c, websocket" is not WebSocket
            upgrade = value.strip().lower()
            self._upgrade_to = self._upgrade_to + b", " + upgrade if self._upgrade_to else upgrade
        elif kind == H_EXPECT:
            self._expect_continue = value.strip().lower() == b"100-continue"
        elif kind == H_TE:
            if value.strip().lower() != b"chunked" or self._te is not None:
                head.bad_header = "unsupported Transfer-Encoding"
            self._te = value
        elif kind == H_CL:
            if int(value) > self.settings.max_body_bytes:  # llhttp checked it is a number
                raise _Reject(413, "body_too_large", "Request body too large")
        if kind == H_LICENSE and not value.isascii():
            head.bad_header = "license key header is not ASCII"

    def on_body(self, body: bytes) -> None:
        self.body_received += len(body)
        self.last_body = self.loop.time()
        if self.body_received > self.settings.max_body_bytes:  # chunked bodies end here
            raise _Reject(413, "body_too_large", "Request body too large")
        ex = self.parsing
        if ex is None or ex.discard:
            return
        upstream = ex.upstream
        if ex is self.active and upstream is not None and ex.upstream_head == b"":
            upstream.send(b"%x\r\n%s\r\n" % (len(body), body) if ex.chunked_in else body)
            ex.sent_body = True
            ex.last_activity = self.last_body  # the upstream read timeout waits for uploads
            return
        ex.body.append(body)
        ex.body_bytes += len(body)
        if ex.body_bytes > self.settings.max_buffer and self.transport is not None:
            self.paused_for_buffer = True
            self.transport.pause_reading()

    def on_message_complete(self) -> None:
        self.in_message = False
        ex = self.parsing
        if ex is None:
            return
        ex.body_done = True
        self.parsing = None
        if ex.discard:
            if ex.response_done and ex is self.active:
                self._finish(ex)
            return
        upstream = ex.upstream
        if ex is self.active and upstream is not None and ex.upstream_head == b"":
            if ex.chunked_in:
                upstream.send(b"0\r\n\r\n")

    # enforcement and dispatch
    def _begin(self, ex: Exchange) -> None:
        started = perf_counter()
        verdict = self.enforcer.check(ex.head)
        self.decision_duration.observe(perf_counter() - started)
        if verdict.kind == NEED_TENANT:
            ex.task = self.loop.create_task(self._begin_after_lookup(ex))
            return
        self._dispatch(ex, verdict)

    async def _begin_after_lookup(self, ex: Exchange) -> None:
        try:
            await self.enforcer.prefetch(ex.head)
            ex.task = None
            if self.transport is None or self.active is not ex:
                return
            self._dispatch(ex, self.enforcer.check(ex.head, fetched=True))
        except Exception:  # a bug of ours or an unexpected store error: answer, never hang
            log.exception("tenant look-up failed")
            ex.task = None
            if self.transport is not None and self.active is ex and not ex.response_started:
                body, _ = problem(500, "internal_error", "Internal gateway error")
                self._answer(ex, 500, body, b"", outcome="rejected")

    def _dispatch(self, ex: Exchange, verdict: Verdict) -> None:
        ex.verdict = verdict
        if verdict.kind == RESPOND:
            self._answer(ex, verdict.status, verdict.body, verdict.response_headers)
            return
        ex.upstream_head = self._upstream_head(ex, verdict)
        self._get_connection(ex)

    def _get_connection(self, ex: Exchange) -> None:
        pool = self.pool
        conn = pool.take()
        if conn is not None:
            self._attach(ex, conn)
        elif pool.can_open():
            ex.task = self.loop.create_task(self._connect(ex))
        else:
            ex.task = self.loop.create_task(self._queue_for_connection(ex))

    async def _queue_for_connection(self, ex: Exchange) -> None:
        """All upstream connections busy: wait (bounded) for one, else 503."""
        waiter = self.pool.wait()
        try:
            conn = await asyncio.wait_for(asyncio.shield(waiter), self.settings.queue_timeout)
        except TimeoutError:
            waiter.cancel()
            ex.task = None
            self.metrics.upstream_errors["overloaded"].inc()
            body, _ = problem(
                503,
                "upstream_overloaded",
                "Upstream connection limit reached",
                f"app {self.enforcer.app}: all {self.settings.max_connections} connections busy",
            )
            self._answer(ex, 503, body, b"Retry-After: 1\r\n", outcome="upstream_error")
            return
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled() and waiter.result() is not None:
                self.pool.release(waiter.result())  # type: ignore[arg-type]
            waiter.cancel()
            raise
        ex.task = None
        if self.transport is None or self.active is not ex:
            if conn is not None:
                self.pool.release(conn)
            return
        if conn is None:
            ex.task = self.loop.create_task(self._connect(ex))
        else:
            self._attach(ex, conn)

    def _upstream_head(self, ex: Exchange, verdict: Verdict) -> bytes:
        head = ex.head
        classic = verdict.kind == CLASSIC
        drop = ex.drop
        upgrade = ex.upgrade
        lines = [
            b"%s %s HTTP/1.1\r\n"
            % (head.method.encode(), head.target if classic else verdict.target)
        ]
        xff = b""
        host_rewrite = None if classic else self.settings.host_header
        for name, value, lname in head.headers:
            if lname in HOP_BY_HOP:
                if lname == b"transfer-encoding":
                    lines.append(b"%s: %s\r\n" % (name, value))  # we re-chunk: still true
                continue
            if is_entitlement_header(lname) or (drop and lname in drop):
                continue
            if not classic:
                if lname == b"x-forwarded-for":  # several lines are one list, in order
                    xff = b"%s, %s" % (xff, value) if xff else value
                    continue
                if lname == b"x-forwarded-proto":
                    continue
                if lname == b"host" and host_rewrite is not None:
                    lines.append(b"Host: %s\r\n" % host_rewrite)
                    continue
            lines.append(b"%s: %s\r\n" % (name, value))
        if upgrade:
            lines.append(WEBSOCKET_UPGRADE)
        if not classic:
            forwarded = b"%s, %s" % (xff, self.peer) if xff else self.peer
            lines.append(b"X-Forwarded-For: %s\r\nX-Forwarded-Proto: http\r\n" % forwarded)
            lines.append(verdict.upstream_headers)
        lines.append(b"\r\n")
        return b"".join(lines)

    async def _connect(self, ex: Exchange) -> None:
        try:
            conn = await self.pool.connect()
        except TimeoutError:
            ex.task = None
            self._upstream_error(ex, "timeout", 504, "Upstream connect timed out")
            return
        except OSError as exc:
            ex.task = None
            log.debug("upstream connect failed: %s", exc)
            self._upstream_error(ex, "refused", 502, "Upstream refused the connection")
            return
        ex.task = None
        if self.transport is None or self.active is not ex:
            self.pool.release(conn)
            return
        self._attach(ex, conn)

    def _attach(self, ex: Exchange, conn: Upstream) -> None:
        ex.upstream = conn
        conn.exchange = ex
        head, ex.upstream_head = ex.upstream_head, b""
        if ex.body:
            chunks = ex.body
            ex.body = []
            if ex.chunked_in:
                payload = b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in chunks)
            else:
                payload = b"".join(chunks)
            conn.send(head + payload)
            ex.sent_body = True
            self._resume_after_buffering()
        else:
            conn.send(head)
        if ex.body_done and ex.chunked_in:
            conn.send(b"0\r\n\r\n")
        ex.last_activity = self.loop.time()
        ex.waiting = True

    def _tick(self) -> None:
        """Watchdog: upstream read timeouts and idle keep-alive connections."""
        now = self.loop.time()
        settings = self.settings
        self.watchdog = self.loop.call_later(settings.tick, self._tick)
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
            if (
                ex.waiting
                and not ex.response_done
                and now - ex.last_activity > settings.read_timeout
            ):
                self._read_timeout(ex)
        elif not self.in_message and now - self.last_active > settings.keepalive_timeout:
            self.close_transport()

    def _client_timeout(self, why: str) -> None:
        self._bad_request(_Reject(408, "client_timeout", why))

    def _read_timeout(self, ex: Exchange) -> None:
        conn = ex.upstream
        if conn is not None:
            conn.exchange = None
            conn.close()
        self._upstream_error(ex, "timeout", 504, "Upstream did not answer in time")

    # upstream → client
    def response_head(
        self,
        ex: Exchange,
        status: int,
        reason: bytes,
        headers: list[tuple[bytes, bytes, bytes]],
        drop: list[bytes],
    ) -> None:
        if 100 <= status < 200 and status != 101:
            ex.interim = True
            if ex.version == "1.1" and self.transport is not None:
                self.write(b"HTTP/1.1 %d %s\r\n\r\n" % (status, reason))
            return
        ex.interim = status == 101  # the tunnel takes over; llhttp still ends the message
        ex.response_started = True
        if ex.upgrade and status != 101:
            ex.close_after = True  # the parser is in upgrade mode: this line cannot go on
        is_head = ex.head.method == "HEAD"
        lines = [b"HTTP/1.1 %d %s\r\n" % (status, reason)]
        has_length = False
        chunked = False
        for name, value, lname in headers:
            if lname in HOP_BY_HOP:
                if lname == b"transfer-encoding":
                    chunked = True
                    if ex.version == "1.1":
                        lines.append(b"%s: %s\r\n" % (name, value))
                elif status == 101 and lname in (b"upgrade", b"connection"):
                    lines.append(b"%s: %s\r\n" % (name, value))
                continue
            if drop and lname in drop:
                continue
            if lname == b"content-length":
                has_length = True
            lines.append(b"%s: %s\r\n" % (name, value))
        verdict = ex.verdict
        if verdict is not None and verdict.response_headers:
            lines.append(verdict.response_headers)
        body_allowed = not is_head and status not in NO_BODY_STATUS and status != 101
        if body_allowed and not has_length and not chunked and ex.upstream is not None:
            ex.upstream.close_delimited = True  # its end is the upstream closing
        if body_allowed and not has_length:
            if ex.version == "1.1":
                ex.chunked_out = True
                if not chunked:
                    lines.append(b"Transfer-Encoding: chunked\r\n")
            else:
                ex.close_after = True  # HTTP/1.0: the end of the body is the end of the line
        if ex.close_after or self.tracker.closing:
            ex.close_after = True
            lines.append(b"Connection: close\r\n")
        elif ex.version == "1.0":
            lines.append(b"Connection: keep-alive\r\n")
        lines.append(b"\r\n")
        self.write(b"".join(lines))
        if is_head and ex.upstream is not None:
            # httptools cannot be told a HEAD response has no body: finish here and do
            # not reuse the connection, whose parser would wait for that body.
            conn = ex.upstream
            conn.exchange = None
            conn.close()
            self._count_forwarded(ex)
            self._complete(ex, None)

    def response_body(self, ex: Exchange, body: bytes) -> None:
        if ex.interim:
            return
        if ex.chunked_out:
            self.write(b"%x\r\n%s\r\n" % (len(body), body))
        else:
            self.write(body)

    def response_complete(self, ex: Exchange, conn: Upstream) -> None:
        if ex.interim:
            if conn.parser.get_status_code() != 101:
                ex.interim = False
            return
        if ex.chunked_out:
            self.write(b"0\r\n\r\n")
        # Back to the pool only once this read is fully parsed (Upstream.data_received):
        # bytes after the response in the same read would otherwise reach the next client.
        # Never reuse what cannot be proved clean: a line that carried an upgrade or CONNECT
        # head, or whose request body did not go out whole, may still owe the upstream bytes.
        conn.finished = conn.parser.should_keep_alive() and ex.body_done and not ex.switching
        conn.exchange = None
        self._count_forwarded(ex)
        self._complete(ex, None)

    def upstream_upgraded(self, conn: Upstream, rest: bytes) -> None:
        """The upstream answered 101: from now on both sides are a byte tunnel."""
        ex = conn.exchange
        if ex is None or self.transport is None:
            conn.close()
            return
        ex.waiting = False
        conn.exchange = None
        conn.tunnel = self
        self.tunnel = conn
        ex.response_done = True
        self._count_forwarded(ex)
        self.metrics.duration.observe(perf_counter() - ex.started)
        if rest:
            self.write(rest)
        for chunk in self.upgrade_buffer or ():
            conn.send(chunk)
        self.upgrade_buffer = None
        self.upgrade_buffered = 0
        self.active = None
        self._resume_after_buffering()

    def _count_forwarded(self, ex: Exchange) -> None:
        verdict = ex.verdict
        if verdict is not None:
            self.metrics.outcome[verdict.outcome].inc()

    def write_raw(self, data: bytes) -> None:
        if self.transport is not None:
            self.transport.write(data)

    def write(self, data: bytes) -> None:
        """Write to the client, or collect while an upstream read is being relayed."""
        out = self.out
        if out is not None:
            out.append(data)
        elif self.transport is not None:
            self.transport.write(data)

    def flush(self) -> None:
        out = self.out
        self.out = None
        if out and self.transport is not None:
            self.transport.write(out[0] if len(out) == 1 else b"".join(out))

    def close_transport(self) -> None:
        """Close after what is queued has been written."""
        self.flush()
        if self.transport is not None:
            self.transport.close()

    def upstream_failed(self, ex: Exchange, kind: str) -> None:
        conn = ex.upstream
        if (
            kind == "reset"
            and conn is not None
            and conn.reused
            and not ex.response_started
            and not ex.retried
            and ex.head.method in IDEMPOTENT
            and not ex.sent_body
            and not ex.body
        ):
            # A pooled connection the upstream had closed: retry once on a fresh one.
            ex.retried = True
            ex.upstream = None
            conn.exchange = None
            ex.waiting = False
            verdict = ex.verdict
            assert verdict is not None
            ex.upstream_head = self._upstream_head(ex, verdict)
            ex.task = self.loop.create_task(self._connect(ex))
            return
        if conn is not None:
            conn.exchange = None
            conn.close()
        status, title = (502, "Upstream closed the connection")
        if kind == "bad_response":
            title = "Upstream sent an invalid response"
        self._upstream_error(ex, kind, status, title)

    def _upstream_error(self, ex: Exchange, kind: str, status: int, title: str) -> None:
        if ex.response_done:
            return
        self.metrics.upstream_errors[kind].inc()
        if ex.response_started:
            # Part of the response is already out: the only honest signal is an abort.
            ex.response_done = True
            self.metrics.outcome["upstream_error"].inc()
            if self.transport is not None:
                self.transport.abort()
            return
        body, _ = problem(status, f"upstream_{kind}", title, f"app {self.enforcer.app}")
        ex.upstream = None
        ex.discard = True
        ex.body = []
        self._answer(ex, status, body, b"", outcome="upstream_error")

    # answering here
    def _answer(
        self, ex: Exchange, status: int, body: bytes, extra: bytes, outcome: str | None = None
    ) -> None:
        """Write a complete problem+json response for ``ex``."""
        ex.discard = True
        ex.body = []
        ex.response_started = True
        if ex.upgrade:
            # Refused here: what the client sends next is for a tunnel that never opens.
            ex.close_after = True
        elif ex.expect_continue or not ex.body_done:
            # The client may still send (or wait to send) a body we do not want; rather
            # than read it to the end, answer and close.
            if ex.expect_continue or ex.body_bytes > self.settings.max_buffer:
                ex.close_after = True
        if self.tracker.closing:
            ex.close_after = True
        connection = b"Connection: close\r\n" if ex.close_after else b""
        self.write(
            b"HTTP/1.1 %d %s\r\nContent-Type: application/problem+json\r\n"
            b"Content-Length: %d\r\n%s%s\r\n%s"
            % (status, REASONS.get(status, b"Error"), len(body), extra, connection, body)
        )
        if outcome is not None:
            self.metrics.outcome[outcome].inc()
        self._complete(ex, None)

    def _bad_request(self, exc: Exception) -> None:
        if isinstance(exc, _Reject):
            status, code, title = exc.status, exc.code, exc.title
        elif isinstance(exc.__cause__, _Reject) or isinstance(exc.__context__, _Reject):
            inner = exc.__cause__ or exc.__context__
            assert isinstance(inner, _Reject)
            status, code, title = inner.status, inner.code, inner.title
        else:
            status, code, title = 400, "bad_request", "Malformed HTTP request"
        self.metrics.outcome["rejected"].inc()
        body, _ = problem(status, code, title, str(exc) if status == 400 else "")
        if self.active is not None and self.active.upstream is not None:
            conn = self.active.upstream  # mid-relay: that upstream exchange is abandoned
            conn.exchange = None
            conn.close()
        if self.active is None or not self.active.response_started:
            self.write(
                b"HTTP/1.1 %d %s\r\nContent-Type: application/problem+json\r\n"
                b"Content-Length: %d\r\nConnection: close\r\n\r\n%s"
                % (status, REASONS.get(status, b"Error"), len(body), body)
            )
        self.close_transport()

    def _complete(self, ex: Exchange, _: Any) -> None:
        """The response to ``ex`` is fully written."""
        ex.response_done = True
        ex.waiting = False
        self.metrics.duration.observe(perf_counter() - ex.started)
        if self.paused_for_upstream:
            self.resume_reading_for_upstream()
        if ex.close_after or (not ex.body_done and not ex.discard):
            self.close_transport()
            return
        if not ex.body_done:
            # The rest of the request body is read and dropped; then the next request.
            ex.discard = True
            return
        self._finish(ex)

    def _finish(self, ex: Exchange) -> None:
        if self.active is not ex:
            return
        self.active = None
        if self.paused_for_buffer and len(self.pipeline) <= 16:
            self._resume_after_buffering()
        if self.pipeline:
            nxt = self.pipeline.popleft()
            self.active = nxt
            self._begin(nxt)
            return
        if self.tracker.closing:
            self.close_transport()
            return
        self.last_active = self.loop.time()

    def _resume_after_buffering(self) -> None:
        """Read again after a pause for buffered input, unless an upgrade still holds more
        than its mark or the upstream is the reason for the pause."""
        if (
            self.paused_for_buffer
            and self.upgrade_buffered <= UPGRADE_HIGH_WATER
            and self.transport is not None
        ):
            self.paused_for_buffer = False
            if not self.paused_for_upstream:
                self.transport.resume_reading()

    def close(self) -> None:
        self.close_transport()

    def close_if_idle(self) -> None:
        if self.active is None and self.parsing is None:
            self.close()


class _Reject(Exception):
    """Raised from a parser callback to refuse a request (httptools re-raises it)."""

    def __init__(self, status: int, code: str, title: str) -> None:
        self.status = status
        self.code = code
        self.title = title
        super().__init__(title)


def _declares_body(headers: list[tuple[bytes, bytes, bytes]]) -> bool:
    """A Content-Length above 0 (llhttp has checked it is one decimal number)."""
    return any(lname == b"content-length" and int(value) > 0 for _, value, lname in headers)


def _tokens(value: bytes) -> list[bytes]:
    return [token.strip().lower() for token in value.split(b",") if token.strip()]


def downstream_factory(
    enforcer: Enforcer, pool: UpstreamPool, settings: ProxySettings, tracker: Tracker
) -> Callable[[], Downstream]:
    def make() -> Downstream:
        return Downstream(enforcer, pool, settings, tracker)

    return make


__all__ = [
    "CLASSIC",
    "FORWARD",
    "Downstream",
    "ProxySettings",
    "Tracker",
    "UpstreamPool",
    "downstream_factory",
]
