"""``make demo``: dev keys, three demo upstreams, the gateway on a SQLite store, the issuing
service, sample keys and commands to paste (gateway/demo_guide.py prints them).

Everything lives in the git-ignored ``demo/`` folder (``GATEWAY_DEMO_DIR`` moves it;
gateway/demo_setup.py writes it). The upstreams, the gateway and the issuer run as child
processes; Ctrl-C (or SIGTERM) stops every process this command started. Before it says
"running", the demo checks that what answers on each of its ports is a process it started:
the upstreams echo a per-run nonce (also through the gateway's listeners), the admin
listener's and the issuer's ``/healthz`` name the pid.

    python -m gateway.demo                      # the whole demo, in the foreground
    python -m gateway.demo --port-base 18000    # ports 18000-18007 (or GATEWAY_DEMO_PORT_BASE)
    python -m gateway.demo upstream --app operations --port 9001 --nonce N
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from gateway.demo_guide import gateway_bin, guide
from gateway.demo_setup import ROOT, DemoPorts, PortError, demo_ports, parse_port_base, prepare

PORT_BASE_ENV = "GATEWAY_DEMO_PORT_BASE"
START_DEADLINE_SECONDS = 30.0
PROBES_PER_PORT = 3  # separate connections: a port shared through SO_REUSEPORT shows up
LOCK_FILE = "demo.lock"
PROBE_PATH = "/xdispatch/demo-probe"  # classic: relayed untouched, no license, no event


def run_upstream(app: str, port: int, nonce: str) -> None:
    """A tiny upstream that answers with which endpoint was hit (and what it was told)."""
    from aiohttp import web

    async def hit(request: web.Request) -> web.StreamResponse:
        if request.headers.get("Upgrade", "").lower() == "websocket":
            ws = web.WebSocketResponse()
            await ws.prepare(request)
            async for message in ws:
                await ws.send_str(f"{app} heard: {message.data}")
            return ws
        body = await request.read()
        return web.json_response(
            {
                "upstream": app,
                "endpoint": f"{request.method} {request.raw_path}",
                "body_bytes": len(body),
                "entitlement": {
                    k: v for k, v in request.headers.items() if k.startswith("X-Entitlement-")
                },
                "demo_run": nonce,  # how the demo recognises its own upstream
            }
        )

    web_app = web.Application(client_max_size=1 << 30)
    web_app.router.add_route("*", "/{tail:.*}", hit)
    web.run_app(web_app, host="127.0.0.1", port=port, print=None, access_log=None)


def _port_free(port: int) -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def _get_json(url: str) -> tuple[int, Any]:
    """(status, decoded body) of a GET; (0, reason) when nothing usable answers."""
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            status, raw = response.status, response.read()
    except urllib.error.HTTPError as exc:
        status, raw = exc.code, exc.read()
    except (urllib.error.URLError, OSError) as exc:
        return 0, str(getattr(exc, "reason", exc))
    try:
        return status, json.loads(raw)
    except ValueError:
        return status, None


def _wait_up(process: subprocess.Popen[bytes], url: str) -> bool:
    """Wait until ``url`` answers 200; False when ``process`` exits first or time runs out."""
    end = time.monotonic() + START_DEADLINE_SECONDS
    while time.monotonic() < end and process.poll() is None:
        if _get_json(url)[0] == 200:
            return True
        time.sleep(0.2)
    return False


def ownership_problems(
    ports: DemoPorts, nonce: str, gateway_pid: int, issuer_pid: int
) -> list[str]:
    """One line per port that answers as something other than what this demo started."""
    checks: list[tuple[str, int, str, str, object]] = []
    for app, port in ports.upstreams.items():
        checks.append((f"{app} upstream", port, PROBE_PATH, "demo_run", nonce))
    for app, port in ports.listeners.items():
        checks.append((f"{app} listener", port, PROBE_PATH, "demo_run", nonce))
    checks.append(("admin", ports.admin, "/healthz", "pid", gateway_pid))
    checks.append(("issuer", ports.issuer, "/healthz", "pid", issuer_pid))
    problems = []
    for label, port, path, field, expected in checks:
        for _ in range(PROBES_PER_PORT):
            status, body = _get_json(f"http://127.0.0.1:{port}{path}")
            seen = body.get(field) if isinstance(body, dict) else None
            if seen == expected:
                continue
            if status == 0:
                why = f"does not answer ({body})"
            elif seen is None:
                why = f"answers HTTP {status}, but not as a process of this demo"
            else:
                why = f"answers as another process ({field} {seen}, expected {expected})"
            problems.append(f"port {port} ({label}) {why}")
            break
    return problems


@contextmanager
def _folder_lock(folder: Path) -> Iterator[bool]:
    """Hold ``folder/demo.lock`` while the demo runs: a second demo on the same folder would
    empty the first one's store and rewrite its secrets. False when another holds it."""
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        yield True
    finally:
        os.close(fd)  # releases the lock


