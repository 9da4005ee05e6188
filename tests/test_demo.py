"""`make demo` end to end: start it on free ports (GATEWAY_DEMO_PORT_BASE), run every command
it prints in order — the curl lines, the signed provisioning call, the issuer order, the
operator commands — and check each behaves as its comment says; then Ctrl-C stops it all."""

from __future__ import annotations

import fcntl
import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import time
import tomllib
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import msgspec
import pytest

from gateway import demo
from gateway.demo_setup import PORT_COUNT, DemoPorts, demo_ports

REPO = Path(__file__).resolve().parent.parent
HEAD = re.compile(r"^  # (?P<what>.*)  \[(?:expect (?P<status>\d{3})|exit (?P<exit>\d+))\]$")
STATUS = re.compile(r"HTTP_STATUS=(\d{3})")


class Block(msgspec.Struct, frozen=True):
    what: str
    status: int | None  # an HTTP status, for curl blocks
    exit: int | None  # an exit code, for operator commands
    command: str


def parse_blocks(printed: list[str]) -> list[Block]:
    """``  # what  [expect 200]`` or ``[exit 0]``, then the command's lines up to a blank one."""
    blocks = []
    for index, line in enumerate(printed):
        found = HEAD.match(line)
        if found is None:
            continue
        lines = []
        for following in printed[index + 1 :]:
            if not following.strip():
                break
            lines.append(following.strip())
        status, code = found["status"], found["exit"]
        blocks.append(
            Block(
                found["what"],
                None if status is None else int(status),
                None if code is None else int(code),
                "\n".join(lines),
            )
        )
    return blocks


def _port_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port_base() -> int:
    """The start of PORT_COUNT consecutive free ports, below the kernel's ephemeral range
    (where client sockets would take them) and away from the demo's default ports."""
    for _ in range(500):
        base = random.randrange(20000, 32000)
        if all(_port_free(port) for port in range(base, base + PORT_COUNT)):
            return base
    raise AssertionError("no block of free ports")


