"""Recorded classic requests through a real gateway, compared byte for byte.

A recording upstream on loopback keeps the raw bytes of every request it receives and
answers with the entry's recorded response. A real gateway (``Runtime`` with the config
given, its listener for the app and that app's upstream moved to loopback) sits in front.
Each classic entry of the HAR is sent as the bytes it was; what reached the upstream must
be ``classic_view`` of them (README "Replaying recorded classic traffic").

    results = await replay(config, "operations", har.log.entries, include_all=False)
"""

from __future__ import annotations

import asyncio
import copy
import itertools
import re
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import httptools
import msgspec

from gateway.config import Config
from gateway.har import (
    TOKEN,
    EntryProblem,
    HarEntry,
    WireRequest,
    classic_view,
    request_target,
    wire_request,
    wire_response,
)
from gateway.matrix import AppName
from gateway.paths import PathRejected, canonical_path
from gateway.runtime import Runtime

MAX_HEAD = 1 << 20
_HEX = re.compile(rb"[0-9A-Fa-f]+")
Result = Literal["pass", "fail", "error", "skipped"]


class MalformedRequest(ValueError):
    """Bytes the upstream received that are not an HTTP/1.1 request."""


class Difference(msgspec.Struct, frozen=True):
    """The first place where the upstream's bytes differ from the expected ones.

    ``line`` counts the lines of the request head from 1 (1 is the request line);
    ``column`` and ``offset`` count bytes from 0, in the line (or the body) and in the
    expected request; ``expected``/``received`` show the line or a body excerpt, with
    ``caret`` the index of the first differing character in them."""

    part: Literal["request line", "header", "body", "requests"]
    message: str
    line: int | None = None
    column: int | None = None
    offset: int | None = None
    expected: str | None = None
    received: str | None = None
    caret: int | None = None


class EntryResult(msgspec.Struct, frozen=True):
    """One HAR entry: ``entry`` is its index in ``log.entries``; ``status`` the status the
    client got through the gateway, ``recorded_status`` the recording's."""

    entry: int
    method: str
    url: str
    result: Result
    classic: Literal["key", "path"] | None
    recorded_status: int | None
    status: int | None = None
    reason: str | None = None
    difference: Difference | None = None


class Received(msgspec.Struct, frozen=True):
    """One request as the upstream got it: the raw head, and the payload (de-chunked)."""

    head: bytes
    body: bytes
    chunked: bool


def show(data: bytes) -> str:
    """Bytes as one readable line: printable ASCII as is, the rest as Python escapes."""
    return repr(data)[2:-1]


# ------------------------------------------------------------------------ comparing
def split_request(buffer: bytes | bytearray) -> tuple[Received, int] | None:
    """The first whole request in ``buffer`` and the bytes it took; None: not all here."""
    end = buffer.find(b"\r\n\r\n")
    if end < 0:
        if len(buffer) > MAX_HEAD:
            raise MalformedRequest("no end of the request head within 1 MiB")
        return None
    head = bytes(buffer[: end + 4])
    lines = head[:-4].split(b"\r\n")
    if len(lines[0].split(b" ")) != 3:
        raise MalformedRequest(f"request line {show(lines[0])}")
    fields: dict[bytes, list[bytes]] = {}
    for line in lines[1:]:
        name, colon, value = line.partition(b":")
        if not colon or not TOKEN.fullmatch(name):
            raise MalformedRequest(f"header line {show(line)}")
        fields.setdefault(name.lower(), []).append(value.strip(b" \t"))
    if b"transfer-encoding" in fields:  # RFC 9112 §6.3: chunked framing wins
        return _chunked(buffer, head, end + 4)
    lengths = set(fields.get(b"content-length", [b"0"]))
    length = lengths.pop()
    if lengths or not length.isdigit():
        raise MalformedRequest(f"Content-Length {show(b', '.join(fields[b'content-length']))}")
    stop = end + 4 + int(length)
    if len(buffer) < stop:
        return None
    return Received(head, bytes(buffer[end + 4 : stop]), chunked=False), stop


def _chunked(buffer: bytes | bytearray, head: bytes, pos: int) -> tuple[Received, int] | None:
    body = bytearray()
    while True:
        eol = buffer.find(b"\r\n", pos)
        if eol < 0:
            return None
        size_text = bytes(buffer[pos:eol]).split(b";")[0].strip()
        if not _HEX.fullmatch(size_text):
            raise MalformedRequest(f"chunk size {show(size_text)}")
        size, pos = int(size_text, 16), eol + 2
        if size == 0:
            break
        if len(buffer) < pos + size + 2:
            return None
        if buffer[pos + size : pos + size + 2] != b"\r\n":
            raise MalformedRequest("chunk data not followed by CRLF")
        body += buffer[pos : pos + size]
        pos += size + 2
    while True:  # the trailer section, up to its empty line
        eol = buffer.find(b"\r\n", pos)
        if eol < 0:
            return None
        last, pos = eol == pos, eol + 2
        if last:
            return Received(head, bytes(body), chunked=True), pos


