"""Upstream faults: refused, reset before or during the response, slow
first byte, stalled body, garbage, and a pooled keep-alive connection the upstream closed.

Each fault comes from a raw asyncio server scripted per request. The client (a raw socket)
always gets an answer (502/504 problem+json) or, once part of the response is out, an
aborted connection: never a 500, never a hang (every read has a deadline). Each fault is
counted once in ``gateway_upstream_errors_total{app,kind}``.
"""

from __future__ import annotations

import asyncio
import socket
import struct
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import NamedTuple, cast

import aiohttp
import httptools
import pytest
from prometheus_client.parser import text_string_to_metric_families

from gateway.matrix import APP_NAMES
from tests.conftest import IssueKey
from tests.harness import Gateway, free_port, running_gateway
from tests.rawhttp import converse, request

# What the upstream does with one request, decided when its head arrives:
#   "ok"          answer 200 once the request is complete
#   "reset"       TCP reset, nothing answered
#   "close"       orderly close (FIN), nothing answered
#   "partial"     a 200 head promising 1000 bytes, 100 of them, then a reset
#   "stall"       nothing, ever
#   "stall_body"  a 200 head promising 1000 bytes, 100 of them, then nothing
#   bytes         these bytes, as the "response"
Action = str | bytes
Script = Callable[[int], Action]  # request number on its connection → action

READ_TIMEOUT = 0.3
HEAD_1000 = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 1000\r\n\r\n"


class Head(NamedTuple):
    connection: int
    number: int  # request number on that connection
    method: str
    target: str


class _FaultConnection(asyncio.Protocol):
    def __init__(self, owner: FaultUpstream) -> None:
        self.owner = owner
        self.number = len(owner.connections)
        owner.connections.append(self)
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.index = 0
        self.url = b""
        self.pending_ok = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self.abort()

    def on_message_begin(self) -> None:
        self.url = b""

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_headers_complete(self) -> None:
        method = self.parser.get_method().decode()
        self.owner.heads.append(Head(self.number, self.index, method, self.url.decode()))
        action = self.owner.script(self.index)
        self.index += 1
        transport = self.transport
        if transport is None:
            return
        if action == "ok":
            self.pending_ok = True
        elif action == "reset":
            self.abort()
        elif action == "close":
            transport.close()
        elif action == "partial":
            transport.write(HEAD_1000 + b"x" * 100)
            self.owner.loop.call_later(0.05, self.abort)
        elif action == "stall_body":
            transport.write(HEAD_1000 + b"x" * 100)
        elif isinstance(action, bytes):
            transport.write(action)
        else:
            assert action == "stall", action

    def on_message_complete(self) -> None:
        if self.pending_ok and self.transport is not None:
            self.pending_ok = False
            self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")

    def abort(self) -> None:
        """A TCP reset: linger 0, then close."""
        if self.transport is None:
            return
        sock = self.transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.transport.abort()


