"""The migration of classic customers: the plan file, what each customer keeps and loses,
when a run issues, re-issues, leaves alone or refuses, and ``gateway migrate`` end to end on
real stores (SQLite files, a real redis-server) and through a real gateway."""

from __future__ import annotations

import asyncio
import json
import re
import sqlite3
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import pytest

from gateway.audit import AuditLog, AuditRecord
from gateway.cli import main
from gateway.config import load_config
from gateway.csvrows import CsvError
from gateway.decision import TenantRecord
from gateway.license import ClassicKeys, KeyRing, Seats, load_signing_key, sign_license
from gateway.matrix import APP_NAMES, TierMatrix
from gateway.migration import (
    DAY,
    ISSUER,
    Customer,
    Outcome,
    apply_step,
    audit_line,
    next_step,
    plan_customer,
    read_plan,
    sign_steps,
    store_license,
)
from gateway.store import TenantStore, open_store
from tests.conftest import REPO, IssueKey
from tests.harness import running_gateway, write_config
from tests.redis_server import RedisServer, start_redis

Capture = pytest.CaptureFixture[str]
T = TypeVar("T")
SAMPLE = REPO / "docs" / "examples" / "customers.csv"
HEADER = "tenant,classic_key,tier,addons,ops_users,drivers,grandfather_days\n"
KEY_A = "XD7Q2-4KLMN-8PRST-2VWXY-3ABCD"
KEY_B = "XD9AA-4KLMN-8PRST-2VWXY-3ABCE"
NOW = int(time.time())
START = NOW - NOW % DAY


def plan_file(folder: Path, *lines: str) -> Path:
    path = folder / "customers.csv"
    path.write_text(HEADER + "".join(f"{line}\n" for line in lines))
    return path


# -- the plan file ----------------------------------------------------------------------------


def test_the_sample_plan_reads(matrix: TierMatrix) -> None:
    customers = read_plan(SAMPLE, matrix, ClassicKeys())
    assert [c.tenant for c in customers] == ["cust-0042", "cust-0043", "cust-0044", "cust-0045"]
    first, second, third, fourth = customers
    assert (first.tier, first.addons, first.seats, first.grandfather_days) == (
        "fleet",
        ("emergency_support",),
        None,
        90,
    )
    assert second.seats == Seats(3, 12) and second.addons == (
        "route_distribution",
        "advanced_shipment_optimization",
    )
    assert len(third.classic_keys) == 2
    assert fourth.grandfather_days == 30


def test_a_bad_plan_lists_every_bad_line(tmp_path: Path, matrix: TierMatrix) -> None:
    path = plan_file(
        tmp_path,
        f"a,{KEY_A},gold,,,,",
        f"b,{KEY_A},core,personalized_url,,,",
        f"c,{KEY_A},core,warp_drive,,,",
        f"d,{KEY_A},fleet,,5,,",
        "e,not-a-classic-key,fleet,,,,",
        f"f,{KEY_A},fleet,,,,ninety",
        f"a,{KEY_B},core,,,,",
        f"g,{KEY_A},core,sms_messaging;sms_messaging,,,",
        f"h,{KEY_A},core,,,,",
    )
    with pytest.raises(CsvError) as caught:
        read_plan(path, matrix, ClassicKeys())
    lines = str(caught.value).splitlines()
    assert [re.sub(r"^.*?:(\d+) \[(\w+)\].*$", r"\1 \2", line) for line in lines] == [
        "2 tier",
        "3 addons",
        "4 addons",
        "5 ops_users",
        "6 classic_key",
        "7 grandfather_days",
        "9 addons",
    ]  # line 8 ("a" again) is not a duplicate: line 2 failed; line 9 lists an add-on twice
    assert "unknown tier 'gold'" in lines[0]
    assert "not available to tier 'core'" in lines[1]


