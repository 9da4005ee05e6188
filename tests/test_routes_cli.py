"""The route tools of the command line, run in-process through ``gateway.cli.main``:
``check`` (warnings, ``--strict``), ``routes coverage``, ``routes export`` and ``test``, on
the shipped configuration or a copy of it."""

from __future__ import annotations

import csv
import io
import re
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest

from gateway.cli import main
from gateway.routes import RouteTable
from gateway.routetest import OUTCOMES

Capture = pytest.CaptureFixture[str]


def run(capsys: Capture, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def set_unmatched(config_dir: Path, app: str, policy: str) -> None:
    routes = config_dir / "routes.toml"
    text = routes.read_text()
    header = f"[apps.{app}]\nunmatched = "
    start = text.index(header) + len(header)
    end = text.index("\n", start)
    routes.write_text(text[:start] + f'"{policy}"' + text[end:])


def test_check_warns_for_apps_that_allow_unmatched_paths(capsys: Capture, config_dir: Path) -> None:
    config = str(config_dir / "gateway.toml")
    code, out, _ = run(capsys, "check", "--config", config)
    assert code == 0
    warned = [line for line in out.splitlines() if 'unmatched = "allow"' in line]
    assert [line.split(":")[1].strip() for line in warned] == [
        "apps.operations",
        "apps.client_portal",
    ]
    assert all(line.startswith("  warning: ") and "/x.json" in line for line in warned)

    for app in ("operations", "client_portal"):
        set_unmatched(config_dir, app, "deny")
    code, out, _ = run(capsys, "check", "--config", config)
    assert code == 0 and "unmatched" not in out


def test_check_strict_turns_warnings_into_errors(capsys: Capture, config_dir: Path) -> None:
    config = str(config_dir / "gateway.toml")
    code, out, _ = run(capsys, "check", "--config", config, "--strict")
    assert code == 1
    assert out.splitlines()[0].endswith("FAILED (--strict: warnings are errors)")
    # unmatched = "allow" on two apps, and no [identity] section
    assert out.count("  error: ") == 3 and "  warning: " not in out

    for app in ("operations", "client_portal"):
        set_unmatched(config_dir, app, "deny")
    with (config_dir / "gateway.toml").open("a") as toml:
        toml.write('\n[identity]\nmode = "headers"\ntrusted_peers = ["10.0.0.5/32"]\n')
    code, out, _ = run(capsys, "check", "--config", config, "--strict")
    assert code == 0 and out.splitlines()[0].endswith(": OK")


def test_check_warns_for_features_with_no_route(capsys: Capture, config_dir: Path) -> None:
    routes = config_dir / "routes.toml"
    routes.write_text(routes.read_text().replace('"ops.sms_messaging"', '"ops.on_demand"'))
    code, out, _ = run(capsys, "check", "--config", str(config_dir / "gateway.toml"))
    assert code == 0
    assert "  warning: features with no route (nothing is gated by them): ops.sms_messaging" in out
    code, _, _ = run(capsys, "check", "--config", str(config_dir / "gateway.toml"), "--strict")
    assert code == 1


def test_check_warns_when_a_shared_path_leaves_methods_ungated(
    capsys: Capture, config_dir: Path
) -> None:
    """GET gated by a feature, DELETE by a second route: PUT is neither's, so on an allow
    app it passes with any license; check says which methods and how to close them."""
    routes = config_dir / "routes.toml"
    routes.write_text(
        routes.read_text()
        + '\n[[routes]]\napp = "operations"\nname = "ops.shipments.purge"\nmethods = ["DELETE"]\n'
        'path = "/api/v1/shipments"\nfeature = "ops.on_demand"\nroles = ["owner"]\n'
    )
    code, out, _ = run(capsys, "check", "--config", str(config_dir / "gateway.toml"))
    assert code == 0
    (warning,) = [line for line in out.splitlines() if "share '/api/v1/shipments'" in line]
    assert "'ops.shipments' at line" in warning and "'ops.shipments.purge' at line" in warning
    assert "PUT, PATCH (listed by none)" in warning and "ops.on_demand" in warning


# --------------------------------------------------------------------------- routes coverage

OPENAPI = Path(__file__).resolve().parent.parent / "docs" / "openapi"


@pytest.mark.parametrize(
    ("app", "document"),
    [
        ("operations", "operations.yaml"),
        ("client_portal", "client_portal.yaml"),
        ("driver_app", "driver_app.json"),
    ],
)
def test_shipped_openapi_samples_are_fully_covered(
    capsys: Capture, repo_root: Path, app: str, document: str
) -> None:
    code, out, _ = run(
        capsys,
        "routes", "coverage", "--config", str(repo_root / "gateway.toml"),
        "--app", app, "--openapi", str(OPENAPI / document),
    )  # fmt: skip
    assert code == 0, out
    assert out.splitlines()[-1] == "OK"
    assert "unmapped" not in out and "dead routes" not in out


def write_openapi(folder: Path, paths: str, head: str = "openapi: 3.1.0\n") -> Path:
    path = folder / "api.yaml"
    path.write_text(head + "info: {title: t, version: '1'}\npaths:\n" + paths)
    return path


def test_coverage_lists_unmapped_operations_and_dead_routes(
    capsys: Capture, config_dir: Path
) -> None:
    paths = ""
    for route_path, methods in (
        ("/api/v1/health", "get"),
        ("/api/v1/auth/login", "post"),
        ("/api/v1/me", "get, put, patch"),
        ("/api/v1/me/avatar", "put"),
        ("/xdispatch/manifest", "get"),
    ):
        paths += f"  {route_path}:\n"
        for method in methods.split(", "):
            paths += f"    {method}: {{responses: {{'200': {{description: OK}}}}}}\n"
    document = write_openapi(config_dir, paths)
    code, out, _ = run(
        capsys,
        "routes", "coverage", "--config", str(config_dir / "gateway.toml"),
        "--app", "driver_app", "--openapi", str(document),
    )  # fmt: skip
    assert code == 1
    lines = out.splitlines()
    assert lines[0].startswith("driver_app: 7 operations in ") and lines[-1] == "FAILED"
    assert "  PATCH /api/v1/me  (path of driver.me, which does not list PATCH)" in lines
    assert '  PUT /api/v1/me/avatar  (no route; unmatched = "deny" decides)' in lines
    dead = lines[lines.index("dead routes, reached by no operation (11):") + 1 : -1]
    assert dead[0].startswith("  driver.me.location /api/v1/me/location [POST]  (")
    assert dead[0].endswith("routes.toml:363)")
    assert not any(line.startswith(("  driver.health ", "  driver.me ")) for line in dead)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        pytest.param("swagger: '2.0'\npaths: {}\n", "not an OpenAPI 3.0 or 3.1", id="swagger-2"),
        pytest.param("openapi: [3\n", "not JSON or YAML", id="broken-yaml"),
        pytest.param('{"openapi": "3.0.3", "paths": [', "not JSON or YAML", id="broken-json"),
        pytest.param("- 1\n- 2\n", "not an object", id="not-an-object"),
        pytest.param("openapi: 3.0.3\npaths: [1]\n", "`paths` is not an object", id="paths-list"),
        pytest.param(
            "openapi: 3.0.3\npaths:\n  api/x: {}\n", "must start with '/'", id="relative-path"
        ),
        pytest.param(
            "openapi: 3.1.0\npaths:\n  /x: {$ref: 'other.yaml#/x'}\n",
            "only local, acyclic $ref", id="external-ref",
        ),
    ],
)  # fmt: skip
def test_coverage_refuses_what_is_not_openapi_3(
    capsys: Capture, config_dir: Path, content: str, message: str
) -> None:
    document = config_dir / "api.yaml"
    document.write_text(content)
    code, out, err = run(
        capsys,
        "routes", "coverage", "--config", str(config_dir / "gateway.toml"),
        "--app", "operations", "--openapi", str(document),
    )  # fmt: skip
    assert code == 1 and out == ""
    assert err.startswith(f"gateway: {document}: ") and message in err
    assert "Traceback" not in err


