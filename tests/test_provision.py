"""Billing provisioning and the tenant store in a running gateway: the HMAC-signed hook,
upgrades that apply at once, two instances sharing a real Redis, a Redis outage, SQLite
across a restart, and the `gateway tenant` verbs."""

from __future__ import annotations

import asyncio
import base64
import json
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import aiohttp
import pytest

from gateway.cli import main
from gateway.license import Seats
from gateway.matrix import APP_NAMES
from gateway.provision import ProvisionError, parse_event, sign, verify_signature
from tests.conftest import IssueKey
from tests.harness import Gateway, running_gateway, two_gateways
from tests.provisioning import SECRET, event, provision, signature
from tests.rawhttp import Reply, read_reply
from tests.redis_server import RedisServer

OPTIMIZE = "/api/v1/shipments/1/optimize"

# Every gateway here takes tests.provisioning's SECRET on its provisioning hook.
pytestmark = pytest.mark.usefixtures("provision_secret")


async def status_of(
    session: aiohttp.ClientSession, gateway: Gateway, headers: dict[str, str]
) -> int:
    async with session.post(gateway.url("operations", OPTIMIZE), headers=headers) as response:
        return response.status


# ------------------------------------------------------------------ signature and body


def test_signature_accepts_the_right_secret_and_rotation() -> None:
    body = b'{"x": 1}'
    now = int(time.time())
    verify_signature(SECRET.encode(), sign(SECRET.encode(), body, now), body, now)
    rotated = sign(b"old", body, now) + "," + sign(SECRET.encode(), body, now).split(",")[1]
    verify_signature(SECRET.encode(), rotated, body, now)


@pytest.mark.parametrize(
    ("header", "code"),
    [
        pytest.param(None, "signature_missing", id="missing"),
        pytest.param("v1=abc", "signature_invalid", id="no-timestamp"),
        pytest.param("t=1", "signature_invalid", id="no-mac"),
        pytest.param("WRONG", "signature_invalid", id="garbage"),
    ],
)
def test_signature_refusals(header: str | None, code: str) -> None:
    with pytest.raises(ProvisionError) as caught:
        verify_signature(SECRET.encode(), header, b"{}", time.time())
    assert (caught.value.status, caught.value.code) == (401, code)


def test_signature_refuses_another_body_secret_or_a_stale_time() -> None:
    now = int(time.time())
    good = sign(SECRET.encode(), b"{}", now)
    for header, body, at in (
        (good, b"{ }", now),
        (sign(b"guess", b"{}", now), b"{}", now),
        (sign(SECRET.encode(), b"{}", now - 301), b"{}", now),
    ):
        with pytest.raises(ProvisionError) as caught:
            verify_signature(SECRET.encode(), header, body, at)
        assert caught.value.status == 401


@pytest.mark.parametrize(
    "header",
    [
        pytest.param("t=\u00b2,v1=00", id="superscript-digit"),
        pytest.param("t=\u0661\u0662,v1=" + "0" * 64, id="arabic-indic-digits"),
        pytest.param("v1=\u00e9", id="non-ascii-mac"),
        pytest.param("t={now},v1=\u00e9" + "0" * 63, id="non-ascii-mac-of-the-right-length"),
        pytest.param("t={now},v1={mac_upper}", id="uppercase-hex"),
        pytest.param("t={now},v1={mac_short}", id="short-mac"),
        pytest.param("t={now},v1={mac}0", id="long-mac"),
        pytest.param("t=" + "9" * 5000 + ",v1={mac}", id="huge-timestamp"),
        pytest.param("t=-{now},v1={mac}", id="negative-timestamp"),
        pytest.param("t={now},t={now},v1={mac}", id="two-timestamps"),
        pytest.param("t={now},v1={mac},v1=zz", id="one-bad-mac-among-good"),
    ],
)
def test_a_malformed_signature_header_is_a_401_not_an_error(header: str) -> None:
    now = int(time.time())
    mac = sign(SECRET.encode(), b"{}", now).split("v1=")[1]
    filled = header.format(now=now, mac=mac, mac_upper=mac.upper(), mac_short=mac[:-2])
    with pytest.raises(ProvisionError) as caught:
        verify_signature(SECRET.encode(), filled, b"{}", now)
    assert (caught.value.status, caught.value.code) == (401, "signature_invalid")


