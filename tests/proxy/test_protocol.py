"""The client protocol driven without sockets (``tests/proxy/fake.py``): pipelining, flow
control both ways, upgrades and tunnels, and requests refused before any upstream is asked.

A real ``Enforcer`` decides on the shipped configuration; only the transports are fakes,
so every byte each side was sent can be read back. Paths under ``/xdispatch/`` are classic
(forwarded untouched, no key needed), ``/api/v1/health`` is public.
"""

from __future__ import annotations

import pytest

from gateway.proxy.flow import NOT_PAUSED, Pause
from gateway.proxy.settings import MAX_PIPELINE, UPGRADE_HIGH_WATER
from gateway.proxy.state import State
from tests.proxy.fake import Wire, parse_requests

WS = (
    b"GET /xdispatch/ws HTTP/1.1\r\nHost: gw.test\r\nConnection: Upgrade\r\n"
    b"Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: a2V5\r\n\r\n"
)
SWITCHED = b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n"
FRAME = b"\x81\x05hello"


def get(target: bytes = b"/xdispatch/x", headers: bytes = b"") -> bytes:
    return b"GET %s HTTP/1.1\r\nHost: gw.test\r\n%s\r\n" % (target, headers)


def post(target: bytes, body: bytes, length: int | None = None) -> bytes:
    declared = len(body) if length is None else length
    return b"POST %s HTTP/1.1\r\nHost: gw.test\r\nContent-Length: %d\r\n\r\n%s" % (
        target,
        declared,
        body,
    )


def ok(body: bytes = b"ok", headers: bytes = b"") -> bytes:
    return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n%s\r\n%s" % (len(body), headers, body)


# ---------------------------------------------------------------- pipelining


async def test_pipelined_requests_are_relayed_one_at_a_time_and_answered_in_order(
    wire: Wire,
) -> None:
    wire.send(get(b"/xdispatch/1") + get(b"/api/v1/health") + get(b"/xdispatch/3"))
    await wire.settle()
    for expected, body in (
        ("/xdispatch/1", b"one"),
        ("/api/v1/health", b"two"),
        ("/xdispatch/3", b"three"),
    ):
        sent = [(upstream, parse_requests(upstream.sent())) for upstream in wire.upstreams]
        ((upstream, (seen,)),) = [(up, seen) for up, seen in sent if seen]  # one at a time
        assert seen.target == expected
        upstream.feed(ok(body))
        await wire.settle()
    assert [bytes(reply.body) for reply in wire.replies()] == [b"one", b"two", b"three"]


async def test_a_pipelined_request_answered_here_waits_for_the_one_before_it(wire: Wire) -> None:
    wire.send(get(b"/xdispatch/1") + get(b"/api/v1/shipments"))  # the second: no key, 401
    await wire.settle()
    assert wire.replies() == []  # the 401 must not overtake the first response
    wire.upstream(0).feed(ok(b"first"))
    statuses = [reply.status for reply in wire.replies()]
    assert statuses == [200, 401]
    assert wire.client.active is None and not wire.transport.closing


async def test_too_many_pipelined_requests_pause_reading_until_the_queue_shrinks(
    wire: Wire,
) -> None:
    wire.send(b"".join(get(b"/xdispatch/%d" % n) for n in range(MAX_PIPELINE + 2)))
    await wire.settle()
    assert wire.client.flow.paused == Pause.PIPELINE
    assert not wire.transport.reading
    wire.upstream(0).feed(ok())
    await wire.settle()
    assert wire.client.flow.paused == NOT_PAUSED
    assert wire.transport.reading


# ---------------------------------------------------------------- flow control


async def test_a_full_upstream_pauses_reading_from_the_client(wire: Wire) -> None:
    wire.send(post(b"/xdispatch/upload", b"first part", length=100))
    await wire.settle()
    upstream = wire.upstream(0)
    upstream.protocol.pause_writing()
    assert not wire.transport.reading
    upstream.protocol.resume_writing()
    assert wire.transport.reading
    wire.send(b"x" * 90)
    assert parse_requests(upstream.sent())[0].body == b"first part" + b"x" * 90


async def test_a_slow_client_pauses_reading_from_the_upstream(wire: Wire) -> None:
    wire.send(get(b"/xdispatch/download"))
    await wire.settle()
    upstream = wire.upstream(0)
    upstream.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n" + b"x" * 10)
    wire.client.pause_writing()
    assert not upstream.transport.reading
    wire.client.resume_writing()
    assert upstream.transport.reading