def test_coverage_of_a_missing_document(capsys: Capture, config_dir: Path) -> None:
    code, _, err = run(
        capsys,
        "routes", "coverage", "--config", str(config_dir / "gateway.toml"),
        "--app", "operations", "--openapi", str(config_dir / "nope.json"),
    )  # fmt: skip
    assert code == 1 and "cannot read" in err


# --------------------------------------------------------------------------- routes export


def test_export_csv_has_one_row_per_route_and_method(
    capsys: Capture, repo_root: Path, route_table: RouteTable
) -> None:
    code, out, _ = run(capsys, "routes", "export", "--config", str(repo_root / "gateway.toml"))
    assert code == 0
    rows = list(csv.DictReader(io.StringIO(out)))
    assert list(rows[0]) == [
        "app", "name", "method", "path", "access", "feature", "tiers", "addons", "roles",
        "quota", "line",
    ]  # fmt: skip
    expected = sum(
        1 if r.methods is None else len(r.methods - ({"HEAD"} if "GET" in r.methods else set()))
        for r in route_table.routes()
    )
    assert len(rows) == expected
    by_key = {(row["name"], row["method"]): row for row in rows}
    optimize = by_key["ops.shipment.optimize", "POST"]
    assert optimize["feature"] == "ops.basic_shipment_optimization"
    assert (optimize["access"], optimize["tiers"]) == ("feature", "fleet, enterprise")
    assert optimize["addons"] == "advanced_shipment_optimization (core: $2.50/driver/mo)"
    itineraries = by_key["ops.itineraries", "GET"]
    assert itineraries["tiers"] == "enterprise"
    assert itineraries["addons"] == (
        "advanced_shipment_optimization (core: $2.50/driver/mo, fleet: $1.50/driver/mo)"
    )
    users = by_key["ops.users.create", "POST"]
    assert (users["access"], users["tiers"], users["roles"], users["quota"]) == (
        "license",
        "core, fleet, enterprise",
        "owner, admin",
        "ops_users",
    )
    health = by_key["ops.health", "*"]
    assert (health["access"], health["tiers"], health["addons"]) == ("public", "", "")
    assert ("ops.shipments", "HEAD") not in by_key  # implied by GET, not a row of its own


