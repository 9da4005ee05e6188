"""``gateway migrate --issuer``: each customer an order to a real issuing service process,
delivered to a real gateway through its provisioning hook; classic keys imported by
migrate itself; the audit trail of both; re-runs that order nothing twice."""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from gateway.cli import main
from gateway.license import Seats
from gateway.matrix import TierMatrix
from gateway.migration import DAY, ORDER_PREFIX, next_step, order_for, plan_customer
from gateway.skus import SkuLine
from tests.conftest import REPO
from tests.harness import EchoUpstream, Gateway, free_port, running_gateway
from tests.issuer_harness import BILLING_SECRET, hook_target, running_issuer, write_issuer
from tests.test_migration import (
    KEY_A,
    KEY_B,
    NOW,
    START,
    classic_imported,
    customer,
    plan_file,
    read_store,
    sqlite_config,
)

pytestmark = pytest.mark.usefixtures("provision_secret")

Capture = pytest.CaptureFixture[str]
KEY_C = "XDC55-6K7LM-8N9PQ-RS2TU-VW3XY"
KEY_D = "XDB11-22C33-D44E5-5F66G-7H88J"
SECRET_ENV = "MIGRATION_BILLING_SECRET"


def drop_sku(matrix: Path, sku: str) -> None:
    """Take one SKU out of a copy of the shipped matrix (this catalog does not sell it)."""
    text, count = re.subn(
        rf"\[skus\.{re.escape(sku)}\]\n(?:[^\[\n].*\n)*\n?", "", matrix.read_text()
    )
    assert count == 1, sku
    matrix.write_text(text)


def audit_actions(path: Path) -> list[tuple[str, str]]:
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    return [(line["action"], line["tenant"]) for line in lines]


async def seen(session: aiohttp.ClientSession, gateway: Gateway, **headers: str) -> Any:
    """What the operations upstream is told for these headers, or the gateway's status."""
    async with session.get(gateway.url("operations", "/api/v1/shipments"), headers=headers) as r:
        if r.status != 200:
            return r.status
        return (await r.json())["headers"].get("X-Entitlement-Tier", "classic")


def test_the_order_id_follows_the_plan(matrix: TierMatrix) -> None:
    step = next_step(plan_customer(customer(), matrix, start=START, exp=START + DAY), None, NOW)
    order = order_for(step, [SkuLine("FLEET")])
    assert order.order_id.startswith(f"{ORDER_PREFIX}acme-")
    assert order_for(step, [SkuLine("FLEET")]) == order  # the same plan: the same order
    later = next_step(
        plan_customer(customer(), matrix, start=START + DAY, exp=START + 2 * DAY), None, NOW
    )
    seats = next_step(
        plan_customer(customer(seats=Seats(3, 3)), matrix, start=START, exp=START + DAY), None, NOW
    )
    revoked = order_for(step, [SkuLine("FLEET")], frozenset({"an-earlier-license"}))
    ids = {order.order_id, order_for(later, [SkuLine("FLEET")]).order_id,
           order_for(seats, [SkuLine("FLEET")]).order_id, revoked.order_id}  # fmt: skip
    assert len(ids) == 4
    assert (order.grandfather_tier, order.grandfather_until) == ("enterprise", START + 90 * DAY)
    assert (order.starts_at, order.ends_at, order.seats) == (START, START + DAY, None)


