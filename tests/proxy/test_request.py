"""Reading a parsed request head (pure): what the enforcer decides on, and the request id."""

from __future__ import annotations

import re

import pytest

from gateway.enforcer import RequestHead
from gateway.proxy.request import read_head
from tests.proxy.fake import settings

PEER = b"203.0.113.7"
GENERATED = re.compile(r"[0-9a-f]+-[0-9a-f]+-[0-9a-f]+")


def head_of(*lines: bytes, **options: str | None) -> RequestHead:
    headers = []
    for line in (b"Host: gw.test", *lines):
        name, _, value = line.partition(b": ")
        headers.append((name, value, name.lower()))
    head, _ = read_head("GET", b"/x", headers, "1.1", settings(**options), upgrade=False, peer=PEER)
    return head


def test_the_head_carries_peer_host_and_every_forwarded_for_in_order() -> None:
    head = head_of(b"X-Forwarded-For: 198.51.100.1, 10.0.0.1", b"x-forwarded-for: 10.0.0.2")
    assert head.peer == PEER
    assert head.host == b"gw.test"
    assert head.forwarded_for == b"198.51.100.1, 10.0.0.1, 10.0.0.2"
    assert head_of().forwarded_for == b""


@pytest.mark.parametrize(
    ("lines", "kept"),
    [
        pytest.param([b"X-Request-Id: abc-123_x.y:z"], "abc-123_x.y:z", id="well-formed"),
        pytest.param([b"X-Request-Id: " + b"a" * 128], "a" * 128, id="128-chars"),
        pytest.param([b"X-Request-Id: " + b"a" * 129], None, id="too-long"),
        pytest.param([b"X-Request-Id: "], None, id="empty"),
        pytest.param([b"X-Request-Id: a b"], None, id="space"),
        pytest.param([b'X-Request-Id: a"b'], None, id="quote"),
        pytest.param([b"X-Request-Id: \xc3\xa9"], None, id="non-ascii"),
        pytest.param([b"X-Request-Id: a", b"X-Request-Id: a"], None, id="twice"),
        pytest.param([], None, id="none"),
    ],
)
def test_a_well_formed_inbound_request_id_is_kept_else_one_is_made(
    lines: list[bytes], kept: str | None
) -> None:
    head = head_of(*lines)
    if kept is not None:
        assert head.request_id == kept
    else:
        assert GENERATED.fullmatch(head.request_id), head.request_id
        assert head.request_id != head_of(*lines).request_id  # one per request


def test_token_and_client_id_are_read_from_the_configured_headers_only() -> None:
    lines = (b"Authorization: Bearer t0k3n", b"X-Client-Id: integration-7")
    head = head_of(*lines, token_header="Authorization", client_header="X-Client-Id")
    assert (head.token, head.client_id) == (b"Bearer t0k3n", b"integration-7")
    unwatched = head_of(*lines)
    assert (unwatched.token, unwatched.client_id) == (None, None)


@pytest.mark.parametrize(
    "line",
    [pytest.param(b"Authorization: b", id="token"), pytest.param(b"X-Client-Id: b", id="client")],
)
def test_a_repeated_token_or_client_header_is_a_bad_header(line: bytes) -> None:
    name = line.partition(b":")[0]
    head = head_of(name + b": a", line, token_header="Authorization", client_header="X-Client-Id")
    assert head.bad_header is not None


def test_a_token_or_client_header_cannot_be_one_the_gateway_reads_already() -> None:
    with pytest.raises(ValueError, match="X-License-Key"):
        settings(token_header="X-License-Key")
