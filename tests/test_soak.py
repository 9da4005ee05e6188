"""The short soak: ``loadtests/soak.py --duration 30`` must pass.

Thirty seconds of mixed traffic against a ``gateway serve`` process, with reloads and one
upstream restart; the script itself checks RSS, every status and every error, and exits 1
on anything unexpected. The ten-minute run is recorded in ``loadtests/RESULTS.md``.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.timeout(180)
def test_short_soak_passes() -> None:
    done = subprocess.run(
        [sys.executable, str(REPO / "loadtests" / "soak.py"), "--duration", "30"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=150,
    )
    report = done.stdout + done.stderr
    assert done.returncode == 0, report
    assert "**Result: PASS**" in done.stdout, report
