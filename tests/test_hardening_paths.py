"""Path confusion through the running gateway (DESIGN §5, issue 6 item 1).

Every raw request target below goes over a plain socket to a real gateway in front of a
recording upstream. Each one is either refused with 400 (``path_rejected``, or
``bad_request`` where llhttp itself refuses the request line) and nothing reaches the
upstream, or the upstream receives exactly the canonical path (``canonical_path`` of the
target's path, plus the query untouched) and the decision was made on that path: a target
that canonicalises to a feature the Core plan lacks is blocked and never forwarded.

The raw-HTTP helpers at the top (``RecordingUpstream``, ``exchange``, ``LoopThread``) are
shared with the other hardening tests.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import socket
import threading
import time
from collections.abc import AsyncIterator, Coroutine, Iterator
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any, NamedTuple, TypeVar, cast

import httptools
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from gateway.matrix import APP_NAMES, AppName, TierMatrix
from gateway.paths import PathRejected, canonical_path
from gateway.routes import RouteTable
from tests.conftest import IssueKey
from tests.harness import Gateway, running_gateway

T = TypeVar("T")

# ============================================================ raw HTTP helpers (shared)


class Seen:
    """One request as the upstream parsed it (llhttp, like most real upstreams)."""

    __slots__ = ("connection", "method", "target", "headers", "trailers", "body", "complete")

    def __init__(
        self, connection: int, method: str, target: str, headers: list[tuple[str, str]]
    ) -> None:
        self.connection = connection
        self.method = method
        self.target = target
        self.headers = headers
        self.trailers: list[tuple[str, str]] = []
        self.body = bytearray()
        self.complete = False

    def header(self, name: str) -> list[str]:
        lname = name.lower()
        return [value for key, value in self.headers if key.lower() == lname]

    def __repr__(self) -> str:
        return f"Seen({self.method} {self.target!r}, complete={self.complete})"


class _RecordingConnection(asyncio.Protocol):
    def __init__(self, owner: RecordingUpstream) -> None:
        self.owner = owner
        self.number = next(owner._numbers)
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self._url = b""
        self._headers: list[tuple[str, str]] = []
        self._current: Seen | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.owner._open.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self.owner._open.discard(self)

    def data_received(self, data: bytes) -> None:
        self.owner.raw += data
        self._feed(data)

    def _feed(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as upgrade:
            if not self.owner.answer_on_head:
                self.close()
                return
            # Like a server without an upgrade handler: what follows is HTTP/1.1 again.
            self.parser = httptools.HttpRequestParser(self)
            self._feed(data[upgrade.args[0] :])
        except httptools.HttpParserError as exc:
            self.owner.errors.append(str(exc))
            self.close()

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def on_message_begin(self) -> None:
        self._url = b""
        self._headers = []
        self._current = None

    def on_url(self, url: bytes) -> None:
        self._url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        pair = (name.decode("latin-1"), value.decode("latin-1"))
        if self._current is None:
            self._headers.append(pair)
        else:
            self._current.trailers.append(pair)

    def on_headers_complete(self) -> None:
        method = self.parser.get_method().decode("latin-1")
        seen = Seen(self.number, method, self._url.decode("latin-1"), self._headers)
        self._current = seen
        self.owner.requests.append(seen)
        if self.owner.answer_on_head:
            self._answer(seen)

    def on_body(self, body: bytes) -> None:
        if self._current is not None:
            self._current.body += body

    def on_message_complete(self) -> None:
        seen = self._current
        if seen is None:
            return
        seen.complete = True
        if not self.owner.answer_on_head:
            self._answer(seen)

    def _answer(self, seen: Seen) -> None:
        if self.transport is None:
            return
        body = b"" if seen.method == "HEAD" else b"seen " + seen.target.encode("latin-1")
        self.transport.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n\r\n%s"
            % (len(body), body)
        )


class RecordingUpstream:
    """A raw upstream that records every request head it parses (``requests``; ``complete``
    once the whole message arrived) and every byte (``raw``), and answers 200.

    With ``answer_on_head`` it behaves like Node.js and many frameworks: it answers as soon
    as the head is parsed, reads the body later (by its own framing, on the same
    connection), and after an upgrade or CONNECT head it has no handler for, carries on
    reading HTTP/1.1."""

    def __init__(self, *, answer_on_head: bool = False) -> None:
        self.answer_on_head = answer_on_head
        self.requests: list[Seen] = []
        self.raw = bytearray()
        self.errors: list[str] = []
        self.port = 0
        self._numbers = itertools.count()
        self._open: set[_RecordingConnection] = set()
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(lambda: _RecordingConnection(self), "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        for conn in list(self._open):
            if conn.transport is not None:
                conn.transport.abort()
        await asyncio.sleep(0)

    def complete(self) -> list[Seen]:
        return [seen for seen in self.requests if seen.complete]

    def probed(self, probe: str) -> list[Seen]:
        return [seen for seen in self.requests if seen.header("X-Probe") == [probe]]


class Reply:
    """What came back on one client connection: the first final response, if any."""

    def __init__(self) -> None:
        self.status: int | None = None
        self.headers: list[tuple[str, str]] = []
        self.body = bytearray()
        self.complete = False  # a whole response was parsed
        self.closed = False  # the gateway closed (or reset) the connection
        self.reset = False
        self.raw = bytearray()

    def header(self, name: str) -> str | None:
        lname = name.lower()
        for key, value in self.headers:
            if key.lower() == lname:
                return value
        return None

    def problem(self) -> dict[str, Any]:
        assert self.header("Content-Type") == "application/problem+json", self
        data = json.loads(bytes(self.body))
        assert isinstance(data, dict)
        return data

    @property
    def code(self) -> str | None:
        if self.header("Content-Type") != "application/problem+json":
            return None
        code = self.problem().get("code")
        return code if isinstance(code, str) else None

    def __repr__(self) -> str:
        return f"Reply({self.status}, complete={self.complete}, raw={bytes(self.raw[:300])!r})"


class MalformedResponse(AssertionError):
    """The gateway sent bytes that are not a well-formed HTTP/1.1 response."""


class ReplyReader:
    """Feeds response bytes to llhttp and collects the responses, in order; ``done`` once
    ``wanted`` final responses are complete. Interim (1xx) responses are skipped."""

    def __init__(self, head_only: bool = False, wanted: int = 1) -> None:
        self.replies = [Reply()]
        self.head_only = head_only  # HEAD requests: responses have no body
        self.wanted = wanted
        self.parser = httptools.HttpResponseParser(self)
        self.raw = bytearray()
        self.closed = False
        self.reset = False
        self._interim = False
        self._finished = 0

    @property
    def done(self) -> bool:
        return self._finished >= self.wanted

    def feed(self, data: bytes) -> None:
        self.raw += data
        self.replies[0].raw = self.raw
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            raise MalformedResponse(f"{exc}: {bytes(self.raw[:500])!r}") from exc
        except httptools.HttpParserUpgrade:
            self._finished = self.wanted

    def eof(self, reset: bool = False) -> None:
        self.closed = True
        self.reset = reset
        last = self.replies[-1]
        last.closed = True
        last.reset = reset

    def on_message_begin(self) -> None:
        current = self.replies[-1]
        if current.complete:
            current = Reply()
            self.replies.append(current)
        current.headers = []
        current.body = bytearray()

    def on_header(self, name: bytes, value: bytes) -> None:
        self.replies[-1].headers.append((name.decode("latin-1"), value.decode("latin-1")))

    def on_headers_complete(self) -> None:
        status = self.parser.get_status_code()
        if self.parser.get_http_version() != "1.1":
            raise MalformedResponse(f"not an HTTP/1.1 response: {bytes(self.raw[:80])!r}")
        self._interim = 100 <= status < 200 and status != 101
        if not self._interim:
            current = self.replies[-1]
            current.status = status
            if self.head_only or status in (101, 204, 304):
                current.complete = True
                self._finished += 1

    def on_body(self, body: bytes) -> None:
        if not self._interim:
            self.replies[-1].body += body

    def on_message_complete(self) -> None:
        if self._interim:
            self._interim = False
            return
        current = self.replies[-1]
        if not current.complete:
            current.complete = True
            self._finished += 1


async def read_replies(
    reader: asyncio.StreamReader,
    *,
    wanted: int = 1,
    until_closed: bool = False,
    deadline: float = 5.0,
    head_only: bool = False,
) -> ReplyReader:
    """Read until ``wanted`` responses are complete (or, with ``until_closed``, until the
    gateway closes) or the connection ends. A gateway that does neither within
    ``deadline`` fails the test: a hung client."""
    parsing = ReplyReader(head_only, wanted)

    async def run() -> None:
        while until_closed or not parsing.done:
            try:
                data = await reader.read(65536)
            except (ConnectionResetError, BrokenPipeError):
                parsing.eof(reset=True)
                return
            if not data:
                parsing.eof()
                return
            parsing.feed(data)

    try:
        await asyncio.wait_for(run(), deadline)
    except TimeoutError:
        raise AssertionError(
            f"no response and no close within {deadline}s: {parsing.replies}"
        ) from None
    return parsing


async def read_reply(
    reader: asyncio.StreamReader, *, deadline: float = 5.0, head_only: bool = False
) -> Reply:
    return (await read_replies(reader, deadline=deadline, head_only=head_only)).replies[0]


async def exchange(
    port: int, raw: bytes, *, deadline: float = 5.0, head_only: bool = False
) -> Reply:
    """Send ``raw`` on a fresh connection and read the first response."""
    return (await converse(port, raw, deadline=deadline, head_only=head_only)).replies[0]


async def converse(
    port: int,
    raw: bytes,
    *,
    wanted: int = 1,
    until_closed: bool = False,
    deadline: float = 5.0,
    head_only: bool = False,
) -> ReplyReader:
    """Send ``raw`` on a fresh connection and read responses (see ``read_replies``)."""
    reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), deadline)
    try:
        writer.write(raw)
        with contextlib.suppress(ConnectionError):
            await writer.drain()
        return await read_replies(
            reader, wanted=wanted, until_closed=until_closed, deadline=deadline, head_only=head_only
        )
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError, TimeoutError):
            await asyncio.wait_for(writer.wait_closed(), deadline)


def exchange_sync(
    port: int, raw: bytes, *, deadline: float = 5.0, head_only: bool = False
) -> Reply:
    """``exchange`` for synchronous (hypothesis) tests: a blocking socket."""
    parsing = ReplyReader(head_only)
    end = time.monotonic() + deadline
    with socket.create_connection(("127.0.0.1", port), timeout=deadline) as sock:
        with contextlib.suppress(ConnectionError):
            sock.sendall(raw)
        while not parsing.done:
            left = end - time.monotonic()
            if left <= 0:
                raise AssertionError(
                    f"no response and no close within {deadline}s: {parsing.replies}"
                )
            sock.settimeout(left)
            try:
                data = sock.recv(65536)
            except TimeoutError:
                continue
            except ConnectionError:
                parsing.eof(reset=True)
                break
            if not data:
                parsing.eof()
                break
            parsing.feed(data)
    return parsing.replies[0]


def request(
    line: bytes,
    *,
    key: str | None = None,
    probe: str | None = None,
    headers: bytes = b"",
    body: bytes = b"",
) -> bytes:
    """A raw request: ``line`` (request line, no CRLF), Host, the key, a probe id."""
    out = [line, b"\r\nHost: gateway.test\r\n"]
    if key is not None:
        out.append(b"X-License-Key: %s\r\n" % key.encode())
    if probe is not None:
        out.append(b"X-Probe: %s\r\n" % probe.encode())
    out.append(headers)
    out.append(b"Content-Length: %d\r\n\r\n" % len(body))
    out.append(body)
    return b"".join(out)


class LoopThread:
    """An event loop in a background thread, for synchronous tests (hypothesis) that talk
    to servers over sockets. ``run`` executes a coroutine there and returns its result."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._main, name="test-loop", daemon=True)
        self._thread.start()

    def _main(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 30.0) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        async def cancel_the_rest() -> None:
            current = asyncio.current_task()
            rest = [task for task in asyncio.all_tasks() if task is not current]
            for task in rest:
                task.cancel()
            await asyncio.gather(*rest, return_exceptions=True)
            await self.loop.shutdown_asyncgens()

        self.run(cancel_the_rest())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()