def test_a_duplicate_tenant_is_refused(tmp_path: Path, matrix: TierMatrix) -> None:
    path = plan_file(tmp_path, f"a,{KEY_A},core,,,,", f"a,{KEY_B},fleet,,,,")
    with pytest.raises(CsvError, match=r":3 \[tenant\]: 'a' is also on line 2"):
        read_plan(path, matrix, ClassicKeys())


def test_a_plan_needs_every_column(tmp_path: Path, matrix: TierMatrix) -> None:
    path = tmp_path / "customers.csv"
    path.write_text("tenant,tier\nacme,core\n")
    with pytest.raises(CsvError, match="missing column"):
        read_plan(path, matrix, ClassicKeys())


# -- what each customer keeps and loses --------------------------------------------------------


def customer(**fields: object) -> Customer:
    values: dict[str, object] = {
        "tenant": "acme", "tier": "fleet", "addons": (), "seats": None,
        "grandfather_days": 90, "classic_keys": (KEY_A,), "line": 2,
    }  # fmt: skip
    values.update(fields)
    return Customer(**values)  # type: ignore[arg-type]


def test_the_window_keeps_what_the_top_tier_has_beyond_the_plan(matrix: TierMatrix) -> None:
    plan = plan_customer(
        customer(addons=("emergency_support",)), matrix, start=START, exp=START + 365 * DAY
    )
    top = matrix.tiers["enterprise"].features
    after = matrix.entitlement("fleet", ("emergency_support",)).features
    assert set(plan.keeps) == top - after and "ops.emergency_support" not in plan.keeps
    assert (plan.grandfather_tier, plan.grandfather_until) == ("enterprise", START + 90 * DAY)
    assert (plan.seats_during, plan.seats_after) == (Seats(10, 10), Seats(5, 5))


def test_contract_seats_hold_during_and_after_the_window(matrix: TierMatrix) -> None:
    plan = plan_customer(customer(seats=Seats(8, 20)), matrix, start=START, exp=START + DAY)
    assert plan.seats_during == plan.seats_after == Seats(8, 20)


@pytest.mark.parametrize(
    "fields",
    [
        pytest.param({"tier": "enterprise"}, id="top-tier"),
        pytest.param({"grandfather_days": 0}, id="zero-days"),
    ],
)
def test_no_window(matrix: TierMatrix, fields: dict[str, object]) -> None:
    plan = plan_customer(customer(**fields), matrix, start=START, exp=START + DAY)
    assert (plan.grandfather_tier, plan.grandfather_until, plan.keeps) == (None, None, ())


# -- issue, re-issue, leave alone, refuse -------------------------------------------------------


def record_with(
    keyring: KeyRing, *tokens: str, revoked: frozenset[str] = frozenset()
) -> TenantRecord:
    licenses = sorted((keyring.verify(t) for t in tokens), key=lambda lic: -lic.claims.serial)
    return TenantRecord("acme", licenses=tuple(licenses), revoked=revoked)


def migration_key(issue_key: IssueKey, **claims: object) -> str:
    fields: dict[str, object] = {
        "iss": ISSUER, "sub": "acme", "tier": "fleet", "nbf": START, "exp": START + 365 * DAY,
        "grandfather_tier": "enterprise", "grandfather_until": START + 90 * DAY, "serial": 5,
    }  # fmt: skip
    fields.update(claims)
    return issue_key(**fields)


def test_next_step(matrix: TierMatrix, keyring: KeyRing, issue_key: IssueKey) -> None:
    plan = plan_customer(customer(), matrix, start=START, exp=START + 365 * DAY)

    assert next_step(plan, None, NOW).action == "issue"
    same = record_with(keyring, migration_key(issue_key))
    unchanged = next_step(plan, same, NOW)
    assert unchanged.action == "unchanged"

    changed = next_step(plan, record_with(keyring, migration_key(issue_key, tier="core")), NOW)
    assert (changed.action, changed.why) == ("reissue", "tier core -> fleet")

    sold_since = record_with(keyring, migration_key(issue_key), issue_key(sub="acme", serial=9))
    conflict = next_step(plan, sold_since, NOW)
    assert conflict.action == "conflict" and "issued outside the migration" in conflict.why

    undone = record_with(
        keyring, migration_key(issue_key, jti="undone"), revoked=frozenset({"undone"})
    )
    again = next_step(plan, undone, NOW)
    assert again.action == "issue" and again.serial > 5


