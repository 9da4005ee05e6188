"""The ``gateway`` command line, run in-process through ``gateway.cli.main``."""

from __future__ import annotations

import json
import re
import stat
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from gateway.cli import main
from gateway.license import KeyRing, load_signing_key

IssueKey = Callable[..., str]
Capture = pytest.CaptureFixture[str]

OPTIMIZE = ["--app", "operations", "POST", "/api/v1/shipments/1/optimize"]


def run(capsys: Capture, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def run_json(capsys: Capture, *argv: str) -> tuple[int, dict[str, Any]]:
    code, out, _ = run(capsys, *argv, "--json")
    parsed: dict[str, Any] = json.loads(out)
    return code, parsed


def tamper(token: str) -> str:
    header, payload, signature = token.split(".")
    middle = len(signature) // 2
    flipped = "A" if signature[middle] != "A" else "B"
    return f"{header}.{payload}.{signature[:middle]}{flipped}{signature[middle + 1 :]}"


# --------------------------------------------------------------------------- keys generate


def test_keys_generate_writes_the_pair(capsys: Capture, tmp_path: Path) -> None:
    out_dir = tmp_path / "keys"
    code, out, _ = run(capsys, "keys", "generate", "--out", str(out_dir), "--kid", "dev-2025")

    assert code == 0
    private_path, public_path = out_dir / "dev-2025.key", out_dir / "dev-2025.pub"
    assert stat.S_IMODE(private_path.stat().st_mode) == 0o600
    assert public_path.is_file()
    assert "kid:         dev-2025" in out
    assert str(private_path) in out and str(public_path) in out
    assert "dev-2025" in KeyRing.load(out_dir).keys
    assert load_signing_key(private_path)[1] == "dev-2025"


def test_keys_generate_picks_a_kid(capsys: Capture, tmp_path: Path) -> None:
    code, out, _ = run(capsys, "keys", "generate", "--out", str(tmp_path))
    assert code == 0
    found = re.search(r"^kid:\s+(k\d{8}-[0-9a-f]{6})$", out, re.MULTILINE)
    assert found is not None
    kid = found.group(1)
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"{kid}.key", f"{kid}.pub"]


def test_keys_generate_refuses_to_overwrite(capsys: Capture, tmp_path: Path) -> None:
    assert run(capsys, "keys", "generate", "--out", str(tmp_path), "--kid", "dev")[0] == 0
    before = (tmp_path / "dev.key").read_bytes()
    code, _, err = run(capsys, "keys", "generate", "--out", str(tmp_path), "--kid", "dev")
    assert code == 1
    assert "refusing to overwrite" in err
    assert (tmp_path / "dev.key").read_bytes() == before


def test_keys_generate_rejects_a_bad_kid(capsys: Capture, tmp_path: Path) -> None:
    code, _, err = run(capsys, "keys", "generate", "--out", str(tmp_path), "--kid", "../x")
    assert code == 1
    assert "bad key id" in err


# --------------------------------------------------------------------------- license issue


@pytest.fixture
def issue(capsys: Capture, key_dir: Path) -> Callable[..., tuple[int, str, str]]:
    """``issue("--tier", "fleet", ...)``: ``license issue`` with the test signing key."""

    def call(*argv: str) -> tuple[int, str, str]:
        base = ["license", "issue", "--signing-key", str(key_dir / "test.key")]
        if "--tenant" not in argv:
            base += ["--tenant", "acme"]
        return run(capsys, *base, *argv)

    return call


def test_license_issue_prints_a_key_that_verifies(
    issue: Callable[..., tuple[int, str, str]], keyring: KeyRing
) -> None:
    before = int(time.time())
    code, out, _ = issue(
        "--tier",
        "core",
        "--addon",
        "route_distribution",
        "--addon",
        "sms_messaging",
        "--days",
        "30",
        "--serial",
        "17",
        "--ops-users",
        "3",
        "--drivers",
        "4",
    )
    after = int(time.time())

    assert code == 0
    lic = keyring.verify(out.strip())
    claims = lic.claims
    assert lic.kid == "test"
    assert (claims.sub, claims.tier, claims.serial) == ("acme", "core", 17)
    assert claims.addons == ("route_distribution", "sms_messaging")
    assert claims.seats is not None and (claims.seats.ops_users, claims.seats.drivers) == (3, 4)
    assert claims.iss == "gateway-cli" and claims.trial is False and claims.expiry is None
    assert before <= claims.iat <= after and claims.nbf == claims.iat
    assert claims.exp - claims.nbf == 30 * 86400


