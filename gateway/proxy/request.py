"""One request head as the parser delivered it, read into what the enforcer decides on
(``RequestHead``) and how the message is framed (``RequestFraming``). Pure: the parser
callbacks of ``client.Downstream`` collect the raw headers, ``read_head`` does the rest.

    head, framing = read_head("GET", b"/x", headers, "1.1", settings, upgrade=False)
"""

from __future__ import annotations

import re

import msgspec

from gateway.enforcer import RequestHead, request_id
from gateway.proxy.framing import NOT_DROPPED, declares_body
from gateway.proxy.settings import (
    H_CL,
    H_CLIENT,
    H_CONNECTION,
    H_EXPECT,
    H_HOST,
    H_LICENSE,
    H_REQUEST_ID,
    H_ROLE,
    H_TE,
    H_TENANT,
    H_TOKEN,
    H_UPGRADE,
    H_USER,
    H_XFF,
    ProxySettings,
)

# Identity headers that may appear once (upstreams disagree on which of two they read): the
# RequestHead attribute each fills, and the complaint when it comes twice.
ONCE = {
    H_TENANT: ("tenant", "more than one tenant id header"),
    H_ROLE: ("role", "more than one role header"),
    H_USER: ("user", "more than one user id header"),
    H_TOKEN: ("token", "more than one identity token header"),
    H_CLIENT: ("client_id", "more than one client id header"),
}
# An inbound X-Request-Id is kept when it is one header of this shape; else one is made.
REQUEST_ID = re.compile(rb"[A-Za-z0-9._:-]{1,128}")


class Reject(Exception):
    """Raised from a parser callback to refuse a request (httptools re-raises it)."""

    def __init__(self, status: int, code: str, title: str) -> None:
        self.status = status
        self.code = code
        self.title = title
        super().__init__(title)


class RequestFraming(msgspec.Struct):
    """How one request message is framed: facts fixed once its head is parsed (a msgspec
    Struct, like ``RequestHead``: one per request, its defaults set in C)."""

    version: str
    chunked: bool = False  # Transfer-Encoding: chunked
    expect_continue: bool = False
    # Header names this request's Connection header lists: by the time the request is
    # dispatched (queued behind a pipelined one, or after a tenant look-up) the parser may
    # be on the next request. A tuple: most requests name none, and share the empty one.
    drop: tuple[bytes, ...] = ()
    switching: bool = False  # any Upgrade or CONNECT head: its upstream line is never reused
    upgrade: bool = False  # a WebSocket upgrade: tunnelled if the upstream answers 101


def read_head(
    method: str,
    target: bytes,
    headers: list[tuple[bytes, bytes, bytes]],
    version: str,
    settings: ProxySettings,
    *,
    upgrade: bool,
    peer: bytes,
) -> tuple[RequestHead, RequestFraming]:
    """``upgrade``: llhttp saw ``Connection: Upgrade`` with ``Upgrade``, or CONNECT;
    ``peer``: the client connection's address."""
    head = RequestHead(method, target, headers)
    head.peer = peer
    framing = RequestFraming(version)
    watch = settings.watch
    hosts = 0
    te: bytes | None = None
    upgrade_to = b""
    inbound_ids: list[bytes] | None = None
    for _, value, lname in headers:
        kind = watch.get(lname)
        if kind is None:
            continue
        # The headers nearly every request has come first: each comparison is paid by
        # every header after it.
        if kind == H_HOST:
            hosts += 1
            if head.host is None:
                head.host = value
        elif kind == H_LICENSE:
            head.license_count += 1
            if head.license_count > 1:
                head.bad_header = "more than one license key header"
            head.license_key = value.strip()
            if not value.isascii():
                head.bad_header = "license key header is not ASCII"
        elif kind == H_CL:
            if int(value) > settings.max_body_bytes:  # llhttp checked it is a number
                raise Reject(413, "body_too_large", "Request body too large")
        elif kind in ONCE:
            attribute, twice = ONCE[kind]
            if getattr(head, attribute) is not None:
                head.bad_header = twice
            setattr(head, attribute, value.strip())
        elif kind == H_XFF:  # several lines are one list, in order
            xff = head.forwarded_for
            head.forwarded_for = b"%s, %s" % (xff, value) if xff else value
        elif kind == H_REQUEST_ID:
            if inbound_ids is None:
                inbound_ids = []
            inbound_ids.append(value.strip())
        elif kind == H_CONNECTION:
            for token in value.split(b","):
                token = token.strip().lower()
                if token and token not in NOT_DROPPED:
                    framing.drop += (token,)
        elif kind == H_UPGRADE:  # several are one list: "h2c, websocket" is not WebSocket
            value = value.strip().lower()
            upgrade_to = upgrade_to + b", " + value if upgrade_to else value
        elif kind == H_EXPECT:
            framing.expect_continue = value.strip().lower() == b"100-continue"
        elif kind == H_TE:
            if value.strip().lower() != b"chunked" or te is not None:
                head.bad_header = "unsupported Transfer-Encoding"
            te = value
    if inbound_ids is not None and len(inbound_ids) == 1 and REQUEST_ID.fullmatch(inbound_ids[0]):
        head.request_id = inbound_ids[0].decode("ascii")
    else:
        head.request_id = request_id()
    if hosts != 1 and (hosts or version == "1.1"):  # RFC 9112 §3.2
        head.bad_header = "more than one Host header" if hosts else "no Host header"
    framing.chunked = te is not None
    if upgrade:
        # llhttp reads no body after such a head, but an upstream answering at once would
        # wait for the declared one and take it from the next request on that connection,
        # another client's. Such a body is refused, with the connection.
        if te is not None or declares_body(headers):
            raise Reject(400, "bad_request", "Upgrade or CONNECT request with a body")
        framing.switching = True
        # Only WebSocket upgrades are tunnelled. Any other protocol (h2c, ...) would open a
        # tunnel the gateway can no longer check: the request goes on as plain HTTP/1.1,
        # without its Upgrade headers, and parsing restarts after it.
        framing.upgrade = upgrade_to == b"websocket" and method == "GET"
    return head, framing
