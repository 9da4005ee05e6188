"""The route tools of the command line: ``gateway check``'s route warnings, run in-process
through ``gateway.cli.main`` on a copy of the shipped configuration."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.cli import main

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
