"""Hot reload of ``routes.toml`` and ``tier_matrix.toml`` (docs/design.md §3) and the process
lifecycle of ``gateway serve``: SIGHUP reloads, SIGTERM drains in-flight requests."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import signal
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from gateway.admin import public_key_fingerprint
from gateway.license import KeyRing, generate_keypair, load_signing_key
from gateway.matrix import APP_NAMES
from tests.conftest import IssueKey, sign_key
from tests.harness import REPO, EchoUpstream, running_gateway, start_app, write_config
from tests.provisioning import provision

OPTIMIZE = "/api/v1/shipments/1/optimize"
OPTIMIZE_ROUTE = (
    'path = "/api/v1/shipments/{id}/optimize"\nfeature = "ops.basic_shipment_optimization"\n'
)
NO_WATCH = "\n[server]\nreload_poll_interval = 3600\n"  # only explicit reloads in these tests
FAST_WATCH = "\n[server]\nreload_poll_interval = 0.1\n"
DEADLINE = 15.0


# --------------------------------------------------------------------------- fixtures


class HeldUpstream(EchoUpstream):
    """An echo upstream whose ``/slow/...`` answers only when the test releases it, so a
    request is in flight for exactly as long as the test needs (no sleeps)."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.slow_started = asyncio.Event()
        self.release = asyncio.Event()

    async def _slow(self, request: web.Request) -> web.Response:
        self.slow_started.set()
        await asyncio.wait_for(self.release.wait(), DEADLINE * 2)
        return web.json_response(self._record(request, 0))


@pytest.fixture
async def upstreams() -> AsyncIterator[dict[str, HeldUpstream]]:
    """Conftest's upstreams, held (conftest's ``upstream_ports`` gives these ports)."""
    servers: dict[str, HeldUpstream] = {app: HeldUpstream(app) for app in APP_NAMES}
    for server in servers.values():
        await server.start()
    yield servers
    for server in servers.values():
        server.release.set()
        await server.stop()


# --------------------------------------------------------------------------- helpers


def sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def samples(text: str, name: str) -> list[tuple[dict[str, str], float]]:
    return [
        (sample.labels, sample.value)
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name
    ]


def reloads(text: str, result: str) -> float:
    found = [
        v
        for labels, v in samples(text, "gateway_config_reloads_total")
        if labels == {"result": result}
    ]
    return found[0] if found else 0.0


ALL_ON = "operations=on,client_portal=on,driver_app=on"


def config_info(text: str) -> list[dict[str, str]]:
    return [labels for labels, value in samples(text, "gateway_config_info") if value == 1]


def edit_routes(folder: Path, old: str, new: str) -> str:
    """Replace ``old`` (which must occur once) in the gateway's routes.toml, atomically."""
    path = folder / "routes.toml"
    text = path.read_text()
    assert text.count(old) == 1, old
    replace_file(path, text.replace(old, new))
    return text.replace(old, new)


def replace_file(path: Path, text: str) -> None:
    """Write the whole file, then rename it into place: a watcher never sees half of it."""
    scratch = path.with_suffix(".tmp")
    scratch.write_text(text)
    os.replace(scratch, path)


async def raw_exchange(port: int, request: bytes) -> tuple[int, dict[str, str], bytes]:
    """Send exact bytes on a fresh connection, read one response (status, lower-cased
    headers, body). Unlike a client library it never retries on a dropped connection."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        await writer.drain()
        head = await reader.readuntil(b"\r\n\r\n")
        status_line, *lines = head.decode("latin-1").split("\r\n")
        headers: dict[str, str] = {}
        for line in lines:
            if line:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
        body = await reader.readexactly(int(headers.get("content-length", "0")))
        return int(status_line.split()[1]), headers, body
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


async def status_of(
    client: aiohttp.ClientSession, url: str, headers: dict[str, str], method: str = "POST"
) -> int:
    async with client.request(method, url, headers=headers) as response:
        await response.read()
        return response.status


async def metrics_text(client: aiohttp.ClientSession, admin_url: str) -> str:
    async with client.get(admin_url) as response:
        assert response.status == 200
        return await response.text()


async def eventually(check: Callable[[], Awaitable[bool]], what: str) -> None:
    """Poll ``check`` until it holds; fail (not hang) after a generous deadline."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + DEADLINE
    while not await check():
        if loop.time() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


