"""Real peers for integration tests: upstream HTTP servers on loopback and a gateway
runtime configured to sit in front of them. Nothing here mocks a gateway component."""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import socket
import subprocess
import textwrap
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from contextlib import AsyncExitStack, asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any, TypeVar

from aiohttp import web

from gateway.config import load_config
from gateway.matrix import APP_NAMES
from gateway.runtime import Runtime

REPO = Path(__file__).resolve().parent.parent


_handed_out: set[int] = set()


def free_port() -> int:
    """A loopback port nothing listens on, never one this process was given before: the
    kernel may hand a just-closed port out again, and a gateway's listeners each take one."""
    while True:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port: int = sock.getsockname()[1]
        if port not in _handed_out:
            _handed_out.add(port)
            return port


def stop_process(
    process: subprocess.Popen[bytes], *, kill: bool = False, grace: float = 10.0
) -> None:
    """Stop a child by its pid: SIGTERM (SIGKILL with ``kill``, a crash), then SIGKILL when it
    has not exited within ``grace`` seconds; returns once the process is gone."""
    if process.poll() is None:
        if kill:
            process.kill()
        else:
            process.terminate()
        try:
            process.wait(grace)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


async def start_app(app: web.Application, port: int = 0) -> tuple[web.AppRunner, int]:
    """Serve ``app`` on loopback ``port`` (0: a free one): its runner (``cleanup()`` stops
    it) and the port."""
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", port)
    await site.start()
    server = site._server
    assert isinstance(server, asyncio.base_events.Server)
    return runner, server.sockets[0].getsockname()[1]