def _common_prefix(a: bytes, b: bytes) -> int:
    differing = (i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y)
    return next(differing, min(len(a), len(b)))


def first_difference(expected: WireRequest, received: Received) -> Difference | None:
    """Where ``received`` first differs from ``expected``: the head byte for byte (request
    line, header lines in order and case), then the payload."""
    want, got = expected.head(), received.head
    if want != got:
        want_lines, got_lines = want[:-4].split(b"\r\n"), got[:-4].split(b"\r\n")
        pairs = itertools.zip_longest(want_lines, got_lines)
        for number, (w, g) in enumerate(pairs, 1):
            if w == g:
                continue
            part: Literal["request line", "header"] = "request line" if number == 1 else "header"
            offset = sum(len(line) + 2 for line in want_lines[: number - 1])
            if w is None:
                message = f"line {number}: an extra header line arrived, not in the recording"
                return Difference(part, message, number, 0, offset, received=show(g), caret=0)
            if g is None:
                message = f"line {number}: the recorded header line did not arrive"
                return Difference(part, message, number, 0, offset, expected=show(w), caret=0)
            column = _common_prefix(w, g)
            what = "the request line" if number == 1 else f"line {number}"
            message = f"{what} differs at byte {column} of the line"
            caret = len(show(w[:column]))
            return Difference(
                part, message, number, column, offset + column, show(w), show(g), caret
            )
    want_body, got_body = expected.body, received.body
    if want_body == got_body:
        return None
    column = _common_prefix(want_body, got_body)
    if column == len(got_body):
        message = f"the body ends after {len(got_body)} of {len(want_body)} bytes"
    elif column == len(want_body):
        message = f"the body has {len(got_body) - len(want_body)} bytes after the recorded ones"
    else:
        message = f"the body differs at byte {column} of {len(want_body)}"
    if expected.chunked:
        message += " (the de-chunked payload)"
    start = max(0, column - 24)
    return Difference(
        "body", message, None, column, len(want) + column,
        show(want_body[start : column + 24]), show(got_body[start : column + 24]),
        len(show(want_body[start:column])),
    )  # fmt: skip


# ------------------------------------------------------------------------ the peers
class RecordingUpstream:
    """A loopback HTTP/1.1 server that keeps each request it receives (raw head, payload)
    and answers it with ``answer``, the recorded response of the entry being replayed."""

    def __init__(self) -> None:
        self.answer = wire_response(None, "GET")
        self.received: list[Received] = []
        self.malformed: list[str] = []
        self.port = 0
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    def take(self) -> tuple[list[Received], list[str]]:
        taken = self.received, self.malformed
        self.received, self.malformed = [], []
        return taken

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        buffer = bytearray()
        try:
            while data := await reader.read(65536):
                buffer += data
                while (split := split_request(buffer)) is not None:
                    request, used = split
                    del buffer[:used]
                    self.received.append(request)
                    writer.write(self.answer)
                await writer.drain()
        except MalformedRequest as exc:
            self.malformed.append(str(exc))
        except ConnectionError:
            pass  # the gateway closed a pooled connection
        finally:
            writer.close()


class Answer(msgspec.Struct, frozen=True):
    """What the client got through the gateway: the final status (1xx skipped), the
    problem ``code`` when the gateway answered itself, or why there is no answer."""

    status: int | None
    code: str | None = None
    error: str | None = None


class _ResponseReader:
    __slots__ = ("parser", "head_only", "status", "body", "complete")

    def __init__(self, head_only: bool) -> None:
        self.parser = httptools.HttpResponseParser(self)
        self.head_only = head_only  # a HEAD answer has no body whatever it says
        self.status: int | None = None
        self.body = bytearray()
        self.complete = False

    def on_headers_complete(self) -> None:
        status = self.parser.get_status_code()
        if status >= 200:
            self.status = status
            self.complete = self.head_only

    def on_body(self, body: bytes) -> None:
        if self.status is not None:
            self.body += body

    def on_message_complete(self) -> None:
        self.complete = self.status is not None


async def send(port: int, data: bytes, method: str, timeout: float) -> Answer:
    """``data`` to the gateway on a new connection; its answer."""
    response = _ResponseReader(head_only=method == "HEAD")
    writer: asyncio.StreamWriter | None = None
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(data)
            while not response.complete and (chunk := await reader.read(65536)):
                response.parser.feed_data(chunk)
    except TimeoutError:
        return Answer(response.status, error=f"no complete answer within {timeout:g} s")
    except httptools.HttpParserError as exc:
        return Answer(response.status, error=f"the answer is not HTTP/1.1: {exc}")
    except OSError as exc:
        return Answer(response.status, error=f"connection failed: {exc}")
    finally:
        if writer is not None:
            writer.close()
    if not response.complete:
        return Answer(response.status, error="the gateway closed the connection mid-answer")
    try:
        problem = msgspec.json.decode(bytes(response.body))
    except msgspec.DecodeError:
        problem = None
    code = problem.get("code") if isinstance(problem, dict) else None
    return Answer(response.status, code=code if isinstance(code, str) else None)


