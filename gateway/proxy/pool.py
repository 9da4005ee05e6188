"""The upstream side: keep-alive connections to one upstream (``UpstreamPool``), each an
``Upstream`` protocol that parses one response at a time and hands it to the exchange it is
attached to, or, after a 101, moves raw bytes for a tunnel.

An upstream connection goes back to the pool only when both messages were framed completely
and neither side switched protocols; anything else is closed (``Upstream.detach``).
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections import deque
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, cast

import httptools

from gateway.metrics import AppMetrics
from gateway.proxy.flow import Pause
from gateway.proxy.framing import NOT_DROPPED, tokens
from gateway.proxy.settings import ProxySettings

if TYPE_CHECKING:
    from gateway.proxy.client import Downstream
    from gateway.proxy.exchange import Exchange

log = logging.getLogger(__name__)

# Opens a connection with the given protocol factory (``loop.create_connection`` to the
# pool's address by default; tests pass one that makes a fake transport).
Opener = Callable[[Callable[[], "Upstream"]], Awaitable[tuple[asyncio.BaseTransport, "Upstream"]]]


class UpstreamPool:
    """Keep-alive connections to one upstream; idle ones are reused last-in first-out."""

    def __init__(
        self,
        host: str,
        port: int,
        settings: ProxySettings,
        metrics: AppMetrics,
        max_idle: int = 256,
        opener: Opener | None = None,
    ) -> None:
        self.host = host
        self.port = port
        self.settings = settings
        self.metrics = metrics
        self.max_idle = max_idle
        self.idle: list[Upstream] = []
        self.open = 0  # connections open or being opened, idle ones included
        self.waiters: deque[asyncio.Future[Upstream | None]] = deque()
        self._opener = opener or self._open_tcp

    def can_open(self) -> bool:
        return self.open < self.settings.max_connections

    # ------------------------------------------------------------ for an exchange
    def provide(self, ex: Exchange) -> None:
        """Attach a connection to ``ex``: an idle one at once, else a new one, else (all
        busy) the next one released, waiting at most ``queue_timeout`` (then 503)."""
        conn = self.take()
        if conn is not None:
            ex.attach(conn)
        elif self.can_open():
            self.open_for(ex)
        else:
            ex.task = ex.loop.create_task(self._queue_for(ex))

    def open_for(self, ex: Exchange) -> None:
        ex.task = ex.loop.create_task(self._connect_for(ex))

    async def _connect_for(self, ex: Exchange) -> None:
        try:
            conn = await self.connect()
        except TimeoutError:
            ex.task = None
            ex.upstream_error("timeout", 504, "Upstream connect timed out")
            return
        except OSError as exc:
            ex.task = None
            log.debug("upstream connect failed: %s", exc)
            ex.upstream_error("refused", 502, "Upstream refused the connection")
            return
        ex.task = None
        if not ex.downstream.serving(ex):
            self.release(conn)
            return
        ex.attach(conn)

    async def _queue_for(self, ex: Exchange) -> None:
        waiter = self.wait()
        try:
            conn = await asyncio.wait_for(asyncio.shield(waiter), self.settings.queue_timeout)
        except TimeoutError:
            waiter.cancel()
            ex.task = None
            ex.upstream_error(
                "overloaded",
                503,
                "Upstream connection limit reached",
                f"app {ex.downstream.enforcer.app}: "
                f"all {self.settings.max_connections} connections busy",
                b"Retry-After: 1\r\n",
            )
            return
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled() and waiter.result() is not None:
                self.release(waiter.result())  # type: ignore[arg-type]
            waiter.cancel()
            raise
        ex.task = None
        if not ex.downstream.serving(ex):
            if conn is not None:
                self.release(conn)
            return
        if conn is None:
            self.open_for(ex)
        else:
            ex.attach(conn)

    # ------------------------------------------------------------ connections

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

    async def _open_tcp(
        self, factory: Callable[[], Upstream]
    ) -> tuple[asyncio.BaseTransport, Upstream]:
        loop = asyncio.get_running_loop()
        return await loop.create_connection(factory, self.host, self.port)

    async def connect(self) -> Upstream:
        self.open += 1
        try:
            _, conn = await asyncio.wait_for(
                self._opener(lambda: Upstream(self)), self.settings.connect_timeout
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
    """One connection to the upstream: relays one response at a time to the exchange it
    is attached to, or (``tunnel``) moves raw bytes to a client after a 101."""

    def __init__(self, pool: UpstreamPool) -> None:
        self.pool = pool
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.exchange: Exchange | None = None
        self.client: Downstream | None = None  # whose flow this connection is joined to
        self.tunnel = False
        self.reused = False
        self.write_paused = False
        # Set when a response ended in the current read: back to the pool (True) or closed,
        # once the whole read is parsed, so no byte after the response reaches another client.
        self.after_read: bool | None = None
        self.stray = False  # the upstream sent bytes no request asked for
        self.until_close = False  # the current response ends when the upstream closes
        self._interim = False  # a 1xx response other than 101 is being parsed
        self._reason = b""
        self._headers: list[tuple[bytes, bytes, bytes]] = []
        self._dropped: list[bytes] = []  # header names the Connection header lists

    # joining an exchange or a tunnel
    def attach(self, ex: Exchange) -> None:
        self.exchange = ex
        ex.upstream = self
        client = self.client = ex.downstream
        if self.transport is not None:
            client.flow.join(self.transport, self.write_paused)

    def open_tunnel(self) -> None:
        """After the 101: the exchange is over, the client stays joined."""
        self.exchange = None
        self.tunnel = True

    def detach(self, reusable: bool = False) -> None:
        """Part from the exchange and the client. ``reusable`` (only from within a read,
        when a response has ended cleanly): back to the pool once the read is parsed;
        otherwise the connection is closed."""
        ex = self.exchange
        self.exchange = None
        if ex is not None and ex.upstream is self:
            ex.upstream = None
        client = self.client
        self.client = None
        if client is not None:
            client.flow.part()
        if reusable:
            self.after_read = True
        else:
            self.close()

    # asyncio callbacks
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        client = self.client
        if self.tunnel:
            if client is not None:
                client.write(data)
            return
        ex = self.exchange
        if ex is None or client is None:  # an idle connection must not talk: not trustworthy
            self.close()
            return
        ex.last_activity = ex.loop.time()
        # Everything one upstream read produces (head, body, end) goes out in one write.
        client.cork()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as upgrade:
            ex.upgraded(data[upgrade.args[0] :])
        except httptools.HttpParserError as exc:
            log.debug("upstream sent a bad response: %s", exc)
            self.stray = True  # never reused, even after a response that ended cleanly
            ex.upstream_failed("bad_response")
        finally:
            client.uncork()
            after, self.after_read = self.after_read, None
            if after is not None:
                if after and not self.stray and self.transport is not None:
                    self.pool.release(self)
                else:
                    self.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self.pool.lost(self)
        if self.tunnel:
            client, self.client = self.client, None
            if client is not None:
                client.close()  # the tunnel's other end
            return
        ex = self.exchange
        if ex is None:
            self.detach()
        elif self.until_close:
            ex.relay_end(reusable=False)  # the close was the response's end
        else:
            ex.upstream_failed("reset")

    def pause_writing(self) -> None:
        self.write_paused = True
        if self.client is not None:
            self.client.flow.pause_reading(Pause.UPSTREAM_FULL)

    def resume_writing(self) -> None:
        self.write_paused = False
        if self.client is not None:
            self.client.flow.resume_reading(Pause.UPSTREAM_FULL)

    # httptools callbacks
    def on_message_begin(self) -> None:
        self.until_close = False
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
        # The headers Connection names are hop-by-hop too (nginx's usual keep-alive: none).
        if lname == b"connection" and value.lower() != b"keep-alive":
            self._dropped.extend(t for t in tokens(value) if t not in NOT_DROPPED)

    def on_headers_complete(self) -> None:
        ex = self.exchange
        if ex is None:
            return
        status = self.parser.get_status_code()
        self._interim = 100 <= status < 200 and status != 101
        if self._interim:
            ex.relay_interim(status, self._reason)
        else:
            ex.relay_head(status, self._reason, self._headers, self._dropped)

    def on_body(self, body: bytes) -> None:
        ex = self.exchange
        if ex is not None and not self._interim:
            ex.relay_body(body)

    def on_message_complete(self) -> None:
        ex = self.exchange
        if ex is None:
            return
        if self._interim:
            self._interim = False
            return
        if self.parser.get_status_code() == 101:
            return  # llhttp ends the message, then raises HttpParserUpgrade: the tunnel
        ex.relay_end(reusable=self.parser.should_keep_alive())

    def send(self, data: bytes) -> None:
        if self.transport is not None:
            self.transport.write(data)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()
            self.transport = None
        self.pool.forget(self)
