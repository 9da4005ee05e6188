"""``gateway tenant show | list | reconcile`` on a real SQLite store, in-process."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest

from gateway.cli import main
from gateway.matrix import APP_NAMES
from tests.conftest import IssueKey
from tests.harness import write_config

Capture = pytest.CaptureFixture[str]
DAY = 86400
NOW = int(time.time())


@pytest.fixture
def config(tmp_path: Path, key_dir: Path) -> Path:
    path, _, _ = write_config(
        tmp_path, key_dir, dict.fromkeys(APP_NAMES, 1), extra='\n[store]\nurl = "sqlite://t.db"\n'
    )
    return path


def run(capsys: Capture, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def load(capsys: Capture, config: Path, tenants: dict[str, list[str]], **extra: str) -> None:
    """Tenants and their keys into the store, through ``gateway tenant import``."""
    lines = []
    for tenant, keys in tenants.items():
        quoted = ", ".join(f'"{key}"' for key in keys)
        lines.append(f'[[tenants]]\nid = "{tenant}"\nkeys = [{quoted}]\n{extra.get(tenant, "")}\n')
    path = config.parent / "tenants.toml"
    path.write_text("\n".join(lines))
    assert run(capsys, "tenant", "import", str(path), "--config", str(config))[0] == 0


@pytest.fixture
def acme(capsys: Capture, config: Path, issue_key: IssueKey) -> dict[str, str]:
    """acme: an old Core license (superseded), a Fleet trial that ended, the Fleet license in
    force with an add-on, a revoked one, and a Core downgrade scheduled in 30 days."""
    keys = {
        "old": issue_key(sub="acme", jti="old", serial=1, nbf=NOW - 90 * DAY, exp=NOW + 90 * DAY),
        "trial": issue_key(
            sub="acme", jti="trial", tier="fleet", trial=True, serial=2,
            nbf=NOW - 40 * DAY, exp=NOW - 26 * DAY,
        ),
        "current": issue_key(
            sub="acme", jti="current", tier="fleet", addons=["emergency_support"], serial=3,
            exp=NOW + 30 * DAY,
        ),
        "leaked": issue_key(sub="acme", jti="leaked", tier="enterprise", serial=4),
        "downgrade": issue_key(
            sub="acme", jti="downgrade", serial=5, nbf=NOW + 30 * DAY, exp=NOW + 395 * DAY
        ),
    }  # fmt: skip
    load(capsys, config, {"acme": list(keys.values())}, acme='revoked = ["leaked"]')
    assert run(capsys, "tenant", "usage", "acme", "--ops-users", "5", "--drivers", "2",
               "--config", str(config))[0] == 0  # fmt: skip
    return keys


def test_tenant_show_flags_each_license_and_shows_seats_next_to_usage(
    capsys: Capture, config: Path, acme: dict[str, str]
) -> None:
    code, out, _ = run(capsys, "tenant", "show", "acme", "--config", str(config))
    assert code == 0
    lines = {
        line[3:].split()[0] if line.startswith(" ") else line: line for line in out.splitlines()
    }
    assert lines["downgrade"].endswith("[scheduled]")
    assert lines["leaked"].endswith("[revoked]")
    assert lines["current"].startswith(" * current  fleet + emergency_support")
    assert lines["current"].endswith("[in force]")
    assert lines["trial"].endswith("[expired, trial]")
    assert lines["old"].endswith("[superseded]")
    assert "state:      active" in out
    assert "plan:       fleet; add-ons: emergency_support" in out
    assert "Operations users: 5 used of 5 included  AT THE LIMIT" in out
    assert "drivers: 2 used of 5 included\n" in out
    assert "revoked:    leaked" in out


def test_tenant_show_json(capsys: Capture, config: Path, acme: dict[str, str]) -> None:
    code, out, _ = run(capsys, "tenant", "show", "acme", "--config", str(config), "--json")
    assert code == 0
    shown: dict[str, Any] = json.loads(out)
    assert shown["current"] == "current" and shown["state"] == "active"
    assert {lic["license_id"]: lic["status"] for lic in shown["licenses"]} == {
        "downgrade": "scheduled",
        "leaked": "revoked",
        "current": "in_force",
        "trial": "expired",
        "old": "superseded",
    }
    assert shown["seats"] == {
        "ops_users": {"used": 5, "included": 5},
        "drivers": {"used": 2, "included": 5},
    }
    assert shown["usage"] == {"ops_users": 5, "drivers": 2}
    assert shown["expires"].endswith("UTC") and shown["suspended"] is False


def test_tenant_show_an_unknown_tenant(capsys: Capture, config: Path) -> None:
    code, _, err = run(capsys, "tenant", "show", "nobody", "--config", str(config))
    assert code == 1 and "not in the store" in err


def test_tenant_list(
    capsys: Capture, config: Path, acme: dict[str, str], issue_key: IssueKey
) -> None:
    until = NOW + 60 * DAY
    load(
        capsys,
        config,
        {
            "globex": [issue_key(sub="globex", tier="enterprise", trial=True, exp=NOW + 14 * DAY)],
            "initech": [
                issue_key(
                    sub="initech",
                    tier="core",
                    grandfather_tier="enterprise",
                    grandfather_until=until,
                )
            ],
            "later": [issue_key(sub="later", nbf=NOW + 5 * DAY, exp=NOW + 9 * DAY)],
            "paused": [issue_key(sub="paused", tier="fleet")],
        },  # fmt: skip
        paused="suspended = true",
    )
    code, out, _ = run(capsys, "tenant", "list", "--config", str(config))
    assert code == 0
    rows = {line.split()[0]: line for line in out.splitlines()[1:-1]}
    assert out.splitlines()[0].split() == [
        "TENANT", "STATE", "TIER", "ADD-ONS", "EXPIRES", "LICENSE", "IN", "FORCE",
    ]  # fmt: skip
    assert rows["acme"].split()[1:4] == ["active", "fleet", "emergency_support"]
    assert rows["globex"].split()[1:4] == ["active,", "trial", "enterprise"]
    day = time.strftime("%Y-%m-%d", time.gmtime(until))
    assert f"core (as enterprise until {day})" in rows["initech"]
    assert rows["later"].split()[1:3] == ["scheduled", "-"]
    assert rows["paused"].split()[1:3] == ["suspended", "fleet"]
    assert out.splitlines()[-1] == "5 tenants"

    code, out, _ = run(capsys, "tenant", "list", "--config", str(config), "--json")
    listed = {item["tenant"]: item for item in json.loads(out)}
    assert listed["initech"]["effective_tier"] == "enterprise"
    assert listed["globex"]["trial"] is True and listed["later"]["current"] is None
    assert "licenses" not in listed["acme"]


def test_tenant_reconcile(capsys: Capture, config: Path, acme: dict[str, str]) -> None:
    export = config.parent / "export.csv"
    ends = time.strftime("%Y-%m-%d", time.gmtime(NOW + 30 * DAY))
    export.write_text(
        f"tenant,tier,addons,ops_users,drivers,ends_at\nacme,fleet,emergency_support,,,{ends}\n"
    )
    code, out, _ = run(
        capsys, "tenant", "reconcile", "--billing", str(export), "--config", str(config)
    )
    assert code == 0, out
    assert out.strip() == "1 billing rows, 1 store tenants: no drift"

    export.write_text("tenant,tier,addons\nacme,enterprise,\nglobex,core,\n")
    code, out, _ = run(
        capsys, "tenant", "reconcile", "--billing", str(export), "--config", str(config)
    )
    assert code == 1
    assert "acme: tier: billing enterprise, store fleet" in out
    assert "acme: addons: billing -, store emergency_support" in out
    assert "globex: tenant: billing core (line 3), store absent" in out
    assert out.splitlines()[-1] == "2 billing rows, 1 store tenants: 5 differences in 2 tenants"

    code, out, _ = run(
        capsys, "tenant", "reconcile", "--billing", str(export), "--config", str(config), "--json"
    )
    assert code == 1
    assert {
        "tenant": "globex",
        "field": "tenant",
        "billing": "core (line 3)",
        "store": "absent",
    } in (json.loads(out))


def test_tenant_reconcile_a_bad_export(capsys: Capture, config: Path) -> None:
    export = config.parent / "export.csv"
    export.write_text("tenant,plan\nacme,fleet\n")
    code, _, err = run(
        capsys, "tenant", "reconcile", "--billing", str(export), "--config", str(config)
    )
    assert code == 1 and "missing column(s) tier" in err and "unknown column(s) plan" in err
