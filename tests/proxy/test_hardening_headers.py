"""Header attacks over raw sockets: what the gateway relies on in a request head
(docs/design.md §5).

Spoofed ``X-Entitlement-*`` headers, ``Connection`` tokens naming headers the gateway relies
on, duplicate and undecodable identity headers, control characters, oversized heads and
request smuggling shapes. Each is sent byte for byte to a real gateway in front of a
recording upstream (llhttp, like most upstreams), which shows what would have reached it.
"""

from __future__ import annotations

import asyncio

import pytest

from gateway.matrix import AppName, TierMatrix
from tests.conftest import IssueKey
from tests.harness import Gateway
from tests.proxy.conftest import MAX_HEADER_BYTES, MAX_HEADERS
from tests.rawhttp import RecordingUpstream, Seen, converse, exchange, request

CLASSIC_KEY = "ABCDE-12345-FGHIJ-67890-KLMNO"
# What a mis-framed body would turn into: a request for a feature Core does not have,
# carrying the headers an upstream trusts.
SMUGGLED = (
    b"POST /api/v1/shipments/1/optimize HTTP/1.1\r\nHost: gateway.test\r\n"
    b"X-Entitlement-Tier: enterprise\r\nContent-Length: 0\r\n\r\n"
)
OPTIMIZE = "/api/v1/shipments/1/optimize"


@pytest.fixture
def core_key(issue_key: IssueKey) -> str:
    return issue_key(tier="core")


def entitlement_headers(seen: Seen) -> list[tuple[str, str]]:
    return [(k, v) for k, v in seen.headers if k.lower().startswith("x-entitlement-")]


def expected_entitlements(matrix: TierMatrix, tenant: str, tier: str) -> list[tuple[str, str]]:
    return [
        ("X-Entitlement-Tenant", tenant),
        ("X-Entitlement-Tier", tier),
        ("X-Entitlement-Features", matrix.entitlement(tier).features_header),
        ("X-Entitlement-Addons", ""),
    ]


# ---------------------------------------------------------------- spoofed X-Entitlement-*

SPOOFED = (
    b"X-Entitlement-Tier: enterprise\r\n"
    b"x-entitlement-tier: enterprise\r\n"
    b"X-ENTITLEMENT-FEATURES: ops.health_data_protection\r\n"
    b"X-Entitlement-Tenant: victim\r\n"
    b"x-EnTiTlEmEnT-aDdOnS: sms_messaging\r\n"
    b"X-Entitlement-Custom: spoofed\r\n"
    b"X-Entitlement-Features: ops.sms_messaging\r\n"
)


@pytest.mark.parametrize(
    ("app", "line", "identity", "expected"),
    [
        pytest.param(
            "operations",
            b"GET /api/v1/shipments HTTP/1.1",
            "core",
            ("tenant-1", "core"),
            id="licensed",
        ),
        pytest.param(
            "operations",
            b"GET /api/v1/shipments HTTP/1.1",
            "tenant",
            ("acme", "fleet"),
            id="tenant-lookup",
        ),
        pytest.param(
            "operations",
            b"POST /api/v1/shipments/1/optimize HTTP/1.1",
            "classic",
            None,
            id="classic",
        ),
        pytest.param(
            "client_portal", b"GET /xdispatch/orders HTTP/1.1", None, None, id="classic-path"
        ),
        pytest.param("driver_app", b"GET /api/v1/health HTTP/1.1", None, None, id="public"),
    ],
)
async def test_spoofed_entitlement_headers_are_always_stripped(
    acme_gateway: Gateway,
    upstream: RecordingUpstream,
    matrix: TierMatrix,
    core_key: str,
    app: AppName,
    line: bytes,
    identity: str | None,
    expected: tuple[str, str] | None,
) -> None:
    headers = SPOOFED
    key = None
    if identity == "core":
        key = core_key
    elif identity == "classic":
        key = CLASSIC_KEY
    elif identity == "tenant":
        headers += b"X-Tenant-Id: acme\r\n"
    reply = await exchange(acme_gateway.listen[app], request(line, key=key, headers=headers))
    assert reply.status == 200, reply
    (seen,) = upstream.complete()
    if expected is None:
        assert entitlement_headers(seen) == []
    else:
        assert entitlement_headers(seen) == expected_entitlements(matrix, *expected)


