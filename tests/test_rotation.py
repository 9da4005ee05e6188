"""Signing-key rotation: ``gateway keys rotate|activate|retire|list``, the ledger check
before a kid is retired, and the runbook end to end on a fleet of two gateways sharing a
real Redis, with the issuing service delivering into it."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import aiohttp
import pytest

from gateway.cli import main
from gateway.license import decode_unverified, generate_keypair
from gateway.signing_keys import load_state, signing_key, signing_kid
from tests.harness import Gateway, two_gateways
from tests.issuer_harness import running_issuer, store_target, write_issuer
from tests.redis_server import RedisServer

Capture = pytest.CaptureFixture[str]
# Every gateway here takes tests.provisioning's SECRET on its provisioning hook.
pytestmark = pytest.mark.usefixtures("provision_secret")


def kid_of(token: str) -> object:
    return decode_unverified(token)[0]["kid"]


def test_rotate_publishes_before_the_issuer_uses_the_kid(tmp_path: Path, capsys: Capture) -> None:
    config, _ = write_issuer(tmp_path, "")
    gateway_keys = tmp_path / "gateway-keys"
    gateway_keys.mkdir()
    keys = tmp_path / "issuer-keys"
    audit = ["--audit-log", str(tmp_path / "audit.jsonl"), "--actor", "ops", "--reason", "Q3"]
    assert main(["keys", "rotate", "--keys", str(keys), "--publish", str(gateway_keys),
                 "--kid", "k2", *audit]) == 0  # fmt: skip
    assert (gateway_keys / "k2.pub").read_bytes() == (keys / "k2.pub").read_bytes()
    assert load_state(keys).keys["k2"].state == "published"
    assert signing_key(keys)[1] == "k1"  # published, not used
    assert main(["keys", "activate", "k2", "--keys", str(keys), *audit]) == 0
    assert signing_key(keys)[1] == "k2"
    assert main(["keys", "activate", "k2", "--keys", str(keys)]) == 1  # already active
    assert main(["keys", "list", "--config", str(config)]) == 0
    out = capsys.readouterr().out
    assert "k2" in out and "<- signs" in out.splitlines()[-1]
    actions = [json.loads(line) for line in (tmp_path / "audit.jsonl").read_text().splitlines()]
    assert [(a["action"], a["kid"], a["actor"], a["reason"]) for a in actions] == [
        ("key_rotate", "k2", "ops", "Q3"), ("key_activate", "k2", "ops", "Q3"),
    ]  # fmt: skip


def test_retire_waits_for_the_last_license_the_kid_signed(tmp_path: Path, capsys: Capture) -> None:
    config, _ = write_issuer(tmp_path, "")
    issue = ["license", "issue", "--issuer-config", str(config), "--tenant", "acme"]
    expires = int(time.time()) + 30 * 86400
    assert main([*issue, "--sku", "CORE", "--expires", str(expires)]) == 0
    capsys.readouterr()
    assert main(["keys", "retire", "k1", "--config", str(config)]) == 1  # it signs
    assert main(["keys", "rotate", "--config", str(config), "--kid", "k2"]) == 0
    assert main(["keys", "activate", "k2", "--config", str(config)]) == 0
    capsys.readouterr()
    assert main(["keys", "retire", "k1", "--config", str(config)]) == 1
    out = capsys.readouterr().out
    assert "1 license(s) it signed are still valid" in out
    assert time.strftime("%Y-%m-%d", time.gmtime(expires + 7 * 86400)) in out  # grace included
    assert (tmp_path / "keys" / "k1.pub").exists()
    assert main(["keys", "retire", "k2", "--config", str(config)]) == 1  # it signs now


def test_a_folder_of_generated_keys_is_adopted(tmp_path: Path) -> None:
    generate_keypair(tmp_path, "legacy")
    assert signing_kid(load_state(tmp_path)) == "legacy"
    assert signing_key(tmp_path)[1] == "legacy"


async def status(
    session: aiohttp.ClientSession, gateway: Gateway, headers: dict[str, str]
) -> tuple[int, str | None]:
    async with session.get(gateway.url("operations", "/api/v1/account"), headers=headers) as r:
        code = (await r.json())["code"] if r.status != 200 else None
        return r.status, code


async def test_the_rotation_runbook_on_a_fleet_sharing_redis(
    tmp_path: Path, upstream_ports: dict[str, int], redis: RedisServer, capsys: Capture
) -> None:
    config, port = write_issuer(tmp_path / "issuer", store_target("fleet", redis.url))
    extra = f'\n[store]\nurl = "{redis.url}"\n'
    published = tmp_path / "issuer" / "keys"
    async with (
        two_gateways(tmp_path, published, upstream_ports, extra=extra) as (one, two),
        running_issuer(config, port) as issuer,
        aiohttp.ClientSession() as session,
    ):
        fleet = (one, two)
        # A license signed with k1 that ends soon, delivered into the shared store.
        ends = int(time.time()) + 3
        code, old = await issuer.order(order_id="o1", tenant="acme", skus=["CORE"], ends_at=ends)
        assert code == 201 and old["kid"] == "k1"
        for gateway in fleet:
            assert await status(session, gateway, {"X-License-Key": old["key"]}) == (200, None)

        # 1. rotate: k2 is written into every gateway's key folder, still unused.
        publish = [f"--publish={folder}" for folder in (published, one.folder / "keys",
                                                        two.folder / "keys")]  # fmt: skip
        assert main(["keys", "rotate", "--config", str(config), "--kid", "k2", *publish]) == 0
        # 2. every gateway reloads and knows k2.
        for gateway in fleet:
            assert await gateway.runtime.reload("SIGHUP")
            assert "k2" in gateway.runtime.shared.licenses.keyring.keys
        # 3. activate: the issuer signs new orders with k2; both gateways accept them,
        #    by key and by tenant id (from the store).
        assert main(["keys", "activate", "k2", "--config", str(config)]) == 0
        code, new = await issuer.order(order_id="o2", tenant="globex", skus=["FLEET"])
        assert code == 201 and new["kid"] == "k2" and kid_of(new["key"]) == "k2"
        assert new["deliveries"][0]["state"] == "delivered"
        for gateway in fleet:
            assert await status(session, gateway, {"X-License-Key": new["key"]}) == (200, None)
            assert await status(session, gateway, {"X-Tenant-Id": "globex"}) == (200, None)
            # k1's keys keep working until k1 is retired
            assert await status(session, gateway, {"X-License-Key": old["key"]}) == (200, None)
            assert await status(session, gateway, {"X-Tenant-Id": "acme"}) == (200, None)

        # 4. retire: refused while a k1 license is valid, allowed once the last one ended.
        retire = ["keys", "retire", "k1", "--config", str(config), "--grace-days", "0", *publish]
        assert main(retire) == 1
        await asyncio.sleep(max(0.0, ends - time.time()) + 1.1)
        for gateway in fleet:  # ended, restricted, but still signed by a trusted kid
            assert (await status(session, gateway, {"X-License-Key": old["key"]}))[0] == 200
        assert main(retire) == 0
        assert not (one.folder / "keys" / "k1.pub").exists()
        assert not (tmp_path / "issuer" / "issuer-keys" / "k1.key").exists()
        for gateway in fleet:
            assert await gateway.runtime.reload("SIGHUP")
            assert await status(session, gateway, {"X-License-Key": old["key"]}) == (
                401, "license_unknown_key",
            )  # fmt: skip
            assert await status(session, gateway, {"X-Tenant-Id": "acme"}) == (
                401, "license_missing",
            )  # fmt: skip
            assert await status(session, gateway, {"X-Tenant-Id": "globex"}) == (200, None)
    capsys.readouterr()
    actions = [json.loads(line)["action"] for line in
               (tmp_path / "issuer" / "audit.jsonl").read_text().splitlines()]  # fmt: skip
    assert actions == ["issue", "provision", "key_rotate", "key_activate", "issue", "provision",
                       "key_retire"]  # fmt: skip
    assert main(["audit", "verify", "--config", str(config)]) == 0