def test_a_new_serial_is_above_every_serial_held(
    matrix: TierMatrix, keyring: KeyRing, issue_key: IssueKey
) -> None:
    plan = plan_customer(customer(), matrix, start=START, exp=START + DAY)
    future = record_with(keyring, migration_key(issue_key, tier="core", serial=NOW + 10_000))
    assert next_step(plan, future, NOW).serial == NOW + 10_001


# -- gateway migrate, end to end ----------------------------------------------------------------


@pytest.fixture(scope="module")
def redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = start_redis(tmp_path_factory.mktemp("redis"))
    yield server
    server.stop()


@pytest.fixture(params=["sqlite", "redis"])
def setup(request: pytest.FixtureRequest, tmp_path: Path, key_dir: Path) -> Path:
    """A gateway.toml on a SQLite file or a fresh Redis database; returns its path."""
    if request.param == "sqlite":
        url = "sqlite://tenants.db"
    else:
        server: RedisServer = request.getfixturevalue("redis")
        url = server.url
        asyncio.run(_flush(url))  # this module's own server: start each test empty
    config, _, _ = write_config(
        tmp_path, key_dir, dict.fromkeys(APP_NAMES, 1), extra=f'\n[store]\nurl = "{url}"\n'
    )
    return config


async def _flush(url: str) -> None:
    import redis.asyncio

    client = redis.asyncio.Redis.from_url(url)
    await client.flushdb()
    await client.aclose()


def migrate(capsys: Capture, config: Path, plan: Path, *extra: str) -> tuple[int, str]:
    code = main(["migrate", "--plan", str(plan), "--config", str(config), *extra])
    out, err = capsys.readouterr()
    return code, out + err


def on_store(config: Path, job: Callable[[TenantStore], Awaitable[T]]) -> T:
    """Run ``job`` on the store of ``config``, as another process would."""
    loaded = load_config(config)

    async def run() -> T:
        store = open_store(loaded.store_url, loaded.keyring)
        try:
            return await job(store)
        finally:
            await store.close()

    return asyncio.run(run())


def read_store(config: Path) -> dict[str, TenantRecord]:
    async def read(store: TenantStore) -> dict[str, TenantRecord]:
        return {record.tenant: record for record in await store.list_tenants()}

    return on_store(config, read)


def classic_imported(config: Path, *keys: str) -> list[bool]:
    async def read(store: TenantStore) -> list[bool]:
        return [await store.is_classic_key(key) for key in keys]

    return on_store(config, read)


def test_dry_run_reports_and_writes_nothing(capsys: Capture, setup: Path) -> None:
    code, out = migrate(capsys, setup, SAMPLE, "--dry-run")
    assert code == 0, out
    assert "cust-0042 (line 6): issue: no license yet" in out
    assert "Fleet + emergency_support; 5 Operations users / 5 drivers; $1,500/mo + $300/mo" in out
    assert re.search(
        r"until \d{4}-\d\d-\d\d: keeps Enterprise \(10 Operations users / 10 drivers\)", out
    )
    assert "loses Operations: Advanced Shipment Optimization" in out
    assert "window:      none (nothing to keep" in out  # cust-0044 is on Enterprise
    assert "4 customers: 4 to issue, 0 to re-issue, 0 unchanged, 0 conflicts" in out
    assert "dry run: nothing written" in out
    assert not (setup.parent / "tenants.db").exists()
    assert read_store(setup) == {}


