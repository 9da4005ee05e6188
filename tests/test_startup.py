"""Start-up refusals: a pure-Python HTTP parser, a broken config."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from gateway.matrix import APP_NAMES
from tests.harness import write_config


@pytest.mark.parametrize("workers", ["1", "2"])
def test_refuses_to_start_without_the_c_parser(tmp_path: Path, key_dir: Path, workers: str) -> None:
    config, _, _ = write_config(tmp_path, key_dir, dict.fromkeys(APP_NAMES, 9))
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "gateway.cli",
            "serve",
            "--config",
            str(config),
            "--workers",
            workers,
        ],
        env={**os.environ, "AIOHTTP_NO_EXTENSIONS": "1"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    assert "C HTTP parser is not in use" in result.stderr


def test_refuses_to_start_on_a_broken_config(tmp_path: Path, key_dir: Path) -> None:
    config, _, _ = write_config(tmp_path, key_dir, dict.fromkeys(APP_NAMES, 9))
    (tmp_path / "routes.toml").write_text("[[routes]\n")
    result = subprocess.run(
        [sys.executable, "-m", "gateway.cli", "serve", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    assert "routes.toml" in result.stderr and "TOML syntax error" in result.stderr