def run_demo(folder: Path, ports: DemoPorts) -> int:
    with _folder_lock(folder) as locked:
        if not locked:
            print(
                f"demo: another demo is running from {folder}; stop it, or give this one "
                "its own folder and ports: GATEWAY_DEMO_DIR=/tmp/demo2 "
                f"{PORT_BASE_ENV}=N make demo",
                file=sys.stderr,
            )
            return 1
        return _run_locked(folder, ports)


def _run_locked(folder: Path, ports: DemoPorts) -> int:
    busy = [f"{port} ({label})" for label, port in ports.named() if not _port_free(port)]
    if busy:
        print(
            f"demo: already in use by another process: {', '.join(busy)}. Stop it (another "
            f"demo or gateway?), or choose other ports: {PORT_BASE_ENV}=N make demo, or "
            "python -m gateway.demo --port-base N (uses N..N+7)",
            file=sys.stderr,
        )
        return 1
    setup = prepare(folder, ports)
    nonce = secrets.token_hex(8)
    children: list[subprocess.Popen[bytes]] = []

    def stop(*_: object) -> None:
        for child in children:
            if child.poll() is None:
                child.terminate()
        for child in children:
            try:
                child.wait(timeout=10)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()

    def on_sigterm(*_: object) -> None:
        stop()
        sys.exit(0)

    signal.signal(signal.SIGTERM, on_sigterm)
    python = sys.executable
    env = {
        **os.environ,
        "PYTHONUNBUFFERED": "1",
        "GATEWAY_PROVISION_SECRET": setup.provision_secret,
        "ISSUER_BILLING_SECRET": setup.billing_secret,
    }
    try:
        for app, port in ports.upstreams.items():
            children.append(
                subprocess.Popen(
                    [
                        python,
                        "-m",
                        "gateway.demo",
                        "upstream",
                        "--app",
                        app,
                        "--port",
                        str(port),
                        "--nonce",
                        nonce,
                    ],
                )  # fmt: skip
            )
        gateway = subprocess.Popen(
            [python, "-m", "gateway.cli", "serve", "--config", str(setup.path("gateway.toml")),
             "--log-level", "WARNING"],
            env=env,
        )  # fmt: skip
        children.append(gateway)
        issuer = subprocess.Popen(
            [python, "-m", "gateway.cli", "issuer", "serve", "--config",
             str(setup.path("issuer.toml")), "--log-level", "WARNING"],
            env=env,
        )  # fmt: skip
        children.append(issuer)
        if not _wait_up(gateway, f"http://127.0.0.1:{ports.admin}/readyz"):
            print("demo: the gateway did not become ready; see the messages above", file=sys.stderr)
            return 1
        if not _wait_up(issuer, f"http://127.0.0.1:{ports.issuer}/healthz"):
            print("demo: the issuer did not come up; see the messages above", file=sys.stderr)
            return 1
        problems = ownership_problems(ports, nonce, gateway.pid, issuer.pid)
        if problems:
            print(
                "demo: these ports are not (only) this demo's, stopping:\n  "
                + "\n  ".join(problems),
                file=sys.stderr,
            )
            return 1
        print(guide(setup, gateway_bin()), flush=True)
        while all(child.poll() is None for child in children):
            time.sleep(0.5)
        print("demo: a child process exited; stopping the rest", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ndemo: stopping", file=sys.stderr)
        return 0
    finally:
        stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gateway.demo")
    parser.add_argument(
        "--port-base",
        help=f"use ports N..N+7 (default: ${PORT_BASE_ENV}, else 8081-8083, 9001-9003, "
        "9900 and 9800)",
    )
    sub = parser.add_subparsers(dest="command")
    upstream = sub.add_parser("upstream", help="run one demo upstream")
    upstream.add_argument("--app", required=True)
    upstream.add_argument("--port", type=int, required=True)
    upstream.add_argument("--nonce", default="")
    args = parser.parse_args(argv)
    if args.command == "upstream":
        run_upstream(args.app, args.port, args.nonce)
        return 0
    try:
        if args.port_base is not None:
            base: int | None = parse_port_base(args.port_base, "--port-base")
        elif os.environ.get(PORT_BASE_ENV):
            base = parse_port_base(os.environ[PORT_BASE_ENV], PORT_BASE_ENV)
        else:
            base = None
        ports = demo_ports(base)
    except PortError as exc:
        print(f"demo: {exc}", file=sys.stderr)
        return 2
    folder = Path(os.environ.get("GATEWAY_DEMO_DIR", ROOT / "demo")).resolve()
    return run_demo(folder, ports)


if __name__ == "__main__":
    sys.exit(main())
