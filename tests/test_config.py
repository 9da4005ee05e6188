"""Loading gateway.toml and the files it names (docs/design.md §3), and ``gateway check``."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest

from gateway.cli import main
from gateway.config import ReminderSettings, load_config, load_settings
from gateway.errors import ConfigError, ConfigProblem
from gateway.license import DEFAULT_CLASSIC_PATTERN

Edit = tuple[str, str, str]  # (file name in the config folder, old text, new text)


def edit(folder: Path, name: str, old: str, new: str) -> Path:
    """Replace the first ``old`` in ``folder/name`` (``old`` "" appends ``new``)."""
    path = folder / name
    text = path.read_text()
    if old == "":
        text += new
    else:
        assert old in text, old
        text = text.replace(old, new, 1)
    path.write_text(text)
    return path


def line_of(path: Path, exact: str, occurrence: int = 0) -> int:
    """Line (1-based) of the ``occurrence``-th line of ``path`` that is exactly ``exact``."""
    lines = [line.strip() for line in path.read_text().splitlines()]
    found = [number for number, line in enumerate(lines, start=1) if line == exact]
    return found[occurrence]


def config_problems(path: Path) -> tuple[ConfigProblem, ...]:
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    return caught.value.problems


MINIMAL = """\
[apps.operations]
listen = "127.0.0.1:8081"
upstream = "http://127.0.0.1:9001"
"""


# ---------------------------------------------------------------------------- loading


def test_shipped_config_loads(config_dir: Path) -> None:
    config = load_config(config_dir / "gateway.toml")
    assert config.path == (config_dir / "gateway.toml").resolve()
    assert set(config.settings.apps) == {"operations", "client_portal", "driver_app"}
    operations = config.settings.apps["operations"]
    assert (operations.listen, operations.upstream) == ("127.0.0.1:8081", "http://127.0.0.1:9001")
    assert operations.classic_path_prefixes == ("/xdispatch/",)
    assert config.settings.admin.listen == "127.0.0.1:9900"
    assert set(config.matrix.tiers) == {"core", "fleet", "enterprise"}
    assert len(list(config.routes.routes())) > 50
    assert set(config.keyring.keys) == {"test"}
    assert config.classic.is_classic("ABCDE-12345-FGHIJ-67890-KLMNO")


def test_shipped_gateway_toml_alone(repo_root: Path) -> None:
    settings = load_settings(repo_root / "gateway.toml")
    assert settings.files.routes == "routes.toml"
    assert settings.files.tier_matrix == "tier_matrix.toml"
    assert settings.license.public_keys == "keys/"
    assert settings.license.grace_days == 7


def test_every_key_but_listen_and_upstream_has_a_default(tmp_path: Path) -> None:
    path = tmp_path / "gateway.toml"
    path.write_text(MINIMAL)
    settings = load_settings(path)
    assert list(settings.apps) == ["operations"]
    app = settings.apps["operations"]
    assert app.classic_path_prefixes == ()
    assert (settings.files.routes, settings.files.tier_matrix) == (
        "routes.toml",
        "tier_matrix.toml",
    )
    assert settings.admin.listen == "127.0.0.1:9900"
    assert settings.admin.provision_secret_env == "GATEWAY_PROVISION_SECRET"
    lic = settings.license
    assert (lic.public_keys, lic.header, lic.tenant_header) == (
        "keys/",
        "X-License-Key",
        "X-Tenant-Id",
    )
    assert (lic.user_header, lic.role_header) == ("X-User-Id", "X-User-Role")
    assert lic.classic_key_pattern == DEFAULT_CLASSIC_PATTERN
    assert lic.grace_days == 7
    assert settings.entitlements.prefix == "/_entitlements"
    seats = settings.seats
    assert (seats.mode, seats.window_days, seats.overage) == ("recorded", 30, 1.25)
    assert (seats.tier_overage, seats.warning_ratio, seats.client_header) == ({}, 0.9, None)


def test_relative_paths_resolve_against_the_file_folder(
    tmp_path: Path, config_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    etc = tmp_path / "deploy" / "etc"
    (etc / "rules").mkdir(parents=True)
    shutil.copy(config_dir / "routes.toml", etc / "rules" / "routes.toml")
    shutil.copy(config_dir / "tier_matrix.toml", etc / "rules" / "matrix.toml")
    shutil.copytree(config_dir / "keys", etc / "trust")
    text = (config_dir / "gateway.toml").read_text()
    text = text.replace('routes = "routes.toml"', 'routes = "rules/routes.toml"')
    text = text.replace('tier_matrix = "tier_matrix.toml"', 'tier_matrix = "rules/matrix.toml"')
    text = text.replace('public_keys = "keys/"', 'public_keys = "trust/"')
    (etc / "gateway.toml").write_text(text)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # nothing the config names is here

    config = load_config(Path("../deploy/etc/gateway.toml"))

    assert config.path == (etc / "gateway.toml").resolve()
    routes_text = (etc / "rules" / "routes.toml").read_bytes()
    assert config.routes.sha == hashlib.sha256(routes_text).hexdigest()[:12]
    assert set(config.keyring.keys) == {"test"}
    assert config.resolve("trust/") == (etc / "trust").resolve()
    assert config.resolve("rules/matrix.toml") == (etc / "rules" / "matrix.toml").resolve()


def test_missing_file_is_looked_for_beside_the_config(
    config_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    elsewhere = config_dir / "elsewhere"
    elsewhere.mkdir()
    (config_dir / "routes.toml").rename(elsewhere / "routes.toml")
    monkeypatch.chdir(elsewhere)  # a routes.toml in the working folder is not the one named
    (problem,) = config_problems(config_dir / "gateway.toml")
    assert problem.file == str(config_dir / "routes.toml")
    assert "cannot read" in problem.message


# ---------------------------------------------------------------------------- gateway.toml errors


@pytest.mark.parametrize(
    ("old", "new", "key", "fragment"),
    [
        pytest.param("[admin]", "[admin]\nbogus = 1", "admin", "`bogus`", id="in-admin"),
        pytest.param(
            "grace_days = 7", "grace_days = 7\ngrace_hours = 1",
            "license", "`grace_hours`", id="in-license",
        ),
        pytest.param(
            "[files]", "[files]\nkeys = 'keys.toml'", "files", "`keys`", id="in-files",
        ),
        pytest.param(
            "", '\n[apps.billing]\nlisten = "127.0.0.1:8084"\nupstream = "http://127.0.0.1:9004"\n',
            "apps.billing", "unknown app", id="unknown-app",
        ),
        pytest.param(
            "", "\n[extra]\nx = 1\n", "extra", "unknown section", id="top-level-table",
        ),
    ],
)  # fmt: skip
def test_unknown_keys(config_dir: Path, old: str, new: str, key: str, fragment: str) -> None:
    path = edit(config_dir, "gateway.toml", old, new)
    (problem,) = config_problems(path)
    assert problem.file == str(path)
    assert problem.key == key
    assert fragment in problem.message


@pytest.mark.parametrize(
    ("old", "new", "fragment"),
    [
        pytest.param(
            'listen = "127.0.0.1:8082"\n', "", "missing required field `listen`", id="no-listen"
        ),
        pytest.param(
            'upstream = "http://127.0.0.1:9002"\n', "", "missing required field `upstream`",
            id="no-upstream",
        ),
        pytest.param(
            "[apps.client_portal]", "[apps.client_portal]\nlisten_port = 1",
            "unknown field `listen_port`", id="unknown-key",
        ),
    ],
)  # fmt: skip
def test_app_table_problems(config_dir: Path, old: str, new: str, fragment: str) -> None:
    path = edit(config_dir, "gateway.toml", old, new)
    (problem,) = config_problems(path)
    assert problem.file == str(path)
    assert problem.key.startswith("apps")
    assert fragment in problem.message


@pytest.mark.parametrize(
    ("old", "new"),
    [
        pytest.param('listen = "127.0.0.1:8082"\n', "", id="no-listen"),
        pytest.param("[apps.client_portal]", "[apps.client_portal]\nlisten_port = 1", id="unknown"),
    ],
)
def test_app_table_problems_name_the_app(config_dir: Path, old: str, new: str) -> None:
    path = edit(config_dir, "gateway.toml", old, new)
    (problem,) = config_problems(path)
    assert problem.key == "apps.client_portal"


def test_no_apps(tmp_path: Path) -> None:
    path = tmp_path / "gateway.toml"
    path.write_text("[admin]\n")
    with pytest.raises(ConfigError) as caught:
        load_settings(path)
    (problem,) = caught.value.problems
    assert problem.file == str(path)
    assert problem.key == "apps"
    assert "at least one app" in problem.message


@pytest.mark.parametrize(
    ("old", "new", "key", "header", "fragment"),
    [
        pytest.param(
            'listen = "127.0.0.1:8081"', 'listen = "8081"',
            "apps.operations.listen", "[apps.operations]", "not host:port", id="bad-listen",
        ),
        pytest.param(
            'upstream = "http://127.0.0.1:9002"', 'upstream = "127.0.0.1:9002"',
            "apps.client_portal.upstream", "[apps.client_portal]", "not http://", id="bad-upstream",
        ),
        pytest.param(
            'listen = "127.0.0.1:8083"', 'listen = "127.0.0.1:8081"',
            "apps.driver_app.listen", "[apps.driver_app]", "also the listener of operations",
            id="listener-shared",
        ),
        pytest.param(
            'listen = "127.0.0.1:9900"', 'listen = "127.0.0.1:8082"',
            "admin.listen", "[admin]", "same address as an app listener", id="admin-on-app-port",
        ),
        pytest.param(
            'classic_path_prefixes = ["/xdispatch/"]', 'classic_path_prefixes = ["xdispatch/"]',
            "apps.operations.classic_path_prefixes", "[apps.operations]", "must start with '/'",
            id="relative-classic-prefix",
        ),
        pytest.param(
            'header = "X-License-Key"', 'header = "X License Key"',
            "license.header", "[license]", "not a valid header name", id="bad-header-name",
        ),
        pytest.param(
            "classic_key_pattern = '^[A-Z0-9]{5}(-[A-Z0-9]{5}){4}$'",
            "classic_key_pattern = '^[A-Z'",
            "license.classic_key_pattern", "[license]", "bad regular expression", id="bad-regex",
        ),
        pytest.param(
            '[apps.driver_app]', '[apps.driver_app]\nread_timeout = 0',
            "apps.driver_app.read_timeout", "[apps.driver_app]", "must be positive",
            id="zero-timeout",
        ),
    ],
)  # fmt: skip
def test_bad_values_name_key_and_line(
    config_dir: Path, old: str, new: str, key: str, header: str, fragment: str
) -> None:
    path = edit(config_dir, "gateway.toml", old, new)
    (problem,) = config_problems(path)
    assert (problem.file, problem.key, problem.line) == (str(path), key, line_of(path, header))
    assert fragment in problem.message


SERVER_TIMEOUTS = [
    "shutdown_deadline",
    "keepalive_timeout",
    "header_timeout",
    "body_timeout",
    "reload_poll_interval",
]
SERVER_LIMITS = ["max_header_bytes", "max_headers", "max_body_bytes"]


@pytest.mark.parametrize(
    ("key", "value"),
    [(key, value) for key in SERVER_TIMEOUTS for value in ("0", "-1.5", "nan", "inf")]
    + [(key, value) for key in SERVER_LIMITS for value in ("0", "-1")],
)
def test_check_refuses_server_timeouts_and_limits_that_are_not_positive(
    config_dir: Path, capsys: pytest.CaptureFixture[str], key: str, value: str
) -> None:
    """A zero header timeout made every connection's watchdog spin; nothing below zero
    (or not a finite number) means anything for a timeout or a limit either."""
    path = edit(config_dir, "gateway.toml", "", f"\n[server]\n{key} = {value}\n")
    assert main(["check", "--config", str(path)]) == 1
    assert f"[server.{key}]: must be positive" in capsys.readouterr().err
    (problem,) = config_problems(path)
    assert (problem.key, problem.line) == (f"server.{key}", line_of(path, "[server]"))


@pytest.mark.parametrize(
    ("old", "new", "key"),
    [
        pytest.param('url = "memory://"', 'url = "mysql://db"', "store.url", id="store-url"),
        pytest.param('sink = "stdout:"', 'sink = "kafka://events"', "events.sink", id="sink"),
        pytest.param("grace_days = 7", "grace_days = -1", "license", id="negative-grace"),
        pytest.param("", '\n[entitlements]\nprefix = "ent"\n', "entitlements.prefix", id="prefix"),
        pytest.param("", "\n[seats]\nwindow_days = 0\n", "seats.window_days", id="seat-window"),
        pytest.param("", "\n[seats]\noverage = 0.8\n", "seats.overage", id="seat-overage"),
        pytest.param(
            "",
            "\n[seats]\ntier_overage = { fleet = 0.5 }\n",
            "seats.tier_overage.fleet",
            id="tier-overage",
        ),
        pytest.param(
            "", "\n[seats]\nwarning_ratio = 1.5\n", "seats.warning_ratio", id="warning-ratio"
        ),
        pytest.param(
            "", '\n[seats]\nclient_header = "X Client"\n', "seats.client_header", id="client"
        ),
        pytest.param("", '\n[seats]\nmode = "per_seat"\n', "seats.mode", id="seat-mode"),
        pytest.param(
            "",
            "\n[seats]\ntier_overage = { platinum = 1.5 }\n",
            "seats.tier_overage.platinum",
            id="unknown-tier",
        ),
        pytest.param("", "\n[reminders]\nlead_days = [0]\n", "reminders.lead_days", id="lead-0"),
        pytest.param(
            "", "\n[reminders]\nlead_days = [60, 7]\n", "reminders.lead_days", id="lead-too-long"
        ),
        pytest.param("", "\n[reminders]\nlead_days = [7, 7]\n", "reminders.lead_days", id="twice"),
        pytest.param("", "\n[reminders]\nlead_days = []\n", "reminders.lead_days", id="no-lead"),
        pytest.param(
            "", '\n[reminders]\nlead_days = ["7"]\n', "reminders.lead_days[0]", id="lead-type"
        ),
        pytest.param(
            "",
            "\n[reminders]\ninterval_seconds = 0\n",
            "reminders.interval_seconds",
            id="reminder-interval",
        ),
    ],
)
def test_bad_values_name_the_key(config_dir: Path, old: str, new: str, key: str) -> None:
    path = edit(config_dir, "gateway.toml", old, new)
    (problem,) = config_problems(path)
    assert (problem.file, problem.key) == (str(path), key)


def test_reminders_section(config_dir: Path) -> None:
    assert load_config(config_dir / "gateway.toml").settings.reminders == ReminderSettings(
        enabled=True, lead_days=(30, 7, 1), interval_seconds=3600.0
    )
    path = edit(
        config_dir,
        "gateway.toml",
        "",
        "\n[reminders]\nenabled = false\nlead_days = []\ninterval_seconds = 600\n",
    )
    assert load_config(path).settings.reminders == ReminderSettings(False, (), 600.0)


def test_store_and_sink_urls_resolve_against_the_file_folder(config_dir: Path) -> None:
    path = edit(
        config_dir,
        "gateway.toml",
        'url = "memory://"\n\n[events]\nsink = "stdout:"',
        'url = "sqlite://data/tenants.db"\n\n[events]\nsink = "file://logs/events.jsonl"\n'
        '\n[access_log]\nsink = "file:///var/log/access.jsonl"',
    )
    config = load_config(path)
    assert config.store_url == f"sqlite:///{config_dir.resolve()}/data/tenants.db"
    assert config.events_sink == f"file://{config_dir.resolve()}/logs/events.jsonl"
    assert config.access_log_sink == "file:///var/log/access.jsonl"


def test_seats_section(config_dir: Path) -> None:
    path = edit(
        config_dir,
        "gateway.toml",
        "",
        '\n[seats]\nmode = "active_users"\nwindow_days = 14\noverage = 1.5\n'
        'tier_overage = { core = 1.0 }\nwarning_ratio = 0.8\nclient_header = "X-Client-Id"\n',
    )
    config = load_config(path)
    seats = config.settings.seats
    assert (seats.mode, seats.window_days, seats.overage) == ("active_users", 14, 1.5)
    assert (seats.tier_overage, seats.warning_ratio) == ({"core": 1.0}, 0.8)
    assert seats.client_header == "X-Client-Id"
    assert config.policy.seat_mode == "active_users"


@pytest.mark.parametrize(
    ("old", "new", "header"),
    [
        pytest.param("[admin]", "[admin]\nbogus = 1", "[admin]", id="unknown-key"),
        pytest.param('url = "memory://"', 'url = "mysql://db"', "[store]", id="bad-store-url"),
        pytest.param("grace_days = 7", 'grace_days = "7"', "[license]", id="wrong-type"),
    ],
)
def test_gateway_toml_problems_name_the_line(
    config_dir: Path, old: str, new: str, header: str
) -> None:
    path = edit(config_dir, "gateway.toml", old, new)
    (problem,) = config_problems(path)
    assert problem.line == line_of(path, header)


def test_toml_syntax_error_reports_the_line(config_dir: Path) -> None:
    path = edit(config_dir, "gateway.toml", "[store]", "[store")
    (problem,) = config_problems(path)
    assert problem.file == str(path)
    assert problem.line == line_of(path, "[store")
    assert "TOML syntax error" in problem.message


def test_not_utf8(config_dir: Path) -> None:
    path = config_dir / "gateway.toml"
    path.write_bytes(path.read_bytes() + b"\n# caf\xe9\n")
    (problem,) = config_problems(path)
    assert problem.file == str(path)
    assert "not UTF-8" in problem.message


# ---------------------------------------------------------------------------- several files


def test_problems_in_several_files_are_reported_together(config_dir: Path) -> None:
    matrix = edit(
        config_dir,
        "tier_matrix.toml",
        'features = ["ops.on_demand", "portal.on_demand", "driver.on_demand"]',
        'features = ["ops.on_demand", "ops.teleport", "portal.on_demand", "driver.on_demand"]',
    )
    routes = edit(config_dir, "routes.toml", "[apps.driver_app]", "[apps.driver_app")
    bad_key = config_dir / "keys" / "old.pub"
    bad_key.write_text("not a key\n")

    problems = config_problems(config_dir / "gateway.toml")

    assert sorted((p.file, p.key, p.line) for p in problems) == sorted(
        [
            (str(matrix), "tiers.core.features", line_of(matrix, "[tiers.core]")),
            (str(routes), "", line_of(routes, "[apps.driver_app")),
            (str(bad_key), "license.public_keys", None),
        ]
    )


def test_route_problems_and_key_problems_together(config_dir: Path) -> None:
    routes = edit(config_dir, "routes.toml", 'path = "/api/v1/account"', 'path = "/api/v1//x"')
    (config_dir / "keys" / "test.pub").unlink()
    (config_dir / "keys").rmdir()
    problems = config_problems(config_dir / "gateway.toml")
    assert {(p.file, p.key) for p in problems} == {
        (str(routes), "routes[3].path"),
        (str(config_dir / "keys"), "license.public_keys"),
    }


def test_gateway_toml_problem_does_not_hide_the_others(config_dir: Path) -> None:
    settings = edit(config_dir, "gateway.toml", 'listen = "127.0.0.1:8081"', 'listen = "x"')
    routes = edit(config_dir, "routes.toml", 'path = "/api/v1/account"', 'path = "/api/v1//x"')
    problems = config_problems(config_dir / "gateway.toml")
    assert {p.file for p in problems} == {str(settings), str(routes)}


def test_matrix_problem_does_not_hide_route_problems(config_dir: Path) -> None:
    matrix = edit(
        config_dir, "tier_matrix.toml", 'title = "Fleet"', 'title = "Fleet"\ncolour = "blue"'
    )
    routes = edit(config_dir, "routes.toml", 'path = "/api/v1/account"', 'path = "/api/v1//x"')
    problems = config_problems(config_dir / "gateway.toml")
    assert {p.file for p in problems} == {str(matrix), str(routes)}


# ---------------------------------------------------------------------------- gateway check


def test_check_shipped_files(config_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check", "--config", str(config_dir / "gateway.toml")]) == 0
    out, err = capsys.readouterr()
    assert "OK" in out
    assert "routes.toml" in out and "tier_matrix.toml" in out
    assert err == ""


def _route_block(path: Path, needle: str) -> tuple[int, int]:
    """(index, header line) of the ``[[routes]]`` entry that contains ``needle``."""
    lines = path.read_text().splitlines()
    target = next(number for number, line in enumerate(lines) if line.strip() == needle)
    headers = [n for n, line in enumerate(lines[:target]) if line.strip() == "[[routes]]"]
    return len(headers) - 1, headers[-1] + 1


AMBIGUOUS = '\n[[routes]]\napp = "operations"\npath = "/api/v1/shipments/{shipment}"\n'


@pytest.mark.parametrize(
    ("name", "old", "new", "expected"),
    [
        pytest.param(
            "gateway.toml", "[admin]", "[admin]\nbogus = 1", "{path}:{line} [admin]: ",
            id="unknown-key",
        ),
        pytest.param(
            "routes.toml", 'feature = "ops.sms_messaging"', 'feature = "ops.sms"',
            "{path}:{line} [routes[{index}].feature]: unknown feature 'ops.sms'",
            id="unknown-feature",
        ),
        pytest.param(
            "routes.toml", "", AMBIGUOUS, "{path}:{line} [routes[{index}].path]: ambiguous",
            id="ambiguous-routes",
        ),
        pytest.param(
            "tier_matrix.toml", "[tiers.fleet]", "[tiers.fleet", "{path}:{line}: TOML syntax error",
            id="toml-syntax-error",
        ),
    ],
)  # fmt: skip
def test_check_reports_each_problem(
    config_dir: Path,
    capsys: pytest.CaptureFixture[str],
    name: str,
    old: str,
    new: str,
    expected: str,
) -> None:
    path = edit(config_dir, name, old, new)
    index, line = 0, 0
    if name == "routes.toml":
        needle = new.strip().splitlines()[-1]
        index, line = _route_block(path, needle)
    elif name == "tier_matrix.toml":
        line = line_of(path, new)
    else:
        line = line_of(path, "[admin]")

    assert main(["check", "--config", str(config_dir / "gateway.toml")]) == 1

    out, err = capsys.readouterr()
    assert "OK" not in out
    first, *rest = err.splitlines()
    assert first == "gateway: configuration invalid (1 problems):"
    assert len(rest) == 1
    assert rest[0].startswith("  " + expected.format(path=path, line=line, index=index))


def test_check_lists_every_problem(config_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    routes = edit(config_dir, "routes.toml", 'feature = "ops.sms_messaging"', 'feature = "ops.sms"')
    edit(config_dir, "routes.toml", "", AMBIGUOUS)
    bad_key = config_dir / "keys" / "old.pub"
    bad_key.write_text("not a key\n")
    assert main(["check", "--config", str(config_dir / "gateway.toml")]) == 1
    first, *rest = capsys.readouterr().err.splitlines()
    assert first == "gateway: configuration invalid (3 problems):"
    assert [line.split(" [")[0].split(":")[0] for line in rest] == [
        f"  {routes}",
        f"  {routes}",
        f"  {bad_key}",
    ]
    assert "unknown feature 'ops.sms'" in rest[0]
    assert "ambiguous" in rest[1]


def test_check_missing_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check", "--config", str(tmp_path / "nope.toml")]) == 1
    assert "cannot read" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv",
    [
        pytest.param(["check", "--no-such-option"], id="unknown-option"),
        pytest.param(["check", "--config"], id="option-without-value"),
        pytest.param(["check", "extra-argument"], id="extra-argument"),
        pytest.param([], id="no-command"),
        pytest.param(["frobnicate"], id="unknown-command"),
    ],
)
def test_check_usage_error(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as caught:
        main(argv)
    assert caught.value.code == 2
    assert "usage: gateway" in capsys.readouterr().err