async def test_underscore_spellings_of_entitlement_headers_are_stripped(
    acme_gateway: Gateway, upstream: RecordingUpstream, core_key: str
) -> None:
    """CGI/WSGI upstreams map X_Entitlement_Tier and X-Entitlement-Tier to the same
    HTTP_X_ENTITLEMENT_TIER variable."""
    spoofed = b"X_Entitlement_Tier: enterprise\r\nx_entitlement-features: ops.sms_messaging\r\n"
    reply = await exchange(
        acme_gateway.listen["operations"],
        request(b"GET /api/v1/shipments HTTP/1.1", key=core_key, headers=spoofed),
    )
    assert reply.status == 200, reply
    (seen,) = upstream.complete()
    lookalikes = [
        name
        for name, _ in seen.headers
        if name.lower().replace("_", "-").startswith("x-entitlement-")
        and not name.startswith("X-Entitlement-")
    ]
    assert lookalikes == []


# ---------------------------------------------------------------- Connection: <header>


@pytest.mark.parametrize(
    ("line", "identity", "headers", "status", "code", "tier"),
    [
        pytest.param(
            b"POST /api/v1/shipments/1/optimize HTTP/1.1",
            "fleet",
            b"Connection: X-License-Key, X-Tenant-Id\r\n",
            200,
            None,
            "fleet",
            id="key-listed-still-decides-allow",
        ),
        pytest.param(
            b"POST /api/v1/shipments/1/optimize HTTP/1.1",
            "core",
            b"Connection: keep-alive, X-License-Key\r\n",
            403,
            "feature_not_entitled",
            None,
            id="key-listed-still-decides-block",
        ),
        pytest.param(
            b"POST /api/v1/shipments/1/optimize HTTP/1.1",
            "tenant",
            b"Connection: X-Tenant-Id\r\n",
            200,
            None,
            "fleet",
            id="tenant-listed-still-decides",
        ),
        pytest.param(
            b"GET /api/v1/shipments HTTP/1.1",
            "core",
            b"Connection: X-Entitlement-Tier, X-Entitlement-Features, X-Entitlement-Tenant,"
            b" X-Entitlement-Addons\r\n",
            200,
            None,
            "core",
            id="entitlement-headers-listed-still-sent",
        ),
        pytest.param(
            b"POST /api/v1/users HTTP/1.1",
            "core",
            b"Connection: X-User-Role\r\nX-User-Role: owner\r\n",  # without it: 403
            200,
            None,
            "core",
            id="role-listed-still-decides",
        ),
    ],
)
async def test_connection_tokens_cannot_hide_what_the_gateway_relies_on(
    acme_gateway: Gateway,
    upstream: RecordingUpstream,
    issue_key: IssueKey,
    matrix: TierMatrix,
    line: bytes,
    identity: str,
    headers: bytes,
    status: int,
    code: str | None,
    tier: str | None,
) -> None:
    key = None
    if identity == "tenant":
        headers += b"X-Tenant-Id: acme\r\n"
    else:
        key = issue_key(tier=identity)
    reply = await exchange(
        acme_gateway.listen["operations"], request(line, key=key, headers=headers)
    )
    assert reply.status == status, reply
    if code is not None:
        assert reply.code == code
        assert upstream.requests == []
        return
    (seen,) = upstream.complete()
    tenant = "acme" if identity == "tenant" else "tenant-1"
    assert tier is not None
    assert entitlement_headers(seen) == expected_entitlements(matrix, tenant, tier)