# --------------------------------------------------------------------------- in-process


@pytest.mark.parametrize(
    ("new_route", "headers_for_200"),
    [
        pytest.param(
            'path = "/api/v1/shipments/{id}/optimize"\nfeature = "ops.on_demand"\n',
            "core",
            id="feature-changed",
        ),
        pytest.param(
            'path = "/api/v1/shipments/{id}/optimize"\npublic = true\n', "none", id="made-public"
        ),
    ],
)
async def test_reload_swaps_in_the_new_routes(
    tmp_path: Path,
    key_dir: Path,
    upstream_ports: dict[str, int],
    client: aiohttp.ClientSession,
    issue_key: IssueKey,
    new_route: str,
    headers_for_200: str,
) -> None:
    headers = {"X-License-Key": issue_key(tier="core")} if headers_for_200 == "core" else {}
    async with running_gateway(tmp_path, key_dir, upstream_ports, extra=NO_WATCH) as gw:
        url = gw.url("operations", OPTIMIZE)
        assert await status_of(client, url, headers) in (401, 403)
        before = await metrics_text(client, gw.admin_url("/metrics"))
        old_matrix = config_info(before)[0]["matrix_sha"]

        new_text = edit_routes(gw.folder, OPTIMIZE_ROUTE, new_route)
        assert await gw.runtime.reload("test") is True

        assert await status_of(client, url, headers) == 200
        after = await metrics_text(client, gw.admin_url("/metrics"))
    assert reloads(before, "success") == 0
    assert reloads(after, "success") == 1
    assert reloads(after, "failure") == 0
    assert config_info(after) == [
        {"routes_sha": sha(new_text), "matrix_sha": old_matrix, "enforce": ALL_ON}
    ]


@pytest.mark.parametrize(
    ("file", "old", "new"),
    [
        pytest.param("routes.toml", OPTIMIZE_ROUTE, "path = [[\n", id="routes-syntax-error"),
        pytest.param(
            "routes.toml",
            OPTIMIZE_ROUTE,
            OPTIMIZE_ROUTE.replace("ops.basic_shipment_optimization", "ops.teleportation"),
            id="routes-unknown-feature",
        ),
        pytest.param(
            "routes.toml",
            OPTIMIZE_ROUTE,
            OPTIMIZE_ROUTE + "bogus_key = 1\n",
            id="routes-unknown-key",
        ),
        pytest.param("tier_matrix.toml", "[tiers.core]\n", "[tiers.core\n", id="matrix-syntax"),
        pytest.param(
            "tier_matrix.toml",
            'inherits = "fleet"\n',
            'inherits = "enterprise"\n',
            id="matrix-inherits-cycle",
        ),
    ],
)
async def test_broken_file_keeps_the_last_good_rules(
    tmp_path: Path,
    key_dir: Path,
    upstream_ports: dict[str, int],
    client: aiohttp.ClientSession,
    issue_key: IssueKey,
    file: str,
    old: str,
    new: str,
) -> None:
    core = {"X-License-Key": issue_key(tier="core")}
    fleet = {"X-License-Key": issue_key(tier="fleet")}
    async with running_gateway(tmp_path, key_dir, upstream_ports, extra=NO_WATCH) as gw:
        url = gw.url("operations", OPTIMIZE)
        before = await metrics_text(client, gw.admin_url("/metrics"))
        path = gw.folder / file
        good = path.read_text()
        assert good.count(old) == 1, old
        replace_file(path, good.replace(old, new))

        assert await gw.runtime.reload("test") is False

        assert await status_of(client, url, core) == 403
        assert await status_of(client, url, fleet) == 200
        after = await metrics_text(client, gw.admin_url("/metrics"))
        assert reloads(after, "failure") == 1
        assert reloads(after, "success") == 0
        assert config_info(after) == config_info(before)

        replace_file(path, good)  # fixed: the next reload succeeds again
        assert await gw.runtime.reload("test") is True
        assert await status_of(client, url, core) == 403
        fixed = await metrics_text(client, gw.admin_url("/metrics"))
    assert reloads(fixed, "success") == 1
    assert reloads(fixed, "failure") == 1