def test_export_markdown_for_one_app(capsys: Capture, repo_root: Path) -> None:
    argv = ["routes", "export", "--config", str(repo_root / "gateway.toml"), "--format"]
    code, out, _ = run(capsys, *argv, "markdown", "--app", "driver_app")
    assert code == 0
    lines = out.splitlines()
    assert lines[0] == (
        "| app | name | method | path | access | feature | tiers | addons | roles | quota | line |"
    )
    assert lines[1] == "|" + "---|" * 11
    assert all(line.startswith("| driver_app | driver.") for line in lines[2:])
    assert any(
        "| driver.scans.depot | POST | /api/v1/scans/depot | feature |" in line for line in lines
    )


# --------------------------------------------------------------------------- gateway test


def test_shipped_route_tests_pass(capsys: Capture, repo_root: Path) -> None:
    code, out, _ = run(
        capsys,
        "test", str(repo_root / "tests" / "route_tests.toml"),
        "--config", str(repo_root / "gateway.toml"),
    )  # fmt: skip
    assert code == 0, out
    assert re.fullmatch(r"(\d+) cases: \1 passed, 0 failed\n", out)


def test_a_wrong_expectation_fails_with_a_diff(
    capsys: Capture, config_dir: Path, issue_key: Callable[..., str]
) -> None:
    cases = config_dir / "cases.toml"
    cases.write_text(
        textwrap.dedent(
            f"""\
            [[case]]
            app = "operations"
            method = "POST"
            path = "/api/v1/shipments/1/optimize"
            tier = "core"
            expect = "allow"

            [[case]]
            name = "fleet key"
            app = "operations"
            method = "POST"
            path = "/api/v1/shipments/1/optimize"
            key = "{issue_key(tier="fleet")}"
            expect = "allow"
            route = "ops.shipment.optimize"

            [[case]]
            app = "driver_app"
            method = "GET"
            path = "/api/v1/routes/today"
            tier = "core"
            addons = ["route_distribution"]
            role = "standard"
            expect = "allowed"
            route = "driver.route.stops"
            """
        )
    )
    code, out, _ = run(capsys, "test", str(cases), "--config", str(config_dir / "gateway.toml"))
    assert code == 1
    assert out.splitlines() == [
        f"FAIL {cases}:1 operations POST /api/v1/shipments/1/optimize (tier core)",
        "  - expect: allow",
        "  + got:    feature_not_entitled (403) by route ops.shipment.optimize, "
        "feature ops.basic_shipment_optimization",
        f"FAIL {cases}:17 driver_app GET /api/v1/routes/today "
        "(tier core+route_distribution, role standard)",
        "  - route:  driver.route.stops",
        "  + route:  driver.routes.today",
        "3 cases: 1 passed, 2 failed",
    ]


def test_case_file_problems_are_listed_with_their_lines(capsys: Capture, config_dir: Path) -> None:
    cases = config_dir / "cases.toml"
    cases.write_text(
        textwrap.dedent(
            """\
            [[case]]
            app = "operations"
            method = "GET"
            path = "/x"
            tier = "platinum"
            expect = "maybe"

            [[case]]
            app = "operations"
            method = "GET"
            path = "/x"
            addons = ["sms_messaging"]
            expect = "allow"
            route = "ops.nope"
            colour = "red"

            [[case]]
            app = "operations"
            method = "GET"
            path = "/x"
            tier = "core"
            key = "k"
            addons = ["gold"]
            expect = "allow"
            """
        )
    )
    code, _, err = run(capsys, "test", str(cases), "--config", str(config_dir / "gateway.toml"))
    assert code == 1
    problems = err.splitlines()[1:]
    assert problems == [
        f"  {cases}:1 [case[0].expect]: unknown outcome 'maybe' (known: "
        + ", ".join(sorted(OUTCOMES))
        + ")",
        f"  {cases}:1 [case[0].tier]: unknown tier 'platinum'",
        f"  {cases}:8 [case[1]]: Object contains unknown field `colour`",
        f"  {cases}:17 [case[2]]: give tier or key, not both",
        f"  {cases}:17 [case[2].addons]: unknown add-on 'gold'",
    ]
