"""What the client protocol does with each part of a verdict, without sockets: content
types, stripped headers, closing, COLLECT (answered from the body), the request id on every
response, the access log, and the per-connection budget of refused license keys.

Where a verdict shape does not come from the shipped configuration, ``Scripted`` (the real
enforcer, with scripted verdicts for a few targets and an ``answer`` for COLLECT) gives it:
a unit test of the protocol, not of the enforcer.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from gateway.accesslog import AccessLog
from gateway.config import AccessLogSettings, Config
from gateway.enforcer import COLLECT, FORWARD, RESPOND, Enforcer, RequestHead, Verdict
from gateway.metrics import Metrics
from tests.conftest import IssueKey
from tests.proxy.fake import Wire, parse_requests
from tests.proxy.test_protocol import get, ok, post

JSON = b"application/json"


class Scripted(Enforcer):
    """The real enforcer, except for the targets in ``verdicts``; ``answer`` echoes a
    collected body back as JSON."""

    verdicts: dict[bytes, Verdict]
    collected: list[tuple[RequestHead, bytes]]

    def check(self, head: RequestHead, fetched: bool = False) -> Verdict:
        scripted = self.verdicts.get(head.target)
        return scripted if scripted is not None else super().check(head, fetched)

    def answer(self, head: RequestHead, body: bytes) -> Verdict:
        self.collected.append((head, body))
        reply = json.dumps({"got": body.decode()}).encode()
        return Verdict(RESPOND, status=202, body=reply, content_type=JSON)


@pytest.fixture
def scripted(config: Config, enforcer: Enforcer) -> Scripted:
    stand_in = Scripted("operations", config, enforcer.shared)
    stand_in.verdicts = {}
    stand_in.collected = []
    return stand_in


@pytest.fixture
async def scripted_wire(scripted: Scripted) -> AsyncIterator[Wire]:
    connection = Wire(scripted)
    yield connection
    await connection.close()


# ---------------------------------------------------------------- verdict fields


async def test_a_respond_verdict_goes_out_with_its_content_type(
    scripted: Scripted, scripted_wire: Wire
) -> None:
    scripted.verdicts[b"/plan"] = Verdict(RESPOND, status=200, body=b"{}", content_type=JSON)
    scripted_wire.send(get(b"/plan") + get(b"/api/v1/shipments"))
    plan, denied = scripted_wire.replies()
    assert (plan.status, plan.header("Content-Type"), bytes(plan.body)) == (
        200,
        "application/json",
        b"{}",
    )
    assert denied.header("Content-Type") == "application/problem+json"  # the default


async def test_headers_a_forward_verdict_strips_never_reach_the_upstream(
    scripted: Scripted, scripted_wire: Wire
) -> None:
    scripted.verdicts[b"/x"] = Verdict(
        FORWARD, target=b"/x", strip=frozenset({b"x-user-role", b"authorization"})
    )
    scripted_wire.send(
        get(b"/x", b"X-User-Role: owner\r\nAuthorization: Bearer a\r\nX-Kept: yes\r\n")
    )
    await scripted_wire.settle()
    (seen,) = parse_requests(scripted_wire.upstream(0).sent())
    assert seen.header("X-User-Role") == seen.header("Authorization") == []
    assert seen.header("X-Kept") == ["yes"]


@pytest.mark.parametrize(
    "kind", [pytest.param(RESPOND, id="respond"), pytest.param(FORWARD, id="forward")]
)
async def test_a_verdict_that_closes_ends_the_connection_after_its_response(
    scripted: Scripted, scripted_wire: Wire, kind: int
) -> None:
    scripted.verdicts[b"/last"] = Verdict(kind, status=429, target=b"/last", close=True)
    scripted_wire.send(get(b"/last"))
    await scripted_wire.settle()
    if kind == FORWARD:
        scripted_wire.upstream(0).feed(ok())
    (reply,) = scripted_wire.replies()
    assert reply.header("Connection") == "close"
    assert scripted_wire.transport.closing


# ---------------------------------------------------------------- COLLECT


async def test_a_collect_verdict_is_answered_from_the_request_body(
    scripted: Scripted, scripted_wire: Wire
) -> None:
    scripted.verdicts[b"/events"] = Verdict(COLLECT, max_body=64)
    chunked = b"POST /events HTTP/1.1\r\nHost: gw.test\r\nTransfer-Encoding: chunked\r\n\r\n"
    scripted_wire.send(post(b"/events", b"click") + chunked + b"3\r\nabc\r\n")
    scripted_wire.send(b"3\r\ndef\r\n0\r\n\r\n")
    first, second = scripted_wire.replies()
    assert (first.status, first.header("Content-Type")) == (202, "application/json")
    assert json.loads(bytes(first.body)) == {"got": "click"}
    assert json.loads(bytes(second.body)) == {"got": "abcdef"}
    assert [body for _, body in scripted.collected] == [b"click", b"abcdef"]
    assert scripted_wire.upstreams == [] and not scripted_wire.transport.closing


async def test_a_collected_body_over_its_limit_is_413_and_closes(
    scripted: Scripted, scripted_wire: Wire
) -> None:
    scripted.verdicts[b"/events"] = Verdict(COLLECT, max_body=8)
    scripted_wire.send(post(b"/events", b"123456789", length=100))
    (reply,) = scripted_wire.replies()
    assert (reply.status, reply.code) == (413, "body_too_large")
    assert reply.header("Connection") == "close" and scripted_wire.transport.closing
    assert scripted.collected == []


async def test_a_collect_request_waiting_for_100_continue_gets_it(
    scripted: Scripted, scripted_wire: Wire
) -> None:
    scripted.verdicts[b"/events"] = Verdict(COLLECT, max_body=64)
    scripted_wire.send(
        b"POST /events HTTP/1.1\r\nHost: gw.test\r\nExpect: 100-continue\r\n"
        b"Content-Length: 2\r\n\r\n"
    )
    assert scripted_wire.received() == b"HTTP/1.1 100 Continue\r\n\r\n"
    scripted_wire.send(b"hi")
    (reply,) = scripted_wire.replies()
    assert json.loads(bytes(reply.body)) == {"got": "hi"}


# ---------------------------------------------------------------- the request id


async def test_every_response_carries_the_request_id_the_upstream_received(
    wire: Wire,
) -> None:
    wire.send(get(b"/api/v1/health") + get(b"/api/v1/health", b"X-Request-Id: mine-1\r\n"))
    await wire.settle()
    for number in (0, 1):
        upstream = wire.upstreams[-1]
        (seen,) = parse_requests(upstream.sent())
        (sent_id,) = seen.header("X-Request-Id")
        upstream.feed(ok(headers=b"X-Request-Id: the-upstreams-own\r\n"))
        await wire.settle()
        assert wire.replies()[number].header("X-Request-Id") == sent_id
    assert sent_id == "mine-1"  # a well-formed inbound id is kept
    (forwarded, kept) = wire.replies()
    assert [k for k, _ in forwarded.headers].count("X-Request-Id") == 1


async def test_answers_given_here_carry_the_request_id_in_header_and_body(wire: Wire) -> None:
    wire.send(get(b"/api/v1/health", b"X-Request-Id: r-502\r\n"))
    await wire.settle()
    wire.upstream(0).feed(b"NOT HTTP\r\n\r\n")  # 502 upstream_bad_response
    wire.send(get(b"/api/v1/shipments", b"X-Request-Id: r-401\r\n"))  # no key: 401
    bad_gateway, unlicensed = wire.replies()
    assert bad_gateway.header("X-Request-Id") == bad_gateway.problem()["request_id"] == "r-502"
    assert unlicensed.header("X-Request-Id") == "r-401"


async def test_classic_responses_come_back_untouched(wire: Wire) -> None:
    wire.send(get(b"/xdispatch/x", b"X-Request-Id: classic-1\r\n"))
    await wire.settle()
    (seen,) = parse_requests(wire.upstream(0).sent())
    assert seen.header("X-Request-Id") == ["classic-1"]  # as the client sent it
    response = ok(headers=b"X-Classic: yes\r\n")
    wire.upstream(0).feed(response)
    assert wire.received() == response


# ---------------------------------------------------------------- the access log


def _access_log(tmp_path: Path) -> tuple[AccessLog, Path]:
    path = tmp_path / "access.jsonl"
    options = AccessLogSettings(sink=f"file://{path}")
    return AccessLog.from_settings(options.sink, options, Metrics()), path


async def test_each_finished_exchange_is_one_access_log_line(
    scripted: Scripted, tmp_path: Path
) -> None:
    access, path = _access_log(tmp_path)
    scripted.verdicts[b"/api/v1/shipments/7"] = Verdict(
        FORWARD,
        target=b"/api/v1/shipments/7",
        route="/api/v1/shipments/{id}",
        route_name="shipment",
        feature="ops.shipments",
        tenant="acme",
        tier="core",
    )
    wire = Wire(scripted, access_log=access)
    try:
        wire.send(get(b"/api/v1/shipments/7", b"X-Request-Id: fwd\r\n"))
        await wire.settle()
        wire.upstream(0).feed(ok(b"hello"))
        await wire.settle()
        first_response = len(wire.received())
        wire.send(get(b"/api/v1/shipments", b"X-Request-Id: denied\r\n"))  # 401
        wire.send(b"BROKEN\r\n\r\n")  # 400, then closed
        replies = wire.replies()
        await wire.settle()
    finally:
        await wire.close()
    access.close()  # writes what is queued
    forwarded, unlicensed, refused = (json.loads(line) for line in path.read_text().splitlines())
    assert forwarded | {"ts": 0, "duration": 0} == {
        "ts": 0, "app": "operations", "method": "GET", "route": "/api/v1/shipments/{id}",
        "route_name": "shipment", "feature": "ops.shipments", "outcome": "allowed",
        "status": 200, "upstream_status": 200, "duration": 0, "bytes": first_response,
        "request_id": "fwd", "tenant": "acme", "tier": "core",
    }  # fmt: skip
    assert (unlicensed["outcome"], unlicensed["status"], unlicensed["upstream_status"]) == (
        "unlicensed",
        401,
        None,
    )
    assert unlicensed["request_id"] == "denied"
    assert (refused["method"], refused["outcome"], refused["status"]) == ("-", "rejected", 400)
    assert refused["request_id"] == replies[2].header("X-Request-Id")


# ---------------------------------------------------------------- refused keys


async def test_a_connection_is_closed_once_it_has_presented_eight_refused_keys(
    wire: Wire, issue_key: IssueKey
) -> None:
    forged = issue_key(sub="flood")[:-4] + "AAAA"
    for n in range(1, 9):
        wire.send(get(b"/api/v1/shipments", b"X-License-Key: %s\r\n" % forged.encode()))
        reply = wire.replies()[-1]
        assert reply.status == 401
        assert (reply.header("Connection") == "close") == (n == 8), n
    assert wire.transport.closing


async def test_requests_without_a_key_or_with_a_valid_one_spend_no_budget(
    wire: Wire, issue_key: IssueKey
) -> None:
    valid = issue_key(tier="core").encode()
    for _ in range(10):
        wire.send(get(b"/api/v1/shipments"))  # 401 license_missing: no key presented
        wire.send(get(b"/api/v1/shipments", b"X-License-Key: %s\r\n" % valid))
        await wire.settle()
        wire.upstreams[-1].feed(ok())
        await wire.settle()
    assert [reply.status for reply in wire.replies()] == [401, 200] * 10
    assert not wire.transport.closing