# ============================================================ fixtures


@pytest.fixture
async def upstream() -> AsyncIterator[RecordingUpstream]:
    server = RecordingUpstream()
    await server.start()
    yield server
    await server.stop()


@pytest.fixture
async def gateway(
    tmp_path: Path, key_dir: Path, upstream: RecordingUpstream
) -> AsyncIterator[Gateway]:
    async with running_gateway(tmp_path, key_dir, dict.fromkeys(APP_NAMES, upstream.port)) as gw:
        yield gw


@pytest.fixture(scope="session")
def core_features(matrix: TierMatrix) -> frozenset[str]:
    return matrix.entitlement("core").features


# ============================================================ the table


class Case(NamedTuple):
    app: AppName
    method: str
    line: bytes  # the request line, without its CRLF
    status: int
    code: str | None  # the problem code of a 4xx answer
    upstream: str | None  # what the upstream must receive (forwarded cases)
    target: str | None  # the target the decision is made on (blocked / forwarded)


OPTIMIZE = "ops.basic_shipment_optimization"


def _line(method: str, target: str) -> bytes:
    return f"{method} {target} HTTP/1.1".encode("latin-1")


def blocked(target: str, method: str = "POST", app: AppName = "operations") -> Case:
    """Canonicalises to a route whose feature Core lacks: 403, never forwarded."""
    return Case(app, method, _line(method, target), 403, "feature_not_entitled", None, target)


