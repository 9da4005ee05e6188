"""`make demo` end to end: start it, run every curl line it prints, check each behaves as
its comment says. Uses the demo's fixed ports (8081-8083, 9001-9003, 9900)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = re.compile(r"^  # (?P<what>.*)  \[expect (?P<status>\d{3})\]$")


@pytest.mark.timeout(120)
def test_demo_prints_curl_lines_that_behave_as_printed(tmp_path: Path) -> None:
    env = {**os.environ, "GATEWAY_DEMO_DIR": str(tmp_path / "demo"), "PYTHONUNBUFFERED": "1"}
    demo = subprocess.Popen(
        [sys.executable, "-m", "gateway.demo"],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    printed: list[str] = []
    try:
        assert demo.stdout is not None
        for line in demo.stdout:
            printed.append(line.rstrip("\n"))
            if line.startswith("Ctrl-C stops"):
                break
        else:
            raise AssertionError("the demo stopped early:\n" + "\n".join(printed))
        examples = [
            (found["what"], int(found["status"]), printed[index + 1].strip())
            for index, line in enumerate(printed)
            if (found := EXAMPLE.match(line))
        ]
        assert len(examples) >= 10
        source = next(line.strip() for line in printed if line.strip().startswith("source "))
        failures: list[tuple[str, object, str]] = []
        for what, status, command in examples:
            assert command.startswith("curl ")
            probe = command.replace("curl ", "curl -w '\\nHTTP_STATUS=%{http_code}\\n' ", 1)
            result = subprocess.run(
                ["bash", "-c", f"{source} && {probe}"],
                cwd=REPO,
                capture_output=True,
                text=True,
                timeout=30,
            )
            seen = re.search(r"HTTP_STATUS=(\d{3})", result.stdout)
            if "metrics" in what:  # piped through grep: the counters must be there
                if "gateway_requests_total" not in result.stdout:
                    failures.append((what, "no gateway_requests_total", result.stdout[-300:]))
                continue
            if seen is None or int(seen.group(1)) != status:
                failures.append((what, status, result.stdout[-400:] + result.stderr[-200:]))
            if "X-License-Warning" in what and "X-License-Warning:" not in result.stdout:
                failures.append((what, "no X-License-Warning header", result.stdout[:400]))
            if "without upsell" in what and '"required_tier"' in result.stdout:
                failures.append((what, "upsell fields present", result.stdout))
        assert not failures, failures
    finally:
        demo.send_signal(signal.SIGINT)  # what Ctrl-C sends
        code = demo.wait(timeout=30)
        if demo.stdout is not None:
            demo.stdout.close()
    assert code == 0
    for port in (8081, 9001, 9900):  # everything it started has stopped
        check = subprocess.run(
            ["bash", "-c", f"exec 3<>/dev/tcp/127.0.0.1/{port}"], capture_output=True
        )
        assert check.returncode != 0, f"port {port} still open"