async def test_a_public_key_replaced_under_the_same_kid_stops_verifying_on_reload(
    tmp_path: Path,
    key_dir: Path,
    upstream_ports: dict[str, int],
    client: aiohttp.ClientSession,
    issue_key: IssueKey,
) -> None:
    """The ``test`` key is rotated out (or compromised) and its file replaced by a new key
    under the same kid: keys signed by the old one must stop counting at once, whether
    presented in a header (verified-key cache) or held by the store (tenant look-up)."""
    old_header_key = issue_key(tier="fleet", sub="header-tenant")
    old_stored_key = issue_key(tier="fleet", sub="stored-tenant")
    async with running_gateway(tmp_path, key_dir, upstream_ports, extra=NO_WATCH) as gw:
        url = gw.url("operations", OPTIMIZE)
        assert await gw.runtime.store.put_license(old_stored_key) is not None
        assert await status_of(client, url, {"X-License-Key": old_header_key}) == 200
        assert await status_of(client, url, {"X-Tenant-Id": "stored-tenant"}) == 200

        replacement = tmp_path / "replacement"
        generate_keypair(replacement, "test")
        replace_file(gw.folder / "keys" / "test.pub", (replacement / "test.pub").read_text())
        assert await gw.runtime.reload("test") is True

        assert await status_of(client, url, {"X-License-Key": old_header_key}) == 401
        assert await status_of(client, url, {"X-Tenant-Id": "stored-tenant"}) != 200
        new_key, _ = load_signing_key(replacement / "test.key")
        fresh = sign_key(new_key, "test", tier="fleet", sub="header-tenant", serial=2)
        assert await status_of(client, url, {"X-License-Key": fresh}) == 200


async def test_file_change_is_picked_up_by_the_watcher(
    tmp_path: Path,
    key_dir: Path,
    upstream_ports: dict[str, int],
    client: aiohttp.ClientSession,
    issue_key: IssueKey,
) -> None:
    core = {"X-License-Key": issue_key(tier="core")}
    async with running_gateway(tmp_path, key_dir, upstream_ports, extra=FAST_WATCH) as gw:
        url = gw.url("operations", OPTIMIZE)
        metrics_url = gw.admin_url("/metrics")
        assert await status_of(client, url, core) == 403

        routes = gw.folder / "routes.toml"
        good = routes.read_text()
        replace_file(routes, good + "[[routes]\n")  # broken: counted, old rules stay

        async def failure_counted() -> bool:
            return reloads(await metrics_text(client, metrics_url), "failure") >= 1

        await eventually(failure_counted, "the broken file to be noticed")
        assert await status_of(client, url, core) == 403

        edit_routes_text = good.replace(
            OPTIMIZE_ROUTE,
            OPTIMIZE_ROUTE.replace("ops.basic_shipment_optimization", "ops.on_demand"),
        )
        replace_file(routes, edit_routes_text)

        async def new_rule_applies() -> bool:
            return await status_of(client, url, core) == 200

        await eventually(new_rule_applies, "the edited routes.toml to apply")
        text = await metrics_text(client, metrics_url)
    assert reloads(text, "success") >= 1
    assert config_info(text)[0]["routes_sha"] == sha(edit_routes_text)


async def test_watcher_notices_an_edit_within_one_timestamp_tick(
    tmp_path: Path,
    key_dir: Path,
    upstream_ports: dict[str, int],
    client: aiohttp.ClientSession,
    issue_key: IssueKey,
) -> None:
    """Filesystems stamp mtimes with a coarse clock (a jiffy, or a whole second), so an
    edit right after the previous one can keep the same mtime; its size still differs."""
    core = {"X-License-Key": issue_key(tier="core")}
    async with running_gateway(tmp_path, key_dir, upstream_ports, extra=FAST_WATCH) as gw:
        url = gw.url("operations", OPTIMIZE)
        routes = gw.folder / "routes.toml"
        stamp = routes.stat()
        edited = routes.read_text().replace(
            OPTIMIZE_ROUTE, 'path = "/api/v1/shipments/{id}/optimize"\nfeature = "ops.on_demand"\n'
        )
        routes.write_text(edited)  # in place, same inode
        os.utime(routes, ns=(stamp.st_atime_ns, stamp.st_mtime_ns))

        async def new_rule_applies() -> bool:
            return await status_of(client, url, core) == 200

        await eventually(new_rule_applies, "the same-mtime edit to apply")


# --------------------------------------------------------------------------- a real process