def forwarded(target: str, upstream: str, method: str = "GET", app: AppName = "operations") -> Case:
    """Allowed for Core: the upstream receives exactly ``upstream``."""
    return Case(app, method, _line(method, target), 200, None, upstream, target)


def rejected(
    target: str, method: str = "POST", code: str = "path_rejected", line: bytes | None = None
) -> Case:
    """Refused with 400 before any decision; nothing reaches the upstream."""
    return Case("operations", method, line or _line(method, target), 400, code, None, None)


CASES = [
    # -- dot segments, slashes, decoded unreserved characters: canonicalised, then decided
    pytest.param(blocked("/api/v1/shipments/1/optimize"), id="baseline"),
    pytest.param(blocked("/api/v1//shipments/1/optimize"), id="double-slash"),
    pytest.param(blocked("//api/v1/shipments/1/optimize"), id="leading-double-slash"),
    pytest.param(blocked("///api///v1///shipments///1///optimize"), id="triple-slashes"),
    pytest.param(blocked("/api/v1/./shipments/1/./optimize"), id="dot-segments"),
    pytest.param(blocked("/api/v1/public/../shipments/1/optimize"), id="dot-dot"),
    pytest.param(blocked("/api/v1/health/../shipments/1/optimize"), id="public-route-dot-dot"),
    pytest.param(blocked("/api/v1/x/%2e%2e/shipments/1/optimize"), id="encoded-dot-dot"),
    pytest.param(blocked("/api/v1/x/%2E%2E/shipments/1/optimize"), id="encoded-dot-dot-upper"),
    pytest.param(blocked("/api/v1/x/.%2e/shipments/1/optimize"), id="half-encoded-dot-dot"),
    pytest.param(blocked("/api/v1/%2e/shipments/1/optimize"), id="encoded-dot"),
    pytest.param(blocked("/api/v1/shipments/1/optimize/"), id="trailing-slash"),
    pytest.param(blocked("/api/v1/shipments/1/optimize//"), id="trailing-double-slash"),
    pytest.param(blocked("/api/v1/shipments/1/optimize/."), id="trailing-dot"),
    pytest.param(blocked("/api/v1/shipments/1/optimize/%2e"), id="trailing-encoded-dot"),
    pytest.param(blocked("/api/v1/shipments/1/optimize/x/.."), id="trailing-dot-dot"),
    pytest.param(blocked("/api/v1/shipments/1/optimize/../optimize"), id="dot-dot-back"),
    pytest.param(blocked("/api/v1/shipments/1/%6Fptimiz%65"), id="encoded-letters"),
    pytest.param(blocked("/%61%70%69/v1/shipments/%31/optimize"), id="encoded-prefix"),
    pytest.param(blocked("/api/v1/shipments/1%3F/optimize"), id="encoded-question-in-id"),
    pytest.param(blocked("/api/v1/shipments/1%23/optimize"), id="encoded-hash-in-id"),
    pytest.param(blocked("/api/v1/shipments/1/optimize?"), id="empty-query"),
    pytest.param(blocked("/api/v1/shipments/1/optimize?next=/api/v1/health"), id="query"),
    pytest.param(blocked("/api/v1/shipments/1/optimize?/../../health"), id="dots-in-query"),
    pytest.param(blocked("/api/v1/shipments/1/optimize", method="GET"), id="unlisted-method"),
    pytest.param(blocked("/api/v1/%73cans/./depot", app="driver_app"), id="driver-app"),
    pytest.param(
        blocked("/api/v1/orders/../branding/logo", method="GET", app="client_portal"),
        id="client-portal",
    ),
    # -- ambiguous encodings: refused, never forwarded
    pytest.param(rejected("/api/v1/public/..%2Fshipments/1/optimize"), id="dot-dot-encoded-slash"),
    pytest.param(rejected("/api/v1/public/..%2fshipments/1/optimize"), id="encoded-slash-lower"),
    pytest.param(rejected("/api/v1/shipments%2F1%2Foptimize"), id="encoded-slashes"),
    pytest.param(rejected("/api/v1/public/..%252Fshipments/1/optimize"), id="double-encoded"),
    pytest.param(rejected("/api/v1/shipments/1/optimize%252F"), id="double-encoded-trailing"),
    pytest.param(rejected("/api/v1/shipments/1/%256Fptimize"), id="encoded-percent"),
    pytest.param(rejected("/api/v1/public/..%5Cshipments/1/optimize"), id="encoded-backslash"),
    pytest.param(rejected("/api/v1/public\\..\\shipments/1/optimize"), id="raw-backslash"),
    pytest.param(rejected("/api/v1/shipments/1/optimize;jsessionid=x"), id="path-parameter"),
    pytest.param(rejected("/api/v1/public/..;/shipments/1/optimize"), id="dot-dot-semicolon"),
    pytest.param(rejected("/api/v1/shipments;v=1/1/optimize"), id="mid-path-parameter"),
    pytest.param(rejected("/api/v1/shipments/1/optimize%3Bv=1"), id="encoded-semicolon"),
    pytest.param(rejected("/api/v1/public/..%3b/shipments/1/optimize"), id="enc-semicolon-dots"),
    pytest.param(rejected("/api/v1/shipments/1/optimize%00"), id="encoded-nul"),
    pytest.param(rejected("/api/v1/shipments/1/optimize%00.json"), id="encoded-nul-suffix"),
    pytest.param(
        rejected("/api/v1/shipments/1/optimize%0D%0AX-Entitlement-Tier:%20enterprise"),
        id="encoded-crlf",
    ),
    pytest.param(rejected("/api/v1/shipments/1/optimize%0a"), id="encoded-lf"),
    pytest.param(rejected("/api/v1/public%C0%AF..%C0%AFshipments/1/optimize"), id="overlong-slash"),
    pytest.param(rejected("/api/v1/x/%C0%AE%C0%AE/shipments/1/optimize"), id="overlong-dots"),
    pytest.param(rejected("/api/v1/x/%E0%80%AE%E0%80%AE/shipments/1/optimize"), id="overlong-3"),
    pytest.param(rejected("/../api/v1/shipments/1/optimize"), id="above-root"),
    pytest.param(rejected("/api/v1/../../../shipments/1/optimize"), id="escapes-root"),
    pytest.param(rejected("/%2e%2e/api/v1/shipments/1/optimize"), id="encoded-above-root"),
    pytest.param(rejected("/api/v1/shipments/1/optimize#x"), id="raw-fragment"),
    pytest.param(rejected("/api/v1/shipments/1/optimize%"), id="bare-percent"),
    pytest.param(rejected("/api/v1/shipments/1/optimize%zz"), id="percent-not-hex"),
    # -- request targets that are not origin-form
    pytest.param(rejected("http://ops.example/api/v1/shipments/1/optimize"), id="absolute-form"),
    pytest.param(rejected("HTTP://ops.example//api/v1/shipments/1/optimize"), id="absolute-upper"),
    pytest.param(rejected("http://u@ops.example/api/v1/shipments/1/optimize"), id="absolute-user"),
    pytest.param(rejected("*", method="OPTIONS"), id="asterisk-form"),
    pytest.param(rejected("ops.example:443", method="CONNECT"), id="authority-form"),
    # -- request lines llhttp refuses itself
    pytest.param(rejected("/api/v1/shipments/1/opt\timize", code="bad_request"), id="raw-tab"),
    pytest.param(rejected("/api/v1/shipments/1/\xc3\xa9", code="bad_request"), id="raw-utf8"),
    pytest.param(rejected("/api/v1/shipments/1/optimize\x00", code="bad_request"), id="raw-nul"),
    pytest.param(rejected("/api/v1/shipments/1/opt\x7fimize", code="bad_request"), id="raw-del"),
    pytest.param(rejected("/api/v1/ship ments/1/optimize", code="bad_request"), id="raw-space"),
    pytest.param(
        rejected("", code="bad_request", line=b"POST /api/v1/shipments/1/optimize\rX HTTP/1.1"),
        id="raw-bare-cr",
    ),
    # -- a raw CRLF ends the request line: the decision is on what came before it
    pytest.param(
        Case(
            "operations",
            "POST",
            b"POST /api/v1/shipments/1/optimize\r\nX-Split: HTTP/1.1",
            403,
            "feature_not_entitled",
            None,
            "/api/v1/shipments/1/optimize",
        ),
        id="raw-crlf-splits-line",
    ),
    # -- forwarded: the upstream receives exactly the canonical form, query untouched
    pytest.param(forwarded("/api/v1/shipments/1", "/api/v1/shipments/1"), id="plain"),
    pytest.param(forwarded("/api/v1//shipments//1", "/api/v1/shipments/1"), id="merged"),
    pytest.param(forwarded("/api/v1/shipments/1/optimize/..", "/api/v1/shipments/1/"), id="up"),
    pytest.param(
        forwarded("/api/v1/shipments/./1/?a=1&b=%2F..%2F", "/api/v1/shipments/1/?a=1&b=%2F..%2F"),
        id="query-untouched",
    ),
    pytest.param(
        forwarded("/api/v1/shipments/1/optimize/../events", "/api/v1/shipments/1/events"),
        id="dot-dot-to-allowed",
    ),
    pytest.param(
        forwarded("/API/v1/shipments/1/optimize", "/API/v1/shipments/1/optimize", "POST"),
        id="case-variant-prefix",
    ),
    pytest.param(
        forwarded("/api/v1/shipments/1/OPTIMIZE", "/api/v1/shipments/1/OPTIMIZE", "POST"),
        id="case-variant-last",
    ),
    pytest.param(
        forwarded("/Api/V1/Shipments/1/Optimize", "/Api/V1/Shipments/1/Optimize", "POST"),
        id="case-variant-mixed",
    ),
    pytest.param(
        forwarded("/api/v1/shipments/1/optimize%3F", "/api/v1/shipments/1/optimize%3F", "POST"),
        id="encoded-question-kept",
    ),
    pytest.param(
        forwarded("/api/v1/shipments/1/optimize%23x", "/api/v1/shipments/1/optimize%23x", "POST"),
        id="encoded-hash-kept",
    ),
    pytest.param(
        forwarded("/api/v1/shipments/1/optimize%2e", "/api/v1/shipments/1/optimize.", "POST"),
        id="encoded-trailing-dot-is-a-name",
    ),
    pytest.param(
        forwarded("/api/v1/shipments/%c3%a9", "/api/v1/shipments/%C3%A9"), id="utf8-upper-cased"
    ),
    pytest.param(forwarded("/api/v1/shipments/%7e1", "/api/v1/shipments/~1"), id="tilde-decoded"),
    pytest.param(
        forwarded("/api/v1/jobs/1/../../me", "/api/v1/me", app="driver_app"), id="driver-dot-dot"
    ),
]


