"""The audit trail: the hash chain, concurrent appenders in several processes, the
``audit`` verbs, and the lines written by the CLI verbs and the provisioning hook."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from gateway.audit import GENESIS, AuditError, AuditLog, AuditRecord, verify
from gateway.cli import main
from gateway.matrix import APP_NAMES
from tests.conftest import IssueKey
from tests.harness import running_gateway, write_config
from tests.provisioning import provision

Capture = pytest.CaptureFixture[str]
# Every gateway here takes tests.provisioning's SECRET on its provisioning hook.
pytestmark = pytest.mark.usefixtures("provision_secret")
AUDITED = '\n[audit]\nlog = "audit.jsonl"\n'


def record(n: int, tenant: str = "acme") -> AuditRecord:
    return AuditRecord(
        actor="alice", action="issue", tenant=tenant, license_id=f"lic-{n}", tier="core",
        addons=("sms_messaging",), reason=f"T-{n}",
    )  # fmt: skip


@pytest.fixture
def log_file(tmp_path: Path) -> Path:
    log = AuditLog(tmp_path / "audit.jsonl")
    for n in range(1, 6):
        log.append(record(n))
    return log.path


def lines_of(path: Path) -> list[bytes]:
    return path.read_bytes().splitlines(keepends=True)


def test_lines_chain_by_hash(log_file: Path) -> None:
    parsed = [json.loads(line) for line in lines_of(log_file)]
    assert [line["seq"] for line in parsed] == [1, 2, 3, 4, 5]
    assert parsed[0]["prev"] == GENESIS
    for before, after in zip(parsed, parsed[1:], strict=False):
        assert after["prev"] == before["hash"]
    first = parsed[0]
    assert (first["actor"], first["action"], first["tenant"], first["license_id"]) == (
        "alice", "issue", "acme", "lic-1",
    )  # fmt: skip
    assert first["addons"] == ["sms_messaging"] and first["reason"] == "T-1"
    assert first["ts"].endswith("Z")
    assert verify(log_file) == (5, None)


@pytest.mark.parametrize("line", [1, 3, 5])
@pytest.mark.parametrize("where", ["content", "hash", "prev"])
def test_one_changed_byte_names_its_line(log_file: Path, line: int, where: str) -> None:
    lines = lines_of(log_file)
    text = lines[line - 1]
    marker = {"content": b'"actor":"alice"', "hash": b'"hash":"', "prev": b'"prev":"'}[where]
    position = text.index(marker) + len(marker) + 1
    flipped = b"0" if text[position : position + 1] != b"0" else b"1"
    lines[line - 1] = text[:position] + flipped + text[position + 1 :]
    log_file.write_bytes(b"".join(lines))
    _, broken = verify(log_file)
    assert broken is not None and broken.line == line and "altered" in broken.problem


@pytest.mark.parametrize(
    ("edit", "line", "fragment"),
    [
        pytest.param(lambda ls: ls[:2] + ls[3:], 3, "removed", id="removed"),
        pytest.param(lambda ls: [ls[0], ls[2], ls[1], *ls[3:]], 2, "removed", id="swapped"),
        pytest.param(lambda ls: [*ls[:3], ls[1], *ls[3:]], 4, "reordered", id="line-repeated"),
        pytest.param(lambda ls: ls[1:], 1, "removed", id="first-removed"),
    ],
)  # fmt: skip
def test_removed_and_reordered_lines_are_named(
    log_file: Path, edit: Any, line: int, fragment: str
) -> None:
    log_file.write_bytes(b"".join(edit(lines_of(log_file))))
    _, broken = verify(log_file)
    assert broken is not None and broken.line == line and fragment in broken.problem


def test_appenders_in_several_processes_keep_one_chain(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    script = (
        "import sys\nfrom pathlib import Path\nfrom gateway.audit import AuditLog, AuditRecord\n"
        "log = AuditLog(Path(sys.argv[1]))\n"
        "for n in range(40):\n"
        "    log.append(AuditRecord(actor=sys.argv[2], action='seat_change', tenant='t'))\n"
    )
    workers = [
        subprocess.Popen([sys.executable, "-c", script, str(path), f"worker-{n}"]) for n in range(4)
    ]
    assert [worker.wait(timeout=60) for worker in workers] == [0, 0, 0, 0]
    assert verify(path) == (160, None)
    actors = [json.loads(line)["actor"] for line in lines_of(path)]
    assert sorted(set(actors)) == [f"worker-{n}" for n in range(4)]


def test_a_log_that_cannot_be_written_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "audit.jsonl").mkdir()  # a folder where the file should be
    with pytest.raises(AuditError, match="cannot open"):
        AuditLog(tmp_path / "audit.jsonl").append(record(1))


def test_no_line_is_added_after_a_damaged_last_line(log_file: Path) -> None:
    log_file.write_bytes(log_file.read_bytes()[:-20] + b"garbage\n")
    with pytest.raises(AuditError, match="not a valid audit line"):
        AuditLog(log_file).append(record(6))
    log_file.write_bytes(log_file.read_bytes()[:-1])  # no newline at the end
    with pytest.raises(AuditError, match="newline"):
        AuditLog(log_file).append(record(6))


def test_audit_verify_command(log_file: Path, capsys: Capture) -> None:
    assert main(["audit", "verify", "--log", str(log_file)]) == 0
    assert "intact (5 lines)" in capsys.readouterr().out
    lines = lines_of(log_file)
    lines[3] = lines[3].replace(b"lic-4", b"lic-X")
    log_file.write_bytes(b"".join(lines))
    assert main(["audit", "verify", "--log", str(log_file)]) == 1
    assert "BROKEN at line 4: altered" in capsys.readouterr().out


def test_audit_show_a_tenants_history(tmp_path: Path, capsys: Capture) -> None:
    log = AuditLog(tmp_path / "audit.jsonl")
    for n, tenant in enumerate(["acme", "globex", "acme"]):
        log.append(record(n, tenant))
    assert main(["audit", "show", "--tenant", "acme", "--log", str(log.path), "--json"]) == 0
    shown = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [line["license_id"] for line in shown] == ["lic-0", "lic-2"]
    assert main(["audit", "show", "--tenant", "acme", "--log", str(log.path)]) == 0
    out = capsys.readouterr().out
    assert "lic-2 core +sms_messaging" in out and "reason: T-2" in out


def test_tenant_verbs_write_audit_lines(
    tmp_path: Path, key_dir: Path, issue_key: IssueKey, capsys: Capture
) -> None:
    extra = '\n[store]\nurl = "sqlite://t.db"\n\n[audit]\nlog = "audit.jsonl"\n'
    config, _, _ = write_config(tmp_path, key_dir, dict.fromkeys(APP_NAMES, 1), extra=extra)
    base = ["--config", str(config), "--actor", "bob", "--reason", "SUP-12"]
    assert main(["tenant", "suspend", "acme", *base]) == 0
    assert main(["tenant", "suspend", "acme", *base]) == 0  # no change: no line
    assert main(["tenant", "reinstate", "acme", *base]) == 0
    assert main(["tenant", "revoke", "acme", "lic-1", *base]) == 0
    assert main(["tenant", "usage", "acme", "--ops-users", "2", "--drivers", "3", *base]) == 0
    log = tmp_path / "audit.jsonl"
    assert verify(log) == (4, None)
    parsed = [json.loads(line) for line in lines_of(log)]
    assert [line["action"] for line in parsed] == ["suspend", "reinstate", "revoke", "seat_change"]
    assert {(line["actor"], line["reason"], line["tenant"]) for line in parsed} == {
        ("bob", "SUP-12", "acme")
    }
    assert parsed[2]["license_id"] == "lic-1"
    assert parsed[3]["detail"] == {"ops_users": 2, "drivers": 3}


def test_license_issue_writes_an_audit_line(tmp_path: Path, key_dir: Path, capsys: Capture) -> None:
    log = tmp_path / "audit.jsonl"
    argv = ["license", "issue", "--signing-key", str(key_dir / "test.key"), "--tenant", "acme",
            "--tier", "fleet", "--audit-log", str(log), "--reason", "DEAL-7"]  # fmt: skip
    assert main(argv) == 0
    key = capsys.readouterr().out.strip()
    (line,) = [json.loads(raw) for raw in lines_of(log)]
    assert (line["action"], line["tenant"], line["tier"], line["reason"]) == (
        "issue", "acme", "fleet", "DEAL-7",
    )  # fmt: skip
    assert line["kid"] == "test" and line["actor"]
    from gateway.license import fingerprint

    assert line["fingerprint"] == fingerprint(key)


def test_license_issue_refuses_when_the_audit_log_cannot_be_written(
    tmp_path: Path, key_dir: Path, capsys: Capture
) -> None:
    (tmp_path / "audit.jsonl").mkdir()
    argv = ["license", "issue", "--signing-key", str(key_dir / "test.key"), "--tenant", "acme",
            "--tier", "fleet", "--audit-log", str(tmp_path / "audit.jsonl")]  # fmt: skip
    assert main(argv) == 1
    out, err = capsys.readouterr()
    assert out == "" and "audit log" in err


async def test_the_provisioning_hook_writes_audit_lines(
    tmp_path: Path, key_dir: Path, upstream_ports: dict[str, int], issue_key: IssueKey
) -> None:
    key = issue_key(sub="acme", tier="fleet", addons=("personalized_url",), serial=5)
    async with (
        running_gateway(tmp_path, key_dir, upstream_ports, extra=AUDITED) as gateway,
        aiohttp.ClientSession() as session,
    ):
        body = {"event_id": "e1", "action": "license", "tenant": "acme", "key": key}
        assert await provision(session, gateway, body) == (200, {"applied": True})
        repeated = (200, {"applied": False, "reason": "duplicate_event"})
        assert await provision(session, gateway, body) == repeated
        suspend = {"event_id": "e2", "action": "suspend", "tenant": "acme"}
        assert await provision(session, gateway, suspend) == (200, {"applied": True})
    log = tmp_path / "audit.jsonl"
    assert verify(log) == (2, None)
    first, second = (json.loads(line) for line in lines_of(log))
    assert (first["action"], first["actor"], first["ref"], first["tier"]) == (
        "provision", "provision-hook", "e1", "fleet",
    )  # fmt: skip
    assert first["addons"] == ["personalized_url"] and first["detail"]["applied"] is True
    assert (second["action"], second["tenant"]) == ("suspend", "acme")


async def test_the_hook_refuses_when_its_audit_log_cannot_be_written(
    tmp_path: Path, key_dir: Path, upstream_ports: dict[str, int]
) -> None:
    (tmp_path / "audit.jsonl").mkdir()
    async with (
        running_gateway(tmp_path, key_dir, upstream_ports, extra=AUDITED) as gateway,
        aiohttp.ClientSession() as session,
    ):
        body = {"event_id": "e1", "action": "suspend", "tenant": "acme"}
        status, answer = await provision(session, gateway, body)
        assert (status, answer["code"]) == (503, "audit_unavailable")
        os.rmdir(tmp_path / "audit.jsonl")
        # The event id was released: billing's retry is applied and recorded.
        again = (200, {"applied": False, "reason": "already_suspended"})
        assert await provision(session, gateway, body) == again
    assert verify(tmp_path / "audit.jsonl") == (1, None)


def test_gateway_check_looks_at_the_audit_log_setting(config_dir: Path, capsys: Capture) -> None:
    config = config_dir / "gateway.toml"
    assert main(["check", "--config", str(config)]) == 0
    assert "no [audit] log" in capsys.readouterr().out
    config.write_text(config.read_text() + '\n[audit]\nlog = "nowhere/audit.jsonl"\n')
    assert main(["check", "--config", str(config)]) == 1
    assert "[audit.log]: its folder does not exist" in capsys.readouterr().err