@pytest.mark.parametrize(
    ("framing", "body"),
    [
        pytest.param(
            b"Connection: Content-Length\r\nContent-Length: %d\r\n" % len(SMUGGLED),
            SMUGGLED,
            id="content-length",
        ),
        pytest.param(
            b"Connection: Transfer-Encoding\r\nTransfer-Encoding: chunked\r\n",
            b"%x\r\n%s\r\n0\r\n\r\n" % (len(SMUGGLED), SMUGGLED),
            id="transfer-encoding",
        ),
    ],
)
async def test_connection_tokens_cannot_strip_the_framing(
    acme_gateway: Gateway, upstream: RecordingUpstream, core_key: str, framing: bytes, body: bytes
) -> None:
    raw = (
        b"POST /api/v1/shipments HTTP/1.1\r\nHost: gateway.test\r\n"
        b"X-License-Key: " + core_key.encode() + b"\r\n" + framing + b"\r\n" + body
    )
    reply = await exchange(acme_gateway.listen["operations"], raw, deadline=2)
    assert reply.status in (200, 400), reply
    await asyncio.sleep(0.05)  # a smuggled request would arrive right behind the first
    assert [seen.target for seen in upstream.requests] in ([], ["/api/v1/shipments"])
    if upstream.requests:
        (seen,) = upstream.requests
        assert seen.complete and bytes(seen.body) == SMUGGLED


# ---------------------------------------------------------------- identity headers


@pytest.mark.parametrize(
    ("headers", "detail"),
    [
        pytest.param(
            b"X-License-Key: {key}\r\nX-License-Key: {key}\r\n", "more than one", id="twice"
        ),
        pytest.param(
            b"x-license-key: {key}\r\nX-LICENSE-KEY: {key}\r\n", "more than one", id="case-variants"
        ),
        pytest.param(
            b"X-License-Key:\r\nX-License-Key: {key}\r\n", "more than one", id="empty-first"
        ),
        pytest.param(b"X-License-Key: {key}\xff\r\n", "not ASCII", id="key-byte-ff"),
        pytest.param(b"X-License-Key: \xc3\xa9{key}\r\n", "not ASCII", id="key-utf8"),
        pytest.param(
            b"X-Tenant-Id: acme\r\nx-tenant-id: acme\r\n", "more than one", id="tenant-twice"
        ),
        pytest.param(b"X-Tenant-Id: ac\xffme\r\n", "not UTF-8", id="tenant-not-utf8"),
        # Upstreams reading the first value would disagree with a decision on the last.
        pytest.param(
            b"X-License-Key: {key}\r\nX-User-Role: standard\r\nX-User-Role: owner\r\n",
            "more than one role",
            id="role-twice",
        ),
        pytest.param(
            b"X-License-Key: {key}\r\nx-user-role: owner\r\nX-USER-ROLE: owner\r\n",
            "more than one role",
            id="role-case-variants",
        ),
        pytest.param(
            b"X-License-Key: {key}\r\nX-User-Id: u1\r\nX-User-Id: u2\r\n",
            "more than one user",
            id="user-twice",
        ),
        pytest.param(b"X-Tenant-Id: \xed\xa0\x80\r\n", "not UTF-8", id="tenant-surrogate"),
    ],
)
async def test_ambiguous_identity_headers_are_400(
    acme_gateway: Gateway, upstream: RecordingUpstream, core_key: str, headers: bytes, detail: str
) -> None:
    headers = headers.replace(b"{key}", core_key.encode())
    reply = await exchange(
        acme_gateway.listen["operations"],
        request(b"GET /api/v1/shipments HTTP/1.1", headers=headers),
    )
    assert reply.status == 400, reply
    assert reply.code == "bad_header"
    assert detail in reply.problem()["detail"]
    assert upstream.requests == []


