"""Pure framing: the bytes of the upstream request head, of the client response head and of
the answers the gateway writes itself. No I/O, no state: each function is its inputs.

    upstream_head(head, verdict, drop=(), upgrade=False, host=None, request_id_line=b"...")
    client_head(200, b"OK", headers, [], version="1.1", method="GET", ...)
    answer(403, body, b"application/problem+json", b"", close=False)
"""

from __future__ import annotations

from http import HTTPStatus
from typing import Final

from gateway.enforcer import CLASSIC, RequestHead, Verdict, problem

HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"proxy-authenticate",
        b"proxy-authorization",
    }
)
NO_BODY_STATUS = frozenset({204, 304})
# X-Entitlement-* and its spellings with '_' (one C-level startswith per header name,
# asked only of names beginning with an "x": the first byte is a cheaper test)
ENTITLEMENT_PREFIXES = tuple(
    b"x%sentitlement%s" % (a, b) for a in (b"-", b"_") for b in (b"-", b"_")
)
_X: Final = ord("x")
# What a WebSocket upgrade sends upstream in place of the client's Connection and Upgrade
# headers, whose extra tokens could make a further hop drop the X-Entitlement-* headers.
WEBSOCKET_UPGRADE = b"Connection: Upgrade\r\nUpgrade: websocket\r\n"
# Framing and routing headers a client cannot have dropped by naming them in Connection
# (dropping Content-Length but forwarding the body would smuggle a second request).
PROTECTED = frozenset({b"content-length", b"transfer-encoding", b"host"})
# Connection tokens not worth remembering: protected, or hop-by-hop (dropped anyway). The
# usual "Connection: keep-alive" then leaves nothing to test every other header against.
NOT_DROPPED = PROTECTED | HOP_BY_HOP
# Request headers the gateway writes itself on forwarded (non-classic) requests.
REPLACED = frozenset({b"x-forwarded-for", b"x-forwarded-proto", b"x-request-id"})

# RFC 9110's reason phrases where Python before 3.13 still has RFC 7231's.
_RFC9110 = {
    413: "Content Too Large",
    414: "URI Too Long",
    416: "Range Not Satisfiable",
    422: "Unprocessable Content",
}


def _status_line(status: int) -> bytes:
    try:
        phrase = _RFC9110.get(status) or HTTPStatus(status).phrase
    except ValueError:  # not a registered status: the phrase may be empty (RFC 9112 §4)
        phrase = ""
    return b"HTTP/1.1 %d %s\r\n" % (status, phrase.encode("ascii"))


STATUS_LINES = {status: _status_line(status) for status in range(100, 600)}


def is_entitlement_header(lname: bytes) -> bool:
    """X-Entitlement-*, also spelled with '_' (CGI/WSGI upstreams map both to the same
    HTTP_X_ENTITLEMENT_* variable)."""
    return lname.startswith(ENTITLEMENT_PREFIXES)


def tokens(value: bytes) -> list[bytes]:
    """A comma-separated header value as lower-case tokens."""
    return [token.strip().lower() for token in value.split(b",") if token.strip()]


def declares_body(headers: list[tuple[bytes, bytes, bytes]]) -> bool:
    """A Content-Length above 0 (llhttp has checked it is one decimal number)."""
    return any(lname == b"content-length" and int(value) > 0 for _, value, lname in headers)


def chunk(body: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(body), body)


LAST_CHUNK = b"0\r\n\r\n"


def upstream_head(
    head: RequestHead,
    verdict: Verdict,
    *,
    drop: tuple[bytes, ...],
    upgrade: bool,
    host: bytes | None,
    request_id_line: bytes,
) -> bytes:
    """The request head the upstream receives. Classic requests keep every byte except
    X-Entitlement-* and hop-by-hop headers; the others get the canonical target, the
    ``host`` rewrite (None: the client's Host), one X-Forwarded-For ending in the peer,
    the request id (``request_id_line``, the ``X-Request-Id`` line that also goes back to
    the client: encoded once for both), and the verdict's X-Entitlement-* lines, without
    the headers the verdict strips."""
    classic = verdict.kind == CLASSIC
    lines = [
        b"%s %s HTTP/1.1\r\n" % (head.method.encode(), head.target if classic else verdict.target)
    ]
    host_rewrite = None if classic else host
    strip = verdict.strip
    for name, value, lname in head.headers:
        if lname in HOP_BY_HOP:
            if lname == b"transfer-encoding":
                lines.append(b"%s: %s\r\n" % (name, value))  # we re-chunk: still true
            continue
        if (lname[0] == _X and lname.startswith(ENTITLEMENT_PREFIXES)) or (drop and lname in drop):
            continue
        if not classic:
            if lname in REPLACED or (strip and lname in strip):
                continue
            if lname == b"host" and host_rewrite is not None:
                lines.append(b"Host: %s\r\n" % host_rewrite)
                continue
        lines.append(b"%s: %s\r\n" % (name, value))
    if upgrade:
        lines.append(WEBSOCKET_UPGRADE)
    if not classic:
        xff = head.forwarded_for
        lines.append(
            b"X-Forwarded-For: %s\r\nX-Forwarded-Proto: http\r\n%s"
            % (b"%s, %s" % (xff, head.peer) if xff else head.peer, request_id_line)
        )
        lines.append(verdict.upstream_headers)
    lines.append(b"\r\n")
    return b"".join(lines)