def test_license_issue_defaults(
    issue: Callable[..., tuple[int, str, str]], keyring: KeyRing
) -> None:
    code, out, _ = issue("--tier", "fleet", "--trial")
    assert code == 0
    claims = keyring.verify(out.strip()).claims
    assert claims.exp - claims.nbf == 365 * 86400
    assert claims.trial is True and claims.expiry_strategy == "revoke"
    assert claims.serial // 1_000_000 in (claims.iat, claims.iat + 1)  # the time in µs
    assert claims.seats is None and claims.addons == ()


def test_license_issue_dates(issue: Callable[..., tuple[int, str, str]], keyring: KeyRing) -> None:
    code, out, _ = issue(
        "--tier",
        "fleet",
        "--not-before",
        "2030-01-01",
        "--expires",
        "2031-01-01T12:30",
        "--expiry",
        "maintain",
        "--grandfather-tier",
        "enterprise",
        "--grandfather-until",
        "1900000000",
    )
    assert code == 0
    claims = keyring.verify(out.strip()).claims
    assert claims.nbf == int(datetime(2030, 1, 1, tzinfo=UTC).timestamp())
    assert claims.exp == int(datetime(2031, 1, 1, 12, 30, tzinfo=UTC).timestamp())
    assert claims.expiry == "maintain"
    assert (claims.grandfather_tier, claims.grandfather_until) == ("enterprise", 1900000000)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        pytest.param(["--tier", "core", "--days", "0"], "expire before it starts", id="days-0"),
        pytest.param(["--tier", "core", "--days", "-1"], "expire before it starts", id="days-neg"),
        pytest.param(
            ["--tier", "core", "--not-before", "2030-01-02", "--expires", "2030-01-01"],
            "expire before it starts",
            id="expires-before-nbf",
        ),
        pytest.param(["--tier", "core", "--ops-users", "3"], "go together", id="seats-half"),
        pytest.param(
            ["--tier", "core", "--grandfather-tier", "fleet"], "go together", id="grandfather-half"
        ),
    ],
)
def test_license_issue_usage_errors(
    issue: Callable[..., tuple[int, str, str]], argv: list[str], message: str
) -> None:
    code, out, err = issue(*argv)
    assert code == 2
    assert out == ""
    assert message in err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        pytest.param(["--tier", "platinum"], "unknown tier 'platinum'", id="unknown-tier"),
        pytest.param(
            ["--tier", "fleet", "--addon", "route_distribution"],
            "add-on 'route_distribution' is not available to tier 'fleet'",
            id="addon-not-for-fleet",
        ),
        pytest.param(
            ["--tier", "core", "--addon", "personalized_url"],
            "add-on 'personalized_url' is not available to tier 'core'",
            id="addon-not-for-core",
        ),
        pytest.param(
            ["--tier", "enterprise", "--addon", "sms_messaging"],
            "not available to tier 'enterprise'",
            id="addon-not-for-enterprise",
        ),
        pytest.param(["--tier", "core", "--addon", "jetpack"], "unknown add-on", id="no-addon"),
        pytest.param(
            ["--tier", "core", "--addon", "sms_messaging", "--addon", "sms_messaging"],
            "an add-on is listed twice",
            id="addon-twice",
        ),
        pytest.param(
            ["--tier", "enterprise", "--grandfather-tier", "fleet"]
            + ["--grandfather-until", "2030-01-01"],
            "grandfather tier 'fleet' does not rank above tier 'enterprise'",
            id="grandfather-not-above",
        ),
        pytest.param(
            ["--tier", "core", "--grandfather-tier", "gold", "--grandfather-until", "2030-01-01"],
            "unknown grandfather tier 'gold'",
            id="grandfather-unknown",
        ),
    ],
)
def test_license_issue_checks_the_matrix_with_config(
    issue: Callable[..., tuple[int, str, str]],
    config_dir: Path,
    argv: list[str],
    message: str,
) -> None:
    code, out, err = issue(*argv, "--config", str(config_dir / "gateway.toml"))
    assert code == 2
    assert out == ""
    assert message in err


def test_license_issue_with_config_accepts_what_the_matrix_sells(
    issue: Callable[..., tuple[int, str, str]], config_dir: Path, keyring: KeyRing
) -> None:
    code, out, _ = issue(
        "--tier",
        "fleet",
        "--addon",
        "personalized_url",
        "--addon",
        "advanced_shipment_optimization",
        "--config",
        str(config_dir / "gateway.toml"),
    )
    assert code == 0
    assert keyring.verify(out.strip()).claims.addons == (
        "personalized_url",
        "advanced_shipment_optimization",
    )