def _split(target: str) -> tuple[str, str]:
    path, mark, query = target.partition("?")
    return path, mark + query


@pytest.mark.parametrize("case", CASES)
async def test_request_target(
    case: Case,
    gateway: Gateway,
    upstream: RecordingUpstream,
    issue_key: IssueKey,
    route_table: RouteTable,
    core_features: frozenset[str],
) -> None:
    reply = await exchange(
        gateway.listen[case.app], request(case.line, key=issue_key(tier="core"), probe="p")
    )
    assert reply.status == case.status, reply
    if case.code is not None:
        assert reply.code == case.code, reply
    if case.target is not None:
        # The table agrees with the canonicaliser and the route table.
        path, query = _split(case.target)
        canonical = canonical_path(path)
        found = route_table.match(case.app, case.method, canonical)
        feature = found.route.feature if found.route is not None else None
        gated = feature is not None and feature not in core_features
        assert gated == (case.status == 403), (canonical, feature)
        if case.status == 403:
            assert reply.problem()["feature"] == feature
        else:
            assert case.upstream == canonical + query
    if case.upstream is None:
        assert upstream.requests == [], "a refused or blocked request reached the upstream"
        return
    (seen,) = upstream.requests
    assert seen.complete
    assert seen.target == case.upstream
    assert seen.header("X-Entitlement-Tier") == ["core"]


