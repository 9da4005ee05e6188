"""``loadtests/relay_loop.py`` runs: the real runtime on fake transports answers the bench's
three requests as the gateway does (it checks each status), and prints its table; with
``--bytecodes`` it counts instead of timing. Timings are its output, never asserted here."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _relay_loop(*args: str) -> str:
    done = subprocess.run(
        [sys.executable, str(REPO / "loadtests" / "relay_loop.py"), *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_relay_loop_times_the_three_requests_of_this_tree() -> None:
    out = _relay_loop("--reps", "1", "--rounds", "1", "--requests", "50")
    rows = [line for line in out.splitlines() if line.startswith("| ")]
    assert [row.split("|")[1].strip() for row in rows[1:]] == ["allowed", "blocked", "classic"]


def test_relay_loop_counts_the_bytecodes_of_a_request_by_side() -> None:
    out = _relay_loop("--bytecodes", "--kinds", "classic", "--requests", "20", "--top", "3")
    row = next(line for line in out.splitlines() if line.startswith("| classic |"))
    relay, rest, harness, total = (int(cell.replace(",", "")) for cell in row.split("|")[3:7])
    # A classic request is relayed, not decided: the relay's bytecodes are most of it.
    assert relay > rest and relay > 500
    assert abs(total - (relay + rest + harness)) <= 2  # each cell rounded on its own
    assert "gateway/proxy/" in out  # the functions listed are named by file