def test_license_issue_days_and_expires_are_exclusive(
    issue: Callable[..., tuple[int, str, str]], capsys: Capture
) -> None:
    with pytest.raises(SystemExit) as caught:
        issue("--tier", "core", "--days", "30", "--expires", "2030-01-01")
    assert caught.value.code == 2
    assert "not allowed with argument" in capsys.readouterr().err


def test_license_issue_rejects_a_bad_date(
    issue: Callable[..., tuple[int, str, str]], capsys: Capture
) -> None:
    with pytest.raises(SystemExit) as caught:
        issue("--tier", "core", "--expires", "next tuesday")
    assert caught.value.code == 2
    assert "not a date" in capsys.readouterr().err


def test_license_issue_with_a_missing_signing_key(capsys: Capture, tmp_path: Path) -> None:
    code, out, err = run(
        capsys,
        "license",
        "issue",
        "--signing-key",
        str(tmp_path / "absent.key"),
        "--tenant",
        "acme",
        "--tier",
        "core",
    )
    assert code == 1 and out == "" and "absent.key" in err


# --------------------------------------------------------------------------- license inspect


def test_inspect_valid_key_human(capsys: Capture, issue_key: IssueKey, key_dir: Path) -> None:
    token = issue_key(tier="fleet", sub="acme", addons=("personalized_url",))
    code, out, _ = run(capsys, "license", "inspect", token, "--public-keys", str(key_dir))
    assert code == 0
    lines = out.splitlines()
    assert lines[0].startswith("VALID: valid - valid until ")
    assert re.fullmatch(r"fingerprint: [0-9a-f]{12}", lines[1])
    assert "kid: test  alg: EdDSA" in lines
    assert re.search(r"^\s+tier\s+fleet$", out, re.MULTILINE)
    assert re.search(r"^\s+sub\s+acme$", out, re.MULTILINE)
    assert re.search(r"^\s+exp\s+\d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC$", out, re.MULTILINE)
    assert token not in out  # the key itself is never echoed


def test_inspect_valid_key_json(capsys: Capture, issue_key: IssueKey, key_dir: Path) -> None:
    token = issue_key(tier="enterprise", serial=9)
    code, report = run_json(capsys, "license", "inspect", token, "--public-keys", str(key_dir))
    assert code == 0
    assert report["valid"] is True
    assert report["reason"] == "valid"
    assert report["claims"]["tier"] == "enterprise"
    assert report["claims"]["serial"] == 9
    assert report["header"] == {"alg": "EdDSA", "typ": "license+jwt", "kid": "test"}
    assert re.fullmatch(r"[0-9a-f]{12}", report["fingerprint"])


def test_inspect_strips_surrounding_whitespace(
    capsys: Capture, issue_key: IssueKey, key_dir: Path
) -> None:
    token = issue_key()
    code, report = run_json(
        capsys, "license", "inspect", f"  {token}\n", "--public-keys", str(key_dir)
    )
    assert code == 0 and report["valid"] is True


def test_inspect_tampered_key(capsys: Capture, issue_key: IssueKey, key_dir: Path) -> None:
    token = tamper(issue_key())
    code, report = run_json(capsys, "license", "inspect", token, "--public-keys", str(key_dir))
    assert code == 1
    assert report["valid"] is False
    assert report["reason"] == "license_bad_signature"
    assert report["claims"]["sub"] == "tenant-1"  # still shown, for support

    code, out, _ = run(capsys, "license", "inspect", token, "--public-keys", str(key_dir))
    assert code == 1
    assert out.startswith("INVALID: license_bad_signature - ")


def test_inspect_expired_trial(capsys: Capture, issue_key: IssueKey, key_dir: Path) -> None:
    now = int(time.time())
    token = issue_key(trial=True, iat=now - 30 * 86400, nbf=now - 30 * 86400, exp=now - 86400)
    code, report = run_json(capsys, "license", "inspect", token, "--public-keys", str(key_dir))
    assert code == 1
    assert report["valid"] is False
    assert report["reason"] == "license_expired"
    assert report["detail"].startswith("expired ")