# ------------------------------------------------------------------------ the run
def classic_kind(entry: HarEntry, config: Config, app: AppName) -> Literal["key", "path"] | None:
    """Why the gateway treats ``entry`` as classic traffic, as the README defines it: a
    license header matching ``classic_key_pattern``, or a path under the app's
    ``classic_path_prefixes`` (as recorded or canonicalised)."""
    header = config.settings.license.header.lower()
    keys = [h.value.strip() for h in entry.request.headers if h.name.lower() == header]
    if keys and config.classic.is_classic(keys[0]):
        return "key"
    prefixes = tuple(config.settings.apps[app].classic_path_prefixes)
    path = request_target(entry.request.url)[1].partition("?")[0]
    try:
        canonical = canonical_path(path)
    except PathRejected:
        canonical = path
    if prefixes and (path.startswith(prefixes) or canonical.startswith(prefixes)):
        return "path"
    return None


def for_replay(config: Config, app: AppName, upstream_port: int, scratch: Path) -> Config:
    """``config`` with only ``app``'s listener, on a free loopback port, in front of the
    recording upstream; the admin listener on a free loopback port; events into a scratch
    file; no access log. Everything else (classic keys and prefixes, store, limits,
    routes, keys) is the config as given."""
    settings = config.settings
    replace = msgspec.structs.replace
    listener = replace(
        settings.apps[app], listen="127.0.0.1:0", upstream=f"http://127.0.0.1:{upstream_port}"
    )
    adjusted = copy.copy(config)
    adjusted.settings = replace(
        settings,
        apps={app: listener},
        admin=replace(settings.admin, listen="127.0.0.1:0"),
        events=replace(settings.events, sink=f"file://{scratch / 'events.jsonl'}"),
        access_log=replace(settings.access_log, enabled=False),
    )
    return adjusted


class _Planned(msgspec.Struct, frozen=True):
    index: int
    entry: HarEntry
    classic: Literal["key", "path"] | None
    sent: WireRequest


async def replay(
    config: Config,
    app: AppName,
    entries: Sequence[HarEntry],
    *,
    include_all: bool = False,
    timeout: float = 10.0,
) -> list[EntryResult]:
    """One result per entry, in order. Non-classic entries are skipped unless
    ``include_all``; the rest are replayed one at a time through a real gateway."""
    results: dict[int, EntryResult] = {}
    planned: list[_Planned] = []
    for index, entry in enumerate(entries):
        request = entry.request
        recorded = entry.response.status if entry.response is not None else None
        base = EntryResult(index, request.method, request.url, "skipped", None, recorded)
        try:
            classic = classic_kind(entry, config, app)
            if classic is None and not include_all:
                results[index] = msgspec.structs.replace(base, reason="not classic")
                continue
            planned.append(_Planned(index, entry, classic, wire_request(request)))
        except EntryProblem as exc:
            results[index] = msgspec.structs.replace(base, result="error", reason=str(exc))
    if planned:
        for result in await _through_gateway(config, app, planned, timeout):
            results[result.entry] = result
    return [results[index] for index in range(len(entries))]


async def _through_gateway(
    config: Config, app: AppName, planned: list[_Planned], timeout: float
) -> list[EntryResult]:
    upstream = RecordingUpstream()
    await upstream.start()
    results = []
    try:
        with tempfile.TemporaryDirectory(prefix="gateway-replay-") as scratch:
            adjusted = for_replay(config, app, upstream.port, Path(scratch))
            runtime = Runtime(adjusted)
            try:
                await runtime.start()
                port = runtime.servers[0].sockets[0].getsockname()[1]
                for plan in planned:
                    upstream.answer = wire_response(plan.entry.response, plan.sent.method)
                    answer = await send(port, plan.sent.to_bytes(), plan.sent.method, timeout)
                    received, malformed = upstream.take()
                    results.append(_judge(plan, answer, received, malformed))
            finally:
                await runtime.stop(deadline=1.0)
    finally:
        await upstream.stop()
    return results


def _judge(
    plan: _Planned, answer: Answer, received: list[Received], malformed: list[str]
) -> EntryResult:
    request = plan.entry.request
    recorded = plan.entry.response.status if plan.entry.response is not None else None
    result = EntryResult(
        plan.index, request.method, request.url, "fail", plan.classic, recorded, answer.status
    )
    difference: Difference | None
    if malformed:
        message = f"the upstream received bytes that are not an HTTP/1.1 request: {malformed[0]}"
        difference = Difference("requests", message)
    elif not received:
        why = answer.error or f"the gateway answered {answer.status} {answer.code or ''}".rstrip()
        difference = Difference("requests", f"the upstream received nothing: {why}")
    elif len(received) > 1:
        difference = Difference("requests", f"the upstream received {len(received)} requests")
    else:
        difference = first_difference(classic_view(plan.sent), received[0])
    if difference is not None:
        return msgspec.structs.replace(result, reason=difference.message, difference=difference)
    if answer.error is not None:
        why = f"the upstream got the expected bytes, but the client side failed: {answer.error}"
        return msgspec.structs.replace(result, reason=why)
    return msgspec.structs.replace(result, result="pass")
