"""Upgrade and CONNECT requests over raw sockets: smuggling through a declared body that
llhttp never reads, pool poisoning, and the memory an upgrade can make the gateway hold.

llhttp (in the gateway and in most upstreams) reads no body after an upgrade or CONNECT
head. An upstream that answers as soon as the head arrives (``RecordingUpstream`` with
``answer_on_head``, like Node.js) and then waits for the declared body would take it from the
next request on that pooled connection — another client's. So such requests are refused, a
connection that carried one never goes back to the pool, and whatever bytes one client sends
never show up inside an upstream request made for another client.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import re
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from gateway.matrix import APP_NAMES
from gateway.proxy import UPGRADE_HIGH_WATER, Downstream
from tests.harness import Gateway, RawUpstream, running_gateway
from tests.proxy.test_hardening_headers import CLASSIC_KEY, SMUGGLED
from tests.rawhttp import (
    RecordingUpstream,
    Reply,
    ThreadedGateway,
    converse,
    exchange,
    exchange_sync,
    read_replies,
    threaded_gateway,
)

WS_HEAD = (
    b"GET %s HTTP/1.1\r\nHost: gateway.test\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
    b"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
)
# The most a paused connection can hold: the mark, plus the one read that crossed it.
READ_SIZE = 256 * 1024


@pytest.fixture
async def upstream() -> AsyncIterator[RecordingUpstream]:
    """Answers on the head, like Node.js (see the module docstring)."""
    server = RecordingUpstream(answer_on_head=True)
    await server.start()
    yield server
    await server.stop()


# ---------------------------------------------------------------- a body nobody reads


def _head(line: bytes, headers: bytes) -> bytes:
    return line + b"\r\nHost: gateway.test\r\n" + headers + b"\r\n"


CHUNKED = b"%x\r\n%s\r\n0\r\n\r\n" % (len(SMUGGLED), SMUGGLED)
LENGTH = b"Content-Length: %d\r\n" % len(SMUGGLED)
TE = b"Transfer-Encoding: chunked\r\n"


@pytest.mark.parametrize(
    "raw",
    [
        pytest.param(
            _head(
                b"GET /api/v1/health HTTP/1.1", b"Connection: Upgrade\r\nUpgrade: h2c\r\n" + LENGTH
            )
            + SMUGGLED,
            id="h2c-content-length",
        ),
        pytest.param(
            _head(
                b"GET /api/v1/health HTTP/1.1",
                b"Connection: Upgrade\r\nUpgrade: websocket\r\n" + LENGTH,
            )
            + SMUGGLED,
            id="websocket-content-length",
        ),
        pytest.param(
            _head(
                b"POST /api/v1/health HTTP/1.1", b"Connection: upgrade\r\nUpgrade: x-any\r\n" + TE
            )
            + CHUNKED,
            id="other-protocol-chunked",
        ),
        pytest.param(
            _head(
                b"GET /api/v1/health HTTP/1.1",
                b"Connection: keep-alive, Upgrade\r\nUpgrade: websocket\r\n"
                b"X-License-Key: " + CLASSIC_KEY.encode() + b"\r\n" + LENGTH,
            )
            + SMUGGLED,
            id="classic-key",
        ),
        pytest.param(_head(b"CONNECT /api/v1/health HTTP/1.1", LENGTH) + SMUGGLED, id="connect"),
        pytest.param(_head(b"CONNECT /api/v1/health HTTP/1.1", TE) + CHUNKED, id="connect-chunked"),
        pytest.param(
            _head(b"CONNECT gateway.test:443 HTTP/1.1", LENGTH) + SMUGGLED,
            id="connect-authority-form",
        ),
    ],
)
async def test_upgrade_with_body_is_refused(
    acme_gateway: Gateway, upstream: RecordingUpstream, raw: bytes
) -> None:
    conversation = await converse(acme_gateway.listen["operations"], raw, wanted=2)
    (reply,) = conversation.replies
    assert reply.status == 400, conversation.replies
    assert reply.code == "bad_request"
    assert conversation.closed  # the body is never read as a request of its own
    await asyncio.sleep(0.05)
    assert upstream.requests == []


@pytest.mark.parametrize(
    "attempt",
    [
        pytest.param(WS_HEAD % b"/api/v1/health" + b"\r\n", id="websocket"),
        pytest.param(
            _head(b"GET /api/v1/health HTTP/1.1", b"Connection: Upgrade\r\nUpgrade: h2c\r\n"),
            id="h2c",
        ),
        pytest.param(_head(b"CONNECT /api/v1/health HTTP/1.1", b""), id="connect"),
    ],
)
async def test_pool_never_reuses_connection_after_upgrade_attempt(
    acme_gateway: Gateway, upstream: RecordingUpstream, attempt: bytes
) -> None:
    port = acme_gateway.listen["operations"]
    first = await exchange(port, attempt)
    assert first.status == 200, first  # the upstream declined by answering as plain HTTP
    await asyncio.sleep(0.05)
    attempted = {seen.connection for seen in upstream.requests}
    reply = await exchange(port, _head(b"GET /api/v1/health?next HTTP/1.1", b""))
    assert reply.status == 200, reply
    (seen,) = [seen for seen in upstream.requests if seen.target == "/api/v1/health?next"]
    assert seen.connection not in attempted


async def test_pool_never_reuses_connection_after_an_answer_before_the_body(
    acme_gateway: Gateway, upstream: RecordingUpstream
) -> None:
    """The upstream answered while the client was still sending the body: what the line
    still owes the upstream is unknown, so the line is closed."""
    port = acme_gateway.listen["operations"]
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(_head(b"POST /api/v1/health HTTP/1.1", b"Content-Length: 100\r\n") + b"partial")
    await writer.drain()
    reply = (await read_replies(reader, until_closed=True)).replies[0]
    writer.close()
    assert reply.status == 200, reply
    (first,) = upstream.requests
    reply = await exchange(port, _head(b"GET /api/v1/health?next HTTP/1.1", b""))
    assert reply.status == 200, reply
    assert upstream.requests[-1].connection != first.connection


# ---------------------------------------------------------------- the pool-poisoning property

TOKEN = re.compile(rb"<<c(\d+)>>")
UPGRADES = (b"websocket", b"WebSocket", b"h2c", b"x-any", b"websocket, h2c")


@pytest.fixture(scope="module")
def threaded(tmp_path_factory: pytest.TempPathFactory, key_dir: Path) -> Iterator[ThreadedGateway]:
    """One gateway and one answer-on-head upstream for every example."""
    folder = tmp_path_factory.mktemp("pool-property")
    with threaded_gateway(folder, key_dir, RecordingUpstream(answer_on_head=True)) as running:
        yield running


AFTER = b"GET /api/v1/health?{t}-after HTTP/1.1\r\nHost: g\r\n\r\n"


@st.composite
def client_bytes(draw: st.DrawFn) -> bytes:
    """What a hostile client sends, with ``{t}`` where its own token goes: an upgrade,
    CONNECT or plain head, declared or undeclared bodies, and more bytes after."""
    method = draw(st.sampled_from([b"GET", b"POST", b"CONNECT", b"PUT"]))
    target = draw(
        st.sampled_from(
            [b"/api/v1/health?{t}", b"/api/v1/unmapped/{t}", b"/xdispatch/{t}", b"g.test:443"]
        )
    )
    lines = [method + b" " + target + b" HTTP/1.1", b"Host: gateway.test", b"X-Probe: {t}"]
    connection = draw(st.sampled_from([None, b"Upgrade", b"keep-alive, Upgrade", b"upgrade"]))
    if connection is not None:
        lines.append(b"Connection: " + connection)
    upgrade = draw(st.sampled_from((None, *UPGRADES)))
    if upgrade is not None:
        lines.append(b"Upgrade: " + upgrade)
    if draw(st.booleans()):
        lines.append(b"X-License-Key: " + CLASSIC_KEY.encode())
    forged = SMUGGLED.replace(b" HTTP/1.1", b"?{t} HTTP/1.1")
    pieces = st.sampled_from([b"{t}", forged, b"\r\n", b"0\r\n\r\n"])
    body = b"".join(
        draw(st.lists(pieces | st.binary(max_size=12).filter(lambda b: b"<<" not in b), max_size=4))
    )
    framing = draw(st.sampled_from(["none", "length", "other-length", "chunked"]))
    if framing == "length":
        lines.append(b"Content-Length: %d" % len(body))
    elif framing == "other-length":
        lines.append(b"Content-Length: %d" % draw(st.integers(1, 200)))
    elif framing == "chunked":
        lines.append(b"Transfer-Encoding: chunked")
        body = (b"%x\r\n%s\r\n" % (len(body), body) if body else b"") + b"0\r\n\r\n"
    if framing != "none" and draw(st.booleans()):
        body = b""  # declared but never sent: the upstream would wait for it
    after = draw(st.sampled_from([b"", AFTER]))
    return b"\r\n".join(lines) + b"\r\n\r\n" + body + after


_clients = itertools.count()


def _victim(token: bytes) -> bytes:
    return b"GET /api/v1/health?%s HTTP/1.1\r\nHost: gateway.test\r\nX-Probe: %s\r\n\r\n" % (
        token,
        token,
    )


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(attack=client_bytes())
@example(
    attack=b"GET /api/v1/health HTTP/1.1\r\nHost: gateway.test\r\nX-Probe: {t}\r\n"
    b"Connection: Upgrade\r\nUpgrade: h2c\r\nContent-Length: 60\r\n\r\n"
)
@example(
    attack=b"CONNECT /xdispatch/{t} HTTP/1.1\r\nHost: gateway.test\r\nX-Probe: {t}\r\n"
    b"X-License-Key: " + CLASSIC_KEY.encode() + b"\r\nContent-Length: 60\r\n\r\n"
)
def test_no_client_bytes_reach_another_clients_upstream_request(
    threaded: ThreadedGateway, attack: bytes
) -> None:
    port = threaded.gateway.listen["operations"]
    upstream = threaded.upstream
    start = len(upstream.requests)
    attacker = b"<<c%d>>" % next(_clients)
    victim = b"<<c%d>>" % next(_clients)
    exchange_sync(port, attack.replace(b"{t}", attacker))  # answered or closed, never hung
    reply: Reply | None = None
    with contextlib.suppress(AssertionError):  # a swallowed request: report the bytes first
        reply = exchange_sync(port, _victim(victim))
    for seen in upstream.requests[start:]:
        text = b"\n".join(
            [seen.target.encode("latin-1")]
            + [f"{name}: {value}".encode("latin-1") for name, value in seen.headers]
            + [bytes(seen.body)]
        )
        owners = set(TOKEN.findall(text))
        assert len(owners) <= 1, f"one upstream request carries two clients' bytes: {text!r}"
    assert reply is not None and reply.status == 200, reply
    assert bytes(reply.body) == b"seen /api/v1/health?" + victim


# ---------------------------------------------------------------- bounded upgrade memory


@contextlib.asynccontextmanager
async def stalled_gateway(
    tmp_path: Path, key_dir: Path, answer: bytes, *, flood: bool = False
) -> AsyncIterator[tuple[Gateway, RawUpstream]]:
    """A gateway in front of an upstream that answers one head with ``answer`` (maybe
    nothing) and then never reads again: a slow WebSocket backend, before or after its 101.
    With ``flood`` it sends frames after its answer for as long as they are taken."""
    stalling = RawUpstream(answer, stall=True, flood=flood)
    await stalling.start()
    try:
        ports: dict[str, int] = dict.fromkeys(APP_NAMES, stalling.port)
        async with running_gateway(tmp_path, key_dir, ports) as gw:
            yield gw, stalling
    finally:
        await stalling.stop()


async def _flood(writer: asyncio.StreamWriter, total: int) -> None:
    chunk = b"\x82\x7e\xff\xff" + b"x" * 65535  # WebSocket-ish frames, never read upstream
    sent = 0
    with contextlib.suppress(ConnectionError):
        while sent < total:
            writer.write(chunk)
            await writer.drain()
            sent += len(chunk)


async def _until(condition: Callable[[], bool], what: str) -> None:
    """Wait for ``condition`` (a state of the gateway, never a duration) with a hang guard."""
    for _ in range(500):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"never reached: {what}")


def _client_side(gateway: Gateway) -> Downstream:
    (conn,) = gateway.runtime.tracker.connections
    return conn


def _buffered(conn: Downstream) -> int:
    return sum(len(chunk) for chunk in conn.upgrade_buffer or ())


async def test_upgrade_buffer_is_bounded_while_waiting_for_101(
    tmp_path: Path, key_dir: Path
) -> None:
    async with stalled_gateway(tmp_path, key_dir, b"") as (gateway, stalling):
        reader, writer = await asyncio.open_connection("127.0.0.1", gateway.listen["operations"])
        writer.write(WS_HEAD % b"/api/v1/health" + b"\r\n")
        flood = asyncio.get_running_loop().create_task(_flood(writer, 64 << 20))
        try:
            await _until(stalling.got_request.is_set, "the upgrade request upstream")
            conn = _client_side(gateway)
            await _until(
                lambda: (
                    conn.upgrade_buffer is not None
                    and (
                        _buffered(conn) > 4 * READ_SIZE
                        or conn.transport is None
                        or not conn.transport.is_reading()
                    )
                ),
                "reading paused, or the buffer past its bound",
            )
            assert _buffered(conn) <= UPGRADE_HIGH_WATER + READ_SIZE
            assert conn.transport is not None and not conn.transport.is_reading()
            assert not flood.done()  # the client is held back, not read into memory
        finally:
            flood.cancel()
            writer.close()
            with contextlib.suppress(asyncio.CancelledError):
                await flood


SWITCHED = (
    b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
    b"Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n"
)


async def test_a_tunnel_to_a_slow_upstream_pauses_the_client(tmp_path: Path, key_dir: Path) -> None:
    async with stalled_gateway(tmp_path, key_dir, SWITCHED) as (gateway, _):
        reader, writer = await asyncio.open_connection("127.0.0.1", gateway.listen["operations"])
        writer.write(WS_HEAD % b"/api/v1/health" + b"\r\n")
        assert (await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)).startswith(
            b"HTTP/1.1 101 "
        )
        flood = asyncio.get_running_loop().create_task(_flood(writer, 64 << 20))
        try:
            conn = _client_side(gateway)
            tunnel = conn.tunnel
            assert tunnel is not None and tunnel.transport is not None
            upstream_transport = tunnel.transport
            high = upstream_transport.get_write_buffer_limits()[1]
            await _until(
                lambda: (
                    upstream_transport.get_write_buffer_size() > 4 * (high + READ_SIZE)
                    or conn.transport is None
                    or not conn.transport.is_reading()
                ),
                "reading paused, or the upstream write buffer past its bound",
            )
            assert upstream_transport.get_write_buffer_size() <= high + READ_SIZE
            assert conn.transport is not None and not conn.transport.is_reading()
        finally:
            flood.cancel()
            writer.close()
            with contextlib.suppress(asyncio.CancelledError):
                await flood


async def test_a_tunnel_to_a_slow_client_pauses_the_upstream(tmp_path: Path, key_dir: Path) -> None:
    """The other way round: the upstream floods after its 101 and the client never reads."""
    async with stalled_gateway(tmp_path, key_dir, SWITCHED, flood=True) as (gateway, _):
        reader, writer = await asyncio.open_connection("127.0.0.1", gateway.listen["operations"])
        try:
            writer.write(WS_HEAD % b"/api/v1/health" + b"\r\n")
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            assert head.startswith(b"HTTP/1.1 101 ")  # and from here on the client reads nothing
            conn = _client_side(gateway)
            tunnel = conn.tunnel
            client_transport = conn.transport
            assert tunnel is not None and tunnel.transport is not None
            assert client_transport is not None
            upstream_transport = tunnel.transport
            high = client_transport.get_write_buffer_limits()[1]
            await _until(
                lambda: (
                    client_transport.get_write_buffer_size() > 4 * (high + READ_SIZE)
                    or not upstream_transport.is_reading()
                ),
                "the upstream paused, or the client write buffer past its bound",
            )
            assert client_transport.get_write_buffer_size() <= high + READ_SIZE
            assert not upstream_transport.is_reading()
        finally:
            writer.close()


@pytest.mark.parametrize(
    ("identity", "status"),
    [
        pytest.param(b"", 401, id="refused-at-once"),
        # The tenant record is not cached yet: the refusal comes after a store look-up,
        # while the client's bytes after the head keep arriving.
        pytest.param(b"X-Tenant-Id: acme\r\n", 403, id="refused-after-tenant-lookup"),
        pytest.param(b"X-Tenant-Id: nobody\r\n", 401, id="unknown-tenant-after-lookup"),
    ],
)
async def test_connection_is_closed_after_refusing_an_upgrade(
    acme_gateway: Gateway, upstream: RecordingUpstream, identity: bytes, status: int
) -> None:
    head = WS_HEAD % b"/api/v1/itineraries" + identity + b"\r\n"
    conversation = await converse(
        acme_gateway.listen["operations"], head + b"\x81\x05hello" * 100, until_closed=True
    )
    (reply,) = conversation.replies
    assert reply.status == status, reply
    assert conversation.closed
    assert upstream.requests == []