def test_inspect_paid_key_in_grace(capsys: Capture, issue_key: IssueKey, key_dir: Path) -> None:
    now = int(time.time())
    token = issue_key(iat=now - 30 * 86400, nbf=now - 30 * 86400, exp=now - 86400)
    code, report = run_json(capsys, "license", "inspect", token, "--public-keys", str(key_dir))
    assert code == 0
    assert (report["valid"], report["reason"]) == (True, "grace")
    assert "grace period ends" in report["detail"]
    code, report = run_json(
        capsys, "license", "inspect", token, "--public-keys", str(key_dir), "--grace-days", "0"
    )
    assert (code, report["reason"]) == (0, "restricted")


def test_inspect_not_yet_valid(capsys: Capture, issue_key: IssueKey, key_dir: Path) -> None:
    now = int(time.time())
    token = issue_key(nbf=now + 30 * 86400, exp=now + 60 * 86400)
    code, report = run_json(capsys, "license", "inspect", token, "--public-keys", str(key_dir))
    assert code == 1
    assert report["reason"] == "license_not_yet_valid"


def test_inspect_unknown_key_id(capsys: Capture, issue_key: IssueKey, tmp_path: Path) -> None:
    code, report = run_json(
        capsys, "license", "inspect", issue_key(), "--public-keys", str(tmp_path)
    )
    assert code == 1
    assert report["reason"] == "license_unknown_key"


def test_inspect_without_public_keys_is_not_verified(capsys: Capture, issue_key: IssueKey) -> None:
    token = tamper(issue_key(tier="fleet"))
    code, out, _ = run(capsys, "license", "inspect", token)
    assert code == 0
    assert out.startswith("NOT VERIFIED: unverified - no --public-keys given")
    code, report = run_json(capsys, "license", "inspect", token)
    assert code == 0
    assert report["valid"] is None and report["reason"] == "unverified"
    assert report["claims"]["tier"] == "fleet"


@pytest.mark.parametrize("token", ["not-a-key", "a.b", "x.y.z"])
def test_inspect_garbage(capsys: Capture, token: str) -> None:
    code, report = run_json(capsys, "license", "inspect", token)
    assert code == 1
    assert report["valid"] is False and report["reason"] == "license_malformed"


def test_inspect_classic_key(capsys: Capture) -> None:
    code, report = run_json(capsys, "license", "inspect", "ABCDE-12345-FGHIJ-67890-KLMNO")
    assert code == 0
    assert report["valid"] is None and report["reason"] == "classic"


def test_inspect_with_a_bad_key_folder(
    capsys: Capture, issue_key: IssueKey, tmp_path: Path
) -> None:
    (tmp_path / "broken.pub").write_text("junk")
    code, out, err = run(capsys, "license", "inspect", issue_key(), "--public-keys", str(tmp_path))
    assert code == 1
    assert "broken.pub" in err


# --------------------------------------------------------------------------- explain


def explain(capsys: Capture, config_dir: Path, *argv: str) -> tuple[int, dict[str, Any]]:
    return run_json(capsys, "explain", "--config", str(config_dir / "gateway.toml"), *argv)


def test_explain_core_is_blocked_from_optimization(capsys: Capture, config_dir: Path) -> None:
    code, report = explain(capsys, config_dir, *OPTIMIZE, "--tier", "core")
    assert code == 0
    assert report["request"] == {
        "app": "operations",
        "method": "POST",
        "path": "/api/v1/shipments/1/optimize",
    }
    assert report["canonical_path"] == "/api/v1/shipments/1/optimize"
    assert report["match"] == "full"
    route = report["route"]
    assert (route["name"], route["pattern"]) == (
        "ops.shipment.optimize",
        "/api/v1/shipments/{id}/optimize",
    )
    assert route["file"] == str(config_dir / "routes.toml") and route["methods"] == ["POST"]
    lines = (config_dir / "routes.toml").read_text().splitlines()
    assert lines[route["line"] - 1] == "[[routes]]" and route["key"].startswith("routes[")
    assert report["feature"] == "ops.basic_shipment_optimization"
    assert report["decision"] == {
        "allowed": False,
        "status": 403,
        "code": "feature_not_entitled",
        "reason": "Basic Shipment Optimization is not in the Core plan",
    }
    assert report["license"]["tier"] == "core" and report["license"]["addons"] == []
    unlock = report["unlock"]
    assert (unlock["required_tier"], unlock["addon"]) == ("fleet", "advanced_shipment_optimization")
    assert "Fleet" in unlock["text"] and "$1,500/mo" in unlock["text"]
    assert "$2.50/driver/mo" in unlock["text"]
    assert report["upsell"] is True
    assert all(re.fullmatch(r"[a-z_]+", key) for key in report)


