"""HAR 1.2 recordings as HTTP/1.1 bytes, for ``gateway replay`` (no I/O but reading the file).

A recorded request becomes the exact bytes a client sends (``wire_request``); a classic hop
may remove only hop-by-hop and inbound ``X-Entitlement-*`` header lines from them
(``classic_view``: the bytes the upstream must receive); the recorded response becomes the
recording upstream's answer (``wire_response``). README "Replaying recorded classic
traffic" is the definition these functions implement.

    recording = read_har(Path("docs/examples/classic.har"))
    sent = wire_request(recording.log.entries[0].request)
    expected = classic_view(sent)
"""

from __future__ import annotations

import base64
import binascii
import re
from http import HTTPStatus
from pathlib import Path
from typing import Any

import msgspec

# RFC 9110 §5.6.2 token characters: header names and methods.
TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")  # use fullmatch: "$" allows a final \n
_BAD_VALUE = re.compile(rb"[\x00\r\n]")
_TARGET = re.compile(r"[\x21-\x7e]+")  # visible ASCII: no spaces, no control characters
_OWS = " \t"

# What any HTTP/1.1 intermediary must not forward (RFC 9110 §7.6.1 and the older
# Proxy-Connection / Proxy-Authenticate / Proxy-Authorization). Written out here rather
# than imported from the proxy: this is the documented contract the proxy is checked
# against, so a change in the proxy must not silently change the expectation too.
HOP_BY_HOP = frozenset(
    b"connection keep-alive proxy-connection te trailer transfer-encoding upgrade "
    b"proxy-authenticate proxy-authorization".split()
)
# Framing and routing: naming them in Connection never removes them (that would let a
# client make a hop drop Content-Length but forward the body).
NEVER_NAMED = frozenset({b"content-length", b"transfer-encoding", b"host"})
# The body is the same bytes whatever the chunk sizes, and every hop re-chunks as data
# arrives: the header stays, the payload is compared.
KEPT_HOP_BY_HOP = frozenset({b"transfer-encoding"})


class HarError(ValueError):
    """A file ``gateway replay`` cannot read as a HAR 1.2 recording at all."""


class EntryProblem(ValueError):
    """One recorded request that cannot be sent as the HTTP/1.1 bytes it was."""


# ------------------------------------------------------------------------- the HAR file
class HarHeader(msgspec.Struct, frozen=True):
    name: str
    value: str


class HarPostData(msgspec.Struct, frozen=True, rename="camel"):
    mime_type: str = ""
    text: str | None = None
    params: list[Any] | None = None
    # Not in HAR 1.2 for postData (it is for response content), written by some tools
    # for binary bodies: "base64" means text is the base64 of the body.
    encoding: str | None = None


class HarRequest(msgspec.Struct, frozen=True, rename="camel"):
    method: str
    url: str
    headers: tuple[HarHeader, ...]
    http_version: str = "HTTP/1.1"
    post_data: HarPostData | None = None


class HarContent(msgspec.Struct, frozen=True, rename="camel"):
    mime_type: str = ""
    text: str | None = None
    encoding: str | None = None


class HarResponse(msgspec.Struct, frozen=True, rename="camel"):
    status: int
    status_text: str = ""
    headers: tuple[HarHeader, ...] = ()
    content: HarContent = HarContent()


class HarEntry(msgspec.Struct, frozen=True):
    request: HarRequest
    response: HarResponse | None = None


class HarLog(msgspec.Struct, frozen=True):
    version: str
    entries: tuple[HarEntry, ...]


class Har(msgspec.Struct, frozen=True):
    log: HarLog


