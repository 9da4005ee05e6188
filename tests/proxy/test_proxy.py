"""The proxy over real sockets: a real gateway runtime in front of real aiohttp upstreams."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp

from gateway.matrix import APP_NAMES
from tests.conftest import IssueKey
from tests.harness import EchoUpstream, Gateway, RawUpstream, running_gateway


async def test_allowed_request_reaches_upstream_with_entitlement_headers(
    gateway: Gateway,
    client: aiohttp.ClientSession,
    issue_key: IssueKey,
    upstreams: dict[str, EchoUpstream],
) -> None:
    key = issue_key(tier="fleet", sub="acme")
    async with client.post(
        gateway.url("operations", "/api/v1/shipments/7/optimize?fast=1"),
        headers={"X-License-Key": key, "X-Entitlement-Tier": "enterprise"},
        data=b"{}",
    ) as response:
        assert response.status == 200
        seen = await response.json()
    assert seen["path"] == "/api/v1/shipments/7/optimize?fast=1"
    headers = seen["headers"]
    assert headers["X-Entitlement-Tenant"] == "acme"
    assert headers["X-Entitlement-Tier"] == "fleet"  # the spoofed "enterprise" is gone
    assert "ops.basic_shipment_optimization" in headers["X-Entitlement-Features"].split(",")
    assert headers["X-Forwarded-For"] == "127.0.0.1"
    assert seen["body_length"] == 2


async def test_blocked_request_gets_problem_json_metric_and_event(
    gateway: Gateway, client: aiohttp.ClientSession, issue_key: IssueKey
) -> None:
    key = issue_key(tier="core", sub="acme")
    async with client.post(
        gateway.url("operations", "/api/v1/shipments/7/optimize"),
        headers={"X-License-Key": key},
    ) as response:
        assert response.status == 403
        assert response.headers["Content-Type"] == "application/problem+json"
        body = await response.json()
    assert body["code"] == "feature_not_entitled"
    assert body["feature"] == "ops.basic_shipment_optimization"
    assert body["required_tier"] == "fleet"
    assert body["addon"] == "advanced_shipment_optimization"
    feature = "ops.basic_shipment_optimization"
    assert body["upgrade"] == f"/_entitlements/ui?from={body['request_id']}&feature={feature}"
    async with client.get(gateway.admin_url("/metrics")) as response:
        metrics = await response.text()
    assert (
        'gateway_feature_block_total{app="operations",'
        'feature="ops.basic_shipment_optimization",tier="core"} 1.0' in metrics
    )
    events = [e for e in gateway.events() if e["event"] == "feature_block"]
    assert (
        events and events[0]["tenant"] == "acme" and events[0]["request_id"] == body["request_id"]
    )
    assert key not in (gateway.folder / "events.jsonl").read_text()


async def test_classic_request_is_forwarded_byte_for_byte(
    tmp_path: Path, key_dir: Path, upstreams: dict[str, EchoUpstream]
) -> None:
    raw_response = (
        b"HTTP/1.1 200 OK\r\nX-Classic: yes\r\nSet-Cookie: a=b\r\nContent-Length: 5\r\n\r\nhello"
    )
    raw = RawUpstream(raw_response)
    await raw.start()
    ports = {app: server.port for app, server in upstreams.items()}
    ports["operations"] = raw.port
    request = (
        b"POST /api/v1/shipments/7/optimize?x=1 HTTP/1.1\r\n"
        b"Host: ops.example\r\n"
        b"X-License-Key: ABCDE-12345-FGHIJ-67890-KLMNO\r\n"
        b"x-lower-case: Value  with  spaces\r\n"
        b"Content-Length: 4\r\n"
        b"\r\n"
        b"ping"
    )
    try:
        async with running_gateway(tmp_path, key_dir, ports) as gateway:
            reader, writer = await asyncio.open_connection(
                "127.0.0.1", gateway.listen["operations"]
            )
            writer.write(request)
            await writer.drain()
            received = await asyncio.wait_for(reader.readexactly(len(raw_response)), 5)
            writer.close()
            await asyncio.wait_for(raw.got_request.wait(), 5)
            for _ in range(50):  # the body may arrive a moment after the head
                if len(raw.received) >= len(request):
                    break
                await asyncio.sleep(0.02)
    finally:
        await raw.stop()
    assert bytes(raw.received) == request
    assert received == raw_response


async def test_public_route_needs_no_license_and_missing_license_is_401(
    gateway: Gateway, client: aiohttp.ClientSession
) -> None:
    async with client.get(gateway.url("driver_app", "/api/v1/health")) as response:
        assert response.status == 200
    async with client.get(gateway.url("driver_app", "/api/v1/jobs")) as response:
        assert response.status == 401
        assert (await response.json())["code"] == "license_missing"


async def test_ambiguous_path_is_rejected(gateway: Gateway, issue_key: IssueKey) -> None:
    key = issue_key(tier="core")
    reader, writer = await asyncio.open_connection("127.0.0.1", gateway.listen["operations"])
    writer.write(
        b"POST /api/v1/public/..%2Fshipments/1/optimize HTTP/1.1\r\nHost: x\r\n"
        b"X-License-Key: " + key.encode() + b"\r\nContent-Length: 0\r\n\r\n"
    )
    await writer.drain()
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    writer.close()
    assert head.startswith(b"HTTP/1.1 400 ")


async def test_upstream_down_is_502_problem(
    tmp_path: Path, key_dir: Path, issue_key: IssueKey, client: aiohttp.ClientSession
) -> None:
    from tests.harness import free_port

    ports: dict[str, int] = {app: free_port() for app in APP_NAMES}  # nothing listens there
    async with running_gateway(tmp_path, key_dir, ports) as gateway:
        async with client.get(
            gateway.url("operations", "/api/v1/shipments"),
            headers={"X-License-Key": issue_key(tier="core")},
        ) as response:
            assert response.status == 502
            assert (await response.json())["code"] == "upstream_refused"


async def test_streams_large_bodies_both_ways(
    gateway: Gateway, client: aiohttp.ClientSession, issue_key: IssueKey
) -> None:
    size = 64 * 1024 * 1024
    headers = {"X-License-Key": issue_key(tier="core")}

    async def body() -> AsyncIterator[bytes]:
        chunk = b"y" * 65536
        for _ in range(size // len(chunk)):
            yield chunk

    async with client.post(
        gateway.url("operations", "/upload"), headers=headers, data=body()
    ) as response:
        assert response.status == 200
        assert (await response.json())["body_length"] == size
    received = 0
    async with client.get(
        gateway.url("operations", f"/download/{size}"), headers=headers
    ) as response:
        assert response.status == 200
        async for piece in response.content.iter_any():
            received += len(piece)
    assert received == size


async def test_websocket_upgrade_is_tunnelled(
    gateway: Gateway, client: aiohttp.ClientSession, issue_key: IssueKey
) -> None:
    headers = {"X-License-Key": issue_key(tier="core")}
    async with client.ws_connect(gateway.url("operations", "/ws"), headers=headers) as ws:
        await ws.send_str("hello")
        message = await asyncio.wait_for(ws.receive(), 5)
        assert message.data == "echo:hello"


async def _echoes(ws: aiohttp.ClientWebSocketResponse, rounds: int) -> None:
    """``rounds`` round trips, a tenth of a second apart."""
    for n in range(rounds):
        await asyncio.sleep(0.1)
        await ws.send_str(f"m{n}")
        message = await asyncio.wait_for(ws.receive(), 5)
        assert message.data == f"echo:m{n}", message


async def test_an_open_websocket_is_drained_not_cut_at_shutdown(
    gateway: Gateway, client: aiohttp.ClientSession, issue_key: IssueKey
) -> None:
    """docs/operations.md: in-flight work gets ``server.shutdown_deadline``; a tunnel is
    in-flight work, so it lives on while draining and the drain ends when it closes."""
    headers = {"X-License-Key": issue_key(tier="core")}
    async with client.ws_connect(gateway.url("operations", "/ws"), headers=headers) as ws:
        stopping = asyncio.get_running_loop().create_task(gateway.runtime.stop(deadline=60.0))
        await _echoes(ws, 5)
        assert not stopping.done()  # the drain waits for the tunnel
    await asyncio.wait_for(stopping, 10)  # the client closed it: nothing left to drain


async def test_an_open_websocket_is_cut_at_the_drain_deadline(
    gateway: Gateway, client: aiohttp.ClientSession, issue_key: IssueKey
) -> None:
    headers = {"X-License-Key": issue_key(tier="core")}
    async with client.ws_connect(gateway.url("operations", "/ws"), headers=headers) as ws:
        await gateway.runtime.stop(deadline=0.3)
        message = await asyncio.wait_for(ws.receive(), 5)
        assert message.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED), message


async def test_an_open_websocket_outlives_the_keep_alive_timeout(
    tmp_path: Path,
    key_dir: Path,
    upstreams: dict[str, EchoUpstream],
    issue_key: IssueKey,
    client: aiohttp.ClientSession,
) -> None:
    """The keep-alive timeout is for idle HTTP connections; a tunnel is not one."""
    ports = {app: server.port for app, server in upstreams.items()}
    quick = "[server]\nkeepalive_timeout = 0.2\n"
    async with running_gateway(tmp_path, key_dir, ports, extra=quick) as gw:
        headers = {"X-License-Key": issue_key(tier="core")}
        async with client.ws_connect(gw.url("operations", "/ws"), headers=headers) as ws:
            await _echoes(ws, 6)


async def test_upstream_timeout_is_504(
    tmp_path: Path,
    key_dir: Path,
    upstreams: dict[str, EchoUpstream],
    issue_key: IssueKey,
    client: aiohttp.ClientSession,
) -> None:
    ports = {app: server.port for app, server in upstreams.items()}
    async with running_gateway(tmp_path, key_dir, ports, app_extra="read_timeout = 0.3\n") as gw:
        async with client.get(
            gw.url("operations", "/slow/2"), headers={"X-License-Key": issue_key(tier="core")}
        ) as response:
            assert response.status == 504
            assert (await response.json())["code"] == "upstream_timeout"