def test_explain_core_with_the_add_on_is_allowed(capsys: Capture, config_dir: Path) -> None:
    argv = [*OPTIMIZE, "--tier", "core", "--addon", "advanced_shipment_optimization"]
    code, report = explain(capsys, config_dir, *argv)
    assert code == 0
    assert report["decision"]["code"] == "allowed" and report["decision"]["allowed"] is True
    assert report["license"]["addons"] == ["advanced_shipment_optimization"]


def test_explain_fleet_is_allowed(capsys: Capture, config_dir: Path) -> None:
    code, report = explain(capsys, config_dir, *OPTIMIZE, "--tier", "fleet")
    assert code == 0
    assert report["decision"] == {"allowed": True, "status": 200, "code": "allowed", "reason": None}
    assert report["unlock"] is None


def test_explain_human_output(capsys: Capture, config_dir: Path) -> None:
    code, out, _ = run(
        capsys, "explain", "--config", str(config_dir / "gateway.toml"), *OPTIMIZE, "--tier", "core"
    )
    assert code == 0
    assert re.search(r"^decision:\s+DENY 403 feature_not_entitled$", out, re.MULTILINE)
    assert re.search(r"^unlock:\s+upgrade to Fleet .* or buy the Advanced", out, re.MULTILINE)
    route = r"^route:\s+/api/v1/shipments/\{id\}/optimize \[ops.shipment.optimize, routes\[\d+\], "
    assert re.search(route + r".*routes.toml line \d+\] \(match\)$", out, re.MULTILINE)


def test_explain_with_a_real_key(capsys: Capture, config_dir: Path, issue_key: IssueKey) -> None:
    code, report = explain(capsys, config_dir, *OPTIMIZE, "--key", issue_key(tier="fleet"))
    assert code == 0
    assert report["decision"]["code"] == "allowed"
    assert (report["license"]["tenant"], report["license"]["tier"]) == ("tenant-1", "fleet")

    code, report = explain(capsys, config_dir, *OPTIMIZE, "--key", tamper(issue_key()))
    assert code == 0
    assert report["decision"]["status"] == 401
    assert report["decision"]["code"] == "license_bad_signature"


def test_explain_classic_key(capsys: Capture, config_dir: Path) -> None:
    code, report = explain(capsys, config_dir, *OPTIMIZE, "--key", "ABCDE-12345-FGHIJ-67890-KLMNO")
    assert code == 0
    assert report["decision"]["code"] == "classic" and report["decision"]["allowed"] is True
    assert report["decision"]["status"] is None and report["route"] is None


def test_explain_classic_path_prefix(capsys: Capture, config_dir: Path) -> None:
    argv = ["--app", "operations", "GET", "/xdispatch/orders", "--tier", "core"]
    code, report = explain(capsys, config_dir, *argv)
    assert code == 0
    assert report["decision"]["code"] == "classic"
    assert report["canonical_path"] == "/xdispatch/orders"


def test_explain_rejected_path(capsys: Capture, config_dir: Path) -> None:
    code, report = explain(
        capsys,
        config_dir,
        "--app",
        "operations",
        "POST",
        "/api/v1/shipments/1/..%2Foptimize",
        "--tier",
        "enterprise",
    )
    assert code == 0
    assert report["decision"] == {
        "allowed": False,
        "status": 400,
        "code": "path_rejected",
        "reason": "encoded '/'",
    }
    assert report["canonical_path"] is None and report["route"] is None


def test_explain_canonicalises_first(capsys: Capture, config_dir: Path) -> None:
    path = "/api/v1//shipments/%31/./optimize?x=1"
    code, report = explain(
        capsys, config_dir, "--app", "operations", "post", path, "--tier", "core"
    )
    assert code == 0
    assert report["request"]["path"] == path and report["request"]["method"] == "POST"
    assert report["canonical_path"] == "/api/v1/shipments/1/optimize"
    assert report["decision"]["code"] == "feature_not_entitled"


def test_explain_dispatch_only_gets_no_upsell(capsys: Capture, config_dir: Path) -> None:
    argv = [*OPTIMIZE, "--tier", "core", "--role", "dispatch_only"]
    code, report = explain(capsys, config_dir, *argv)
    assert code == 0
    assert report["decision"]["code"] == "feature_not_entitled"
    assert report["upsell"] is False


