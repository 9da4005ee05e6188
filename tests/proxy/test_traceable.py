"""Every status the gateway answers itself is traceable: one event line carrying the request
id the client saw in ``X-Request-Id`` (README, Events), whether the enforcer refused the
request, the relay could not parse it, or the upstream failed. Raw sockets, so malformed
requests reach the gateway as written."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import IssueKey
from tests.harness import free_port, running_gateway
from tests.rawhttp import exchange

GATED = b"POST /api/v1/shipments/1/optimize HTTP/1.1\r\nHost: gw\r\n"  # Fleet and up
END = b"Content-Length: 0\r\n\r\n"


def cases(core_key: str) -> list[tuple[str, str, bytes, int, str]]:
    """(id, app, raw request, status, code): one of each answer the gateway gives itself."""
    key = f"X-License-Key: {core_key}\r\n".encode()
    return [
        ("path-rejected", "operations", b"GET /api/v1/a%2Fb HTTP/1.1\r\nHost: gw\r\n\r\n",
         400, "path_rejected"),
        ("bad-header", "operations", GATED + key + key + END, 400, "bad_header"),
        ("unlicensed", "operations", GATED + END, 401, "license_missing"),
        ("feature-not-entitled", "operations", GATED + key + END, 403, "feature_not_entitled"),
        ("route-unmatched", "driver_app",
         b"GET /api/v1/nowhere HTTP/1.1\r\nHost: gw\r\n" + key + b"\r\n", 403, "route_unmatched"),
        ("tenant-api-not-found", "operations",
         b"GET /_entitlements/nope HTTP/1.1\r\nHost: gw\r\n\r\n", 404, "not_found"),
        ("tenant-api-method", "operations",
         b"DELETE /_entitlements HTTP/1.1\r\nHost: gw\r\n\r\n", 405, "method_not_allowed"),
        ("body-too-large", "operations",
         b"POST /api/v1/shipments HTTP/1.1\r\nHost: gw\r\nContent-Length: 999999\r\n\r\n",
         413, "body_too_large"),
        ("headers-too-large", "operations",
         b"GET /api/v1/shipments HTTP/1.1\r\nHost: gw\r\nX-Big: " + b"a" * 40_000 + b"\r\n\r\n",
         431, "headers_too_large"),
        ("malformed", "operations", b"GET /api/v1/shipments HTTP/1.1\r\nHost gw\r\n\r\n",
         400, "bad_request"),
        ("upstream-refused", "client_portal",
         b"GET /api/v1/health HTTP/1.1\r\nHost: gw\r\n\r\n", 502, "upstream_refused"),
    ]  # fmt: skip


async def test_every_answer_the_gateway_gives_itself_is_one_event_with_its_request_id(
    tmp_path: Path,
    key_dir: Path,
    upstream_ports: dict[str, int],
    issue_key: IssueKey,
) -> None:
    ports = {**upstream_ports, "client_portal": free_port()}  # nothing listens there
    core = issue_key(tier="core")
    extra = "\n[server]\nmax_body_bytes = 1000\n"
    seen: dict[str, tuple[str, str]] = {}
    async with running_gateway(tmp_path, key_dir, ports, extra=extra) as gateway:
        for name, app, raw, status, code in cases(core):
            reply = await exchange(gateway.listen[app], raw)
            assert reply.status == status, (name, reply)
            assert reply.problem()["code"] == code, name
            rid = reply.header("X-Request-Id")
            assert rid, name
            assert reply.problem()["request_id"] == rid, name
            seen[rid] = (name, code)
        events = gateway.events()
    for rid, (name, code) in seen.items():
        lines = [event for event in events if event.get("request_id") == rid]
        assert len(lines) == 1, (name, lines)
        (line,) = lines
        assert line.get("code", line.get("reason")) == code or line["event"] == code, (name, line)


@pytest.mark.parametrize("inbound", ["support-ticket-42", "a.b:c_d-1"])
async def test_a_well_formed_inbound_request_id_is_the_one_in_the_answer_and_the_event(
    tmp_path: Path, key_dir: Path, upstream_ports: dict[str, int], inbound: str
) -> None:
    async with running_gateway(tmp_path, key_dir, upstream_ports) as gateway:
        raw = GATED + f"X-Request-Id: {inbound}\r\n".encode() + END
        reply = await exchange(gateway.listen["operations"], raw)
        assert (reply.status, reply.header("X-Request-Id")) == (401, inbound)
        assert reply.problem()["request_id"] == inbound
        assert [e["event"] for e in gateway.events() if e.get("request_id") == inbound] == [
            "license_invalid"
        ]