class ServeProcess:
    """``gateway serve`` in a subprocess, reachable at the harness's ports."""

    def __init__(self, proc: asyncio.subprocess.Process, listen: dict[str, int], admin: int):
        self.proc = proc
        self.listen = listen
        self.admin = admin

    def url(self, app: str, path: str) -> str:
        return f"http://127.0.0.1:{self.listen[app]}{path}"

    def admin_url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.admin}{path}"


@contextlib.asynccontextmanager
async def serve(
    folder: Path,
    key_dir: Path,
    upstream_ports: dict[str, int],
    client: aiohttp.ClientSession,
    *,
    extra: str = "",
    workers: int = 1,
    **config: Any,
) -> AsyncIterator[ServeProcess]:
    """``gateway serve`` (``--workers N`` above 1: the supervisor and its workers)."""
    path, listen, admin = write_config(
        folder, key_dir, upstream_ports, extra=NO_WATCH + extra, **config
    )
    log_path = folder / "serve.log"
    with log_path.open("wb") as log:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "gateway.cli",
            "serve",
            "--config",
            str(path),
            "--workers",
            str(workers),
            cwd=REPO,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=log,
            stderr=log,
        )
    running = ServeProcess(proc, listen, admin)
    try:

        async def ready() -> bool:
            if proc.returncode is not None:
                pytest.fail(f"gateway serve exited {proc.returncode}:\n{log_path.read_text()}")
            try:
                async with client.get(running.admin_url("/readyz")) as response:
                    return response.status == 200
            except aiohttp.ClientConnectionError:
                return False

        await eventually(ready, "gateway serve to be ready")
        yield running
    finally:
        if proc.returncode is None and workers > 1:
            proc.terminate()  # the supervisor stops its workers (a kill would orphan them)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(proc.wait(), DEADLINE)
        if proc.returncode is None:
            proc.kill()
        await proc.wait()


async def test_sighup_reloads_a_running_process(
    tmp_path: Path,
    key_dir: Path,
    upstream_ports: dict[str, int],
    client: aiohttp.ClientSession,
    issue_key: IssueKey,
) -> None:
    core = {"X-License-Key": issue_key(tier="core")}
    async with serve(tmp_path, key_dir, upstream_ports, client) as gw:
        url = gw.url("operations", OPTIMIZE)
        metrics_url = gw.admin_url("/metrics")
        assert await status_of(client, url, core) == 403

        new_text = edit_routes(
            tmp_path,
            OPTIMIZE_ROUTE,
            OPTIMIZE_ROUTE.replace("ops.basic_shipment_optimization", "ops.on_demand"),
        )
        gw.proc.send_signal(signal.SIGHUP)

        async def new_rule_applies() -> bool:
            return await status_of(client, url, core) == 200

        await eventually(new_rule_applies, "SIGHUP to reload routes.toml")
        text = await metrics_text(client, metrics_url)
        assert reloads(text, "success") == 1
        assert config_info(text)[0]["routes_sha"] == sha(new_text)

        replace_file(tmp_path / "routes.toml", new_text + "[[routes]\n")
        gw.proc.send_signal(signal.SIGHUP)

        async def failure_counted() -> bool:
            return reloads(await metrics_text(client, metrics_url), "failure") == 1

        await eventually(failure_counted, "SIGHUP with a broken file to be counted")
        assert await status_of(client, url, core) == 200  # the last good rules stay
        gw.proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(gw.proc.wait(), DEADLINE) == 0


