"""The issuing service as a real process: orders delivered to two real gateways through
their provisioning hooks and into a real Redis store, idempotency, refusals, the
dead-letter list and recovery, and the audit trail it leaves."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from gateway.audit import verify
from gateway.cli import main
from gateway.config import load_config
from gateway.license import decode_unverified
from gateway.runtime import Runtime
from tests.harness import EchoUpstream, Gateway, running_gateway, two_gateways, write_config
from tests.issuer_harness import hook_target, running_issuer, store_target, write_issuer
from tests.redis_server import RedisServer

# Every gateway here takes tests.provisioning's SECRET on its provisioning hook.
pytestmark = pytest.mark.usefixtures("provision_secret")


async def tier_seen(
    session: aiohttp.ClientSession, gateway: Gateway, tenant: str, upstream: EchoUpstream
) -> str | int:
    """The tier the upstream is told for ``tenant`` (or the gateway's refusal status)."""
    async with session.get(
        gateway.url("operations", "/api/v1/account"), headers={"X-Tenant-Id": tenant}
    ) as response:
        if response.status != 200:
            return response.status
    return str(upstream.requests[-1]["headers"]["X-Entitlement-Tier"])


def audit_lines(folder: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (folder / "audit.jsonl").read_text().splitlines()]


async def test_orders_reach_two_gateways_through_their_hooks(
    tmp_path: Path, upstream_ports: dict[str, int], upstreams: dict[str, EchoUpstream]
) -> None:
    # The issuer's key is published first; the gateways load it; then the issuer learns
    # where the gateways' hooks are.
    write_issuer(tmp_path / "issuer", "")
    keys = tmp_path / "issuer" / "keys"
    ops = upstreams["operations"]
    async with two_gateways(tmp_path, keys, upstream_ports) as (one, two):
        targets = hook_target("gw-a", one.admin) + hook_target("gw-b", two.admin)
        config, port = write_issuer(tmp_path / "issuer", targets)
        async with running_issuer(config, port) as issuer, aiohttp.ClientSession() as session:
            status, fleet = await issuer.order(order_id="ord-1", tenant="acme", skus=["FLEET"])
            assert status == 201, fleet
            assert (fleet["tier"], fleet["change"], fleet["kid"]) == ("fleet", "new", "k1")
            assert {d["target"]: d["state"] for d in fleet["deliveries"]} == {
                "gw-a": "delivered", "gw-b": "delivered",
            }  # fmt: skip
            for gateway in (one, two):
                assert await tier_seen(session, gateway, "acme", ops) == "fleet"

            # The same order again: the same license, nothing minted or delivered again.
            status, again = await issuer.order(order_id="ord-1", tenant="acme", skus=["FLEET"])
            assert status == 200 and again["license_id"] == fleet["license_id"]
            status, conflict = await issuer.order(order_id="ord-1", tenant="acme", skus=["CORE"])
            assert (status, conflict["code"]) == (409, "order_conflict")

            # An upgrade applies at once on both; a downgrade waits for the period's end.
            status, up = await issuer.order(order_id="ord-2", tenant="acme", skus=["ENTERPRISE"])
            assert (status, up["change"]) == (201, "upgrade") and up["serial"] > fleet["serial"]
            for gateway in (one, two):
                assert await tier_seen(session, gateway, "acme", ops) == "enterprise"
            status, down = await issuer.order(order_id="ord-3", tenant="acme", skus=["CORE"])
            assert (status, down["change"], down["nbf"]) == (201, "downgrade", up["exp"])
            for gateway in (one, two):
                assert await tier_seen(session, gateway, "acme", ops) == "enterprise"

            # A trial runs trial_days; seats given outright replace the SKUs'.
            status, trial = await issuer.order(
                order_id="ord-4", tenant="prospect", trial=True, seats={"ops_users": 2,
                "drivers": 3}, skus=["FLEET", {"sku": "SEAT-DRIVER", "quantity": 9}],
            )  # fmt: skip
            assert status == 201 and trial["trial"] is True
            assert trial["exp"] - trial["nbf"] == 14 * 86400
            assert trial["seats"] == {"ops_users": 2, "drivers": 3}

            status, shown = await issuer.call("GET", "/v1/orders/ord-2")
            assert status == 200 and shown["license_id"] == up["license_id"]
            assert [d["state"] for d in shown["deliveries"]] == ["delivered", "delivered"]
    lines = audit_lines(tmp_path / "issuer")
    assert [(line["action"], line["tier"], line["ref"]) for line in lines] == [
        ("issue", "fleet", "ord-1"), ("issue", "enterprise", "ord-2"), ("issue", "core", "ord-3"),
        ("issue", "fleet", "ord-4"),
    ]  # fmt: skip
    assert {line["actor"] for line in lines} == {"billing:billing-main"}
    assert verify(tmp_path / "issuer" / "audit.jsonl")[1] is None


async def test_orders_the_matrix_does_not_allow_are_refused(tmp_path: Path) -> None:
    config, port = write_issuer(tmp_path / "issuer", "")
    async with running_issuer(config, port) as issuer:
        for skus, sku, rule in (
            (["CORE", "ADDON-PURL"], "ADDON-PURL", "addon_not_available"),
            (["FLEET", "ADDON-ROUTE-DIST"], "ADDON-ROUTE-DIST", "addon_included_in_tier"),
            (["GOLD"], "GOLD", "unknown_sku"),
            (["ADDON-SMS"], "ADDON-SMS", "no_tier"),
        ):
            status, answer = await issuer.order(order_id=f"o-{sku}", tenant="acme", skus=skus)
            assert status == 422, answer
            assert (answer["code"], answer["sku"], answer["rule"]) == ("order_refused", sku, rule)
            assert answer["type"].endswith("/order_refused") and answer["detail"]
        for window, rule in (("core", "grandfather_not_above_tier"),
                             ("gold", "unknown_grandfather_tier")):  # fmt: skip
            status, answer = await issuer.order(
                order_id=f"o-{window}", tenant="acme", skus=["FLEET"], grandfather_tier=window,
                grandfather_until="2030-01-01",
            )  # fmt: skip
            assert status == 422, answer
            assert (answer["rule"], answer["field"]) == (rule, "grandfather_tier")
        status, answer = await issuer.order(
            order_id="o-half", tenant="acme", skus=["CORE"], grandfather_tier="enterprise"
        )
        assert (status, answer["code"], answer["field"]) == (400, "bad_body", "grandfather_until")
        status, answer = await issuer.order(order_id="o", tenant="acme")
        assert (status, answer["code"], answer["field"]) == (400, "bad_body", "skus")
        status, answer = await issuer.call("POST", "/v1/orders", {"x": 1}, secret="wrong")
        assert (status, answer["code"]) == (401, "signature_invalid")
        status, answer = await issuer.call("GET", "/v1/orders/nope")
        assert (status, answer["code"]) == (404, "order_unknown")
        status, answer = await issuer.call("GET", "/v1/licenses/nope")
        assert (status, answer["code"]) == (404, "license_unknown")
    assert not (tmp_path / "issuer" / "audit.jsonl").exists()  # nothing was minted


async def test_an_order_with_a_grandfather_window(tmp_path: Path) -> None:
    config, port = write_issuer(tmp_path / "issuer", "")
    until = int(time.time()) + 90 * 86400
    async with running_issuer(config, port) as issuer:
        order = {"order_id": "ord-gf", "tenant": "acme", "skus": ["CORE", "ADDON-SMS"],
                 "grandfather_tier": "enterprise", "grandfather_until": until}  # fmt: skip
        status, minted = await issuer.order(**order)
        assert status == 201, minted
        claims = decode_unverified(minted["key"])[1]
        assert (claims["tier"], claims["grandfather_tier"], claims["grandfather_until"]) == (
            "core", "enterprise", until,
        )  # fmt: skip
        assert (minted["grandfather_tier"], minted["grandfather_until"]) == ("enterprise", until)
        status, again = await issuer.order(**order)
        assert status == 200 and again["license_id"] == minted["license_id"]
        status, other = await issuer.order(**{**order, "grandfather_until": until + 86400})
        assert (status, other["code"]) == (409, "order_conflict")  # the window is the order
        status, found = await issuer.call("GET", f"/v1/licenses/{minted['license_id']}")
        assert status == 200 and found["order_id"] == "ord-gf" and found == minted


@asynccontextmanager
async def stopped_gateway(folder: Path, keys: Path, ports: dict[str, int]) -> AsyncIterator[Any]:
    """A gateway's config written (so its admin port is known) but not started yet;
    ``start()`` brings it up on those ports."""
    folder.mkdir(parents=True, exist_ok=True)
    path, listen, admin = write_config(folder, keys, ports)
    runtimes: list[Runtime] = []

    class Handle:
        def __init__(self) -> None:
            self.gateway = Gateway(Runtime(load_config(path)), listen, admin, folder)

        async def start(self) -> Gateway:
            await self.gateway.runtime.start()
            runtimes.append(self.gateway.runtime)
            return self.gateway

    try:
        yield Handle()
    finally:
        for runtime in runtimes:
            await runtime.stop(deadline=2.0)


async def test_a_down_gateway_is_dead_lettered_then_delivered_on_retry(
    tmp_path: Path, upstream_ports: dict[str, int], upstreams: dict[str, EchoUpstream], capsys: Any
) -> None:
    config, port = write_issuer(tmp_path / "issuer", "")
    keys = tmp_path / "issuer" / "keys"
    ops = upstreams["operations"]
    (tmp_path / "a").mkdir()
    async with (
        running_gateway(tmp_path / "a", keys, upstream_ports) as one,
        stopped_gateway(tmp_path / "b", keys, upstream_ports) as down,
    ):
        targets = hook_target("gw-a", one.admin) + hook_target("gw-b", down.gateway.admin)
        delivery = "max_attempts = 2\nbackoff_seconds = 0.05\n"
        config, port = write_issuer(tmp_path / "issuer", targets, delivery=delivery)
        async with running_issuer(config, port) as issuer, aiohttp.ClientSession() as session:
            status, answer = await issuer.order(order_id="ord-1", tenant="acme", skus=["FLEET"])
            assert status == 201
            answer = await issuer.wait_for("ord-1", "gw-b", "dead")
            states = {d["target"]: d for d in answer["deliveries"]}
            assert states["gw-a"]["state"] == "delivered"
            assert states["gw-b"]["attempts"] == 2 and states["gw-b"]["last_error"]
            status, dead = await issuer.call("GET", "/v1/dead-letters")
            assert [(d["license_id"], d["target"]) for d in dead["dead_letters"]] == [
                (answer["license_id"], "gw-b")
            ]
            assert main(["issuer", "dead-letters", "--config", str(config)]) == 0
            assert "1 dead-lettered" in capsys.readouterr().out

            two = await down.start()
            assert await tier_seen(session, two, "acme", ops) == 401  # not delivered yet
            status, requeued = await issuer.call("POST", "/v1/orders/ord-1/retry")
            assert (status, requeued) == (200, {"requeued": 1})
            await issuer.wait_for("ord-1", "gw-b", "delivered")
            two.runtime.shared.tenants.invalidate()
            assert await tier_seen(session, two, "acme", ops) == "fleet"


async def test_deliveries_retry_until_the_gateway_is_back(
    tmp_path: Path, upstream_ports: dict[str, int], upstreams: dict[str, EchoUpstream]
) -> None:
    config, port = write_issuer(tmp_path / "issuer", "")
    keys = tmp_path / "issuer" / "keys"
    async with stopped_gateway(tmp_path / "b", keys, upstream_ports) as down:
        delivery = "max_attempts = 1000\nbackoff_seconds = 0.05\nmax_backoff_seconds = 0.2\n"
        config, port = write_issuer(
            tmp_path / "issuer", hook_target("gw-b", down.gateway.admin), delivery=delivery
        )
        async with running_issuer(config, port) as issuer, aiohttp.ClientSession() as session:
            status, answer = await issuer.order(order_id="ord-1", tenant="acme", skus=["CORE"])
            assert status == 201 and answer["deliveries"][0]["state"] == "pending"
            deadline = time.monotonic() + 20
            while (await issuer.call("GET", "/v1/orders/ord-1"))[1]["deliveries"][0][
                "attempts"
            ] < 2:
                assert time.monotonic() < deadline
                await asyncio.sleep(0.05)
            two = await down.start()
            await issuer.wait_for("ord-1", "gw-b", "delivered")
            two.runtime.shared.tenants.invalidate()
            assert await tier_seen(session, two, "acme", upstreams["operations"]) == "core"


async def test_orders_delivered_into_a_shared_redis_store(
    tmp_path: Path,
    upstream_ports: dict[str, int],
    upstreams: dict[str, EchoUpstream],
    redis: RedisServer,
) -> None:
    config, port = write_issuer(tmp_path / "issuer", store_target("fleet", redis.url))
    keys = tmp_path / "issuer" / "keys"
    extra = f'\n[store]\nurl = "{redis.url}"\n'
    ops = upstreams["operations"]
    async with (
        two_gateways(tmp_path, keys, upstream_ports, extra=extra) as (one, two),
        running_issuer(config, port) as issuer,
        aiohttp.ClientSession() as session,
    ):
        for gateway in (one, two):
            assert await tier_seen(session, gateway, "globex", ops) == 401
        status, answer = await issuer.order(
            order_id="ord-9", tenant="globex", skus=["CORE", "ADDON-ROUTE-DIST"]
        )
        assert status == 201 and answer["deliveries"][0]["state"] == "delivered", answer
        deadline = time.monotonic() + 10
        for gateway in (one, two):  # the store's change feed reaches both caches
            while await tier_seen(session, gateway, "globex", ops) != "core":
                assert time.monotonic() < deadline
                await asyncio.sleep(0.05)
            assert ops.requests[-1]["headers"]["X-Entitlement-Addons"] == "route_distribution"
    actions = [(line["action"], line["actor"]) for line in audit_lines(tmp_path / "issuer")]
    assert actions == [("issue", "billing:billing-main"), ("provision", "issuer:issuer")]