async def test_apply_through_the_issuer_twice_issues_once(
    tmp_path: Path,
    upstreams: dict[str, EchoUpstream],
    monkeypatch: pytest.MonkeyPatch,
    capsys: Capture,
) -> None:
    monkeypatch.setenv(SECRET_ENV, BILLING_SECRET)
    ports = {app: server.port for app, server in upstreams.items()}
    write_issuer(tmp_path / "issuer", "")  # its signing key, published for the gateway
    (tmp_path / "gw").mkdir()
    extra = (
        '\n[store]\nurl = "sqlite://tenants.db"\n\n[license]\nclassic_keys = "store"\n'
        '\n[audit]\nlog = "audit.jsonl"\n'
    )
    plan = plan_file(
        tmp_path,
        f"cust-a,{KEY_A},core,,,,",  # Core, with the Enterprise window
        f"cust-b,{KEY_B},fleet,emergency_support,8,20,0",  # no window, contract seats
        f"cust-c,{KEY_C},core,route_distribution,,,",  # the gateway's catalog cannot order it
        f"cust-d,{KEY_D},core,sms_messaging,,,",  # the issuer's catalog refuses it
    )
    async with (
        running_gateway(tmp_path / "gw", tmp_path / "issuer" / "keys", ports, extra=extra) as gw,
        aiohttp.ClientSession() as session,
    ):
        gw_config = tmp_path / "gw" / "gateway.toml"
        drop_sku(tmp_path / "gw" / "tier_matrix.toml", "ADDON-ROUTE-DIST")
        config, port = write_issuer(tmp_path / "issuer", hook_target("gw", gw.admin))
        drop_sku(tmp_path / "issuer" / "tier_matrix.toml", "ADDON-SMS")
        async with running_issuer(config, port) as issuer:
            argv = ["migrate", "--plan", str(plan), "--config", str(gw_config), "--apply",
                    "--issuer", issuer.base, "--billing-secret-env", SECRET_ENV]  # fmt: skip

            code = await asyncio.to_thread(main, argv)
            out = capsys.readouterr().out
            assert code == 1, out  # one not migratable, one refused by the issuer
            assert "cust-a (line 2): issue: no license yet" in out
            order_a = re.search(r"order:       CORE \((migrate-cust-a-\w+)\)", out)
            assert order_a is not None, out
            assert f"ordered ({order_a[1]}); delivery: gw delivered" in out
            assert "order:       FLEET + ADDON-EMERGENCY (migrate-cust-b-" in out
            assert (
                "cust-c (line 4): refused: not migratable: no SKU sells add-on "
                "'route_distribution'" in out
            )
            assert re.search(r"FAILED: .*refused order migrate-cust-d-\w+: 422 order_refused, "
                             r"rule unknown_sku: SKU 'ADDON-SMS'.*1 classic keys removed again, "
                             "customer untouched", out)  # fmt: skip
            assert "4 customers: 3 to issue, 0 to re-issue, 0 unchanged, 0 conflicts, " in out
            assert "1 not migratable" in out and "applied, 1 failed" in out

            gw.runtime.shared.tenants.invalidate()
            assert await seen(session, gw, **{"X-Tenant-Id": "cust-a"}) == "enterprise"
            assert await seen(session, gw, **{"X-Tenant-Id": "cust-b"}) == "fleet"
            for tenant in ("cust-c", "cust-d"):
                assert await seen(session, gw, **{"X-Tenant-Id": tenant}) == 401
            for key, answer in ((KEY_A, "classic"), (KEY_B, "classic"), (KEY_C, 401),
                                (KEY_D, 401)):  # fmt: skip
                assert await seen(session, gw, **{"X-License-Key": key}) == answer, key
            stored = await asyncio.to_thread(read_store, gw_config)
            assert stored["cust-b"].licenses[0].claims.seats == Seats(8, 20)
            status, ordered = await issuer.call("GET", f"/v1/orders/{order_a[1]}")
            assert status == 200
            assert ordered["license_id"] == stored["cust-a"].licenses[0].claims.jti
            assert ordered["grandfather_tier"] == "enterprise"

            # Again: nothing ordered, nothing imported; the two failures are reported again.
            code = await asyncio.to_thread(main, argv)
            out = capsys.readouterr().out
            assert code == 1, out
            assert "cust-a (line 2): unchanged" in out and "cust-b (line 3): unchanged" in out
            assert "1 to issue, 0 to re-issue, 2 unchanged" in out and "ordered (" not in out

            # Billing sells cust-a something; cust-b's line changes: a conflict left alone,
            # and a new order for cust-b recognised as the migration's own.
            status, sold = await issuer.order(order_id="ord-9", tenant="cust-a", skus=["FLEET"])
            assert status == 201, sold
            changed = plan.read_text().replace(
                "fleet,emergency_support,8", "fleet,emergency_support;personalized_url,8"
            )
            plan.write_text(changed)
            code = await asyncio.to_thread(main, argv)
            out = capsys.readouterr().out
            assert "cust-a (line 2): conflict: holds license" in out
            assert "cust-b (line 3): reissue: add-ons" in out
            assert "order:       FLEET + ADDON-EMERGENCY + ADDON-PURL (migrate-cust-b-" in out
    issued = [(a, t) for a, t in audit_actions(tmp_path / "issuer" / "audit.jsonl") if a == "issue"]
    assert issued == [
        ("issue", "cust-a"),
        ("issue", "cust-b"),
        ("issue", "cust-a"),
        ("issue", "cust-b"),
    ]  # fmt: skip  (run 1; billing's order; run 3)
    trail = audit_actions(tmp_path / "gw" / "audit.jsonl")
    assert trail[:6] == [
        ("migrate", "cust-a"), ("provision", "cust-a"), ("migrate", "cust-b"),
        ("provision", "cust-b"), ("migrate", "cust-d"), ("migrate_undo", "cust-d"),
    ]  # fmt: skip
    assert main(["audit", "verify", "--log", str(tmp_path / "gw" / "audit.jsonl")]) == 0