async def test_sigterm_drains_in_flight_requests_and_refuses_new_ones(
    tmp_path: Path,
    key_dir: Path,
    upstreams: dict[str, HeldUpstream],
    upstream_ports: dict[str, int],
    client: aiohttp.ClientSession,
    issue_key: IssueKey,
) -> None:
    core = {"X-License-Key": issue_key(tier="core")}
    held = upstreams["operations"]
    async with serve(tmp_path, key_dir, upstream_ports, client) as gw:

        async def slow_request() -> tuple[int, dict[str, str], bytes]:
            return await raw_exchange(
                gw.listen["operations"],
                b"GET /slow/1 HTTP/1.1\r\nHost: ops.example\r\nX-License-Key: "
                + core["X-License-Key"].encode()
                + b"\r\n\r\n",
            )

        # a keep-alive connection that is idle when SIGTERM comes must not hold up the exit
        idle_reader, idle_writer = await asyncio.open_connection(
            "127.0.0.1", gw.listen["client_portal"]
        )
        idle_writer.write(b"GET /api/v1/health HTTP/1.1\r\nHost: portal.example\r\n\r\n")
        head = await idle_reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 ")
        length = next(
            int(line.split(b":")[1])
            for line in head.lower().split(b"\r\n")
            if line.startswith(b"content-length:")
        )
        await idle_reader.readexactly(length)

        in_flight = asyncio.get_running_loop().create_task(slow_request())
        await asyncio.wait_for(held.slow_started.wait(), DEADLINE)

        gw.proc.send_signal(signal.SIGTERM)

        async def refused() -> bool:
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", gw.listen["operations"])
            except ConnectionRefusedError:
                return True
            except ConnectionResetError:
                # Caught in the listen backlog as the listener closed: the kernel resets it.
                return False
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()
            return False

        await eventually(refused, "the listener to close after SIGTERM")
        assert await asyncio.wait_for(idle_reader.read(), DEADLINE) == b""  # closed by the gateway
        idle_writer.close()
        for app in APP_NAMES:
            with pytest.raises(ConnectionRefusedError):
                await asyncio.open_connection("127.0.0.1", gw.listen[app])
        async with client.get(gw.admin_url("/readyz")) as response:
            assert response.status == 503  # draining: take this instance out of rotation
            assert (await response.json())["draining"] is True
        assert not in_flight.done()  # the upstream has not answered yet

        held.release.set()
        status, headers, body = await asyncio.wait_for(in_flight, DEADLINE)
        assert status == 200
        assert json.loads(body)["path"] == "/slow/1"
        assert headers["connection"].lower() == "close"
        assert await asyncio.wait_for(gw.proc.wait(), DEADLINE) == 0


async def test_a_reload_with_new_keys_reaches_the_stores_verification(
    tmp_path: Path,
    key_dir: Path,
    upstream_ports: dict[str, int],
    issue_key: IssueKey,
    provision_secret: str,
) -> None:
    extra = NO_WATCH + '\n[store]\nurl = "sqlite://tenants.db"\n'  # verifies keys it reads
    async with (
        running_gateway(tmp_path, key_dir, upstream_ports, extra=extra) as gateway,
        aiohttp.ClientSession() as session,
    ):

        async def by_tenant() -> tuple[int, str | None]:
            url = gateway.url("operations", "/api/v1/account")
            async with session.get(url, headers={"X-Tenant-Id": "acme"}) as response:
                code = (await response.json())["code"] if response.status != 200 else None
                return response.status, code

        old = issue_key(sub="acme", serial=1)
        body = {"event_id": "e1", "action": "license", "tenant": "acme", "key": old}
        assert await provision(session, gateway, body) == (200, {"applied": True})
        # A new kid appears in the gateway's key folder, the old one goes: reload.
        new_private, _ = generate_keypair(tmp_path / "keys", "k2")
        (tmp_path / "keys" / "test.pub").unlink()
        assert await gateway.runtime.reload("test")
        # The store verifies what it holds with the new ring: the old kid's key is gone...
        assert await by_tenant() == (401, "license_missing")
        # ...and a key of the new kid is accepted by the hook and stored.
        new = sign_key(load_signing_key(new_private)[0], "k2", sub="acme", serial=2)
        body = {"event_id": "e2", "action": "license", "tenant": "acme", "key": new}
        assert await provision(session, gateway, body) == (200, {"applied": True})
        assert await by_tenant() == (200, None)


def event_lines(path: Path, kind: str) -> list[dict[str, object]]:
    if not path.exists():
        return []
    found = [json.loads(line) for line in path.read_text().splitlines() if line]
    return [event for event in found if event.get("event") == kind]