# ============================================================ the property


class ThreadedGateway(NamedTuple):
    loop: LoopThread
    gateway: Gateway
    upstream: RecordingUpstream


@contextlib.contextmanager
def threaded_gateway(
    folder: Path, key_dir: Path, upstream: RecordingUpstream
) -> Iterator[ThreadedGateway]:
    """A gateway in front of ``upstream``, both on a loop in a thread, for synchronous
    (hypothesis) tests that share them across examples."""
    loop = LoopThread()
    stack = AsyncExitStack()

    async def start() -> Gateway:
        await upstream.start()
        stack.push_async_callback(upstream.stop)
        ports: dict[str, int] = dict.fromkeys(APP_NAMES, upstream.port)
        return await stack.enter_async_context(running_gateway(folder, key_dir, ports))

    try:
        gateway = loop.run(start())
        yield ThreadedGateway(loop, gateway, upstream)
    finally:
        loop.run(stack.aclose())
        loop.close()


@pytest.fixture(scope="module")
def threaded(tmp_path_factory: pytest.TempPathFactory, key_dir: Path) -> Iterator[ThreadedGateway]:
    """One gateway and upstream for every hypothesis example."""
    folder = tmp_path_factory.mktemp("paths-property")
    with threaded_gateway(folder, key_dir, RecordingUpstream()) as running:
        yield running