def test_apply_twice_issues_once(capsys: Capture, setup: Path, key_dir: Path) -> None:
    signing = ["--signing-key", str(key_dir / "test.key")]
    code, out = migrate(capsys, setup, SAMPLE, "--apply", *signing)
    assert code == 0, out
    assert "applied, 0 failed" in out and len(re.findall(r"\(fingerprint \w+\) stored", out)) == 4
    first = read_store(setup)
    assert sorted(first) == ["cust-0042", "cust-0043", "cust-0044", "cust-0045"]
    fleet = first["cust-0042"].licenses[0].claims
    assert (fleet.iss, fleet.tier, fleet.addons, fleet.grandfather_tier) == (
        ISSUER,
        "fleet",
        ("emergency_support",),
        "enterprise",
    )
    assert fleet.grandfather_until == fleet.nbf + 90 * DAY
    assert first["cust-0044"].licenses[0].claims.grandfather_tier is None
    assert first["cust-0043"].licenses[0].claims.seats == Seats(3, 12)
    keys = [
        "XD7Q2-4KLMN-8PRST-2VWXY-3ABCD",
        "XDB11-22C33-D44E5-5F66G-7H88J",
        "XDB11-22C33-D44E5-5F66G-7H88K",
    ]
    assert classic_imported(setup, *keys, "ZZZZZ-22C33-D44E5-5F66G-7H88K") == [
        True,
        True,
        True,
        False,
    ]

    code, out = migrate(capsys, setup, SAMPLE, "--apply", *signing)
    assert code == 0, out
    assert "0 to issue, 0 to re-issue, 4 unchanged" in out and ") stored" not in out
    assert read_store(setup) == first


def test_a_changed_line_is_reissued_and_keeps_its_window(
    capsys: Capture, setup: Path, key_dir: Path, tmp_path: Path
) -> None:
    signing = ["--signing-key", str(key_dir / "test.key")]
    before = plan_file(tmp_path, f"acme,{KEY_A},fleet,,,,")
    assert migrate(capsys, setup, before, "--apply", *signing, "--start", "2026-01-05")[0] == 0
    (held,) = read_store(setup)["acme"].licenses

    after = plan_file(tmp_path, f"acme,{KEY_A},fleet,emergency_support,,,")
    code, out = migrate(capsys, setup, after, "--apply", *signing)
    assert code == 0, out
    assert "acme (line 2): reissue: add-ons [] -> ['emergency_support']" in out
    newer, older = read_store(setup)["acme"].licenses
    assert older == held
    assert newer.claims.serial > held.claims.serial
    assert newer.claims.addons == ("emergency_support",)
    # The window began at the first migration (--start), not on the day of the re-run.
    assert (newer.claims.nbf, newer.claims.grandfather_until) == (
        held.claims.nbf,
        held.claims.grandfather_until,
    )


def test_a_customer_sold_something_since_is_a_conflict_left_alone(
    capsys: Capture, setup: Path, key_dir: Path, tmp_path: Path, issue_key: IssueKey
) -> None:
    sold = issue_key(sub="globex", tier="enterprise", serial=NOW)
    tenants = tmp_path / "tenants.toml"
    tenants.write_text(f'[[tenants]]\nid = "globex"\nkeys = ["{sold}"]\n')
    assert main(["tenant", "import", str(tenants), "--config", str(setup)]) == 0
    plan = plan_file(tmp_path, f"globex,{KEY_A},core,,,,", f"acme,{KEY_B},core,,,,")

    code, out = migrate(capsys, setup, plan, "--apply", "--signing-key", str(key_dir / "test.key"))
    assert code == 1
    assert "globex (line 2): conflict: holds license" in out and "1 conflicts" in out
    stored = read_store(setup)
    assert [lic.claims.tier for lic in stored["globex"].licenses] == ["enterprise"]
    assert classic_imported(setup, KEY_A, KEY_B) == [False, True]  # acme migrated, globex not


def test_a_signing_key_the_gateways_do_not_trust_writes_nothing(
    capsys: Capture, setup: Path, tmp_path: Path
) -> None:
    assert main(["keys", "generate", "--out", str(tmp_path / "other"), "--kid", "test"]) == 0
    capsys.readouterr()
    code, out = migrate(
        capsys, setup, SAMPLE, "--apply", "--signing-key", str(tmp_path / "other" / "test.key")
    )
    assert code == 1
    assert "does not verify with license.public_keys" in out
    assert read_store(setup) == {}