def _listening(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def _children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


@contextmanager
def running_demo(folder: Path) -> Iterator[tuple[subprocess.Popen[str], list[str], int]]:
    """The demo on free ports, its banner read; (process, printed lines, port base). Stopped
    with SIGINT (what Ctrl-C sends) unless the test did it already."""
    for _ in range(3):
        base = free_port_base()
        env = {
            **os.environ,
            "GATEWAY_DEMO_DIR": str(folder),
            "GATEWAY_DEMO_PORT_BASE": str(base),
            "PYTHONUNBUFFERED": "1",
        }
        process = subprocess.Popen(
            [sys.executable, "-m", "gateway.demo"],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        printed: list[str] = []
        try:
            assert process.stdout is not None
            for line in process.stdout:
                printed.append(line.rstrip("\n"))
                if line.startswith("Ctrl-C stops"):
                    break
            else:
                if "already in use" in "\n".join(printed):  # taken since we looked: again
                    continue
                raise AssertionError("the demo stopped early:\n" + "\n".join(printed))
            yield process, printed, base
            return
        finally:
            if process.poll() is None:
                process.send_signal(signal.SIGINT)
                process.wait(timeout=30)
            if process.stdout is not None:
                process.stdout.close()
    raise AssertionError("no free ports for the demo")


def run_shell(source: str, command: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", "-c", f"{source} && {command}"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )


def _run_curl_block(source: str, block: Block) -> tuple[int | None, str]:
    """Run a printed curl block; (the HTTP status of its curl, its output)."""
    probe = block.command.replace("curl ", "curl -w '\\nHTTP_STATUS=%{http_code}\\n' ", 1)
    result = run_shell(source, probe)
    seen = STATUS.search(result.stdout)
    return (None if seen is None else int(seen.group(1))), result.stdout + result.stderr


def _readme_recipe() -> str:
    text = (REPO / "README.md").read_text()
    section = text[text.index("### How billing provisions a tenant") :]
    start = section.index("```sh", section.index("Copy-paste")) + len("```sh\n")
    return section[start : section.index("```", start)]


@pytest.mark.timeout(300)
def test_demo_prints_commands_that_behave_as_printed(tmp_path: Path) -> None:
    folder = tmp_path / "demo"
    with running_demo(folder) as (process, printed, base):
        ports = demo_ports(base)
        blocks = parse_blocks(printed)
        assert len(blocks) >= 20
        source = next(line.strip() for line in printed if line.strip().startswith("source "))
        signing = next(line.split()[2] for line in printed if line.startswith("  signing key"))
        assert (REPO / signing).is_file() and Path(signing).name == "demo.key"

        failures: list[tuple[str, object, str]] = []
        answers: dict[str, str] = {}
        for block in blocks:
            if block.status is None:
                continue
            status, output = _run_curl_block(source, block)
            answers[block.command] = output
            if "metrics" in block.what:  # piped through grep: the counters must be there
                if "gateway_requests_total" not in output:
                    failures.append((block.what, "no gateway_requests_total", output[-300:]))
                continue
            if status != block.status:
                failures.append((block.what, block.status, output[-600:]))
            if "X-License-Warning" in block.what and "X-License-Warning:" not in output:
                failures.append((block.what, "no X-License-Warning header", output[:400]))
            if "without upsell" in block.what and '"required_tier"' in output:
                failures.append((block.what, "upsell fields present", output))
        assert not failures, failures

        # The provisioning call and the order change what the line after each returns.
        for marker in ("/admin/provision", "/v1/orders"):
            at = next(i for i, b in enumerate(blocks) if marker in b.command)
            signed, after = blocks[at], blocks[at + 1]
            assert "openssl dgst -sha256 -hmac" in signed.command
            earlier = [b for b in blocks[:at] if b.command == after.command]
            assert earlier, f"nothing before {marker} shows what it changes"
            assert (earlier[-1].status, after.status) in ((401, 200), (403, 200))
        order = next(b for b in blocks if "/v1/orders" in b.command)
        answer = json.loads(answers[order.command].split("\nHTTP_STATUS=")[0])
        assert answer["change"] in ("new", "upgrade") and answer["tier"] == "fleet"
        assert [d["state"] for d in answer["deliveries"]] == ["delivered"]

        # Every operator command works as pasted, on the demo's files.
        outputs: dict[str, str] = {}
        for block in blocks:
            if block.exit is None:
                continue
            result = run_shell(source, block.command)
            outputs[block.command] = result.stdout
            if result.returncode != block.exit:
                failures.append((block.command, result.returncode, result.stderr[-400:]))
        assert not failures, failures
        for verb in (
            "tenant list",
            "audit verify",
            "audit show",
            "report funnel",
            "replay --har",
            "routes coverage",
            "migrate --plan",
        ):
            assert any(f" {verb} " in command for command in outputs), verb
        text = "\n".join(outputs.values())
        assert "intact" in text  # audit verify
        assert "billing:demo-billing" in text and "provision-hook" in text  # audit show
        assert "demo-new" in text  # tenant list: the provisioned tenant

        # The README's recipe runs against the demo as printed there (paths under demo/).
        recipe = (
            _readme_recipe()
            .replace("demo/", f"{folder}/")
            .replace("127.0.0.1:9900", f"127.0.0.1:{ports.admin}")
            .replace(".venv/bin/gateway", str(Path(sys.executable).parent / "gateway"))
        )
        result = subprocess.run(["bash", "-c", recipe], cwd=REPO, capture_output=True, text=True,
                                timeout=60)  # fmt: skip
        assert '{"applied": true}' in result.stdout, result.stdout + result.stderr
        for doc in ("README.md", "keys/README.md"):
            for named in set(re.findall(r"\bdemo/[\w./-]+\w", (REPO / doc).read_text())):
                assert (folder / named.removeprefix("demo/")).exists(), (doc, named)

        children = _children(process.pid)
        assert len(children) == 5  # three upstreams, the gateway, the issuer
        with urllib.request.urlopen(f"http://127.0.0.1:{ports.admin}/healthz") as response:
            assert json.load(response)["pid"] in children
        process.send_signal(signal.SIGINT)  # what Ctrl-C sends
        code = process.wait(timeout=30)
    assert code == 0
    for label, port in ports.named():  # everything it started has stopped
        assert not _listening(port), f"port {port} ({label}) still open"
    still = [pid for pid in children if Path(f"/proc/{pid}").exists()]
    assert not still, still


@pytest.mark.timeout(60)
def test_demo_refuses_a_port_taken_by_another_process(tmp_path: Path) -> None:
    base = free_port_base()
    ports = demo_ports(base)
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", ports.admin))
        squatter.listen()
        result = subprocess.run(
            [sys.executable, "-m", "gateway.demo", "--port-base", str(base)],
            cwd=REPO,
            env={**os.environ, "GATEWAY_DEMO_DIR": str(tmp_path / "demo")},
            capture_output=True,
            text=True,
            timeout=50,
        )
    assert result.returncode == 1
    assert f"{ports.admin} (admin)" in result.stderr and "--port-base" in result.stderr
    assert "running" not in result.stdout
    assert not any(_listening(port) for _, port in ports.named() if port != ports.admin)


@pytest.mark.timeout(60)
def test_a_second_demo_on_the_same_folder_is_refused(tmp_path: Path) -> None:
    folder = tmp_path / "demo"
    folder.mkdir()
    with (folder / demo.LOCK_FILE).open("w") as held:  # what a running demo holds
        fcntl.flock(held, fcntl.LOCK_EX)
        result = subprocess.run(
            [sys.executable, "-m", "gateway.demo", "--port-base", str(free_port_base())],
            cwd=REPO,
            env={**os.environ, "GATEWAY_DEMO_DIR": str(folder)},
            capture_output=True,
            text=True,
            timeout=50,
        )
    assert result.returncode == 1
    assert f"another demo is running from {folder}" in result.stderr
    assert "GATEWAY_DEMO_DIR" in result.stderr
    assert sorted(path.name for path in folder.iterdir()) == [demo.LOCK_FILE]  # untouched


def _wait_answering(port: int) -> None:
    deadline = time.monotonic() + 20
    while not _listening(port):
        assert time.monotonic() < deadline, "the upstream did not come up"
        time.sleep(0.05)


@pytest.mark.timeout(60)
def test_ownership_check_names_ports_answered_by_other_processes() -> None:
    """Another demo's upstream on our ports: found by its nonce; a port where no /healthz
    names our pid is not ours; a silent port is named too."""
    other, silent = free_port_base(), free_port_base()
    process = subprocess.Popen(
        [sys.executable, "-m", "gateway.demo", "upstream", "--app", "operations",
         "--port", str(other), "--nonce", "another-run"],
        cwd=REPO,
    )  # fmt: skip
    try:
        _wait_answering(other)
        ports = DemoPorts(
            listeners={"operations": other},
            upstreams={"operations": other},
            admin=other,
            issuer=silent,
        )
        problems = demo.ownership_problems(ports, "this-run", os.getpid(), os.getpid())
    finally:
        process.terminate()
        process.wait(10)
    assert problems == [
        f"port {other} (operations upstream) answers as another process "
        "(demo_run another-run, expected this-run)",
        f"port {other} (operations listener) answers as another process "
        "(demo_run another-run, expected this-run)",
        f"port {other} (admin) answers HTTP 200, but not as a process of this demo",
        f"port {silent} (issuer) does not answer ([Errno 111] Connection refused)",
    ]


@pytest.mark.parametrize(
    ("argv", "env", "message"),
    [
        pytest.param(["--port-base", "abc"], None, "--port-base='abc': expected a port number",
                     id="flag-not-a-number"),
        pytest.param([], "80", "port base 80: the demo uses 8 ports", id="env-too-low"),
        pytest.param(["--port-base", "65530"], "20000", "port base 65530", id="flag-wins"),
    ],
)  # fmt: skip
def test_a_bad_port_base_is_refused_before_anything_starts(
    argv: list[str],
    env: str | None,
    message: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    if env is not None:
        monkeypatch.setenv(demo.PORT_BASE_ENV, env)
    assert demo.main(argv) == 2
    assert message in capsys.readouterr().err


def test_default_ports_are_those_of_the_shipped_configs() -> None:
    gateway = tomllib.loads((REPO / "gateway.toml").read_text())
    issuer = tomllib.loads((REPO / "issuer.toml").read_text())
    ports = demo_ports(None)

    def port(address: str) -> int:
        return int(address.rsplit(":", 1)[1])

    for app, settings in gateway["apps"].items():
        assert ports.listeners[app] == port(settings["listen"])
        assert ports.upstreams[app] == port(settings["upstream"])
    assert ports.admin == port(gateway["admin"]["listen"])
    assert ports.issuer == port(issuer["issuer"]["listen"])
    assert len({p for _, p in demo_ports(20000).named()}) == PORT_COUNT