async def test_a_slow_client_also_holds_back_the_upstream_of_the_next_pipelined_request(
    wire: Wire,
) -> None:
    wire.send(get(b"/xdispatch/1") + get(b"/xdispatch/2"))
    await wire.settle()
    first = wire.upstream(0)
    wire.client.pause_writing()  # the client stopped reading during the first response
    first.feed(ok(b"one", b"Connection: close\r\n"))  # that line cannot be reused
    await wire.settle()
    second = wire.upstreams[-1]
    assert second is not first
    assert parse_requests(second.sent())[0].target == "/xdispatch/2"
    assert not second.transport.reading  # its response must not stream into a full buffer
    wire.client.resume_writing()
    assert second.transport.reading


async def test_pause_reasons_combine_and_reading_resumes_when_none_is_left(wire: Wire) -> None:
    wire.send(b"".join(get(b"/xdispatch/%d" % n) for n in range(MAX_PIPELINE + 2)))
    await wire.settle()
    upstream = wire.upstream(0)
    upstream.protocol.pause_writing()
    assert wire.client.flow.paused == Pause.PIPELINE | Pause.UPSTREAM_FULL
    upstream.protocol.resume_writing()
    assert wire.client.flow.paused == Pause.PIPELINE  # lifting one reason keeps the other
    assert not wire.transport.reading


async def test_a_body_held_behind_an_in_flight_request_pauses_reading_until_it_is_sent(
    wire: Wire,
) -> None:
    held = b"y" * (wire.settings.max_buffer + 1)
    wire.send(get(b"/xdispatch/first") + post(b"/xdispatch/upload", held))
    await wire.settle()
    assert wire.client.flow.paused == Pause.BUFFER_FULL  # the kernel holds the rest
    first = wire.upstream(0)
    assert parse_requests(first.sent())[0].target == "/xdispatch/first"
    first.feed(ok())
    await wire.settle()
    assert wire.client.flow.paused == NOT_PAUSED
    (upload,) = [seen for up in wire.upstreams for seen in parse_requests(up.sent())]
    assert upload.body == held


# ---------------------------------------------------------------- upgrades and tunnels


async def _tunnel(wire: Wire, early: bytes = b"") -> None:
    wire.send(WS + early)
    await wire.settle()
    upstream = wire.upstream(0)
    (seen,) = parse_requests(upstream.sent())
    assert seen.header("Upgrade") == ["websocket"]
    upstream.feed(SWITCHED + b"server says hi")
    assert wire.received().endswith(b"\r\n\r\nserver says hi")
    assert wire.client.tunnel is upstream.protocol


async def test_a_websocket_upgrade_becomes_a_tunnel(wire: Wire) -> None:
    await _tunnel(wire, early=FRAME)
    upstream = wire.upstream(0)
    assert upstream.sent() == FRAME  # held until the 101, then sent as is
    wire.send(b"GET / HTTP/1.1\r\n\r\n")  # not HTTP any more: bytes for the tunnel
    assert upstream.sent() == b"GET / HTTP/1.1\r\n\r\n"
    upstream.feed(b"\x81\x02yo")
    assert wire.received() == b"\x81\x02yo"
    assert [reply.status for reply in wire.replies()] == [101]


async def test_bytes_before_the_101_are_bounded(wire: Wire) -> None:
    wire.send(WS)
    await wire.settle()
    wire.send(b"z" * (UPGRADE_HIGH_WATER + 1))
    assert wire.client.flow.paused == Pause.UPGRADE
    wire.upstream(0).feed(SWITCHED)
    assert wire.client.flow.paused == NOT_PAUSED


async def test_a_tunnel_is_flow_controlled_both_ways(wire: Wire) -> None:
    await _tunnel(wire)
    upstream = wire.upstream(0)
    upstream.protocol.pause_writing()  # the upstream stopped reading after its 101
    assert not wire.transport.reading
    upstream.protocol.resume_writing()
    assert wire.transport.reading
    wire.client.pause_writing()  # the client stopped reading
    assert not upstream.transport.reading
    wire.client.resume_writing()
    assert upstream.transport.reading


async def test_a_pipelined_upgrade_behind_an_in_flight_request_is_not_parsed_as_http(
    wire: Wire,
) -> None:
    after = FRAME + b"GET /xdispatch/smuggled HTTP/1.1\r\nHost: gw.test\r\n\r\n"
    wire.send(get(b"/xdispatch/first") + WS + after)
    await wire.settle()
    upstream = wire.upstream(0)
    (first,) = parse_requests(upstream.sent())
    assert first.target == "/xdispatch/first"
    upstream.feed(ok(b"first"))
    await wire.settle()
    (upgrade,) = parse_requests(wire.upstreams[-1].sent())
    assert upgrade.target == "/xdispatch/ws"
    wire.upstreams[-1].feed(SWITCHED)
    assert wire.upstreams[-1].sent() == after  # raw, for the tunnel: never a request
    assert [reply.status for reply in wire.replies()] == [200, 101]


