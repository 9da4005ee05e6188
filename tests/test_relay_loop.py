"""``loadtests/relay_loop.py`` runs: the real runtime on fake transports answers the bench's
three requests as the gateway does (it checks each status), and prints its table. Timings
are its output, never asserted here."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_relay_loop_times_the_three_requests_of_this_tree() -> None:
    done = subprocess.run(
        [
            sys.executable,
            str(REPO / "loadtests" / "relay_loop.py"),
            "--reps",
            "1",
            "--rounds",
            "1",
            "--requests",
            "50",
        ],  # fmt: skip
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    rows = [line for line in done.stdout.splitlines() if line.startswith("| ")]
    assert [row.split("|")[1].strip() for row in rows[1:]] == ["allowed", "blocked", "classic"]