def test_explain_unmatched_path_in_driver_app(capsys: Capture, config_dir: Path) -> None:
    argv = ["--app", "driver_app", "GET", "/api/v1/not/mapped", "--tier", "enterprise"]
    code, report = explain(capsys, config_dir, *argv)
    assert code == 0
    assert (report["match"], report["route"], report["unmatched_policy"]) == ("none", None, "deny")
    assert report["decision"]["code"] == "route_unmatched"


def test_explain_wrong_method(capsys: Capture, config_dir: Path) -> None:
    argv = ["--app", "driver_app", "GET", "/api/v1/scans/depot", "--tier", "enterprise"]
    code, report = explain(capsys, config_dir, *argv)
    assert code == 0
    assert report["match"] == "partial" and report["route"]["name"] == "driver.scans.depot"
    assert report["decision"]["code"] == "route_unmatched" and report["feature"] is None


def test_explain_method_no_route_of_a_shared_path_lists(capsys: Capture, config_dir: Path) -> None:
    argv = ["--app", "operations", "PUT", "/api/v1/users", "--tier", "core"]
    code, report = explain(capsys, config_dir, *argv)
    assert code == 0
    assert (report["match"], report["route"]) == ("partial", None)
    names = [route["name"] for route in report["shared_path_routes"]]
    assert names == ["ops.users.list", "ops.users.create"]
    assert report["decision"]["code"] == "allowed"  # unmatched = "allow" on Operations
    _, out, _ = run(capsys, "explain", "--config", str(config_dir / "gateway.toml"), *argv)
    assert "the path's routes (ops.users.list, ops.users.create) do not list PUT" in out


def test_explain_public_route(capsys: Capture, config_dir: Path) -> None:
    argv = ["--app", "client_portal", "GET", "/api/v1/health", "--tier", "core"]
    code, report = explain(capsys, config_dir, *argv)
    assert code == 0
    assert report["route"]["public"] is True and report["feature"] is None
    assert report["decision"]["code"] == "public"


def test_explain_role_forbidden(capsys: Capture, config_dir: Path) -> None:
    argv = ["--app", "operations", "POST", "/api/v1/users", "--tier", "enterprise"]
    code, report = explain(capsys, config_dir, *argv, "--role", "standard")
    assert code == 0
    assert report["feature"] is None and report["route"]["name"] == "ops.users.create"
    assert report["decision"]["code"] == "role_forbidden"


def test_explain_unknown_tier_is_a_usage_error(capsys: Capture, config_dir: Path) -> None:
    code, out, err = run(
        capsys,
        "explain",
        "--config",
        str(config_dir / "gateway.toml"),
        *OPTIMIZE,
        "--tier",
        "platinum",
    )
    assert code == 2
    assert "unknown tier 'platinum'" in err


def test_explain_needs_a_key_a_tier_or_a_tenant(capsys: Capture, config_dir: Path) -> None:
    code, _, err = run(capsys, "explain", "--config", str(config_dir / "gateway.toml"), *OPTIMIZE)
    assert code == 2 and "--key, --tier or --tenant" in err


def test_explain_with_a_broken_config(capsys: Capture, config_dir: Path) -> None:
    routes = config_dir / "routes.toml"
    routes.write_text(routes.read_text().replace('"ops.on_demand"', '"ops.nope"', 1))
    code, out, err = run(
        capsys,
        "explain",
        "--config",
        str(config_dir / "gateway.toml"),
        *OPTIMIZE,
        "--tier",
        "core",
    )
    assert code == 1
    assert "configuration invalid" in err and "routes.toml" in err and "ops.nope" in err


# --------------------------------------------------------------------------- check


def test_check_the_shipped_configuration(capsys: Capture, config_dir: Path) -> None:
    code, out, _ = run(capsys, "check", "--config", str(config_dir / "gateway.toml"))
    assert code == 0
    assert out.splitlines()[0].endswith("gateway.toml: OK")
    assert "public keys       1 (test)" in out
    assert "features with no route" not in out


def test_version_is_the_package_version_and_the_changelog_s_newest_section(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """One version: ``gateway --version``, ``gateway_build_info{version}`` (the package's
    ``__version__``) and the newest dated section of CHANGELOG.md agree."""
    from gateway import __version__

    with pytest.raises(SystemExit) as exited:
        main(["--version"])
    assert exited.value.code == 0
    assert capsys.readouterr().out.strip() == f"gateway {__version__}"
    changelog = (Path(__file__).resolve().parent.parent / "CHANGELOG.md").read_text()
    newest = re.search(r"^## (\S+) — \d{4}-\d{2}-\d{2}$", changelog, re.M)
    assert newest is not None and newest.group(1) == __version__