@pytest.mark.parametrize(
    ("argv", "error"),
    [
        pytest.param(["--apply"], "--apply needs --signing-key", id="no-signing-key"),
        pytest.param(
            ["--dry-run", "--grandfather-tier", "gold"], "unknown grandfather tier", id="tier"
        ),
        pytest.param(["--dry-run", "--days", "0"], "--days must be at least 1", id="days"),
    ],
)
def test_usage_errors(
    capsys: Capture, tmp_path: Path, key_dir: Path, argv: list[str], error: str
) -> None:
    config, _ = sqlite_config(tmp_path, key_dir)
    code, out = migrate(capsys, config, SAMPLE, *argv)
    assert code == 2 and error in out


def test_apply_needs_a_store_outside_the_gateway(
    capsys: Capture, tmp_path: Path, key_dir: Path
) -> None:
    config, _, _ = write_config(tmp_path, key_dir, dict.fromkeys(APP_NAMES, 1))  # memory://
    code, out = migrate(
        capsys, config, SAMPLE, "--apply", "--signing-key", str(key_dir / "test.key")
    )
    assert code == 2 and "memory://" in out
    code, out = migrate(capsys, config, SAMPLE, "--dry-run")
    assert code == 0 and "4 to issue" in out


# -- all or nothing per customer (a real SQLite file that refuses writes) -----------------------


def sqlite_config(tmp_path: Path, key_dir: Path) -> tuple[Path, Path]:
    config, _, _ = write_config(
        tmp_path, key_dir, dict.fromkeys(APP_NAMES, 1), extra='\n[store]\nurl = "sqlite://t.db"\n'
    )
    assert (
        main(
            [
                "tenant",
                "usage",
                "_init",
                "--ops-users",
                "0",
                "--drivers",
                "0",
                "--config",
                str(config),
            ]
        )
        == 0
    )
    return config, tmp_path / "t.db"


def refuse(db: Path, table: str, operation: str = "INSERT") -> None:
    """Make the real database refuse ``operation`` on ``table`` (as a full disk would)."""
    with sqlite3.connect(db) as conn:
        conn.execute(
            f"CREATE TRIGGER refuse_{table}_{operation} BEFORE {operation} ON {table} "
            "BEGIN SELECT RAISE(ABORT, 'disk says no'); END"
        )


def allow(db: Path, table: str, operation: str = "INSERT") -> None:
    with sqlite3.connect(db) as conn:
        conn.execute(f"DROP TRIGGER refuse_{table}_{operation}")


def test_a_customer_whose_classic_keys_cannot_be_written_is_left_untouched(
    capsys: Capture, tmp_path: Path, key_dir: Path
) -> None:
    config, db = sqlite_config(tmp_path, key_dir)
    plan = plan_file(tmp_path, f"acme,{KEY_A},fleet,,,,")
    signing = ["--signing-key", str(key_dir / "test.key")]
    refuse(db, "classic_keys")

    code, out = migrate(capsys, config, plan, "--apply", *signing)
    assert code == 1
    assert "FAILED:" in out and "disk says no" in out and "nothing written" in out
    assert "acme" not in read_store(config)  # the license comes after the keys: never stored
    assert classic_imported(config, KEY_A) == [False]

    allow(db, "classic_keys")
    code, out = migrate(capsys, config, plan, "--apply", *signing)
    assert code == 0, out
    assert "acme (line 2): issue" in out
    record = read_store(config)["acme"]
    assert len(record.licenses) == 1 and not record.revoked
    assert classic_imported(config, KEY_A) == [True]


