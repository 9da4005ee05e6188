"""``GET /admin/config`` on the admin listener: what the running process loaded (revisions,
key ids with fingerprints, apps, store, events) and never a secret."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from gateway import __version__
from gateway.admin import redact_url
from gateway.license import generate_keypair
from gateway.matrix import APP_NAMES
from tests.harness import Gateway, running_gateway
from tests.redis_server import RedisServer

PASSWORD = "hunter2-do-not-leak"
PROVISION_SECRET = "provision-secret-do-not-leak"


async def admin_config(client: aiohttp.ClientSession, gateway: Gateway) -> tuple[str, Any]:
    async with client.get(gateway.admin_url("/admin/config")) as response:
        assert response.status == 200
        assert response.content_type == "application/json"
        text = await response.text()
        return text, await response.json()


async def test_admin_config_lists_what_the_process_loaded_and_no_secret(
    tmp_path: Path,
    key_dir: Path,
    upstream_ports: dict[str, int],
    redis: RedisServer,
    client: aiohttp.ClientSession,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("GATEWAY_PROVISION_SECRET", PROVISION_SECRET)
    # Redis' default user has no password, so any password passes AUTH: the URL is real.
    store = redis.url.replace("redis://", f"redis://default:{PASSWORD}@")
    folder = tmp_path / "gw"
    folder.mkdir()
    async with running_gateway(
        folder,
        key_dir,
        upstream_ports,
        extra=f'\n[store]\nurl = "{store}?socket_timeout=2"\n',
        app_extra="read_timeout = 30.0\n",
    ) as gw:
        async with client.get(gw.admin_url("/readyz")) as response:
            assert (await response.json())["store"] == "up"
        text, body = await admin_config(client, gw)
        rules = gw.runtime.shared.rules

    assert PASSWORD not in text and PROVISION_SECRET not in text
    assert body["version"] == __version__
    assert body["config_file"] == str((folder / "gateway.toml").resolve())
    assert body["revisions"] == {"routes": rules.routes.sha, "matrix": rules.matrix.sha}
    assert body["files"] == {
        "routes": str((folder / "routes.toml").resolve()),
        "tier_matrix": str((folder / "tier_matrix.toml").resolve()),
    }
    der = subprocess.run(
        ["openssl", "pkey", "-pubin", "-in", str(key_dir / "test.pub"), "-outform", "DER"],
        capture_output=True,
        check=True,
    ).stdout
    assert body["public_keys"] == {
        "folder": str((folder / "keys").resolve()),
        "keys": [{"kid": "test", "fingerprint": "sha256:" + hashlib.sha256(der).hexdigest()}],
    }
    assert set(body["apps"]) == set(APP_NAMES)
    operations = body["apps"]["operations"]
    assert operations["listen"] == f"127.0.0.1:{gw.listen['operations']}"
    assert operations["upstream"] == f"http://127.0.0.1:{upstream_ports['operations']}"
    assert operations["classic_path_prefixes"] == ["/xdispatch/"]
    assert operations["read_timeout"] == 30.0  # set in the config
    assert operations["connect_timeout"] == 5.0  # a default
    assert {app: body["apps"][app]["unmatched"] for app in APP_NAMES} == {
        "operations": "allow",
        "client_portal": "allow",
        "driver_app": "deny",
    }
    assert body["store"] == {
        "url": f"redis://default:***@127.0.0.1:{redis.port}/0?socket_timeout=2",
        "required_for_ready": False,
        "seed": None,
    }
    assert body["events"]["sink"] == "file://" + str((folder / "events.jsonl").resolve())
    assert body["admin"] == {
        "listen": f"127.0.0.1:{gw.admin}",
        "provision_secret_env": "GATEWAY_PROVISION_SECRET",
        "provisioning_enabled": True,
    }
    assert body["identity"] is None


async def test_admin_config_shows_the_revisions_and_keys_after_a_reload(
    gateway: Gateway, client: aiohttp.ClientSession
) -> None:
    _, before = await admin_config(client, gateway)
    assert [key["kid"] for key in before["public_keys"]["keys"]] == ["test"]
    assert before["admin"]["provisioning_enabled"] is False

    routes = gateway.folder / "routes.toml"
    routes.write_text(routes.read_text() + "\n# a new revision\n")
    generate_keypair(gateway.folder / "new-keys", "next")
    shutil.copy(gateway.folder / "new-keys" / "next.pub", gateway.folder / "keys" / "next.pub")
    assert await gateway.runtime.reload("test")

    _, after = await admin_config(client, gateway)
    assert after["revisions"]["routes"] != before["revisions"]["routes"]
    assert after["revisions"]["matrix"] == before["revisions"]["matrix"]
    assert [key["kid"] for key in after["public_keys"]["keys"]] == ["next", "test"]
    fingerprints = [key["fingerprint"] for key in after["public_keys"]["keys"]]
    assert len(set(fingerprints)) == 2 and all(f.startswith("sha256:") for f in fingerprints)


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        pytest.param("memory://", "memory://", id="memory"),
        pytest.param("sqlite:////var/lib/gw.db", "sqlite:////var/lib/gw.db", id="sqlite"),
        pytest.param("redis://r:6379/0", "redis://r:6379/0", id="no-credentials"),
        pytest.param("redis://:pw@r:6379/0", "redis://:***@r:6379/0", id="password-only"),
        pytest.param("rediss://u:p%40w@r/0", "rediss://u:***@r/0", id="user-and-password"),
        pytest.param("redis://u@r/0", "redis://u@r/0", id="user-only"),
        pytest.param("redis://u:pa/ss@r/0", "redis://u:***@r/0", id="slash-in-password"),
        pytest.param("redis://u:p@[::1]:6379/0", "redis://u:***@[::1]:6379/0", id="ipv6"),
        pytest.param(
            "redis://r/0?password=pw&socket_timeout=2",
            "redis://r/0?password=***&socket_timeout=2",
            id="password-in-query",
        ),
    ],
)
def test_store_urls_are_shown_without_password(url: str, shown: str) -> None:
    assert redact_url(url) == shown
