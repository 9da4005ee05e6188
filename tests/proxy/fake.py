"""The proxy's protocols without sockets: a fake transport (uvicorn's ``MockTransport`` in
spirit) and a ``Wire`` that joins one ``Downstream`` to upstream connections made on fake
transports, so a test feeds bytes on either side and reads what each side was sent.

    wire = Wire(enforcer)
    wire.send(b"GET /api/v1/health HTTP/1.1\\r\\nHost: a\\r\\n\\r\\n")
    await wire.settle()
    assert wire.upstream(0).sent().startswith(b"GET /api/v1/health ")
    wire.upstream(0).feed(b"HTTP/1.1 200 OK\\r\\nContent-Length: 0\\r\\n\\r\\n")
    assert wire.replies().status == 200
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import httptools

from gateway.enforcer import Enforcer
from gateway.proxy import Downstream, ProxySettings, Tracker, Upstream, UpstreamPool
from tests.rawhttp import Reply, ReplyReader, Seen

CLIENT = ("203.0.113.7", 40000)


class FakeTransport(asyncio.Transport):
    """Records what is written; remembers whether reading is paused; ``close`` and
    ``abort`` make the protocol lose its connection on the next loop turn, like asyncio."""

    def __init__(self, protocol: asyncio.Protocol, peer: tuple[str, int]) -> None:
        super().__init__()
        self.protocol = protocol
        self.peer = peer
        self.data = bytearray()
        self.reading = True
        self.closing = False
        self.aborted = False
        self.lost = False

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"peername": self.peer}.get(name, default)

    def write(self, data: bytes | bytearray | memoryview) -> None:
        assert not self.lost, "written after the connection was lost"
        self.data += data

    def is_reading(self) -> bool:
        return self.reading and not self.closing

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        if not self.closing:
            self.closing = True
            asyncio.get_running_loop().call_soon(self._lose)

    def abort(self) -> None:
        self.aborted = True
        self.close()

    def _lose(self) -> None:
        if not self.lost:
            self.lost = True
            self.protocol.connection_lost(None)

    def sent(self) -> bytes:
        """What was written since the last call."""
        out = bytes(self.data)
        self.data.clear()
        return out


class FakeUpstream:
    """One upstream connection of a ``Wire``: what the gateway sent it, and a way to answer."""

    def __init__(self, protocol: Upstream, transport: FakeTransport) -> None:
        self.protocol = protocol
        self.transport = transport

    def sent(self) -> bytes:
        return self.transport.sent()

    def feed(self, data: bytes) -> None:
        self.protocol.data_received(data)

    def requests(self, data: bytes) -> list[Seen]:
        """``data`` (what it was sent) parsed as requests."""
        return parse_requests(data)


def settings(**overrides: Any) -> ProxySettings:
    options: dict[str, Any] = {
        "license_header": "X-License-Key",
        "tenant_header": "X-Tenant-Id",
        "role_header": "X-User-Role",
        "user_header": "X-User-Id",
        "host_header": None,
        "connect_timeout": 5.0,
        "read_timeout": 30.0,
    }
    options.update(overrides)
    return ProxySettings(**options)


class Wire:
    """A client connection (``Downstream`` on a fake transport) and the upstream connections
    it opens (fake transports too, in the order opened)."""

    def __init__(
        self,
        enforcer: Enforcer,
        proxy_settings: ProxySettings | None = None,
        factory: Callable[..., Downstream] = Downstream,
        **extra: Any,
    ) -> None:
        self.settings = proxy_settings or settings()
        self.upstreams: list[FakeUpstream] = []
        self.pool = UpstreamPool(
            "upstream.test", 80, self.settings, enforcer.metrics, opener=self._open
        )
        self.tracker = Tracker()
        self.client = factory(enforcer, self.pool, self.settings, self.tracker, **extra)
        self.transport = FakeTransport(self.client, CLIENT)
        self.client.connection_made(self.transport)
        self._replies = ReplyReader(wanted=1 << 30)
        self._tunnel = False  # after a 101 the client reads raw bytes, not responses

    async def _open(
        self, factory: Callable[[], Upstream]
    ) -> tuple[asyncio.BaseTransport, Upstream]:
        protocol = factory()
        transport = FakeTransport(protocol, ("192.0.2.1", 80))
        protocol.connection_made(transport)
        self.upstreams.append(FakeUpstream(protocol, transport))
        return transport, protocol

    def send(self, data: bytes) -> None:
        """Bytes from the client."""
        self.client.data_received(data)

    def upstream(self, index: int) -> FakeUpstream:
        return self.upstreams[index]

    def received(self) -> bytes:
        """What the client was sent since the last call (also parsed for ``replies``)."""
        data = self.transport.sent()
        if data and not self._tunnel:
            self._replies.feed(data)
            self._tunnel = any(reply.status == 101 for reply in self._replies.replies)
        return data

    def replies(self) -> list[Reply]:
        """Every complete response the client has been sent so far, in order."""
        self.received()
        return [reply for reply in self._replies.replies if reply.complete]

    async def settle(self) -> None:
        """Let the tasks the protocols started (connects, look-ups) and pending closes run."""
        for _ in range(20):
            await asyncio.sleep(0)

    async def close(self) -> None:
        self.transport.close()
        for upstream in self.upstreams:
            upstream.transport.close()
        await self.settle()


class _RequestParser:
    def __init__(self) -> None:
        self.seen: list[Seen] = []
        self.parser = httptools.HttpRequestParser(self)
        self._url = b""
        self._headers: list[tuple[str, str]] = []

    def on_message_begin(self) -> None:
        self._url = b""
        self._headers = []

    def on_url(self, url: bytes) -> None:
        self._url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name.decode("latin-1"), value.decode("latin-1")))

    def on_headers_complete(self) -> None:
        method = self.parser.get_method().decode()
        self.seen.append(Seen(0, method, self._url.decode("latin-1"), self._headers))

    def on_body(self, body: bytes) -> None:
        self.seen[-1].body += body

    def on_message_complete(self) -> None:
        self.seen[-1].complete = True


def parse_requests(data: bytes) -> list[Seen]:
    """HTTP/1.1 requests in ``data`` (an upgrade stops the parse: what follows is raw)."""
    reader = _RequestParser()
    try:
        reader.parser.feed_data(data)
    except httptools.HttpParserUpgrade:
        pass
    return reader.seen