@pytest.mark.parametrize(
    ("raw", "status", "detail"),
    [
        pytest.param(b"GET /api/v1/shipments HTTP/1.1\r\n", 400, "no Host", id="none"),
        pytest.param(
            b"GET /api/v1/shipments HTTP/1.1\r\nHost: a.test\r\nHost: b.test\r\n",
            400,
            "more than one Host",
            id="two",
        ),
        pytest.param(
            b"GET /api/v1/shipments HTTP/1.1\r\nhost: a.test\r\nHOST: a.test\r\n",
            400,
            "more than one Host",
            id="two-equal",
        ),
        pytest.param(
            b"GET /api/v1/shipments HTTP/1.0\r\nHost: a.test\r\nHost: b.test\r\n",
            400,
            "more than one Host",
            id="two-http10",
        ),
        pytest.param(b"GET /api/v1/shipments HTTP/1.0\r\n", 200, None, id="none-http10"),
        pytest.param(b"GET /xdispatch/orders HTTP/1.1\r\n", 400, "no Host", id="none-classic-path"),
    ],
)
async def test_host_header_must_appear_exactly_once(
    acme_gateway: Gateway,
    upstream: RecordingUpstream,
    core_key: str,
    raw: bytes,
    status: int,
    detail: str | None,
) -> None:
    """RFC 9112 §3.2: an HTTP/1.1 request needs one Host; no request may have two (an
    upstream and a virtual-host router could each pick another)."""
    raw += b"X-License-Key: %s\r\n\r\n" % core_key.encode()
    reply = await exchange(acme_gateway.listen["operations"], raw)
    assert reply.status == status, reply
    if detail is None:
        assert len(upstream.complete()) == 1
        return
    assert reply.code == "bad_header"
    assert detail in reply.problem()["detail"]
    assert upstream.requests == []


async def test_repeated_x_forwarded_for_headers_are_combined_in_order(
    acme_gateway: Gateway, upstream: RecordingUpstream, core_key: str
) -> None:
    headers = (
        b"X-Forwarded-For: 203.0.113.1\r\nX-Note: between\r\n"
        b"x-forwarded-for: 198.51.100.2, 192.0.2.3\r\n"
    )
    reply = await exchange(
        acme_gateway.listen["operations"],
        request(b"GET /api/v1/shipments HTTP/1.1", key=core_key, headers=headers),
    )
    assert reply.status == 200, reply
    (seen,) = upstream.complete()
    assert seen.header("X-Forwarded-For") == ["203.0.113.1, 198.51.100.2, 192.0.2.3, 127.0.0.1"]


WEBSOCKET = b"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"


@pytest.mark.parametrize(
    "headers",
    [
        pytest.param(
            b"Connection: Upgrade, X-Entitlement-Tier\r\nUpgrade: websocket\r\n",
            id="entitlement-token",
        ),
        pytest.param(
            b"Connection: keep-alive, Upgrade, X-Forwarded-For\r\nUpgrade: WebSocket\r\n",
            id="mixed-tokens",
        ),
        pytest.param(
            b"Connection: Upgrade\r\nConnection: X-Entitlement-Features\r\nUpgrade: websocket\r\n",
            id="two-connection-headers",
        ),
    ],
)
async def test_websocket_upgrade_forwards_only_connection_upgrade(
    acme_gateway: Gateway,
    upstream: RecordingUpstream,
    matrix: TierMatrix,
    core_key: str,
    headers: bytes,
) -> None:
    """A further hop (a proxy inside the app) would drop the headers the client lists in
    Connection, the gateway's X-Entitlement-* among them."""
    raw = request(b"GET /api/v1/shipments HTTP/1.1", key=core_key, headers=headers + WEBSOCKET)
    await converse(acme_gateway.listen["operations"], raw, until_closed=True)
    assert upstream.requests, "the upgrade request was not forwarded"
    for seen in upstream.requests:
        assert seen.header("Connection") == ["Upgrade"]
        assert seen.header("Upgrade") == ["websocket"]
        assert entitlement_headers(seen) == expected_entitlements(matrix, "tenant-1", "core")