@pytest.mark.parametrize(
    ("argv", "error"),
    [
        pytest.param(["--apply"], "--apply needs --signing-key or --issuer URL", id="neither"),
        pytest.param(["--apply", "--issuer", "http://127.0.0.1:9"], "--billing-secret-env",
                     id="no-secret"),
        pytest.param(["--apply", "--issuer", "127.0.0.1:9", "--billing-secret-env", "X"],
                     "expected http(s)://", id="not-a-url"),
        pytest.param(["--apply", "--issuer", "http://127.0.0.1:9", "--billing-secret-env",
                      "MIGRATION_SECRET_NOT_SET"], "$MIGRATION_SECRET_NOT_SET is not set",
                     id="secret-unset"),
        pytest.param(["--dry-run", "--billing-secret-env", "X"], "goes with --issuer",
                     id="secret-without-issuer"),
    ],
)  # fmt: skip
def test_issuer_usage_errors(
    capsys: Capture, tmp_path: Path, key_dir: Path, argv: list[str], error: str
) -> None:
    config, _ = sqlite_config(tmp_path, key_dir)
    sample = REPO / "docs" / "examples" / "customers.csv"
    code = main(["migrate", "--plan", str(sample), "--config", str(config), *argv])
    out, err = capsys.readouterr()
    assert code == 2 and error in err, err


def test_an_issuer_that_does_not_answer_writes_nothing(
    capsys: Capture, tmp_path: Path, key_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:

    monkeypatch.setenv(SECRET_ENV, BILLING_SECRET)
    config, _ = sqlite_config(tmp_path, key_dir)
    plan = plan_file(tmp_path, f"acme,{KEY_A},fleet,,,,")
    code = main(["migrate", "--plan", str(plan), "--config", str(config), "--apply",
                 "--issuer", f"http://127.0.0.1:{free_port()}", "--billing-secret-env",
                 SECRET_ENV])  # fmt: skip
    out = capsys.readouterr().out
    assert code == 1
    assert "did not answer" in out and "a re-run places the same order" in out
    assert "1 classic keys removed again, customer untouched" in out
    assert set(read_store(config)) == {"_init"} and classic_imported(config, KEY_A) == [False]


def test_a_dry_run_with_the_issuer_shows_each_order_and_places_none(
    capsys: Capture, tmp_path: Path, key_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(SECRET_ENV, BILLING_SECRET)
    config, _ = sqlite_config(tmp_path, key_dir)
    (tmp_path / "tier_matrix.toml").write_text(
        (tmp_path / "tier_matrix.toml").read_text() + "\n[skus.FLEET-EMERGENCY]\n"
        'addons = ["emergency_support", "personalized_url"]\n'
    )  # a bundle granting more than cust-0042's plan: not used for it
    sample = REPO / "docs" / "examples" / "customers.csv"
    nobody = f"http://127.0.0.1:{free_port()}"  # a new customer needs no answer from it
    code = main(["migrate", "--plan", str(sample), "--config", str(config), "--dry-run",
                 "--issuer", nobody, "--billing-secret-env", SECRET_ENV])  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0, out
    assert "order:       FLEET + ADDON-EMERGENCY (migrate-cust-0042-" in out
    assert "order:       CORE + ADDON-ADV-OPT + ADDON-ROUTE-DIST (migrate-cust-0043-" in out
    assert "order:       ENTERPRISE (migrate-cust-0044-" in out
    assert "dry run: nothing written" in out and set(read_store(config)) == {"_init"}