def test_a_license_that_cannot_be_written_leaves_nothing_behind(
    capsys: Capture, tmp_path: Path, key_dir: Path
) -> None:
    config, db = sqlite_config(tmp_path, key_dir)
    plan = plan_file(tmp_path, f"acme,{KEY_A},fleet,,,,", f"globex,{KEY_B},core,,,,")
    refuse(db, "licenses")
    code, out = migrate(capsys, config, plan, "--apply", "--signing-key", str(key_dir / "test.key"))
    assert code == 1
    assert out.count("1 classic keys removed again, customer untouched") == 2 and "2 failed" in out
    assert set(read_store(config)) == {"_init"}
    assert classic_imported(config, KEY_A, KEY_B) == [False, False]


def test_when_even_the_undo_fails_a_rerun_completes_the_customer(
    capsys: Capture, tmp_path: Path, key_dir: Path
) -> None:
    config, db = sqlite_config(tmp_path, key_dir)
    plan = plan_file(tmp_path, f"acme,{KEY_A},fleet,,,,")
    signing = ["--signing-key", str(key_dir / "test.key")]
    refuse(db, "licenses")
    refuse(db, "classic_keys", "DELETE")
    code, out = migrate(capsys, config, plan, "--apply", *signing)
    assert code == 1 and "could not be removed again" in out and "re-run" in out

    allow(db, "licenses")
    allow(db, "classic_keys", "DELETE")
    code, out = migrate(capsys, config, plan, "--apply", *signing)
    assert code == 0 and "acme (line 2): issue" in out and "(1 already imported" in out
    assert classic_imported(config, KEY_A) == [True]
    assert len(read_store(config)["acme"].licenses) == 1


# -- the audit trail ------------------------------------------------------------------------------


def audit_lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_every_change_is_in_the_audit_trail_and_a_rerun_adds_nothing(
    capsys: Capture, tmp_path: Path, key_dir: Path
) -> None:
    config, _ = sqlite_config(tmp_path, key_dir)
    log = tmp_path / "audit.jsonl"
    with config.open("a") as handle:  # [audit] log of gateway.toml, as the other verbs use
        handle.write('\n[audit]\nlog = "audit.jsonl"\n')
    argv = ["--apply", "--signing-key", str(key_dir / "test.key"), "--actor", "alice"]
    code, out = migrate(capsys, config, SAMPLE, *argv, "--reason", "TICKET-7")
    assert code == 0, out
    assert "the migration is not recorded" not in out
    lines = audit_lines(log)
    store = read_store(config)
    assert [(line["action"], line["tenant"]) for line in lines] == [
        ("migrate", tenant) for tenant in ("cust-0042", "cust-0043", "cust-0044", "cust-0045")
    ]
    first = lines[0]
    held = store["cust-0042"].licenses[0]
    assert (first["actor"], first["reason"], first["license_id"], first["fingerprint"]) == (
        "alice", "TICKET-7", held.claims.jti, held.fingerprint,
    )  # fmt: skip
    assert (first["tier"], first["addons"], first["kid"]) == (
        "fleet", ["emergency_support"], "test",
    )  # fmt: skip
    assert first["detail"]["grandfather_tier"] == "enterprise"
    assert first["detail"]["classic_keys"] == 1 and first["detail"]["step"] == "issue"

    assert migrate(capsys, config, SAMPLE, *argv)[0] == 0
    assert len(audit_lines(log)) == 4  # nothing changed, nothing recorded
    assert main(["audit", "verify", "--log", str(log)]) == 0
    assert main(["audit", "show", "--tenant", "cust-0042", "--log", str(log)]) == 0
    assert "migrate" in capsys.readouterr().out


def test_an_audit_log_that_cannot_be_written_leaves_every_customer_untouched(
    capsys: Capture, tmp_path: Path, key_dir: Path
) -> None:
    config, _ = sqlite_config(tmp_path, key_dir)
    unwritable = tmp_path / "audit-is-a-folder"
    unwritable.mkdir()  # open() fails whoever runs the tests (root ignores file modes)
    signing = ["--apply", "--signing-key", str(key_dir / "test.key")]
    code, out = migrate(capsys, config, SAMPLE, *signing, "--audit-log", str(unwritable))
    assert code == 1
    assert out.count("cannot open") == 4 and out.count(": nothing written") == 4
    assert set(read_store(config)) == {"_init"}
    assert classic_imported(config, KEY_A, KEY_B) == [False, False]

    log = tmp_path / "audit.jsonl"
    code, out = migrate(capsys, config, SAMPLE, *signing, "--audit-log", str(log))
    assert code == 0, out
    assert len(audit_lines(log)) == 4