async def test_several_upgrade_headers_are_one_list_and_not_a_websocket_upgrade(
    acme_gateway: Gateway, upstream: RecordingUpstream, core_key: str
) -> None:
    """``Upgrade: h2c`` then ``Upgrade: websocket`` is the list "h2c, websocket": an
    upstream reading the first would switch to h2c, a tunnel the gateway cannot check."""
    headers = b"Connection: Upgrade\r\nUpgrade: h2c\r\nUpgrade: websocket\r\n" + WEBSOCKET
    reply = await exchange(
        acme_gateway.listen["operations"],
        request(b"GET /api/v1/shipments HTTP/1.1", key=core_key, headers=headers),
    )
    assert reply.status == 200, reply
    (seen,) = upstream.complete()
    assert seen.header("Upgrade") == [] and seen.header("Connection") == []


# ---------------------------------------------------------------- a key and a tenant header


@pytest.mark.parametrize(
    ("tenant", "key_tenant", "status"),
    [
        pytest.param(b"acme", "tenant-1", 403, id="another-tenants-key"),
        pytest.param(b"tenant-1", "acme", 403, id="borrowed-key-of-a-stored-tenant"),
        pytest.param(b"ACME", "acme", 403, id="case-differs"),
        pytest.param(b"acme", "acme", 200, id="same-tenant"),
    ],
)
async def test_license_key_for_another_tenant_than_the_tenant_header_is_403(
    acme_gateway: Gateway,
    upstream: RecordingUpstream,
    issue_key: IssueKey,
    tenant: bytes,
    key_tenant: str,
    status: int,
) -> None:
    """An upstream that scopes data by X-Tenant-Id must never see it next to the
    entitlements of another tenant's key."""
    key = issue_key(tier="enterprise", sub=key_tenant)
    reply = await exchange(
        acme_gateway.listen["operations"],
        request(
            b"GET /api/v1/itineraries HTTP/1.1",
            key=key,
            headers=b"X-Tenant-Id: " + tenant + b"\r\n",
        ),
    )
    assert reply.status == status, reply
    if status == 200:
        (seen,) = upstream.complete()
        assert seen.header("X-Entitlement-Tenant") == [key_tenant]
        return
    assert reply.code == "tenant_mismatch"
    assert upstream.requests == []


# ---------------------------------------------------------------- control characters


@pytest.mark.parametrize(
    "headers",
    [
        pytest.param(b"X-Note: a\rX-Entitlement-Tier: enterprise\r\n", id="bare-cr"),
        pytest.param(b"X-Note: a\nX-Entitlement-Tier: enterprise\r\n", id="bare-lf"),
        pytest.param(b"X-Note: a\x00b\r\n", id="nul"),
        pytest.param(b"X-Note: a\x01b\r\n", id="control"),
        pytest.param(b"X-Note: a\x7fb\r\n", id="del"),
        pytest.param(b"X-User-Role: owner\r\rX-Entitlement-Tier: enterprise\r\n", id="double-cr"),
        pytest.param(b"X-Entitlement-Tier enterprise\r\n", id="no-colon"),
        pytest.param(b"X-License-Key : {key}\r\n", id="space-before-colon"),
        pytest.param(b"X-Li\x00cense-Key: {key}\r\n", id="nul-in-name"),
        pytest.param(b"X-Note: a\r\n X-Entitlement-Tier: enterprise\r\n", id="obs-fold"),
        pytest.param(b"X-Note: a\r\n\tX-Entitlement-Tier: enterprise\r\n", id="obs-fold-tab"),
    ],
)
async def test_control_characters_in_the_head_are_refused(
    acme_gateway: Gateway, upstream: RecordingUpstream, core_key: str, headers: bytes
) -> None:
    headers = headers.replace(b"{key}", core_key.encode())
    conversation = await converse(
        acme_gateway.listen["operations"],
        request(b"GET /api/v1/shipments HTTP/1.1", key=core_key, headers=headers),
        wanted=2,
    )
    (reply,) = conversation.replies
    assert reply.status == 400, reply
    assert reply.code == "bad_request"
    assert conversation.closed
    assert upstream.requests == []


# ---------------------------------------------------------------- size limits