async def test_a_101_to_a_request_that_asked_for_no_websocket_is_a_bad_response(
    wire: Wire,
) -> None:
    """Otherwise an upstream's stray 101 would turn the client connection into a tunnel
    whose later requests reach the upstream unchecked."""
    wire.send(get(b"/xdispatch/1"))
    await wire.settle()
    upstream = wire.upstream(0)
    upstream.feed(SWITCHED + b"raw")
    assert wire.client.tunnel is None
    (reply,) = wire.replies()
    assert (reply.status, reply.code) == (502, "upstream_bad_response")
    assert upstream.transport.closing
    wire.send(get(b"/api/v1/shipments"))  # enforced as ever: no key, 401
    assert [reply.status for reply in wire.replies()] == [502, 401]


async def test_a_refused_upgrade_closes_the_connection(wire: Wire) -> None:
    refused = WS.replace(b"/xdispatch/ws", b"/api/v1/itineraries")  # no key: 401
    wire.send(refused + FRAME * 10)
    (reply,) = wire.replies()
    assert reply.status == 401
    assert reply.header("Connection") == "close"
    assert wire.transport.closing and wire.upstreams == []


# ---------------------------------------------------------------- refused early


@pytest.mark.parametrize(
    ("raw", "status", "code"),
    [
        pytest.param(b"GARBAGE\r\n\r\n", 400, "bad_request", id="not-http"),
        pytest.param(
            b"GET /x HTTP/1.1\r\nHost: gw.test\r\nNo colon\r\n\r\n", 400, "bad_request", id="header"
        ),
        pytest.param(
            b"GET /" + b"a" * (33 * 1024) + b" HTTP/1.1\r\n\r\n", 414, "uri_too_long", id="target"
        ),
        pytest.param(
            b"GET / HTTP/1.1\r\nX-Big: " + b"v" * (33 * 1024) + b"\r\n\r\n",
            431,
            "headers_too_large",
            id="header-bytes",
        ),
        pytest.param(
            post(b"/xdispatch/upload", b"", length=5 << 30), 413, "body_too_large", id="body"
        ),
    ],
)
async def test_bad_requests_are_answered_and_closed_before_any_upstream(
    wire: Wire, raw: bytes, status: int, code: str
) -> None:
    wire.send(raw)
    (reply,) = wire.replies()
    assert (reply.status, reply.code) == (status, code)
    assert reply.header("Connection") == "close"
    assert wire.transport.closing
    await wire.settle()
    assert wire.upstreams == []


async def test_a_malformed_pipelined_request_lets_the_response_in_flight_finish(
    wire: Wire,
) -> None:
    wire.send(get(b"/xdispatch/download"))
    await wire.settle()
    upstream = wire.upstream(0)
    upstream.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n12345")  # streaming
    wire.send(b"NOT HTTP AT ALL\r\n\r\n")  # the next request is malformed
    assert not upstream.transport.closing
    upstream.feed(b"67890")
    first, refusal = wire.replies()
    assert (first.status, bytes(first.body)) == (200, b"1234567890")  # whole, then the 400
    assert (refusal.status, refusal.code) == (400, "bad_request")
    assert wire.transport.closing


async def test_a_malformed_request_refuses_the_requests_not_yet_answered(wire: Wire) -> None:
    bad = b"GET / HTTP/1.1\r\nNo colon\r\n\r\n"
    wire.send(get(b"/xdispatch/1") + get(b"/api/v1/shipments") + bad + get(b"/xdispatch/4"))
    await wire.settle()
    assert [reply.status for reply in wire.replies()] == [400]
    assert wire.transport.closing
    assert all(upstream.transport.closing for upstream in wire.upstreams)


async def test_a_malformed_body_of_the_request_being_relayed_ends_the_connection(
    wire: Wire,
) -> None:
    chunked = (
        b"POST /xdispatch/upload HTTP/1.1\r\nHost: gw.test\r\nTransfer-Encoding: chunked\r\n\r\n"
    )
    wire.send(chunked + b"5\r\nhello\r\n")
    await wire.settle()
    upstream = wire.upstream(0)
    upstream.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n12345")
    wire.send(b"zz\r\n")  # not a chunk size: that request cannot be completed
    assert upstream.transport.closing  # the upstream got half a request: never reused
    assert wire.transport.closing
    assert wire.replies() == []  # the 200 already began: no answer can follow it


async def test_an_answer_before_the_body_drains_a_small_body_and_goes_on(wire: Wire) -> None:
    wire.send(post(b"/api/v1/shipments", b"part", length=10))  # no key: 401 at once
    (reply,) = wire.replies()
    assert reply.status == 401
    assert wire.client.active is not None and wire.client.active.state is State.DRAINING
    wire.send(b"rest..")  # the body's end: dropped
    wire.send(get(b"/api/v1/shipments"))
    assert [reply.status for reply in wire.replies()] == [401, 401]
    assert not wire.transport.closing
