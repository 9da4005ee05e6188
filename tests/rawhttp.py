"""Raw HTTP over sockets, for the tests that must see every byte: a recording upstream
(llhttp, like most real upstreams), a response reader that fails on malformed output, and a
gateway running on a loop in a thread for synchronous (hypothesis) tests.

    reply = await exchange(port, request(b"GET /x HTTP/1.1", key=key))
    assert reply.status == 200 and reply.header("X-Request-Id")
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import socket
import threading
import time
from collections.abc import Coroutine, Iterator
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any, NamedTuple, TypeVar, cast

import httptools

from gateway.matrix import APP_NAMES
from tests.harness import Gateway, running_gateway

T = TypeVar("T")


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