def _filler(count: int, size: int) -> bytes:
    return b"".join(b"X-Filler-%d: %s\r\n" % (i, b"v" * size) for i in range(count))


@pytest.mark.parametrize(
    ("line", "headers", "status", "code"),
    [
        pytest.param(
            b"GET /api/v1/shipments HTTP/1.1",
            b"X-Big: " + b"v" * (MAX_HEADER_BYTES + 1) + b"\r\n",
            431,
            "headers_too_large",
            id="one-oversized-value",
        ),
        pytest.param(
            b"GET /api/v1/shipments HTTP/1.1",
            b"X-" + b"n" * (MAX_HEADER_BYTES + 1) + b": v\r\n",
            431,
            "headers_too_large",
            id="oversized-name",
        ),
        pytest.param(
            b"GET /api/v1/shipments HTTP/1.1",
            _filler(20, 250),
            431,
            "headers_too_large",
            id="total-bytes",
        ),
        pytest.param(
            b"GET /api/v1/shipments HTTP/1.1",
            _filler(MAX_HEADERS, 1),
            431,
            "headers_too_large",
            id="too-many",
        ),
        pytest.param(
            b"GET /api/v1/shipments HTTP/1.1",
            _filler(MAX_HEADERS - 3, 1),  # + Host, X-License-Key, Content-Length
            200,
            None,
            id="exactly-the-limit",
        ),
        pytest.param(
            b"GET /api/v1/shipments?q=" + b"x" * MAX_HEADER_BYTES + b" HTTP/1.1",
            b"",
            414,
            "uri_too_long",
            id="oversized-target",
        ),
    ],
)
async def test_oversized_heads_are_refused(
    acme_gateway: Gateway,
    upstream: RecordingUpstream,
    core_key: str,
    line: bytes,
    headers: bytes,
    status: int,
    code: str | None,
) -> None:
    reply = await exchange(
        acme_gateway.listen["operations"], request(line, key=core_key, headers=headers)
    )
    assert reply.status == status, reply
    if code is None:
        assert len(upstream.complete()) == 1
        return
    assert reply.code == code
    assert upstream.requests == []


# ---------------------------------------------------------------- smuggling shapes


def _post(headers: bytes, body: bytes, version: bytes = b"HTTP/1.1") -> bytes:
    return (
        b"POST /api/v1/shipments " + version + b"\r\nHost: gateway.test\r\n"
        b"X-License-Key: {key}\r\n" + headers + b"\r\n" + body
    )


CHUNKED_SMUGGLED = b"0\r\n\r\n" + SMUGGLED


