"""Limits and client timeouts over real sockets: 413, 408, 431, 503 with Retry-After."""

from __future__ import annotations

import asyncio
import contextlib

import aiohttp
import pytest

from tests.conftest import GatewayFactory, IssueKey
from tests.harness import Gateway, RawUpstream

LIMITS = """
[server]
max_body_bytes = 1000
header_timeout = 0.3
body_timeout = 0.3
max_headers = 20
"""


@pytest.fixture
async def limited_gateway(
    gateway_factory: GatewayFactory, upstream_ports: dict[str, int]
) -> Gateway:
    """``LIMITS``, and one upstream connection per app, queued for at most 0.3 s."""
    return await gateway_factory(
        upstream_ports, extra=LIMITS, app_extra="max_connections = 1\nqueue_timeout = 0.3\n"
    )


async def _exchange(limited_gateway: Gateway, raw: bytes, *, wait: float = 5) -> bytes:
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", limited_gateway.listen["operations"]
    )
    writer.write(raw)
    await writer.drain()
    try:
        return await asyncio.wait_for(reader.read(65536), wait)
    finally:
        writer.close()


def _status(response: bytes) -> int:
    return int(response.split(b" ", 2)[1])


async def test_declared_body_over_the_limit_is_413(
    limited_gateway: Gateway, issue_key: IssueKey
) -> None:
    key = issue_key(tier="core").encode()
    response = await _exchange(
        limited_gateway,
        b"POST /api/v1/shipments HTTP/1.1\r\nHost: x\r\nX-License-Key: "
        + key
        + b"\r\nContent-Length: 5000\r\n\r\n",
    )
    assert _status(response) == 413
    assert b'"code":"body_too_large"' in response


async def test_chunked_body_over_the_limit_is_413(
    limited_gateway: Gateway, issue_key: IssueKey
) -> None:
    key = issue_key(tier="core").encode()
    chunk = b"%x\r\n%s\r\n" % (600, b"z" * 600)
    response = await _exchange(
        limited_gateway,
        b"POST /api/v1/shipments HTTP/1.1\r\nHost: x\r\nX-License-Key: "
        + key
        + b"\r\nTransfer-Encoding: chunked\r\n\r\n"
        + chunk
        + chunk,
    )
    assert _status(response) == 413


async def test_slow_request_head_is_408(limited_gateway: Gateway) -> None:
    response = await _exchange(limited_gateway, b"GET /api/v1/health HTTP/1.1\r\nHost: x\r\n")
    assert _status(response) == 408
    assert b'"code":"client_timeout"' in response


async def test_stalled_body_is_cut_off(limited_gateway: Gateway, issue_key: IssueKey) -> None:
    key = issue_key(tier="core").encode()
    response = await _exchange(
        limited_gateway,
        b"POST /api/v1/shipments HTTP/1.1\r\nHost: x\r\nX-License-Key: "
        + key
        + b"\r\nContent-Length: 100\r\n\r\nonly-part",
    )
    # The request went upstream; the client stopped sending: the connection ends
    # (408 if nothing was answered yet), it is not held open.
    assert response == b"" or _status(response) == 408


async def test_too_many_headers_is_431(limited_gateway: Gateway) -> None:
    headers = b"".join(b"X-Filler-%d: v\r\n" % i for i in range(30))
    response = await _exchange(
        limited_gateway, b"GET /api/v1/health HTTP/1.1\r\nHost: x\r\n" + headers + b"\r\n"
    )
    assert _status(response) == 431


async def test_connection_limit_queues_then_503_with_retry_after(
    limited_gateway: Gateway, issue_key: IssueKey
) -> None:
    headers = {"X-License-Key": issue_key(tier="core")}
    async with aiohttp.ClientSession() as session:

        async def slow() -> int:
            async with session.get(
                limited_gateway.url("operations", "/slow/1"), headers=headers
            ) as r:
                return r.status

        first = asyncio.ensure_future(slow())  # noqa: TID251 - awaited below
        await asyncio.sleep(0.1)  # the first request holds the only upstream connection
        async with session.get(
            limited_gateway.url("operations", "/api/v1/shipments"), headers=headers
        ) as r:
            assert r.status == 503
            assert r.headers["Retry-After"] == "1"
            assert (await r.json())["code"] == "upstream_overloaded"
        assert await first == 200
        # With the connection free again, requests flow.
        async with session.get(
            limited_gateway.url("operations", "/api/v1/shipments"), headers=headers
        ) as r:
            assert r.status == 200


async def test_a_denied_expect_continue_request_is_answered_and_closed(
    limited_gateway: Gateway, issue_key: IssueKey
) -> None:
    key = issue_key(tier="core").encode()
    # The client waits for 100 Continue before sending its body: it gets the final 403 and
    # the connection closes, so an unsent body can never be read as the next request.
    response = await _exchange(
        limited_gateway,
        b"POST /api/v1/shipments/1/optimize HTTP/1.1\r\nHost: x\r\nX-License-Key: "
        + key
        + b"\r\nExpect: 100-continue\r\nContent-Length: 10\r\n\r\n",
    )
    assert _status(response) == 403
    assert b"Connection: close" in response


async def test_an_upload_held_back_by_a_slow_upstream_is_not_a_stalled_client(
    gateway_factory: GatewayFactory,
) -> None:
    """Reading from the client pauses while the upstream does not read the body: that
    time is the upstream's (504 after read_timeout), never the client's body_timeout."""
    stalling = RawUpstream(b"", stall=True)
    await stalling.start()
    try:
        gateway = await gateway_factory(
            stalling.port, extra="[server]\nbody_timeout = 0.3\n", app_extra="read_timeout = 1.5\n"
        )
        reader, writer = await asyncio.open_connection("127.0.0.1", gateway.listen["operations"])
        size = 256 << 20  # far more than the socket buffers on the way hold
        writer.write(
            b"POST /xdispatch/upload HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % size
        )
        reply = asyncio.get_running_loop().create_task(reader.read(65536))
        chunk = b"u" * 65536
        with contextlib.suppress(ConnectionError):
            while not reply.done():
                writer.write(chunk)
                await asyncio.wait_for(writer.drain(), 10)
        response = await asyncio.wait_for(reply, 10)
        writer.close()
        assert _status(response) == 504, response[:200]
        assert b'"code":"upstream_timeout"' in response
    finally:
        await stalling.stop()