# A relayed response head and how its body goes to the client: (head, chunked: the body is
# re-chunked for the client, until_close: the upstream's body ends when the upstream closes,
# close: the client connection closes after this response). A plain tuple: a NamedTuple
# costs a Python-level __new__ per response.
ClientHead = tuple[bytes, bool, bool, bool]
# Response headers client_head does more with than copy them (one set look-up for the rest).
_NOTED_RESPONSE = HOP_BY_HOP | {b"content-length", b"x-request-id"}


def client_head(
    status: int,
    reason: bytes,
    headers: list[tuple[bytes, bytes, bytes]],
    drop: list[bytes],
    *,
    version: str,
    method: str,
    extra: bytes,
    close: bool,
    request_id_line: bytes,
) -> ClientHead:
    """The head of a relayed final response: hop-by-hop headers and those the upstream's
    Connection names dropped, ``extra`` (the verdict's response lines) added, and framing
    the client's HTTP version can read. ``request_id_line`` (the ``X-Request-Id`` line;
    empty for classic traffic, which goes back untouched) replaces any X-Request-Id of the
    upstream's."""
    lines = [b"HTTP/1.1 %d %s\r\n" % (status, reason)]
    has_length = False
    upstream_chunked = False
    for name, value, lname in headers:
        if lname in _NOTED_RESPONSE:
            if lname in HOP_BY_HOP:
                if lname == b"transfer-encoding":
                    upstream_chunked = True
                    if version == "1.1":
                        lines.append(b"%s: %s\r\n" % (name, value))
                elif status == 101 and lname in (b"upgrade", b"connection"):
                    lines.append(b"%s: %s\r\n" % (name, value))
                continue
            if lname == b"content-length":  # never named by Connection (PROTECTED)
                has_length = True
            elif request_id_line:
                continue  # the upstream's X-Request-Id: ours replaces it
        if drop and lname in drop:
            continue
        lines.append(b"%s: %s\r\n" % (name, value))
    if extra:
        lines.append(extra)
    if request_id_line:
        lines.append(request_id_line)
    body_allowed = method != "HEAD" and status not in NO_BODY_STATUS and status != 101
    until_close = body_allowed and not has_length and not upstream_chunked
    chunked = False
    if body_allowed and not has_length:
        if version == "1.1":
            chunked = True
            if not upstream_chunked:
                lines.append(b"Transfer-Encoding: chunked\r\n")
        else:
            close = True  # HTTP/1.0: the end of the body is the end of the line
    if close:
        lines.append(b"Connection: close\r\n")
    elif version == "1.0":
        lines.append(b"Connection: keep-alive\r\n")
    lines.append(b"\r\n")
    return b"".join(lines), chunked, until_close, close


def interim_head(status: int, reason: bytes) -> bytes:
    """A 1xx response as relayed to an HTTP/1.1 client (its headers are hop-local)."""
    return b"HTTP/1.1 %d %s\r\n\r\n" % (status, reason)


def answer(
    status: int,
    body: bytes,
    content_type: bytes,
    extra: bytes,
    *,
    close: bool,
    request_id: str,
) -> bytes:
    """A complete response the gateway writes itself."""
    return b"%sContent-Type: %s\r\nContent-Length: %d\r\n%sX-Request-Id: %s\r\n%s\r\n%s" % (
        STATUS_LINES[status],
        content_type,
        len(body),
        extra,
        request_id.encode(),
        b"Connection: close\r\n" if close else b"",
        body,
    )


def problem_body(status: int, code: str, title: str, detail: str, request_id: str) -> bytes:
    """The problem+json body of an answer the proxy gives itself (an upstream fault, a
    malformed request), carrying the request id the response header carries."""
    body, generated = problem(status, code, title, detail)
    # ``problem`` makes an id of its own: the answer's is put in its place.
    return body.replace(b'"%s"}' % generated.encode(), b'"%s"}' % request_id.encode())