@pytest.mark.parametrize(
    "raw",
    [
        pytest.param(
            _post(b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n", CHUNKED_SMUGGLED),
            id="cl-te",
        ),
        pytest.param(
            _post(b"Transfer-Encoding: chunked\r\nContent-Length: 5\r\n", CHUNKED_SMUGGLED),
            id="te-cl",
        ),
        pytest.param(
            _post(b"Content-Length: 0\r\nContent-Length: %d\r\n" % len(SMUGGLED), SMUGGLED),
            id="two-content-lengths",
        ),
        pytest.param(
            _post(b"Content-Length: 0\r\nContent-Length: 0\r\n", SMUGGLED),
            id="two-equal-content-lengths",
        ),
        pytest.param(_post(b"Content-Length: 0, 0\r\n", SMUGGLED), id="content-length-list"),
        pytest.param(_post(b"Content-Length: +0\r\n", SMUGGLED), id="content-length-sign"),
        pytest.param(_post(b"Content-Length: -1\r\n", SMUGGLED), id="content-length-negative"),
        pytest.param(_post(b"Content-Length: 0x0\r\n", SMUGGLED), id="content-length-hex"),
        pytest.param(
            _post(b"Transfer-Encoding: chunked, identity\r\n", CHUNKED_SMUGGLED),
            id="te-chunked-identity",
        ),
        pytest.param(
            _post(b"Transfer-Encoding: identity, chunked\r\n", CHUNKED_SMUGGLED),
            id="te-identity-chunked",
        ),
        pytest.param(_post(b"Transfer-Encoding: xchunked\r\n", SMUGGLED), id="te-xchunked"),
        pytest.param(
            _post(
                b"Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n", CHUNKED_SMUGGLED
            ),
            id="te-twice",
        ),
        pytest.param(
            _post(b"Transfer-Encoding : chunked\r\n", CHUNKED_SMUGGLED), id="te-space-before-colon"
        ),
        pytest.param(
            _post(b"Transfer-Encoding:\r\n chunked\r\n", CHUNKED_SMUGGLED), id="te-obs-fold"
        ),
        pytest.param(
            _post(b"X-Note: a\r\n Transfer-Encoding: chunked\r\n", CHUNKED_SMUGGLED),
            id="obs-fold-hides-te",
        ),
        pytest.param(
            _post(b"Transfer-Encoding: chunked\r\n", b"zz\r\n" + SMUGGLED + b"\r\n0\r\n\r\n"),
            id="bad-chunk-size",
        ),
        pytest.param(
            _post(b"Transfer-Encoding: chunked\r\n", b"1" * 20 + b"\r\n" + SMUGGLED),
            id="chunk-size-overflow",
        ),
        pytest.param(
            _post(b"Transfer-Encoding: chunked\r\n", b"3\nabc\r\n" + CHUNKED_SMUGGLED),
            id="chunk-size-bare-lf",
        ),
        pytest.param(
            _post(b"Transfer-Encoding: chunked\r\n", b"3\r\nabcdef\r\n" + CHUNKED_SMUGGLED),
            id="chunk-longer-than-size",
        ),
        pytest.param(
            _post(b"Transfer-Encoding: chunked\r\n", b'3;x="a\r\nb"\r\nabc\r\n' + CHUNKED_SMUGGLED),
            id="chunk-extension-crlf",
        ),
        pytest.param(
            _post(b"Transfer-Encoding: chunked\r\n", CHUNKED_SMUGGLED, version=b"HTTP/1.0"),
            id="http10-te-then-data",
        ),
    ],
)
async def test_smuggling_shapes_are_refused(
    acme_gateway: Gateway, upstream: RecordingUpstream, core_key: str, raw: bytes
) -> None:
    raw = raw.replace(b"{key}", core_key.encode())
    conversation = await converse(acme_gateway.listen["operations"], raw, wanted=2)
    first, *later = conversation.replies
    assert first.status == 400, conversation.replies
    assert first.code in ("bad_request", "bad_header")
    if first.code == "bad_request":
        # The parser lost the framing: the connection ends, nothing after is read.
        assert later == [] and conversation.closed
    # Where the framing was clear (a refused but well-delimited body), what follows is a
    # request of its own, enforced like any other: here it has no key.
    assert all(reply.status == 401 for reply in later), later
    await asyncio.sleep(0.05)
    assert all(seen.target != OPTIMIZE for seen in upstream.requests), upstream.requests
    if raw.startswith(b"POST /api/v1/shipments HTTP/1.0"):
        # HTTP/1.0 + chunked: the first message is complete and relayed before the data
        # after it is found; only that first request may reach the upstream.
        assert [seen.target for seen in upstream.complete()] in ([], ["/api/v1/shipments"])
    else:
        assert upstream.complete() == [], "the upstream received a complete request"


@pytest.mark.parametrize(
    ("framing", "body"),
    [
        pytest.param(b"Content-Length: %d\r\n" % len(SMUGGLED), SMUGGLED, id="content-length"),
        pytest.param(
            b"Transfer-Encoding: chunked\r\n",
            b"%x\r\n%s\r\n0\r\n\r\n" % (len(SMUGGLED), SMUGGLED),
            id="chunked",
        ),
        pytest.param(
            b"Transfer-Encoding: Chunked\r\n",
            b"%x\r\n%s\r\n0\r\n\r\n" % (len(SMUGGLED), SMUGGLED),
            id="chunked-capitalised",
        ),
        pytest.param(
            b"Transfer-Encoding: chunked\r\n",
            b"".join(b"1\r\n%c\r\n" % byte for byte in SMUGGLED) + b"0\r\n\r\n",
            id="one-byte-chunks",
        ),
    ],
)
async def test_a_request_inside_a_body_stays_a_body(
    acme_gateway: Gateway, upstream: RecordingUpstream, core_key: str, framing: bytes, body: bytes
) -> None:
    raw = _post(framing, body).replace(b"{key}", core_key.encode())
    reply = await exchange(acme_gateway.listen["operations"], raw)
    assert reply.status == 200, reply
    await asyncio.sleep(0.05)
    (seen,) = upstream.requests
    assert seen.complete and seen.target == "/api/v1/shipments"
    assert bytes(seen.body) == SMUGGLED


async def test_a_pipelined_second_request_is_enforced_on_its_own(
    acme_gateway: Gateway, upstream: RecordingUpstream, core_key: str
) -> None:
    first = _post(b"Content-Length: 0\r\n", b"")
    second = (
        b"POST /api/v1/shipments/1/optimize HTTP/1.1\r\nHost: gateway.test\r\n"
        b"X-License-Key: {key}\r\nX-Entitlement-Tier: enterprise\r\nContent-Length: 0\r\n\r\n"
    )
    raw = (first + second).replace(b"{key}", core_key.encode())
    conversation = await converse(acme_gateway.listen["operations"], raw, wanted=2)
    replies = conversation.replies
    assert [reply.status for reply in replies] == [200, 403]
    assert replies[1].code == "feature_not_entitled"
    assert [seen.target for seen in upstream.requests] == ["/api/v1/shipments"]


async def test_only_websocket_upgrades_are_forwarded(
    acme_gateway: Gateway, upstream: RecordingUpstream, core_key: str
) -> None:
    """An upstream that accepted h2c (or anything else) with 101 would open a tunnel the
    gateway no longer checks (h2c smuggling)."""
    reply = await exchange(
        acme_gateway.listen["operations"],
        request(
            b"GET /api/v1/shipments HTTP/1.1",
            key=core_key,
            headers=b"Connection: Upgrade\r\nUpgrade: h2c\r\n"
            b"HTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n",
        ),
    )
    assert reply.status in (200, 400), reply
    upgrades = [value for seen in upstream.requests for value in seen.header("Upgrade")]
    assert all(value.lower() == "websocket" for value in upgrades), upgrades


async def test_bytes_after_a_refused_upgrade_are_parsed_as_requests(
    acme_gateway: Gateway, upstream: RecordingUpstream, core_key: str
) -> None:
    """What a client sends after an h2c upgrade the gateway declined is HTTP again, and
    each request in it is decided on its own."""
    first = request(
        b"GET /api/v1/shipments HTTP/1.1",
        key=core_key,
        headers=b"Connection: Upgrade\r\nUpgrade: h2c\r\n",
    )
    conversation = await converse(acme_gateway.listen["operations"], first + SMUGGLED, wanted=2)
    assert [reply.status for reply in conversation.replies] == [200, 401], conversation.replies
    assert [seen.target for seen in upstream.requests] == ["/api/v1/shipments"]
    assert upstream.requests[0].header("Upgrade") == []


async def test_chunked_trailers_never_reach_the_upstream(
    acme_gateway: Gateway, upstream: RecordingUpstream, core_key: str
) -> None:
    body = b"3\r\nabc\r\n0\r\nX-Entitlement-Tier: enterprise\r\nX-License-Key: forged\r\n\r\n"
    raw = _post(b"Transfer-Encoding: chunked\r\n", body).replace(b"{key}", core_key.encode())
    reply = await exchange(acme_gateway.listen["operations"], raw)
    assert reply.status == 200, reply
    (seen,) = upstream.complete()
    assert bytes(seen.body) == b"abc"
    assert seen.trailers == []
    assert seen.header("X-Entitlement-Tier") == ["core"]