class EchoUpstream:
    """An aiohttp app that answers with what it received, like the demo upstreams.

    Special paths: ``/slow/{seconds}`` waits before answering, ``/download/{n}`` streams n
    bytes, ``/upload`` counts the request body as it streams in, ``/ws`` is a WebSocket echo.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self.requests: list[dict[str, Any]] = []
        self.port = 0
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        app = web.Application(client_max_size=1 << 40)
        app.router.add_get("/ws", self._ws)
        app.router.add_route("*", "/slow/{seconds}", self._slow)
        app.router.add_get("/download/{size}", self._download)
        app.router.add_route("*", "/upload", self._upload)
        app.router.add_route("*", "/{tail:.*}", self._echo)
        self._runner, self.port = await start_app(app)

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    def _record(self, request: web.Request, body_length: int) -> dict[str, Any]:
        seen = {
            "app": self.name,
            "method": request.method,
            "path": request.raw_path,
            "headers": dict(request.headers),
            "body_length": body_length,
        }
        self.requests.append(seen)
        return seen

    async def _echo(self, request: web.Request) -> web.Response:
        body = await request.read()
        return web.json_response(self._record(request, len(body)))

    async def _slow(self, request: web.Request) -> web.Response:
        await asyncio.sleep(float(request.match_info["seconds"]))
        return web.json_response(self._record(request, 0))

    async def _download(self, request: web.Request) -> web.StreamResponse:
        size = int(request.match_info["size"])
        self._record(request, 0)
        response = web.StreamResponse()
        response.content_length = size
        await response.prepare(request)
        chunk = b"x" * 65536
        sent = 0
        while sent < size:
            piece = chunk[: min(len(chunk), size - sent)]
            await response.write(piece)
            sent += len(piece)
        await response.write_eof()
        return response

    async def _upload(self, request: web.Request) -> web.Response:
        total = 0
        async for piece in request.content.iter_any():
            total += len(piece)
        return web.json_response(self._record(request, total))

    async def _ws(self, request: web.Request) -> web.WebSocketResponse:
        self._record(request, 0)
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        async for message in ws:
            await ws.send_str(f"echo:{message.data}")
        return ws


class RawUpstream:
    """A TCP server that records the raw bytes of each connection and answers every
    request head with a fixed raw response (for byte-identity tests).

    With ``stall``, it answers the first head (``response`` may be empty) and then never
    reads again: a slow backend, before or after a 101. With ``flood`` as well, it then
    sends WebSocket-ish frames for as long as the connection takes them."""

    FRAME = b"\x82\x7e\xff\xff" + b"x" * 65535

    def __init__(self, response: bytes, *, stall: bool = False, flood: bool = False) -> None:
        self.response = response
        self.stall = stall
        self.flood = flood
        self.received = bytearray()
        self.port = 0
        self._server: asyncio.Server | None = None
        self.got_request = asyncio.Event()
        self._stopping = asyncio.Event()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                data = await reader.read(65536)
                if not data:
                    break
                self.received += data
                if b"\r\n\r\n" in self.received:
                    self.got_request.set()
                    writer.write(self.response)
                    await writer.drain()
                    if self.stall:
                        while self.flood and not self._stopping.is_set():
                            writer.write(self.FRAME)
                            await writer.drain()
                        await self._stopping.wait()
                        break
        finally:
            writer.close()

    async def stop(self) -> None:
        self._stopping.set()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()


def write_config(
    folder: Path,
    key_dir: Path,
    upstream_ports: Mapping[str, int],
    *,
    extra: str = "",
    app_extra: str | Mapping[str, str] = "",
    routes: Path | None = None,
    events: str = 'sink = "file://events.jsonl"',
    shipped: bool = False,
) -> tuple[Path, dict[str, int], int]:
    """A gateway.toml in ``folder`` with free listener ports; returns (path, ports, admin).
    ``app_extra`` goes into every ``[apps.<name>]`` section, or, as a mapping, into the
    section of each app it names; ``events`` is the body of its ``[events]`` section. With
    ``shipped``, the file is the repository's gateway.toml with only those changed."""
    per_app = dict.fromkeys(APP_NAMES, app_extra) if isinstance(app_extra, str) else app_extra
    shutil.copy(routes or REPO / "routes.toml", folder / "routes.toml")
    shutil.copy(REPO / "tier_matrix.toml", folder / "tier_matrix.toml")
    keys = folder / "keys"
    keys.mkdir(exist_ok=True)
    for pub in key_dir.glob("*.pub"):
        shutil.copy(pub, keys / pub.name)
    listen: dict[str, int] = {app: free_port() for app in APP_NAMES}
    admin = free_port()
    if shipped:
        text = (REPO / "gateway.toml").read_text()
        for app in APP_NAMES:
            text = _edit_section(
                text,
                f"apps.{app}",
                {"listen": f'"127.0.0.1:{listen[app]}"',
                 "upstream": f'"http://127.0.0.1:{upstream_ports[app]}"'},
                per_app.get(app, ""),
            )  # fmt: skip
        text = _edit_section(text, "admin", {"listen": f'"127.0.0.1:{admin}"'})
        text = _edit_section(text, "events", {"sink": events.removeprefix("sink = ")})
    else:
        sections = []
        for app in APP_NAMES:
            sections.append(
                textwrap.dedent(
                    f"""
                    [apps.{app}]
                    listen = "127.0.0.1:{listen[app]}"
                    upstream = "http://127.0.0.1:{upstream_ports[app]}"
                    classic_path_prefixes = ["/xdispatch/"]
                    """
                )
                + per_app.get(app, "")
            )
        text = "\n".join(sections) + textwrap.dedent(
            f"""
            [admin]
            listen = "127.0.0.1:{admin}"

            [events]
            """
        )
        text += events
    text += "\n" + extra
    if "[access_log]" not in text:  # into a file, never the test runner's stdout
        text += '\n[access_log]\nsink = "file://access.jsonl"\n'
    path = folder / "gateway.toml"
    path.write_text(text)
    return path, listen, admin


def _edit_section(text: str, name: str, values: Mapping[str, str], append: str = "") -> str:
    """``text`` (TOML) with the keys of section ``[name]`` set to ``values`` (TOML values)
    and ``append`` added at the section's end; every key must be there already."""
    header = f"[{name}]\n"
    start = text.index(header) + len(header)
    found = re.search(r"^\[", text[start:], re.M)
    end = start + found.start() if found else len(text)
    body = text[start:end]
    for key, value in values.items():
        body, count = re.subn(rf"^{re.escape(key)} = .*$", f"{key} = {value}", body, flags=re.M)
        assert count == 1, f"the shipped gateway.toml has no {key} in [{name}]: adapt this"
    if append:
        body = body.rstrip("\n") + "\n" + append.rstrip("\n") + "\n\n"
    return text[:start] + body + text[end:]