@pytest.mark.parametrize(
    ("body", "field"),
    [
        pytest.param(b'{"action": "suspend", "tenant": "a"}', "event_id", id="no-event-id"),
        pytest.param(
            b'{"event_id": "e", "action": "upgrade", "tenant": "a"}', "action", id="action"
        ),
        pytest.param(b'{"event_id": "e", "action": "license", "tenant": "a"}', "key", id="no-key"),
        pytest.param(
            b'{"event_id": "e", "action": "revoke", "tenant": "a"}', "license_id", id="no-id"
        ),
        pytest.param(
            b'{"event_id": "", "action": "suspend", "tenant": "a"}', "event_id", id="empty"
        ),
        pytest.param(b'{"event_id": 7, "action": "suspend", "tenant": "a"}', "event_id", id="type"),
        pytest.param(
            b'{"event_id": "e", "action": "seats", "tenant": "a", "drivers": 2}',
            "ops_users",
            id="seats-without-ops-users",
        ),
        pytest.param(
            b'{"event_id": "e", "action": "seats", "tenant": "a", "ops_users": 1, "drivers": -1}',
            "drivers",
            id="negative-seats",
        ),
        pytest.param(
            b'{"event_id": "e", "action": "seats", "tenant": "a", "ops_users": "1", "drivers": 1}',
            "ops_users",
            id="seats-not-a-number",
        ),
    ],
)
def test_bad_bodies_name_the_field(body: bytes, field: str) -> None:
    with pytest.raises(ProvisionError) as caught:
        parse_event(body)
    assert (caught.value.status, caught.value.field) == (400, field)


def test_not_json_is_400() -> None:
    with pytest.raises(ProvisionError) as caught:
        parse_event(b"nope")
    assert caught.value.status == 400


# ------------------------------------------------------------------ the hook in a gateway


async def test_provisioning_applies_once_and_upgrades_at_once(
    tmp_path: Path, key_dir: Path, upstream_ports: dict[str, int], issue_key: IssueKey
) -> None:
    core = issue_key(sub="acme", tier="core", serial=1)
    fleet = issue_key(sub="acme", tier="fleet", serial=2)
    async with (
        running_gateway(tmp_path, key_dir, upstream_ports) as gateway,
        aiohttp.ClientSession() as session,
    ):
        # The client keeps sending its Core key throughout.
        assert await status_of(session, gateway, {"X-License-Key": core}) == 403
        first = event("license", key=fleet)
        assert await provision(session, gateway, first) == (200, {"applied": True})
        repeated = (200, {"applied": False, "reason": "duplicate_event"})
        assert await provision(session, gateway, first) == repeated
        assert await status_of(session, gateway, {"X-License-Key": core}) == 200
        # An older serial arriving late never replaces the newer license.
        stale = event("license", key=issue_key(sub="acme", tier="core", serial=1))
        older = (200, {"applied": False, "reason": "not_newer"})
        assert await provision(session, gateway, stale) == older
        assert await status_of(session, gateway, {"X-Tenant-Id": "acme"}) == 200

        assert await provision(session, gateway, event("suspend")) == (200, {"applied": True})
        async with session.post(
            gateway.url("operations", OPTIMIZE), headers={"X-License-Key": core}
        ) as response:
            assert response.status == 401
            assert (await response.json())["code"] == "tenant_suspended"
        assert await provision(session, gateway, event("reinstate")) == (200, {"applied": True})
        assert await status_of(session, gateway, {"X-License-Key": core}) == 200

        fleet_id = json.loads(base64.urlsafe_b64decode(fleet.split(".")[1] + "=="))["jti"]
        assert await provision(session, gateway, event("revoke", license_id=fleet_id)) == (
            200,
            {"applied": True},
        )
        async with session.post(
            gateway.url("operations", OPTIMIZE), headers={"X-License-Key": fleet}
        ) as response:
            assert (await response.json())["code"] == "license_revoked"

        # The tenant's first license is no upgrade: license_provisioned.
        events = gateway.events()
        assert not [e for e in events if e["event"] == "upgrade_complete"]
        [first_license] = [e for e in events if e["event"] == "license_provisioned"]
        assert first_license["tenant"] == "acme" and first_license["tier"] == "fleet"


