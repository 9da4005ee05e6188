"""The seat and usage verbs against a SQLite store: `gateway tenant seats` (holders with
last-seen times, `--release`) and `gateway usage report` (by feature, client, day; table,
CSV, JSON)."""

from __future__ import annotations

import asyncio
import csv
import io
import json
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from gateway.cli import main
from gateway.license import KeyRing
from gateway.matrix import APP_NAMES
from gateway.store import TenantStore
from gateway.store.sqlite import SqliteStore
from gateway.usage import UsageMeter
from tests.conftest import IssueKey
from tests.harness import write_config

NOW = time.time()
WINDOW = 30 * 86400.0
M0 = int(NOW) // 86400 * 86400 - 2 * 86400  # 00:00 UTC two days ago
DAY0 = time.strftime("%Y-%m-%d", time.gmtime(M0))


@pytest.fixture
def config(tmp_path: Path, key_dir: Path) -> Path:
    path, _, _ = write_config(
        tmp_path,
        key_dir,
        dict.fromkeys(APP_NAMES, 1),
        extra='\n[store]\nurl = "sqlite://t.db"\n\n[seats]\nmode = "active_users"\n',
    )
    return path


Job = Callable[[TenantStore], Awaitable[object]]


def with_sqlite(config: Path, keyring: KeyRing, job: Job) -> None:
    """Prepare the store the CLI will read (as a running gateway would have written it)."""

    async def run() -> None:
        store = SqliteStore(f"sqlite://{config.parent / 't.db'}", keyring)
        try:
            await job(store)
        finally:
            await store.close()

    asyncio.run(run())


def cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


# -- gateway tenant seats -------------------------------------------------------------------


def test_tenant_seats_lists_holders_with_last_seen_times(
    config: Path, keyring: KeyRing, issue_key: IssueKey, capsys: pytest.CaptureFixture[str]
) -> None:
    async def prepare(store: TenantStore) -> None:
        await store.put_license(issue_key(sub="acme", tier="fleet"))
        await store.set_extra_seats("acme", 1, 0)
        await store.admit_seat("acme", "ops_users", "alice", NOW - 3600, WINDOW, 10)
        await store.admit_seat("acme", "ops_users", "bob", NOW - 60, WINDOW, 10)
        await store.admit_seat("acme", "drivers", "dave", NOW - 40 * 86400, WINDOW, 10)

    with_sqlite(config, keyring, prepare)
    code, out, _ = cli(capsys, "tenant", "seats", "acme", "--config", str(config))
    assert code == 0
    lines = out.splitlines()
    assert lines[0] == "tenant: acme  (mode active_users, window 30 days)"
    assert lines[1] == "ops_users: 2 in use, 6 included, 7 allowed"  # Fleet 5 + 1 bought
    assert lines[2].split()[0] == "bob" and lines[3].split()[0] == "alice"  # recent first
    assert "last seen" in lines[2] and lines[2].endswith("UTC")
    assert lines[4] == "drivers: 0 in use, 5 included, 6 allowed"  # dave's seat expired

    code, out, _ = cli(capsys, "tenant", "seats", "acme", "--json", "--config", str(config))
    shown = json.loads(out)
    assert (shown["tenant"], shown["mode"], shown["window_days"]) == ("acme", "active_users", 30)
    assert shown["extra"] == {"ops_users": 1, "drivers": 0}
    ops = shown["seats"]["ops_users"]
    assert (ops["used"], ops["included"], ops["allowance"], ops["tier"]) == (2, 6, 7, "fleet")
    assert [h["user"] for h in ops["holders"]] == ["bob", "alice"]
    assert ops["holders"][0]["last_seen"] == pytest.approx(NOW - 60)


def test_tenant_seats_release(
    config: Path, keyring: KeyRing, capsys: pytest.CaptureFixture[str]
) -> None:
    async def prepare(store: TenantStore) -> None:
        await store.admit_seat("acme", "ops_users", "alice", NOW, WINDOW, 10)
        await store.admit_seat("acme", "drivers", "alice", NOW, WINDOW, 10)

    with_sqlite(config, keyring, prepare)
    args = ["tenant", "seats", "acme", "--config", str(config), "--release", "alice"]
    code, out, _ = cli(capsys, *args, "--kind", "drivers")
    assert (code, out) == (0, "acme: released alice (drivers)\n")
    code, out, _ = cli(capsys, *args)
    assert (code, out) == (0, "acme: released alice (ops_users)\n")
    code, out, _ = cli(capsys, *args)
    assert (code, out) == (0, "acme: alice holds no seat: no change\n")
    # No license in the store: the holders are listed, the limits are unknown.
    code, out, _ = cli(
        capsys, "tenant", "seats", "acme", "--kind", "ops_users", "--config", str(config)
    )
    assert out.splitlines()[1:] == ["ops_users: 0 in use (no license in the store)"]