def write_candidate_matrix(folder: Path, name: str = "tier_matrix.next.toml") -> Path:
    """A candidate ``tier_matrix.toml`` for ``[candidate]``: the shipped one with Basic
    Shipment Optimization moved down from Fleet into Core (a pricing change), so a Core
    key's ``POST /api/v1/shipments/{id}/optimize`` is ``newly_allowed``."""
    text = (REPO / "tier_matrix.toml").read_text()
    core = 'features = ["ops.on_demand", "portal.on_demand", "driver.on_demand"]'
    fleet = '    "ops.basic_shipment_optimization",\n'
    assert core in text and fleet in text, "the shipped tier matrix changed: adapt this"
    text = text.replace(fleet, "", 1).replace(
        core,
        'features = ["ops.on_demand", "ops.basic_shipment_optimization", '
        '"portal.on_demand", "driver.on_demand"]',
    )
    path = folder / name
    path.write_text(text)
    return path


class Gateway:
    """A started runtime and where to reach it."""

    def __init__(self, runtime: Runtime, listen: dict[str, int], admin: int, folder: Path):
        self.runtime = runtime
        self.listen = listen
        self.admin = admin
        self.folder = folder

    def url(self, app: str, path: str) -> str:
        return f"http://127.0.0.1:{self.listen[app]}{path}"

    def admin_url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.admin}{path}"

    def events(self) -> list[dict[str, Any]]:
        self.runtime.events.flush_now()
        path = self.folder / "events.jsonl"
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line]


@asynccontextmanager
async def running_gateway(
    folder: Path,
    key_dir: Path,
    upstream_ports: Mapping[str, int],
    **config: Any,
) -> AsyncIterator[Gateway]:
    path, listen, admin = write_config(folder, key_dir, upstream_ports, **config)
    runtime = Runtime(load_config(path))
    await runtime.start()
    try:
        yield Gateway(runtime, listen, admin, folder)
    finally:
        await runtime.stop(deadline=2.0)


@asynccontextmanager
async def two_gateways(
    folder: Path, key_dir: Path, upstream_ports: Mapping[str, int], **config: Any
) -> AsyncIterator[tuple[Gateway, Gateway]]:
    """A fleet of two: gateways in ``folder/a`` and ``folder/b`` with the same settings (a
    shared store comes in ``extra``), in front of the same upstreams."""
    (folder / "a").mkdir()
    (folder / "b").mkdir()
    async with (
        running_gateway(folder / "a", key_dir, upstream_ports, **config) as a,
        running_gateway(folder / "b", key_dir, upstream_ports, **config) as b,
    ):
        yield a, b


T = TypeVar("T")


class GatewayThread:
    """A gateway (``running_gateway``) in front of echo upstreams, all on an event loop in a
    thread of their own: for synchronous clients, which block the thread they run in (the
    Playwright browser tests, schemathesis). ``run`` executes a coroutine there."""

    def __init__(self, loop: asyncio.AbstractEventLoop, gateway: Gateway) -> None:
        self.loop = loop
        self.gateway = gateway

    def run(self, coroutine: Awaitable[T]) -> T:
        async def wrapped() -> T:
            return await coroutine

        return asyncio.run_coroutine_threadsafe(wrapped(), self.loop).result(timeout=30)

    def events(self, kind: str | None = None) -> list[dict[str, Any]]:
        """The events written so far (flushed on the gateway's loop, which owns the queue)."""

        async def flushed() -> list[dict[str, Any]]:
            return self.gateway.events()

        found = self.run(flushed())
        return [event for event in found if kind is None or event["event"] == kind]


@contextmanager
def gateway_in_thread(folder: Path, key_dir: Path, **config: Any) -> Iterator[GatewayThread]:
    """``running_gateway(folder, key_dir, <echo upstreams>, **config)`` on a loop in another
    thread, stopped (gateway, upstreams, loop) on leaving."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="gateway", daemon=True)
    thread.start()
    stack = AsyncExitStack()

    async def start() -> Gateway:
        upstreams = {app: EchoUpstream(app) for app in APP_NAMES}
        for upstream in upstreams.values():
            await upstream.start()
            stack.push_async_callback(upstream.stop)
        ports: dict[str, int] = {app: upstream.port for app, upstream in upstreams.items()}
        return await stack.enter_async_context(running_gateway(folder, key_dir, ports, **config))

    try:
        gateway = asyncio.run_coroutine_threadsafe(start(), loop).result(timeout=30)
        yield GatewayThread(loop, gateway)
    finally:
        asyncio.run_coroutine_threadsafe(stack.aclose(), loop).result(timeout=30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)
        loop.close()


Factory = Callable[..., Any]