def test_an_audit_log_broken_mid_run_stops_at_the_customer_it_could_not_record(
    tmp_path: Path, key_dir: Path, matrix: TierMatrix, keyring: KeyRing
) -> None:
    """Customer by customer: the first is recorded and migrated; then the log stops taking
    lines and the second is left untouched, its classic keys not imported."""
    config, _ = sqlite_config(tmp_path, key_dir)
    customers = read_plan(SAMPLE, matrix, ClassicKeys())[:2]
    steps = [
        next_step(plan_customer(c, matrix, start=START, exp=START + DAY), None, NOW)
        for c in customers
    ]
    key, kid = load_signing_key(key_dir / "test.key")
    signed = sign_steps(steps, lambda claims: sign_license(key, kid, claims), keyring, NOW)
    log = AuditLog(tmp_path / "audit.jsonl")

    async def record(line: AuditRecord) -> None:
        log.append(line)

    async def run(store: TenantStore) -> list[Outcome]:
        outcomes = []
        for step in steps:
            token, verified = signed[step.plan.customer.tenant]
            line = audit_line(step, actor="t", reason=None, signed=verified)
            outcomes.append(
                await apply_step(step, store_license(store, token), line, store, record)
            )
            log.path.write_bytes(log.path.read_bytes() + b"not an audit line\n")
        return outcomes

    outcomes = on_store(config, run)
    assert [o.error is None for o in outcomes] == [True, False]
    assert "not a valid audit line" in str(outcomes[1].error)
    assert set(read_store(config)) == {"_init", "cust-0042"}
    assert classic_imported(config, KEY_A, KEY_B) == [True, False]


# -- through a real gateway ----------------------------------------------------------------------


async def test_migrated_customers_get_the_window_then_their_plan_and_classic_keys_pass(
    tmp_path: Path, key_dir: Path, upstream_ports: dict[str, int], issue_key: IssueKey
) -> None:
    extra = '\n[store]\nurl = "sqlite://tenants.db"\n\n[license]\nclassic_keys = "store"\n'
    plan = plan_file(tmp_path, f"now,{KEY_A},core,,,,", f"ended,{KEY_B},core,,,,0")
    async with (
        running_gateway(tmp_path, key_dir, upstream_ports, extra=extra) as gateway,
        aiohttp.ClientSession() as session,
    ):
        argv = ["migrate", "--plan", str(plan), "--config", str(tmp_path / "gateway.toml")]
        argv += ["--apply", "--signing-key", str(key_dir / "test.key")]
        assert await asyncio.to_thread(main, argv) == 0
        for tenant in ("now", "ended"):
            gateway.runtime.shared.tenants.invalidate(tenant)  # another process wrote the file
        optimize = gateway.url("operations", "/api/v1/shipments/1/optimize")
        async with session.post(optimize, headers={"X-Tenant-Id": "now"}) as response:
            assert response.status == 200  # Core, grandfathered as Enterprise
            seen = await response.json()
            assert seen["headers"]["X-Entitlement-Tier"] == "enterprise"
        async with session.post(optimize, headers={"X-Tenant-Id": "ended"}) as response:
            assert response.status == 403  # no window: Core from the start
            assert (await response.json())["code"] == "feature_not_entitled"
        classic = gateway.url("operations", "/api/v1/shipments")
        for key, status in ((KEY_A, 200), ("ZZZZZ-4KLMN-8PRST-2VWXY-3ABCD", 401)):
            async with session.get(classic, headers={"X-License-Key": key}) as response:
                assert response.status == status, key