SEGMENTS = (
    "api", "v1", "shipments", "optimize", "itineraries", "plan", "phi", "events", "1", "42",
    ".", "..", "%2e", "%2E%2e", ".%2E", "", "%61pi", "optimiz%65", "x", "%2F", "%5c", ";a",
)  # fmt: skip
# Paths of gated routes, which noise below then tries to talk around.
SKELETONS = (
    ("api", "v1", "shipments", "1", "optimize"),
    ("api", "v1", "shipments", "1", "phi"),
    ("api", "v1", "shipments", "1"),
    ("api", "v1", "itineraries"),
    ("api", "v1", "itineraries", "7", "plan"),
    ("api", "v1", "phi", "records", "9"),
    ("api", "v1", "sms", "messages"),
)
NOISE = (".", "..", "%2e", "%2E%2e", "", "x", "%2F", ";a", "%6Fptimize", "%61pi", "1")


def _insert(skeleton: tuple[str, ...], noise: list[tuple[int, str]]) -> list[str]:
    parts = list(skeleton)
    for position, segment in noise:
        parts.insert(position % (len(parts) + 1), segment)
    return parts


noisy = st.builds(
    _insert,
    st.sampled_from(SKELETONS),
    st.lists(st.tuples(st.integers(0, 8), st.sampled_from(NOISE)), max_size=3),
)
targets = st.builds(
    lambda parts, slash, query: "/" + "/".join(parts) + slash + query,
    st.one_of(noisy, st.lists(st.sampled_from(SEGMENTS), max_size=7)),
    st.sampled_from(["", "/"]),
    st.sampled_from(["", "?a=1", "?next=%2F..%2Fx"]),
)
_probes = itertools.count()


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(target=targets, method=st.sampled_from(["GET", "POST"]))
def test_decision_is_made_on_the_path_the_upstream_receives(
    threaded: ThreadedGateway,
    issue_key: IssueKey,
    route_table: RouteTable,
    core_features: frozenset[str],
    target: str,
    method: str,
) -> None:
    port = threaded.gateway.listen["operations"]
    upstream = threaded.upstream
    line = _line(method, target)
    path, query = _split(target)

    probe = f"enterprise-{next(_probes)}"
    reply = exchange_sync(port, request(line, key=issue_key(tier="enterprise"), probe=probe))
    if reply.status == 400:
        assert reply.code == "path_rejected", reply
        event("rejected")
        with pytest.raises(PathRejected):
            canonical_path(path)
        assert upstream.probed(probe) == []
        return
    assert reply.status == 200, reply
    (seen,) = upstream.probed(probe)
    assert seen.target == canonical_path(path) + query
    received = seen.target.partition("?")[0]
    found = route_table.match("operations", method, received)
    feature = found.route.feature if found.route is not None else None

    probe = f"core-{next(_probes)}"
    reply = exchange_sync(port, request(line, key=issue_key(tier="core"), probe=probe))
    if feature is not None and feature not in core_features:
        event(f"blocked for core: {feature}")
        assert reply.status == 403, reply
        assert reply.problem()["feature"] == feature
        assert upstream.probed(probe) == []
    else:
        event("allowed for core")
        assert reply.status == 200, reply
        (seen,) = upstream.probed(probe)
        assert seen.target.partition("?")[0] == received
