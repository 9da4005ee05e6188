"""Framing and per-request state over raw sockets: close-delimited upstream responses,
pipelined requests keeping their own Connection tokens, long uploads, public paths."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from gateway.matrix import APP_NAMES
from tests.conftest import IssueKey
from tests.harness import EchoUpstream, Gateway, running_gateway


class CloseDelimitedUpstream:
    """Answers every request with a body that ends only when it closes the connection."""

    def __init__(self) -> None:
        self.port = 0
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nConnection: close\r\n\r\n")
        writer.write(b"hello close-delimited")
        await writer.drain()
        writer.close()

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()


async def test_a_close_delimited_response_arrives_whole(
    tmp_path: Path, key_dir: Path, upstreams: dict[str, EchoUpstream]
) -> None:
    odd = CloseDelimitedUpstream()
    await odd.start()
    ports = {app: server.port for app, server in upstreams.items()}
    ports["operations"] = odd.port
    try:
        async with (
            running_gateway(tmp_path, key_dir, ports) as gateway,
            aiohttp.ClientSession() as session,
        ):
            async with session.get(gateway.url("operations", "/api/v1/health")) as response:
                assert response.status == 200
                assert await response.read() == b"hello close-delimited"
            async with session.get(gateway.admin_url("/metrics")) as response:
                metrics = await response.text()
            assert 'gateway_requests_total{app="operations",outcome="public"} 1.0' in metrics
            assert 'outcome="upstream_error"} 1.0' not in metrics
    finally:
        await odd.stop()


async def test_pipelined_requests_keep_their_own_connection_tokens(gateway: Gateway) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", gateway.listen["operations"])
    writer.write(
        b"GET /api/v1/health HTTP/1.1\r\nHost: x\r\n\r\n"
        b"GET /api/v1/health?b HTTP/1.1\r\nHost: x\r\nX-Keep: mine\r\n"
        b"Connection: x-hop\r\nX-Hop: should-drop\r\n\r\n"
        b"GET /api/v1/health?c HTTP/1.1\r\nHost: x\r\nConnection: x-keep, close\r\n\r\n"
    )
    await writer.drain()
    bodies = []
    for _ in range(3):
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        length = int(head.split(b"Content-Length: ")[1].split(b"\r\n")[0])
        bodies.append(json.loads(await reader.readexactly(length)))
    writer.close()
    second = {k.lower(): v for k, v in bodies[1]["headers"].items()}
    assert second.get("x-keep") == "mine"
    assert "x-hop" not in second


async def test_a_slow_upload_is_not_cut_by_the_upstream_read_timeout(
    tmp_path: Path, key_dir: Path, upstreams: dict[str, EchoUpstream], issue_key: IssueKey
) -> None:
    ports = {app: server.port for app, server in upstreams.items()}
    async with running_gateway(
        tmp_path, key_dir, ports, app_extra="read_timeout = 0.4\n"
    ) as gateway:
        reader, writer = await asyncio.open_connection("127.0.0.1", gateway.listen["operations"])
        key = issue_key(tier="core").encode()
        writer.write(
            b"POST /upload HTTP/1.1\r\nHost: x\r\nX-License-Key: "
            + key
            + b"\r\nContent-Length: 6\r\n\r\n"
        )
        for _ in range(6):  # 6 x 0.2 s = three read timeouts' worth of uploading
            writer.write(b"z")
            await writer.drain()
            await asyncio.sleep(0.2)
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        writer.close()
        assert head.startswith(b"HTTP/1.1 200 ")


@pytest.fixture
async def revoked_setup(
    tmp_path: Path, key_dir: Path, upstreams: dict[str, EchoUpstream], issue_key: IssueKey
) -> AsyncIterator[tuple[Gateway, str]]:
    import base64

    key = issue_key(sub="acme", tier="fleet")
    jti = json.loads(base64.urlsafe_b64decode(key.split(".")[1] + "=="))["jti"]
    (tmp_path / "tenants.toml").write_text(
        f'[[tenants]]\nid = "acme"\nkeys = ["{key}"]\nrevoked = ["{jti}"]\n'
    )
    ports: dict[str, int] = {app: upstreams[app].port for app in APP_NAMES}
    extra = '\n[store]\nseed = "tenants.toml"\n'
    async with running_gateway(tmp_path, key_dir, ports, extra=extra) as gateway:
        yield gateway, key


async def test_a_revoked_key_on_an_unlisted_method_of_a_public_path_is_refused(
    revoked_setup: tuple[Gateway, str],
) -> None:
    gateway, key = revoked_setup
    async with aiohttp.ClientSession() as session:
        # /api/v1/auth/login is public for POST only: a GET there needs a valid license.
        async with session.get(
            gateway.url("operations", "/api/v1/auth/login"), headers={"X-License-Key": key}
        ) as response:
            assert response.status == 401
            assert (await response.json())["code"] == "license_revoked"


def _request_id_seen(seen: dict[str, Any]) -> str:
    (value,) = [v for k, v in seen["headers"].items() if k.lower() == "x-request-id"]
    assert isinstance(value, str)
    return value


async def test_the_request_id_goes_upstream_and_comes_back(
    gateway: Gateway, client: aiohttp.ClientSession, issue_key: IssueKey
) -> None:
    headers = {"X-License-Key": issue_key(tier="core")}
    async with client.get(gateway.url("operations", "/api/v1/shipments"), headers=headers) as r:
        assert r.headers["X-Request-Id"] == _request_id_seen(await r.json())
    headers["X-Request-Id"] = "trace-42"
    async with client.get(gateway.url("operations", "/api/v1/shipments"), headers=headers) as r:
        assert _request_id_seen(await r.json()) == "trace-42"
        assert r.headers["X-Request-Id"] == "trace-42"
    async with client.get(
        gateway.url("operations", "/api/v1/shipments"), headers={"X-Request-Id": "trace-43"}
    ) as r:
        assert r.status == 401
        assert r.headers["X-Request-Id"] == "trace-43"