async def test_upgrade_complete_names_the_tier_the_decision_was_serving(
    gateway: Gateway, client: aiohttp.ClientSession, issue_key: IssueKey
) -> None:
    """The Fleet license is revoked, so the tenant is served Core: a new Fleet license is
    an upgrade from Core (the decision's current license), not "no change" from the
    revoked Fleet one that happens to be stored."""
    core = issue_key(sub="acme", tier="core", serial=1)
    fleet = issue_key(sub="acme", tier="fleet", serial=2)
    fleet_id = json.loads(base64.urlsafe_b64decode(fleet.split(".")[1] + "=="))["jti"]
    for change in (
        event("license", key=core),
        event("license", key=fleet),
        event("revoke", license_id=fleet_id),
    ):
        assert await provision(client, gateway, change) == (200, {"applied": True})
    assert await status_of(client, gateway, {"X-Tenant-Id": "acme"}) == 403  # Core now
    renewed = event("license", key=issue_key(sub="acme", tier="fleet", serial=3))
    assert await provision(client, gateway, renewed) == (200, {"applied": True})
    assert await status_of(client, gateway, {"X-Tenant-Id": "acme"}) == 200
    upgrades = [
        (e["previous_tier"], e["tier"])
        for e in gateway.events()
        if e["event"] == "upgrade_complete"
    ]
    assert upgrades == [("core", "fleet"), ("core", "fleet")]  # Core was the first license


async def test_extra_seats_bought_through_billing(gateway: Gateway) -> None:
    store = gateway.runtime.store
    async with aiohttp.ClientSession() as session:
        bought = event("seats", ops_users=3, drivers=10)
        assert await provision(session, gateway, bought) == (200, {"applied": True})
        repeated = (200, {"applied": False, "reason": "duplicate_event"})
        assert await provision(session, gateway, bought) == repeated
        assert await store.extra_seats("acme") == Seats(ops_users=3, drivers=10)
        # The next purchase replaces the numbers (billing sends the totals bought).
        fewer = event("seats", ops_users=0, drivers=4)
        assert await provision(session, gateway, fewer) == (200, {"applied": True})
        assert await store.extra_seats("acme") == Seats(ops_users=0, drivers=4)