def test_a_released_seat_is_an_audited_seat_change(
    config: Path, keyring: KeyRing, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    async def prepare(store: TenantStore) -> None:
        await store.admit_seat("acme", "drivers", "alice", NOW, WINDOW, 10)

    with_sqlite(config, keyring, prepare)
    log = tmp_path / "audit.jsonl"
    args = ["tenant", "seats", "acme", "--config", str(config), "--release", "alice"]
    code, _, _ = cli(capsys, *args, "--audit-log", str(log), "--actor", "sam", "--reason", "T-9")
    assert code == 0
    (line,) = [json.loads(text) for text in log.read_text().splitlines()]
    assert (line["action"], line["tenant"], line["actor"], line["reason"]) == (
        "seat_change",
        "acme",
        "sam",
        "T-9",
    )
    assert line["detail"] == {"released": "alice", "seats": ["drivers"]}
    # Nothing released: nothing recorded.
    assert cli(capsys, *args, "--audit-log", str(log))[0] == 0
    assert len(log.read_text().splitlines()) == 1


# -- gateway usage report -------------------------------------------------------------------


@pytest.fixture
def metered(config: Path, keyring: KeyRing) -> Path:
    """Calls a gateway metered for acme (and one for globex), flushed to the store."""

    async def prepare(store: TenantStore) -> None:
        meter = UsageMeter(store)
        for _ in range(3):
            meter.count("acme", "ops.on_demand", "", M0 + 5)
        meter.count("acme", "ops.on_demand", "erp", M0 + 65)
        meter.count("acme", "driver.depot_scanning", "erp", M0 + 86400)
        meter.count("acme", None, "", M0 + 86400)
        meter.count("globex", "ops.on_demand", "", M0)
        assert await meter.flush()

    with_sqlite(config, keyring, prepare)
    return config


def report(capsys: pytest.CaptureFixture[str], config: Path, *extra: str) -> tuple[int, str]:
    argv = ["usage", "report", "--tenant", "acme", "--since", DAY0, "--config", str(config)]
    code, out, _ = cli(capsys, *argv, *extra)
    return code, out


def test_usage_report_by_feature(metered: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out = report(capsys, metered)
    assert code == 0
    assert [line.split() for line in out.splitlines()] == [
        ["feature", "calls"],
        ["(ungated)", "1"],
        ["driver.depot_scanning", "1"],
        ["ops.on_demand", "4"],
        ["total", "6"],
    ]


@pytest.mark.parametrize(
    ("by", "rows"),
    [
        pytest.param("client", [["(none)", "4"], ["erp", "2"]], id="client"),
        pytest.param(
            "day",
            [[DAY0, "4"], [time.strftime("%Y-%m-%d", time.gmtime(M0 + 86400)), "2"]],
            id="day",
        ),
    ],
)
def test_usage_report_csv(
    metered: Path, capsys: pytest.CaptureFixture[str], by: str, rows: list[list[str]]
) -> None:
    code, out = report(capsys, metered, "--by", by, "--format", "csv")
    assert code == 0
    assert list(csv.reader(io.StringIO(out))) == [[by, "calls"], *rows]


def test_usage_report_json_and_until(metered: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out = report(capsys, metered, "--format", "json", "--until", f"{DAY0}T00:01:00")
    assert code == 0
    document: dict[str, Any] = json.loads(out)
    assert document == {
        "tenant": "acme",
        "since": f"{DAY0} 00:00:00 UTC",
        "until": f"{DAY0} 00:01:00 UTC",
        "by": "feature",
        "rows": [{"feature": "ops.on_demand", "calls": 3}],
        "total": 3,
    }


def test_usage_report_usage_errors(config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["usage", "report", "--tenant", "acme", "--since", "2024-01-01", "--config", str(config)]
    code, _, err = cli(capsys, *argv, "--until", "2020-01-01")
    assert code == 2 and "--until must be after --since" in err
    for bad, message in [
        (["--by", "hour"], "invalid choice: 'hour'"),
        (["--format", "xml"], "invalid choice: 'xml'"),
        (["--since", "yesterday"], "not a date: 'yesterday'"),
    ]:
        with pytest.raises(SystemExit) as caught:
            main([*argv, *bad])
        assert caught.value.code == 2
        assert message in capsys.readouterr().err


def test_usage_report_needs_a_shared_store(
    tmp_path: Path, key_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path, _, _ = write_config(tmp_path, key_dir, dict.fromkeys(APP_NAMES, 1))
    argv = ["usage", "report", "--tenant", "acme", "--since", "2024-01-01", "--config", str(path)]
    code, _, err = cli(capsys, *argv)
    assert code == 2 and "memory://" in err
