"""Signed revocation lists: export from a store, verification, and a gateway without a
shared store that enforces the list it loads (``[license] revocation_list = "file"``)."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import aiohttp
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from gateway.cli import main
from gateway.license import KeyRing
from gateway.matrix import APP_NAMES
from gateway.revocations import sign_list, verify_list
from tests.conftest import IssueKey
from tests.harness import running_gateway, write_config

Capture = pytest.CaptureFixture[str]


def test_a_list_round_trips(signing_key: Ed25519PrivateKey, keyring: KeyRing) -> None:
    token = sign_list(signing_key, "test", {"acme": ["b", "a"], "empty": []}, "ops", 1000.0)
    found = verify_list(token, keyring)
    assert found.revoked == {"acme": frozenset({"a", "b"})}
    assert (found.issued_at, found.kid) == (1000, "test")


def test_what_is_not_a_trusted_list_is_refused(
    signing_key: Ed25519PrivateKey, keyring: KeyRing, issue_key: IssueKey
) -> None:
    token = sign_list(signing_key, "test", {"acme": ["a"]}, "ops", time.time())
    header, payload, signature = token.split(".")
    tampered = f"{header}.{payload[:-2]}AA.{signature}"
    with pytest.raises(ValueError, match="signature"):
        verify_list(tampered, keyring)
    with pytest.raises(ValueError, match="not a revocation list"):
        verify_list(issue_key(), keyring)  # a license key is not a list
    other = Ed25519PrivateKey.generate()
    with pytest.raises(ValueError, match="not in the key ring"):
        verify_list(sign_list(other, "stranger", {}, "ops", time.time()), keyring)


def test_export_signs_every_revocation_of_a_store(
    tmp_path: Path, key_dir: Path, keyring: KeyRing, capsys: Capture
) -> None:
    extra = '\n[store]\nurl = "sqlite://t.db"\n\n[audit]\nlog = "audit.jsonl"\n'
    config, _, _ = write_config(tmp_path, key_dir, dict.fromkeys(APP_NAMES, 1), extra=extra)
    for tenant, license_id in (("acme", "lic-1"), ("acme", "lic-2"), ("globex", "lic-3")):
        assert main(["tenant", "revoke", tenant, license_id, "--config", str(config)]) == 0
    out = tmp_path / "revoked.jws"
    assert main(["revocations", "export", "--signing-key", str(key_dir / "test.key"),
                 "--config", str(config), "--out", str(out), "--reason", "leak"]) == 0  # fmt: skip
    assert "3 revoked license ids of 2 tenants" in capsys.readouterr().err
    found = verify_list(out.read_text(), keyring)
    assert found.revoked == {"acme": frozenset({"lic-1", "lic-2"}), "globex": frozenset({"lic-3"})}
    last = json.loads((tmp_path / "audit.jsonl").read_text().splitlines()[-1])
    assert (last["action"], last["reason"], last["detail"]["revoked"]) == (
        "revocations_export", "leak", 3,
    )  # fmt: skip
    assert main(["revocations", "export", "--signing-key", str(key_dir / "test.key"),
                 "--config", str(config)]) == 0  # fmt: skip
    assert verify_list(capsys.readouterr().out, keyring).revoked == found.revoked


async def test_a_gateway_without_a_shared_store_enforces_the_list(
    tmp_path: Path,
    key_dir: Path,
    signing_key: Ed25519PrivateKey,
    upstream_ports: dict[str, int],
    issue_key: IssueKey,
    capsys: Capture,
) -> None:
    extra = '\n[license]\nrevocation_list = "file"\nrevocation_file = "revoked.jws"\n'
    leaked = issue_key(sub="acme", jti="lic-leaked", serial=1)
    other = issue_key(sub="acme", jti="lic-other", serial=2)
    async with (
        running_gateway(tmp_path, key_dir, upstream_ports, extra=extra) as gateway,
        aiohttp.ClientSession() as session,
    ):

        async def status(key: str) -> tuple[int, str | None]:
            url = gateway.url("operations", "/api/v1/account")
            async with session.get(url, headers={"X-License-Key": key}) as response:
                body = await response.json()
                return response.status, body.get("code") if response.status != 200 else None

        assert await status(leaked) == (200, None)  # no list yet: nothing revoked
        path = tmp_path / "revoked.jws"
        path.write_text(sign_list(signing_key, "test", {"acme": ["lic-leaked"]}, "ops", 1.0))
        deadline = time.monotonic() + 15
        while await status(leaked) != (401, "license_revoked"):  # re-read within seconds
            assert time.monotonic() < deadline
            gateway.runtime.shared.tenants.invalidate()
            await asyncio.sleep(0.1)
        assert await status(other) == (200, None)

        # A tampered list is refused; the last good one stays in force.
        path.write_text(path.read_text()[:-4] + "AAAA")
        await asyncio.sleep(1.2)
        gateway.runtime.shared.tenants.invalidate()
        assert await status(leaked) == (401, "license_revoked")
    assert main(["check", "--config", str(tmp_path / "gateway.toml")]) == 1
    assert "revocation_file" in capsys.readouterr().err