class FaultUpstream:
    def __init__(self, script: Script) -> None:
        self.script = script
        self.heads: list[Head] = []
        self.connections: list[_FaultConnection] = []
        self.port = 0
        self.loop = asyncio.get_running_loop()
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        self._server = await self.loop.create_server(lambda: _FaultConnection(self), "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        for conn in self.connections:
            if conn.transport is not None:
                conn.transport.abort()
        await asyncio.sleep(0)


@asynccontextmanager
async def gateway_before(
    tmp_path: Path, key_dir: Path, script: Script | None
) -> AsyncIterator[tuple[Gateway, FaultUpstream | None]]:
    """A gateway whose operations upstream follows ``script`` (None: nothing listens)."""
    upstream = None
    port = free_port()
    if script is not None:
        upstream = FaultUpstream(script)
        await upstream.start()
        port = upstream.port
    ports: dict[str, int] = dict.fromkeys(APP_NAMES, free_port())
    ports["operations"] = port
    try:
        async with running_gateway(
            tmp_path, key_dir, ports, app_extra=f"read_timeout = {READ_TIMEOUT}\n"
        ) as gateway:
            yield gateway, upstream
    finally:
        if upstream is not None:
            await upstream.stop()


async def upstream_errors(gateway: Gateway) -> dict[tuple[str, str], float]:
    """Non-zero ``gateway_upstream_errors_total`` by (app, kind), and the operations
    ``upstream_error`` outcome count under ("operations", "outcome")."""
    async with aiohttp.ClientSession() as session:
        async with session.get(gateway.admin_url("/metrics")) as response:
            assert response.status == 200
            text = await response.text()
    found: dict[tuple[str, str], float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "gateway_upstream_errors_total" and sample.value:
                found[(sample.labels["app"], sample.labels["kind"])] = sample.value
            if (
                sample.name == "gateway_requests_total"
                and sample.labels == {"app": "operations", "outcome": "upstream_error"}
                and sample.value
            ):
                found[("operations", "outcome")] = sample.value
    return found


def _get(key: str) -> bytes:
    return request(b"GET /api/v1/shipments HTTP/1.1", key=key)


def _post(key: str) -> bytes:
    return request(b"POST /api/v1/shipments HTTP/1.1", key=key, body=b'{"ref": 1}')


def always(action: Action) -> Script:
    return lambda index: action


# ---------------------------------------------------------------- answered with 502 / 504


async def test_refused_is_502(tmp_path: Path, key_dir: Path, issue_key: IssueKey) -> None:
    async with gateway_before(tmp_path, key_dir, None) as (gateway, _):
        reply = await converse(gateway.listen["operations"], _get(issue_key()))
        assert reply.replies[0].status == 502, reply.replies
        assert reply.replies[0].code == "upstream_refused"
        assert await upstream_errors(gateway) == {
            ("operations", "refused"): 1,
            ("operations", "outcome"): 1,
        }


@pytest.mark.parametrize("action", ["reset", "close"])
async def test_reset_before_any_response_byte_is_502(
    tmp_path: Path, key_dir: Path, issue_key: IssueKey, action: str
) -> None:
    async with gateway_before(tmp_path, key_dir, always(action)) as (gateway, upstream):
        assert upstream is not None
        reply = (await converse(gateway.listen["operations"], _post(issue_key()))).replies[0]
        assert reply.status == 502, reply
        assert reply.code == "upstream_reset"
        assert [head.method for head in upstream.heads] == ["POST"]  # never replayed
        assert await upstream_errors(gateway) == {
            ("operations", "reset"): 1,
            ("operations", "outcome"): 1,
        }


async def test_idempotent_request_is_retried_once_only(
    tmp_path: Path, key_dir: Path, issue_key: IssueKey
) -> None:
    """The first attempt goes out on the pooled connection (opened by the start-up probe);
    its reset earns one retry on a fresh connection, whose reset is final."""
    async with gateway_before(tmp_path, key_dir, always("reset")) as (gateway, upstream):
        assert upstream is not None
        reply = (await converse(gateway.listen["operations"], _get(issue_key()))).replies[0]
        assert reply.status == 502, reply
        assert reply.code == "upstream_reset"
        attempts = [head for head in upstream.heads if head.method == "GET"]
        assert len(attempts) == 2
        assert attempts[0].connection != attempts[1].connection
        assert await upstream_errors(gateway) == {
            ("operations", "reset"): 1,
            ("operations", "outcome"): 1,
        }


async def test_slow_first_byte_is_504(tmp_path: Path, key_dir: Path, issue_key: IssueKey) -> None:
    async with gateway_before(tmp_path, key_dir, always("stall")) as (gateway, _):
        reply = (await converse(gateway.listen["operations"], _get(issue_key()))).replies[0]
        assert reply.status == 504, reply
        assert reply.code == "upstream_timeout"
        assert await upstream_errors(gateway) == {
            ("operations", "timeout"): 1,
            ("operations", "outcome"): 1,
        }


@pytest.mark.parametrize(
    "garbage",
    [
        pytest.param(b"HELLO\r\n\r\n", id="hello"),
        pytest.param(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03", id="tls-hello"),
        pytest.param(b"HTTP/1.1 2OO OK\r\n\r\n", id="bad-status"),
        pytest.param(b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n", id="negative-length"),
        pytest.param(
            b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab",
            id="two-lengths",
        ),
        pytest.param(b"HTTP/1.1 200 OK\r\nX-Bad\x00: v\r\n\r\n", id="nul-in-header"),
        pytest.param(b"HTTP/1.1 200 OK\r\nX-Note: a\rb\r\n\r\n", id="bare-cr"),
    ],
)
async def test_garbage_response_is_502(
    tmp_path: Path, key_dir: Path, issue_key: IssueKey, garbage: bytes
) -> None:
    async with gateway_before(tmp_path, key_dir, always(garbage)) as (gateway, _):
        reply = (await converse(gateway.listen["operations"], _get(issue_key()))).replies[0]
        assert reply.status == 502, reply
        assert reply.code == "upstream_bad_response"
        assert await upstream_errors(gateway) == {
            ("operations", "bad_response"): 1,
            ("operations", "outcome"): 1,
        }


# ---------------------------------------------------------------- aborted mid-response


@pytest.mark.parametrize(
    ("action", "kind"),
    [
        pytest.param("partial", "reset", id="reset-mid-body"),
        pytest.param("stall_body", "timeout", id="stalled-body"),
    ],
)
async def test_fault_after_the_head_aborts_the_client_connection(
    tmp_path: Path, key_dir: Path, issue_key: IssueKey, action: str, kind: str
) -> None:
    """Once the head is out, a status can no longer change: the client must see the
    response cut short (connection aborted), not a complete-looking one and not a hang."""
    async with gateway_before(tmp_path, key_dir, always(action)) as (gateway, _):
        conversation = await converse(
            gateway.listen["operations"], _get(issue_key()), until_closed=True
        )
        (reply,) = conversation.replies
        assert reply.status == 200
        assert reply.header("Content-Length") == "1000"
        assert not reply.complete
        assert len(reply.body) < 1000
        assert conversation.closed
        assert await upstream_errors(gateway) == {
            ("operations", kind): 1,
            ("operations", "outcome"): 1,
        }


# ---------------------------------------------------------------- pooled connection closed


@pytest.mark.parametrize("action", ["close", "reset"])
async def test_closed_pooled_connection_is_retried_for_get(
    tmp_path: Path, key_dir: Path, issue_key: IssueKey, action: str
) -> None:
    """The upstream answers the first request on a connection and drops the connection when
    the next one arrives (its keep-alive timer fired as the gateway reused it)."""
    script: Script = lambda index: "ok" if index == 0 else action  # noqa: E731
    key = issue_key()
    async with gateway_before(tmp_path, key_dir, script) as (gateway, upstream):
        assert upstream is not None
        port = gateway.listen["operations"]
        first = (await converse(port, _get(key))).replies[0]
        assert first.status == 200, first
        second = (await converse(port, _get(key))).replies[0]
        assert second.status == 200, second
        # The second GET went out on the pooled connection, then once more on a new one.
        attempts = [(head.connection, head.number) for head in upstream.heads]
        assert len(attempts) == 3
        assert attempts[1] == (attempts[0][0], 1)
        assert attempts[2][0] != attempts[0][0] and attempts[2][1] == 0
        assert await upstream_errors(gateway) == {}


@pytest.mark.parametrize("action", ["close", "reset"])
async def test_closed_pooled_connection_is_not_retried_for_post_with_body(
    tmp_path: Path, key_dir: Path, issue_key: IssueKey, action: str
) -> None:
    script: Script = lambda index: "ok" if index == 0 else action  # noqa: E731
    key = issue_key()
    async with gateway_before(tmp_path, key_dir, script) as (gateway, upstream):
        assert upstream is not None
        port = gateway.listen["operations"]
        first = (await converse(port, _get(key))).replies[0]
        assert first.status == 200, first
        reply = (await converse(port, _post(key))).replies[0]
        assert reply.status == 502, reply
        assert reply.code == "upstream_reset"
        assert [head.method for head in upstream.heads] == ["GET", "POST"]
        assert await upstream_errors(gateway) == {
            ("operations", "reset"): 1,
            ("operations", "outcome"): 1,
        }


# ---------------------------------------------------------------- bytes after a response

SECRET = b'{"secret":"data of the previous client"}'


async def test_bytes_after_a_response_never_reach_the_next_client(
    tmp_path: Path, key_dir: Path, issue_key: IssueKey
) -> None:
    """An upstream that answers twice (a handler writes 200, an error path then writes a
    500 head; its body follows later) must not leak into another client's response."""

    def script(index: int) -> Action:
        if index == 0:
            stray_head = b"HTTP/1.1 500 Oops\r\nContent-Length: %d\r\n\r\n" % len(SECRET)
            return b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nfirst" + stray_head
        return SECRET + b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nsecond"

    key = issue_key()
    async with gateway_before(tmp_path, key_dir, script) as (gateway, _):
        port = gateway.listen["operations"]
        first = (await converse(port, _get(key))).replies[0]
        assert (first.status, bytes(first.body)) == (200, b"first")
        second = await converse(port, _get(key), deadline=2)
        assert SECRET not in second.raw
        assert second.replies[0].status in (200, 502), second.replies