@pytest.mark.parametrize(
    "workers", [pytest.param(1, id="one-process"), pytest.param(2, id="supervisor-forwards")]
)
async def test_sigusr1_reopens_the_event_and_access_log_files_logrotate_moved(
    tmp_path: Path,
    key_dir: Path,
    upstream_ports: dict[str, int],
    client: aiohttp.ClientSession,
    issue_key: IssueKey,
    workers: int,
) -> None:
    """logrotate's ``postrotate`` sends SIGUSR1 (with ``--workers``, to the supervisor):
    the files are opened again by name, the next event lands in the new file, and the
    process keeps serving (SIGUSR1's default action is to terminate)."""
    core = {"X-License-Key": issue_key(tier="core")}
    extra = '\n[access_log]\nsink = "file://access.jsonl"\n'
    if workers > 1:
        extra += '\n[store]\nurl = "sqlite://tenants.db"\n'  # workers need a shared store
    events, access = tmp_path / "events.jsonl", tmp_path / "access.jsonl"
    rotated = tmp_path / "events.jsonl.1"
    async with serve(tmp_path, key_dir, upstream_ports, client, extra=extra, workers=workers) as gw:
        url = gw.url("operations", OPTIMIZE)
        assert await status_of(client, url, core) == 403

        async def blocked_in(path: Path) -> bool:
            return len(event_lines(path, "feature_block")) == 1

        await eventually(lambda: blocked_in(events), "the first feature_block to be written")
        os.replace(events, rotated)
        os.replace(access, tmp_path / "access.jsonl.1")
        gw.proc.send_signal(signal.SIGUSR1)

        async def reopened() -> bool:
            # Nothing writes to the access log yet: only a reopen creates the file again.
            return events.exists() and access.exists()

        await eventually(reopened, "SIGUSR1 to open the files again")
        assert await status_of(client, url, core) == 403
        await eventually(lambda: blocked_in(events), "the next feature_block in the new file")
        assert len(event_lines(rotated, "feature_block")) == 1
        gw.proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(gw.proc.wait(), DEADLINE) == 0


class Collector:
    """A real HTTP events collector that refuses batches (503) until ``accept`` is set."""

    def __init__(self) -> None:
        self.accept = asyncio.Event()
        self.refused = asyncio.Event()
        self.events: list[dict[str, object]] = []
        self.port = 0
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/ingest", self._ingest)
        self._runner, self.port = await start_app(app)

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _ingest(self, request: web.Request) -> web.Response:
        body = await request.read()
        if not self.accept.is_set():
            self.refused.set()
            return web.Response(status=503)
        self.events += [json.loads(line) for line in body.splitlines() if line]
        return web.Response(status=204)


async def test_shutdown_delivers_queued_events_to_the_http_collector_before_exit(
    tmp_path: Path,
    key_dir: Path,
    upstream_ports: dict[str, int],
    client: aiohttp.ClientSession,
    issue_key: IssueKey,
) -> None:
    """Events still queued (the collector was refusing them) when SIGTERM comes are
    delivered within ``events.flush_deadline`` once it takes them, then the process exits."""
    collector = Collector()
    await collector.start()
    sink = f'sink = "http://127.0.0.1:{collector.port}/ingest"\n'
    events = sink + f"retry_max_backoff = 0.2\nflush_deadline = {DEADLINE}\n"
    core = {"X-License-Key": issue_key(tier="core", sub="acme")}
    try:
        async with serve(tmp_path, key_dir, upstream_ports, client, events=events) as gw:
            for _ in range(3):
                assert await status_of(client, gw.url("operations", OPTIMIZE), core) == 403
            await asyncio.wait_for(collector.refused.wait(), DEADLINE)
            gw.proc.send_signal(signal.SIGTERM)
            collector.accept.set()
            assert await asyncio.wait_for(gw.proc.wait(), DEADLINE * 2) == 0
    finally:
        await collector.stop()
    blocks = [event for event in collector.events if event["event"] == "feature_block"]
    assert [event["tenant"] for event in blocks] == ["acme"] * 3


async def test_start_and_reload_log_the_loaded_key_ids_and_fingerprints(
    tmp_path: Path,
    key_dir: Path,
    upstream_ports: dict[str, int],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Operators compare pods from their logs: which keys each one verifies with."""
    fingerprint = public_key_fingerprint(KeyRing.load(key_dir).keys["test"])
    caplog.set_level(logging.INFO, logger="gateway.runtime")
    async with running_gateway(tmp_path, key_dir, upstream_ports, extra=NO_WATCH) as gw:
        (started,) = [r.message for r in caplog.records if r.message.startswith("started:")]
        assert f"keys test {fingerprint}" in started
        caplog.clear()
        assert await gw.runtime.reload("test") is True
    (reloaded,) = [r.message for r in caplog.records if r.message.startswith("reload (test)")]
    assert f"keys test {fingerprint}" in reloaded