def read_har(path: Path) -> Har:
    """The recording in ``path``; ``HarError`` naming the file and what is wrong."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise HarError(f"{path}: cannot read: {exc.strerror or exc}") from exc
    try:
        raw = msgspec.json.decode(data)
    except msgspec.DecodeError as exc:
        raise HarError(f"{path}: not a HAR file: not JSON ({exc})") from exc
    log = raw.get("log") if isinstance(raw, dict) else None
    if not isinstance(log, dict) or "entries" not in log:
        raise HarError(f"{path}: not a HAR file: no log.entries (a HAR is {{'log': ...}})")
    version = log.get("version") or "1.1"  # HAR 1.2: "if empty, 1.1 is assumed"
    if version != "1.2":
        raise HarError(
            f"{path}: HAR version {version!r}: gateway replay reads HAR 1.2 "
            "(export the recording again as HAR 1.2)"
        )
    try:
        return msgspec.convert(raw, Har)
    except msgspec.ValidationError as exc:
        raise HarError(f"{path}: not a valid HAR 1.2 file: {exc}") from exc


# ------------------------------------------------------------------------- request bytes
class WireRequest(msgspec.Struct, frozen=True):
    """One HTTP/1.1 request: ``body`` is the payload (sent chunked when ``chunked``)."""

    method: str
    target: str
    headers: tuple[tuple[bytes, bytes], ...]
    body: bytes
    chunked: bool

    def head(self) -> bytes:
        lines = [b"%s %s HTTP/1.1\r\n" % (self.method.encode(), self.target.encode())]
        lines.extend(b"%s: %s\r\n" % header for header in self.headers)
        lines.append(b"\r\n")
        return b"".join(lines)

    def to_bytes(self) -> bytes:
        if not self.chunked:
            return self.head() + self.body
        chunk = b"%x\r\n%s\r\n" % (len(self.body), self.body) if self.body else b""
        return self.head() + chunk + b"0\r\n\r\n"


def request_target(url: str) -> tuple[str, str]:
    """(authority, origin-form target) of an absolute ``http(s)://`` URL, kept as
    recorded: no re-encoding, the fragment (never sent) dropped."""
    scheme, sep, rest = url.partition("://")
    if not sep or scheme.lower() not in ("http", "https"):
        raise EntryProblem(f"url {url!r} is not an absolute http:// or https:// URL")
    cut = min((i for i in (rest.find(c) for c in "/?#") if i >= 0), default=len(rest))
    authority, target = rest[:cut].rpartition("@")[2], rest[cut:].partition("#")[0]
    if not authority:
        raise EntryProblem(f"url {url!r} has no host")
    target = target if target.startswith("/") else "/" + target
    if not _TARGET.fullmatch(target):
        raise EntryProblem(
            f"url {url!r}: a request target is visible ASCII (percent-encode the rest)"
        )
    return authority, target


def wire_request(request: HarRequest) -> WireRequest:
    """The bytes a client sends for ``request`` (README "Replaying recorded classic traffic":
    which recorded fields are used and what is added); ``EntryProblem`` when the recording
    does not hold them."""
    if not TOKEN.fullmatch(request.method.encode("utf-8", "replace")):
        raise EntryProblem(f"method {request.method!r} is not an HTTP token")
    authority, target = request_target(request.url)
    headers: list[tuple[bytes, bytes]] = []
    for header in request.headers:
        if header.name.startswith(":"):
            continue  # HTTP/2 pseudo-headers: the URL carries them
        name = header.name.encode("utf-8", "replace")
        value = _utf8(header.value.strip(_OWS), f"header {header.name}")
        if not TOKEN.fullmatch(name):
            raise EntryProblem(f"header name {header.name!r} is not an HTTP token")
        if _BAD_VALUE.search(value):
            raise EntryProblem(f"header {header.name}: the value holds CR, LF or NUL")
        headers.append((name, value))
    if all(name.lower() != b"host" for name, _ in headers):
        headers.insert(0, (b"Host", authority.encode()))
    lowered = [name.lower() for name, _ in headers]
    upgrade = [v.lower() for (_, v), n in zip(headers, lowered, strict=True) if n == b"upgrade"]
    if any(b"websocket" in value for value in upgrade):
        raise EntryProblem("a WebSocket upgrade: the tunnel after it is not replayed")
    body = _body(request.post_data)
    framing = {
        name: [v for (_, v), n in zip(headers, lowered, strict=True) if n == name]
        for name in (b"transfer-encoding", b"content-length")
    }
    te, cl = framing[b"transfer-encoding"], framing[b"content-length"]
    if te:
        if cl:
            raise EntryProblem("both Transfer-Encoding and Content-Length (a smuggling shape)")
        if len(te) > 1 or te[0].lower() != b"chunked":
            shown = b", ".join(te).decode("utf-8", "replace")
            raise EntryProblem(
                f"Transfer-Encoding {shown}: only chunked can be replayed "
                "(a HAR holds the decoded body)"
            )
    elif cl:
        if len(cl) > 1 or not cl[0].isdigit() or int(cl[0]) != len(body):
            shown = b", ".join(cl).decode("utf-8", "replace")
            raise EntryProblem(
                f"Content-Length {shown} but the recorded body has {len(body)} bytes"
            )
    elif body:
        headers.append((b"Content-Length", b"%d" % len(body)))
    return WireRequest(request.method, target, tuple(headers), body, chunked=bool(te))


def _body(post: HarPostData | None) -> bytes:
    if post is None:
        return b""
    if post.text is None:
        if post.params:
            raise EntryProblem(
                "postData has params but no text: the body's bytes are not in the recording"
            )
        return b""
    return _decoded(post.text, post.encoding, "postData")


def _utf8(text: str, where: str) -> bytes:
    try:
        return text.encode()
    except UnicodeEncodeError as exc:  # a lone surrogate escaped in the JSON
        raise EntryProblem(f"{where}: not encodable as UTF-8 ({exc.reason})") from exc


def _decoded(text: str, encoding: str | None, where: str) -> bytes:
    if encoding is None or encoding == "":
        return _utf8(text, f"{where}.text")
    if encoding != "base64":
        raise EntryProblem(f"{where}.encoding {encoding!r}: only base64 is understood")
    try:
        return base64.b64decode(text, validate=True)
    except binascii.Error as exc:
        raise EntryProblem(f"{where}.text is not base64: {exc}") from exc


def is_entitlement_header(lname: bytes) -> bool:
    """X-Entitlement-*, also spelled with underscores."""
    return lname.replace(b"_", b"-").startswith(b"x-entitlement-")


def classic_view(sent: WireRequest) -> WireRequest:
    """What the upstream must receive for ``sent`` on a classic hop: the same request line,
    header lines (order, case, values) and body, without hop-by-hop headers (Connection,
    Keep-Alive, Proxy-Connection, TE, Trailer, Upgrade, Proxy-Authenticate,
    Proxy-Authorization, and those named in Connection but Content-Length,
    Transfer-Encoding and Host) and inbound ``X-Entitlement-*``. Transfer-Encoding stays."""
    named = {
        token.strip().lower()
        for name, value in sent.headers
        if name.lower() == b"connection"
        for token in value.split(b",")
    } - NEVER_NAMED
    kept = tuple(
        (name, value)
        for name, value in sent.headers
        if not (
            (name.lower() in HOP_BY_HOP and name.lower() not in KEPT_HOP_BY_HOP)
            or name.lower() in named
            or is_entitlement_header(name.lower())
        )
    )
    return msgspec.structs.replace(sent, headers=kept)


# ------------------------------------------------------------------------- the answer
_NO_BODY = frozenset({204, 304})
# content.text is the decoded body: its recorded length and coding no longer apply.
_NOT_REPLAYED = HOP_BY_HOP | {b"content-length", b"content-encoding"}


def wire_response(response: HarResponse | None, method: str) -> bytes:
    """The recorded answer as HTTP/1.1 bytes, framed by Content-Length. Without a usable
    recorded response (none, status 0 or 1xx): 200 with an empty body."""
    if response is None or not 200 <= response.status <= 599:
        return b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"
    status = response.status
    reason = response.status_text.encode("latin-1", "replace")
    if not reason or _BAD_VALUE.search(reason):
        try:
            reason = HTTPStatus(status).phrase.encode()
        except ValueError:
            reason = b"Unknown"
    lines = [b"HTTP/1.1 %d %s\r\n" % (status, reason)]
    for header in response.headers:
        name = header.name.encode("utf-8", "replace")
        value = header.value.strip(_OWS).encode("utf-8", "replace")
        if TOKEN.fullmatch(name) and not _BAD_VALUE.search(value):
            if name.lower() not in _NOT_REPLAYED:
                lines.append(b"%s: %s\r\n" % (name, value))
    content = response.content
    try:
        body = _decoded(content.text or "", content.encoding, "response.content")
    except EntryProblem:
        body = b""
    if status in _NO_BODY:
        return b"".join(lines) + b"\r\n"
    lines.append(b"Content-Length: %d\r\n\r\n" % len(body))
    return b"".join(lines) + (b"" if method == "HEAD" else body)