async def test_provisioning_refusals(
    tmp_path: Path,
    key_dir: Path,
    upstream_ports: dict[str, int],
    issue_key: IssueKey,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async with (
        running_gateway(tmp_path, key_dir, upstream_ports) as gateway,
        aiohttp.ClientSession() as session,
    ):
        status, body = await provision(session, gateway, event("suspend"), secret="wrong")
        assert (status, body["code"]) == (401, "signature_invalid")
        status, body = await provision(session, gateway, event("suspend"), t=int(time.time()) - 600)
        assert (status, body["code"]) == (401, "signature_stale")
        other = event("license", tenant="acme", key=issue_key(sub="globex", tier="fleet"))
        status, body = await provision(session, gateway, other)
        assert (status, body["field"]) == (400, "key")
        tampered = issue_key(sub="acme", tier="fleet")[:-4] + "AAAA"
        status, body = await provision(session, gateway, event("license", key=tampered))
        assert (status, body["code"], body["field"]) == (400, "license_bad_signature", "key")
        # A refused event id is not burnt: the same id with a good key is applied.
        retry = event("license", key=issue_key(sub="acme", tier="fleet", serial=5))
        retry["event_id"] = other["event_id"]
        assert await provision(session, gateway, retry) == (200, {"applied": True})

        monkeypatch.delenv("GATEWAY_PROVISION_SECRET")
        status, body = await provision(session, gateway, event("suspend"))
        assert (status, body["code"]) == (503, "provisioning_disabled")


# ------------------------------------------------------------------ the hook over raw sockets


async def post_in_pieces(
    gateway: Gateway, head: bytes, pieces: list[bytes], *, pause: float = 0.1
) -> Reply:
    """POST to the hook on a raw socket: the head, then each piece in its own write with a
    pause between, so the gateway sees each piece arrive on its own."""
    reader, writer = await asyncio.open_connection("127.0.0.1", gateway.admin)
    try:
        request = b"POST /admin/provision HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n"
        writer.write(request + head + b"\r\n")
        for piece in pieces:
            await asyncio.sleep(pause)
            writer.write(piece)
            await writer.drain()
        return await read_reply(reader)
    finally:
        writer.close()


def signed_head(body: bytes, *, chunked: bool = False) -> bytes:
    framing = b"Transfer-Encoding: chunked" if chunked else b"Content-Length: %d" % len(body)
    return b"Gateway-Signature: %s\r\n%s\r\n" % (signature(body).encode(), framing)


def code_of(reply: Reply) -> str:
    code = json.loads(bytes(reply.body))["code"]
    assert isinstance(code, str)
    return code


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


@pytest.mark.parametrize(
    "header",
    [
        pytest.param(b"t=\xc2\xb2,v1=00", id="superscript-digit"),
        pytest.param(b"v1=\xc3\xa9", id="non-ascii-mac"),
        pytest.param(b"t=NOW,v1=\xc3\xa9", id="non-ascii-mac-with-a-timestamp"),
        pytest.param(b"t=NOW,v1=\xff\xfe", id="not-utf-8"),
    ],
)
async def test_a_malformed_signature_header_on_the_wire_is_a_401(
    gateway: Gateway, header: bytes
) -> None:
    header = header.replace(b"NOW", str(int(time.time())).encode())
    body = json.dumps(event("suspend")).encode()
    head = b"Gateway-Signature: %s\r\nContent-Length: %d\r\n" % (header, len(body))
    reply = await post_in_pieces(gateway, head, [body])
    assert (reply.status, code_of(reply)) == (401, "signature_invalid"), reply


async def test_a_signed_body_arriving_in_two_segments_verifies(gateway: Gateway) -> None:
    body = json.dumps(event("suspend", tenant="split-segments")).encode()
    half = len(body) // 2
    reply = await post_in_pieces(gateway, signed_head(body), [body[:half], body[half:]])
    assert reply.status == 200, reply
    assert json.loads(bytes(reply.body)) == {"applied": True}


async def test_a_signed_body_arriving_in_chunks_verifies(gateway: Gateway) -> None:
    body = json.dumps(event("suspend", tenant="split-chunks")).encode()
    pieces = [chunk(body[i : i + 16]) for i in range(0, len(body), 16)] + [b"0\r\n\r\n"]
    reply = await post_in_pieces(gateway, signed_head(body, chunked=True), pieces, pause=0.02)
    assert reply.status == 200, reply
    assert json.loads(bytes(reply.body)) == {"applied": True}


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
async def test_the_body_cap_holds_for_a_body_in_pieces(gateway: Gateway, chunked: bool) -> None:
    from gateway.provision import MAX_BODY_BYTES

    padding = b" " * (MAX_BODY_BYTES + 1 - 2)
    body = b"{" + padding + b"}"
    piece = 8192
    parts = [body[i : i + piece] for i in range(0, len(body), piece)]
    pieces = [chunk(part) for part in parts] + [b"0\r\n\r\n"] if chunked else parts
    reply = await post_in_pieces(gateway, signed_head(body, chunked=chunked), pieces, pause=0.01)
    assert (reply.status, code_of(reply)) == (413, "body_too_large"), reply


# ------------------------------------------------------------------ fleets on Redis


@asynccontextmanager
async def two_instances(
    tmp_path: Path, key_dir: Path, upstream_ports: dict[str, int], redis: RedisServer
) -> AsyncIterator[tuple[Gateway, Gateway, aiohttp.ClientSession]]:
    """Two gateways sharing one Redis store, and a client session."""
    store = f'\n[store]\nurl = "{redis.url}"\n'
    async with (
        two_gateways(tmp_path, key_dir, upstream_ports, extra=store) as (a, b),
        aiohttp.ClientSession() as session,
    ):
        yield a, b, session


async def test_an_upgrade_through_instance_a_is_enforced_by_b_within_a_second(
    tmp_path: Path,
    key_dir: Path,
    upstream_ports: dict[str, int],
    issue_key: IssueKey,
    redis: RedisServer,
) -> None:
    core = issue_key(sub="acme", tier="core", serial=1)
    async with two_instances(tmp_path, key_dir, upstream_ports, redis) as (a, b, session):
        assert await provision(session, a, event("license", key=core)) == (200, {"applied": True})
        # B has looked the tenant up and cached it: Core, blocked.
        assert await status_of(session, b, {"X-License-Key": core}) == 403
        fleet = event("license", key=issue_key(sub="acme", tier="fleet", serial=2))
        assert await provision(session, a, fleet) == (200, {"applied": True})
        deadline = time.monotonic() + 1.0  # well under B's 5 s cache TTL: pub/sub did it
        while await status_of(session, b, {"X-License-Key": core}) != 200:
            assert time.monotonic() < deadline, "instance B still enforces the old license"
            await asyncio.sleep(0.02)


async def test_after_a_redis_restart_an_upgrade_reaches_the_other_instance_promptly(
    tmp_path: Path,
    key_dir: Path,
    upstream_ports: dict[str, int],
    issue_key: IssueKey,
    redis: RedisServer,
) -> None:
    """B caches the tenant for an hour, so only its subscription can tell it of the
    upgrade A applies after Redis comes back. A reconnect backoff that grew during the
    outage (it reached 5 s) kept B deaf for seconds after Redis was back."""
    core = issue_key(sub="acme", tier="core", serial=1)
    async with two_instances(tmp_path, key_dir, upstream_ports, redis) as (a, b, session):
        b.runtime.shared.tenants.ttl = 3600.0
        assert await provision(session, a, event("license", key=core)) == (200, {"applied": True})
        assert await status_of(session, b, {"X-Tenant-Id": "acme"}) == 403  # Core, cached

        redis.stop()
        await asyncio.sleep(7.5)  # a long outage: long enough for a growing backoff to grow
        redis.restart()  # empty: nothing was persisted
        restarted = time.monotonic()
        fleet = event("license", key=issue_key(sub="acme", tier="fleet", serial=2))
        while (await provision(session, a, fleet))[0] != 200:
            assert time.monotonic() < restarted + 10, "instance A never reached Redis again"
            await asyncio.sleep(0.05)
        while await status_of(session, b, {"X-Tenant-Id": "acme"}) != 200:
            assert time.monotonic() < restarted + 3.0, "instance B still enforces Core"
            await asyncio.sleep(0.05)


async def test_redis_outage_keeps_traffic_flowing_then_recovers(
    tmp_path: Path,
    key_dir: Path,
    upstream_ports: dict[str, int],
    issue_key: IssueKey,
    redis: RedisServer,
) -> None:
    fleet = issue_key(sub="acme", tier="fleet", serial=1)
    extra = f'\n[store]\nurl = "{redis.url}"\n'
    async with (
        running_gateway(tmp_path, key_dir, upstream_ports, extra=extra) as gateway,
        aiohttp.ClientSession() as session,
    ):
        assert await provision(session, gateway, event("license", key=fleet)) == (
            200,
            {"applied": True},
        )
        assert await status_of(session, gateway, {"X-Tenant-Id": "acme"}) == 200
        redis.stop()
        gateway.runtime.shared.tenants.ttl = 0.0  # every request now asks the dead store
        for _ in range(20):
            # Fail-static: the last record known and keys in headers keep working.
            assert await status_of(session, gateway, {"X-Tenant-Id": "acme"}) == 200
            assert await status_of(session, gateway, {"X-License-Key": fleet}) == 200
        async with session.get(gateway.admin_url("/readyz")) as response:
            ready = await response.json()
            assert response.status == 200 and ready["store"] == "down"
        async with session.get(gateway.admin_url("/metrics")) as response:
            assert 'gateway_store_errors_total{op="get"}' in await response.text()
        status, body = await provision(session, gateway, event("suspend"))
        assert (status, body["code"]) == (503, "store_unavailable")

        redis.restart()  # empty: nothing was persisted
        deadline = time.monotonic() + 10
        while True:
            status, body = await provision(
                session, gateway, event("license", key=issue_key(sub="acme", tier="core"))
            )
            if status == 200:
                break
            assert time.monotonic() < deadline, body
            await asyncio.sleep(0.1)
        gateway.runtime.shared.tenants.ttl = 5.0
        async with session.get(gateway.admin_url("/readyz")) as response:
            assert (await response.json())["store"] == "up"


# ------------------------------------------------------------------ SQLite and the CLI


async def test_sqlite_store_keeps_its_data_across_a_restart(
    tmp_path: Path, key_dir: Path, upstream_ports: dict[str, int], issue_key: IssueKey
) -> None:
    extra = '\n[store]\nurl = "sqlite://tenants.db"\n'
    fleet = issue_key(sub="acme", tier="fleet", serial=3)
    async with aiohttp.ClientSession() as session:
        async with running_gateway(tmp_path, key_dir, upstream_ports, extra=extra) as gw:
            assert await provision(session, gw, event("license", key=fleet)) == (
                200,
                {"applied": True},
            )
        assert (tmp_path / "tenants.db").exists()
        async with running_gateway(tmp_path, key_dir, upstream_ports, extra=extra) as gw:
            assert await status_of(session, gw, {"X-Tenant-Id": "acme"}) == 200


def test_tenant_cli_against_sqlite(
    tmp_path: Path, key_dir: Path, issue_key: IssueKey, capsys: pytest.CaptureFixture[str]
) -> None:
    from tests.harness import write_config

    config, _, _ = write_config(
        tmp_path, key_dir, dict.fromkeys(APP_NAMES, 1), extra='\n[store]\nurl = "sqlite://t.db"\n'
    )
    core = issue_key(sub="acme", tier="core", serial=1)
    enterprise = issue_key(sub="acme", tier="enterprise", serial=2)
    bad = issue_key(sub="globex", tier="fleet")[:-4] + "AAAA"
    tenants = tmp_path / "tenants.toml"
    tenants.write_text(
        f'[[tenants]]\nid = "acme"\nkeys = ["{enterprise}", "{core}"]\n'
        f'classic_keys = ["XD7Q2-4KLMN-8PRST-2VWXY-3ABCD"]\n\n'
        f'[[tenants]]\nid = "globex"\nkeys = ["{bad}"]\n'
    )
    assert main(["tenant", "import", str(tenants), "--config", str(config)]) == 1  # one bad key
    out, err = capsys.readouterr()
    assert "2 tenants, 2 keys stored" in out and "globex" in err
    assert main(["tenant", "suspend", "acme", "--config", str(config)]) == 0
    assert main(["tenant", "show", "acme", "--config", str(config), "--json"]) == 0
    shown = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert shown["suspended"] is True
    assert [lic["tier"] for lic in shown["licenses"]] == ["enterprise", "core"]
    assert shown["current"] == shown["licenses"][0]["license_id"]
    assert main(["tenant", "reinstate", "acme", "--config", str(config)]) == 0
    assert main(["tenant", "show", "acme", "--config", str(config)]) == 0
    assert "SUSPENDED" not in capsys.readouterr().out
    assert main(["tenant", "show", "nobody", "--config", str(config)]) == 1


def test_tenant_cli_refuses_a_memory_store(
    tmp_path: Path, key_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from tests.harness import write_config

    config, _, _ = write_config(tmp_path, key_dir, dict.fromkeys(APP_NAMES, 1))
    assert main(["tenant", "show", "acme", "--config", str(config)]) == 2
    assert "memory://" in capsys.readouterr().err


async def test_seat_usage_recorded_by_the_cli_is_enforced(
    tmp_path: Path, key_dir: Path, upstream_ports: dict[str, int], issue_key: IssueKey
) -> None:
    extra = '\n[store]\nurl = "sqlite://tenants.db"\n'
    core = issue_key(sub="acme", tier="core", serial=1)  # Core: 1 ops user, 1 driver
    async with (
        running_gateway(tmp_path, key_dir, upstream_ports, extra=extra) as gateway,
        aiohttp.ClientSession() as session,
    ):
        add_driver = gateway.url("operations", "/api/v1/drivers")
        headers = {"X-License-Key": core, "X-User-Role": "admin"}
        assert await provision(session, gateway, event("license", key=core)) == (
            200,
            {"applied": True},
        )
        async with session.post(add_driver, headers=headers) as response:
            assert response.status == 200
        config = str(tmp_path / "gateway.toml")
        args = ["tenant", "usage", "acme", "--ops-users", "1", "--drivers", "1"]
        assert await asyncio.to_thread(main, [*args, "--config", config]) == 0
        gateway.runtime.shared.tenants.invalidate("acme")  # another process wrote the file
        async with session.post(add_driver, headers=headers) as response:
            assert response.status == 429
            assert (await response.json())["code"] == "seat_limit_exceeded"


async def test_the_hook_says_why_a_call_changed_nothing(
    gateway: Gateway, issue_key: IssueKey
) -> None:
    """Billing must tell a repeat from a no-op from an older key: ``applied: false`` always
    comes with its ``reason``."""
    key = issue_key(sub="acme", tier="fleet", serial=5)
    lic_id = json.loads(base64.urlsafe_b64decode(key.split(".")[1] + "=="))["jti"]
    async with aiohttp.ClientSession() as session:
        calls = [
            (event("license", key=key), {"applied": True}),
            (event("license", key=key), {"applied": False, "reason": "not_newer"}),
            (event("suspend"), {"applied": True}),
            (event("suspend"), {"applied": False, "reason": "already_suspended"}),
            (event("reinstate"), {"applied": True}),
            (event("reinstate"), {"applied": False, "reason": "not_suspended"}),
            (event("revoke", license_id=lic_id), {"applied": True}),
            (event("revoke", license_id=lic_id), {"applied": False, "reason": "already_revoked"}),
        ]
        for body, expected in calls:
            assert await provision(session, gateway, body) == (200, expected), body
