"""``gateway explain`` says what the proxy does: both classify with ``gateway.classify``, and
``--tenant`` (or a key) decides on what the tenant store holds."""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path
from typing import Any

import pytest

from gateway.cli import main
from gateway.config import Config, load_config
from gateway.enforcer import CLASSIC, RESPOND, Verdict
from gateway.explain import Explanation, evaluate
from gateway.store import open_store
from tests.conftest import IssueKey
from tests.enforcing import WorldFactory

Capture = pytest.CaptureFixture[str]
CLASSIC_KEY = "ABCDE-12345-FGHIJ-67890-KLMNO"


def explain(capsys: Capture, config_dir: Path, *argv: str) -> tuple[int, dict[str, Any]]:
    code = main(["explain", "--config", str(config_dir / "gateway.toml"), *argv, "--json"])
    out, _ = capsys.readouterr()
    return code, (json.loads(out) if out else {})


def with_store(config_dir: Path, *, classic_keys: str = "pattern") -> str:
    """Point the config at a SQLite store (and the classic-key mode); the store's URL."""
    url = f"sqlite:///{config_dir / 'tenants.db'}"
    text = (config_dir / "gateway.toml").read_text()
    text = text.replace('url = "memory://"', f'url = "{url}"')
    text = re.sub(r"(\[license\]\n)", rf'\1classic_keys = "{classic_keys}"\n', text)
    (config_dir / "gateway.toml").write_text(text)
    return url


async def store_tenant(url: str, config: Config, *keys: str, classic: str | None = None) -> None:
    store = open_store(url, config.keyring)
    try:
        for key in keys:
            await store.put_license(key)
        if classic is not None:
            await store.import_classic_key("acme", classic)
    finally:
        await store.close()


def test_explain_tenant_decides_on_the_license_the_store_holds(
    capsys: Capture, config_dir: Path, issue_key: IssueKey
) -> None:
    url = with_store(config_dir)
    config = load_config(config_dir / "gateway.toml")
    asyncio.run(store_tenant(url, config, issue_key(sub="acme", tier="fleet", serial=3)))
    optimize = ["--app", "operations", "POST", "/api/v1/shipments/1/optimize"]
    code, report = explain(capsys, config_dir, *optimize, "--tenant", "acme")
    assert code == 0
    assert report["decision"]["code"] == "allowed"
    assert (report["license"]["tenant"], report["license"]["tier"]) == ("acme", "fleet")
    _, unknown = explain(capsys, config_dir, *optimize, "--tenant", "nobody")
    assert unknown["decision"]["code"] == "license_missing"


def test_explain_with_an_old_key_decides_on_the_newer_license_in_the_store(
    capsys: Capture, config_dir: Path, issue_key: IssueKey
) -> None:
    url = with_store(config_dir)
    config = load_config(config_dir / "gateway.toml")
    old = issue_key(sub="acme", tier="core", serial=1)
    asyncio.run(store_tenant(url, config, old, issue_key(sub="acme", tier="fleet", serial=2)))
    optimize = ["--app", "operations", "POST", "/api/v1/shipments/1/optimize"]
    _, report = explain(capsys, config_dir, *optimize, "--key", old)
    assert (report["decision"]["code"], report["license"]["tier"]) == ("allowed", "fleet")
    _, mismatch = explain(capsys, config_dir, *optimize, "--key", old, "--tenant", "globex")
    assert mismatch["decision"]["code"] == "tenant_mismatch"


def test_explain_honours_classic_keys_from_the_store(
    capsys: Capture, config_dir: Path, issue_key: IssueKey
) -> None:
    url = with_store(config_dir, classic_keys="store")
    config = load_config(config_dir / "gateway.toml")
    asyncio.run(store_tenant(url, config, issue_key(sub="acme"), classic=CLASSIC_KEY))
    shipments = ["--app", "operations", "GET", "/api/v1/shipments"]
    _, imported = explain(capsys, config_dir, *shipments, "--key", CLASSIC_KEY)
    assert imported["decision"]["code"] == "classic"
    _, other = explain(capsys, config_dir, *shipments, "--key", "ZZZZZ-12345-FGHIJ-67890-KLMNO")
    # The proxy treats a classic-looking key the store never imported as a license key.
    assert (other["decision"]["code"], other["decision"]["status"]) == ("license_malformed", 401)


def test_explain_with_a_tier_takes_no_tenant(capsys: Capture, config_dir: Path) -> None:
    argv = ["--app", "operations", "GET", "/x", "--tier", "core", "--tenant", "acme"]
    code = main(["explain", "--config", str(config_dir / "gateway.toml"), *argv])
    assert code == 2 and "--tier" in capsys.readouterr().err


def test_explain_refuses_a_classic_path_that_is_not_canonical_as_the_proxy_does(
    capsys: Capture, config_dir: Path
) -> None:
    argv = ["--app", "operations", "GET", "/api/v1/../../xdispatch/orders", "--tier", "core"]
    code, report = explain(capsys, config_dir, *argv)
    assert code == 0
    assert report["decision"]["code"] == "path_rejected"
    assert report["decision"]["reason"] == "classic path is not canonical"


# ------------------------------------------------------------------ explain == the proxy


def _proxy_code(verdict: Verdict) -> str:
    if verdict.kind == CLASSIC:
        return "classic"
    if verdict.kind == RESPOND:
        return str(json.loads(verdict.body)["code"])
    return verdict.code or "allowed"


REQUESTS = [
    pytest.param("operations", "POST", "/api/v1/shipments/1/optimize", "core", id="blocked"),
    pytest.param("operations", "POST", "/api/v1/shipments/1/optimize", "fleet", id="allowed"),
    pytest.param("operations", "GET", "/api/v1/health", "bad", id="public-bad-key"),
    pytest.param("operations", "GET", "/xdispatch/orders", None, id="classic-path"),
    pytest.param("operations", "GET", "/api/../xdispatch/orders", None, id="classic-noncanonical"),
    pytest.param("operations", "GET", "/api/v1/shipments", CLASSIC_KEY, id="classic-key"),
    pytest.param("operations", "GET", "/api/v1/a%2Fb", "fleet", id="encoded-slash"),
    pytest.param("operations", "GET", "/api/v1/shipments", None, id="no-license"),
    pytest.param("operations", "GET", "/api/v1/shipments", "a.b.c", id="malformed"),
    pytest.param("driver_app", "GET", "/nowhere", "fleet", id="unmatched-deny"),
    pytest.param("operations", "GET", "/api/v1/account/billing", "fleet", id="role"),
]


@pytest.mark.parametrize(("app", "method", "target", "key"), REQUESTS)
async def test_explain_and_the_proxy_agree(
    config: Config,
    make_world: WorldFactory,
    issue_key: IssueKey,
    app: Any,
    method: str,
    target: str,
    key: str | None,
) -> None:
    if key in ("core", "fleet"):
        key = issue_key(sub="acme", tier=key)
    world = make_world(config)
    verdict = await world.decide(app, world.head(method, target, key=key))
    found: Explanation = evaluate(config, app, method, target, key=key)
    assert found.code == _proxy_code(verdict)
    assert found.status == (verdict.status if verdict.kind == RESPOND else found.status)
