"""Soak: mixed traffic through a ``gateway serve`` process for a long time, with reloads and
one store (or upstream) restart, watching memory and every answer.

Traffic (16 concurrent clients by default, aiohttp): allowed and blocked requests on all
three apps, classic keys and classic paths, public routes, invalid keys (malformed, bad
signature, unknown key id, a trickle of random junk), tenant-header lookups from the store,
and a rejected ambiguous path. Every request carries a spoofed ``X-Entitlement-Tier`` the
upstream must never see. Every answer is checked against the status its kind must get.

During the run: a config reload every ``--reload-every`` seconds (default 30, at most a
sixth of the run), alternately an edit of ``routes.toml`` (the file watcher) and SIGHUP;
once, half-way, a restart: of ``redis-server`` with ``--redis`` (the soak starts its own,
with an append-only file so the data survives), else of the upstream, since a ``memory://``
store has nothing to restart. RSS of the gateway process is sampled every 10 s (at most a
sixth of the run).

It prints a Markdown report and exits 1 when RSS grew more than ``--max-growth`` % (10)
between the end of the warm-up and the end, or when anything unexpected happened: a status
other than the expected one (a 5xx or client error is expected only inside the restart
window), a spoofed header reaching the upstream, a failed reload, or the gateway dying.

    python loadtests/soak.py --duration 600            # the full run (loadtests/RESULTS.md)
    python loadtests/soak.py --duration 30             # the short one in `make test`
    python loadtests/soak.py --duration 600 --redis    # the Redis store, restarted once
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from yarl import URL

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from gateway.license import (  # noqa: E402
    LicenseClaims,
    generate_keypair,
    load_signing_key,
    sign_license,
)

CLASSIC_KEY = "ABCDE-12345-FGHIJ-67890-KLMNO"
SPOOF = "enterprise"
RESTART_GRACE = 3.0  # seconds after a restart during which failures still count as expected


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def wait_for_port(port: int, deadline: float = 15.0) -> None:
    end = time.monotonic() + deadline
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            if time.monotonic() > end:
                raise
            time.sleep(0.05)


# ------------------------------------------------------------------ the upstream process


def stop_process(process: subprocess.Popen[bytes], grace: float = 10.0) -> None:
    """SIGTERM, then SIGKILL when it has not exited within ``grace`` seconds; returns once
    the process is gone."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(grace)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def run_upstream(port: int) -> None:
    """An aiohttp echo app: 200 with the path and the entitlement tier it received."""
    from aiohttp import web

    async def echo(request: web.Request) -> web.Response:
        await request.read()
        return web.json_response(
            {
                "path": request.raw_path,
                "tiers": request.headers.getall("X-Entitlement-Tier", []),
            }
        )

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", echo)
    web.run_app(app, host="127.0.0.1", port=port, access_log=None, print=None)


class Upstream:
    def __init__(self, folder: Path) -> None:
        self.port = free_port()
        self.folder = folder
        self.process: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def start(self) -> None:
        self.starts += 1
        log = open(self.folder / f"upstream-{self.starts}.log", "wb")  # noqa: SIM115
        self.process = subprocess.Popen(
            [sys.executable, __file__, "_upstream", "--port", str(self.port)],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        wait_for_port(self.port)

    def stop(self) -> None:
        if self.process is not None:
            stop_process(self.process)


class Redis:
    """A redis-server the soak owns, persisting to an append-only file across restarts."""

    def __init__(self, folder: Path) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise SystemExit("--redis needs redis-server on PATH (Debian package redis-server)")
        self.binary = binary
        self.folder = folder
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        command = [
            self.binary, "--port", str(self.port), "--bind", "127.0.0.1",
            "--dir", str(self.folder), "--save", "", "--appendonly", "yes",
            "--appendfsync", "everysec", "--daemonize", "no",
        ]  # fmt: skip
        self.process = subprocess.Popen(
            command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        wait_for_port(self.port)

    def stop(self) -> None:
        if self.process is not None:
            stop_process(self.process)  # SIGTERM: redis flushes the AOF and exits


# ------------------------------------------------------------------ traffic


@dataclass(frozen=True)
class Kind:
    name: str
    app: str
    method: str
    path: str
    headers: dict[str, str]
    expected: int
    tier: str | None = None  # allowed requests: the tier the upstream must see
    forwarded: bool = False  # reaches the upstream (so it may fail during a restart)
    weight: int = 1


@dataclass
class Tally:
    statuses: collections.Counter[tuple[str, int]] = field(default_factory=collections.Counter)
    unexpected: collections.Counter[str] = field(default_factory=collections.Counter)
    in_window: collections.Counter[str] = field(default_factory=collections.Counter)
    client_errors: collections.Counter[str] = field(default_factory=collections.Counter)
    spoofed_seen: int = 0
    requests: int = 0
    examples: list[str] = field(default_factory=list)

    def note_unexpected(self, what: str, detail: str) -> None:
        self.unexpected[what] += 1
        if len(self.examples) < 10:
            self.examples.append(detail)


@dataclass
class Window:
    """When failures of forwarded requests are expected: from the stop of the restarted
    process until a little after it is back."""

    start: float = float("inf")
    end: float = float("inf")

    def covers(self, started: float, finished: float) -> bool:
        return finished >= self.start and started <= self.end


def make_keys(folder: Path) -> dict[str, str]:
    keys = folder / "keys"
    generate_keypair(keys, "soak")
    signer, _ = load_signing_key(keys / "soak.key")
    (keys / "soak.key").unlink()  # the gateway holds public keys only
    stranger_dir = folder / "stranger"
    generate_keypair(stranger_dir, "stranger")
    stranger, _ = load_signing_key(stranger_dir / "stranger.key")
    now = int(time.time())

    def issue(tier: str, sub: str, signing: Any = signer, kid: str = "soak") -> str:
        claims = LicenseClaims(
            iss="soak", sub=sub, jti=str(uuid.uuid4()), iat=now - 60, nbf=now - 60,
            exp=now + 30 * 86400, tier=tier, serial=1,
        )  # fmt: skip
        return sign_license(signing, kid, claims)

    core = issue("core", "soak-core")
    return {
        "core": core,
        "fleet": issue("fleet", "soak-fleet"),
        "enterprise": issue("enterprise", "soak-enterprise"),
        "acme": issue("fleet", "acme"),
        "globex": issue("core", "globex"),
        "bad_signature": core[:-4] + ("AAAA" if not core.endswith("AAAA") else "BBBB"),
        "unknown_kid": issue("enterprise", "soak-stranger", stranger, "stranger"),
        "malformed": "not-a-license-key",
    }


def traffic(keys: dict[str, str]) -> list[Kind]:
    def key(name: str) -> dict[str, str]:
        return {"X-License-Key": keys[name]}

    ops, portal, driver = "operations", "client_portal", "driver_app"
    optimize = "/api/v1/shipments/1/optimize"
    return [
        Kind("allowed", ops, "GET", "/api/v1/shipments", key("core"), 200, "core", True, 4),
        Kind("allowed", ops, "POST", optimize, key("fleet"), 200, "fleet", True, 2),
        Kind("allowed", portal, "GET", "/api/v1/orders/7", key("core"), 200, "core", True, 2),
        Kind("allowed", driver, "GET", "/api/v1/jobs", key("enterprise"), 200, "enterprise", True),
        Kind("blocked", ops, "POST", optimize, key("core"), 403, weight=3),
        Kind("blocked", portal, "GET", "/api/v1/branding/logo", key("core"), 403),
        Kind("blocked", driver, "POST", "/api/v1/scans/depot", key("core"), 403),
        Kind("classic", ops, "POST", optimize, {"X-License-Key": CLASSIC_KEY}, 200, None, True, 2),
        Kind("classic", portal, "GET", "/xdispatch/orders", {}, 200, None, True),
        Kind("public", driver, "GET", "/api/v1/health", {}, 200, None, True),
        Kind("invalid", ops, "GET", "/api/v1/shipments", key("malformed"), 401),
        Kind("invalid", ops, "GET", "/api/v1/shipments", key("bad_signature"), 401),
        Kind("invalid", portal, "GET", "/api/v1/orders", key("unknown_kid"), 401),
        Kind("invalid", driver, "GET", "/api/v1/jobs", {}, 401),
        Kind("junk-key", ops, "GET", "/api/v1/shipments", {"X-License-Key": "random"}, 401),
        Kind("tenant", ops, "POST", optimize, {"X-Tenant-Id": "acme"}, 200, "fleet", True, 2),
        Kind("tenant", ops, "POST", optimize, {"X-Tenant-Id": "globex"}, 403),
        Kind("tenant", ops, "GET", "/api/v1/shipments", {"X-Tenant-Id": "nobody"}, 401),
        Kind("rejected", ops, "GET", "/api/v1/public/..%2Fshipments/1/optimize", key("core"), 400),
    ]


class Soak:
    def __init__(self, args: argparse.Namespace, folder: Path) -> None:
        self.args = args
        self.folder = folder
        self.duration: float = args.duration
        self.reload_every: float = min(args.reload_every, max(self.duration / 6, 1.0))
        self.sample_every: float = min(10.0, max(self.duration / 6, 1.0))
        self.warmup: float = min(60.0, max(5.0, self.duration / 10))
        self.tally = Tally()
        self.window = Window()
        self.rss: list[tuple[float, int]] = []
        self.reloads: collections.Counter[str] = collections.Counter()
        self.restart_note = ""
        self.started = 0.0
        self.redis: Redis | None = None

    # -------------------------------------------------------------- setup
    def configure(self) -> None:
        folder = self.folder
        self.keys = make_keys(folder)
        for name in ("routes.toml", "tier_matrix.toml"):
            shutil.copy(REPO / name, folder / name)
        (folder / "tenants.toml").write_text(
            f'[[tenants]]\nid = "acme"\nkeys = ["{self.keys["acme"]}"]\n\n'
            f'[[tenants]]\nid = "globex"\nkeys = ["{self.keys["globex"]}"]\n'
        )
        self.upstream = Upstream(folder)
        store = "memory://"
        if self.args.redis:
            self.redis = Redis(folder)
            self.redis.start()
            store = self.redis.url
        self.listen = {app: free_port() for app in ("operations", "client_portal", "driver_app")}
        self.admin = free_port()
        apps = "".join(
            f'[apps.{app}]\nlisten = "127.0.0.1:{port}"\n'
            f'upstream = "http://127.0.0.1:{self.upstream.port}"\n'
            f'classic_path_prefixes = ["/xdispatch/"]\n\n'
            for app, port in self.listen.items()
        )
        (folder / "gateway.toml").write_text(
            apps
            + f'[admin]\nlisten = "127.0.0.1:{self.admin}"\n\n'
            + f'[store]\nurl = "{store}"\nseed = "tenants.toml"\n\n'
            + '[events]\nsink = "file://events.jsonl"\n'
        )

    def start_gateway(self) -> None:
        self.gateway_log = self.folder / "gateway.log"
        with open(self.gateway_log, "wb") as log:
            self.gateway = subprocess.Popen(
                [sys.executable, "-m", "gateway.cli", "serve", "--config",
                 str(self.folder / "gateway.toml"), "--log-level", "WARNING"],
                stdout=log, stderr=subprocess.STDOUT, cwd=REPO,
            )  # fmt: skip
        for port in (*self.listen.values(), self.admin):
            wait_for_port(port)

    def stop_all(self) -> None:
        gateway = getattr(self, "gateway", None)
        if gateway is not None:
            stop_process(gateway, grace=15)
        if hasattr(self, "upstream"):
            self.upstream.stop()
        if self.redis is not None:
            self.redis.stop()

    # -------------------------------------------------------------- running
    def now(self) -> float:
        return time.monotonic() - self.started

    async def run(self) -> None:
        kinds = traffic(self.keys)
        schedule = [kind for kind in kinds for _ in range(kind.weight)]
        connector = aiohttp.TCPConnector(limit=self.args.concurrency * 2)
        timeout = aiohttp.ClientTimeout(total=10)
        self.started = time.monotonic()
        self.rss.append((0.0, rss_bytes(self.gateway.pid)))
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
            deadline = self.started + self.duration
            workers = [
                self.worker(session, schedule, random.Random(index), deadline)
                for index in range(self.args.concurrency)
            ]
            await asyncio.gather(
                *workers, self.sampler(deadline), self.reloader(deadline), self.restarter()
            )
            self.metrics = await self.scrape(session)
        self.rss.append((self.now(), rss_bytes(self.gateway.pid)))

    async def worker(
        self,
        session: aiohttp.ClientSession,
        schedule: list[Kind],
        rng: random.Random,
        deadline: float,
    ) -> None:
        tally = self.tally
        while time.monotonic() < deadline:
            kind = rng.choice(schedule)
            headers = {**kind.headers, "X-Entitlement-Tier": SPOOF}
            if kind.name == "junk-key":
                headers["X-License-Key"] = f"junk-{rng.getrandbits(64):x}"
            url = URL(f"http://127.0.0.1:{self.listen[kind.app]}{kind.path}", encoded=True)
            began = self.now()
            try:
                async with session.request(kind.method, url, headers=headers) as response:
                    status = response.status
                    body: Any = None
                    if status == 200 and kind.tier is not None:
                        body = await response.json()
                    else:
                        await response.read()
            except (aiohttp.ClientError, TimeoutError) as exc:
                tally.requests += 1
                what = f"{type(exc).__name__} ({kind.name})"
                if kind.forwarded and self.window.covers(began, self.now()):
                    tally.in_window[what] += 1
                else:
                    tally.client_errors[what] += 1
                    tally.note_unexpected(what, f"t={began:.1f}s {kind.method} {kind.path}: {exc}")
                continue
            tally.requests += 1
            tally.statuses[(kind.name, status)] += 1
            if status != kind.expected:
                if kind.forwarded and status in (502, 503, 504):
                    if self.window.covers(began, self.now()):
                        tally.in_window[f"{status} ({kind.name})"] += 1
                        continue
                tally.note_unexpected(
                    f"{kind.name}: {status} instead of {kind.expected}",
                    f"t={began:.1f}s {kind.app} {kind.method} {kind.path} -> {status}",
                )
                continue
            if body is not None and body.get("tiers") != [kind.tier]:
                tally.spoofed_seen += 1
                tally.note_unexpected(
                    "upstream saw a wrong X-Entitlement-Tier",
                    f"{kind.method} {kind.path}: upstream saw {body.get('tiers')}",
                )

    async def sampler(self, deadline: float) -> None:
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return
            await asyncio.sleep(min(self.sample_every, left))
            if self.gateway.poll() is not None:
                self.tally.note_unexpected("the gateway exited", f"code {self.gateway.returncode}")
                return
            self.rss.append((self.now(), rss_bytes(self.gateway.pid)))

    async def reloader(self, deadline: float) -> None:
        routes = self.folder / "routes.toml"
        original = routes.read_text()
        count = 0
        while time.monotonic() + self.reload_every < deadline:
            await asyncio.sleep(self.reload_every)
            count += 1
            if count % 2:
                # A content change (the watcher compares mtime, size and inode).
                marker = f"\n# soak reload {count}\n" if count % 4 == 1 else ""
                staged = routes.with_suffix(".staged")
                staged.write_text(original + marker)
                os.replace(staged, routes)  # atomic: the watcher never sees half a file
                self.reloads["file edit"] += 1
            else:
                self.gateway.send_signal(signal.SIGHUP)
                self.reloads["SIGHUP"] += 1
        await asyncio.sleep(min(2.0, max(0.0, deadline - time.monotonic())))

    async def restarter(self) -> None:
        await asyncio.sleep(self.duration / 2)
        loop = asyncio.get_running_loop()
        self.window.start = self.now()
        began = time.monotonic()
        if self.redis is not None:
            await loop.run_in_executor(None, self.redis.stop)
            await asyncio.sleep(1.0)
            await loop.run_in_executor(None, self.redis.start)
            what = "redis-server (the store)"
        else:
            await loop.run_in_executor(None, self.upstream.stop)
            await asyncio.sleep(1.0)
            await loop.run_in_executor(None, self.upstream.start)
            what = "the upstream (memory:// store: nothing to restart)"
        outage = time.monotonic() - began
        self.window.end = self.now() + RESTART_GRACE
        self.restart_note = f"{what} at t={self.window.start:.1f} s, down {outage:.1f} s"

    async def scrape(self, session: aiohttp.ClientSession) -> dict[str, float]:
        from prometheus_client.parser import text_string_to_metric_families

        async with session.get(f"http://127.0.0.1:{self.admin}/metrics") as response:
            text = await response.text()
        found: dict[str, float] = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if not sample.value or sample.name.endswith(("_bucket", "_created")):
                    continue
                labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
                found[f"{sample.name}{{{labels}}}"] = sample.value
        return found

    # -------------------------------------------------------------- report
    def report(self) -> int:
        tally = self.tally
        elapsed = self.duration
        start_rss = self.rss[0][1]
        after_warmup = next((rss for t, rss in self.rss if t >= self.warmup), self.rss[-1][1])
        end_rss = self.rss[-1][1]
        growth = (end_rss - after_warmup) / after_warmup * 100
        metrics = getattr(self, "metrics", {})
        reload_ok = sum(v for k, v in metrics.items() if "config_reloads" in k and "=success" in k)
        reload_failed = sum(
            v for k, v in metrics.items() if "config_reloads" in k and "=failure" in k
        )
        issued = sum(self.reloads.values())
        problems: list[str] = []
        if growth > self.args.max_growth:
            problems.append(
                f"RSS grew {growth:.1f} % after warm-up (limit {self.args.max_growth} %)"
            )
        if tally.unexpected:
            problems.append(f"{sum(tally.unexpected.values())} unexpected answers or errors")
        if reload_failed or reload_ok < issued:
            problems.append(
                f"reloads: {issued} issued, {reload_ok:.0f} ok, {reload_failed:.0f} failed"
            )
        if self.gateway.poll() is not None:
            problems.append("the gateway process is gone")

        mib = 1024 * 1024
        out = [
            f"# Soak: {elapsed:.0f} s of mixed traffic, {self.args.concurrency} clients",
            "",
            "| | |",
            "|---|---|",
            f"| requests | {tally.requests:,} ({tally.requests / elapsed:,.0f}/s) |",
            f"| reloads | {issued} issued ({dict(self.reloads)}), gateway counted "
            f"ok={reload_ok:.0f} failed={reload_failed:.0f} |",
            f"| restart | {self.restart_note or 'none'} |",
            f"| RSS | start {start_rss / mib:.1f} MiB, after warm-up ({self.warmup:.0f} s) "
            f"{after_warmup / mib:.1f} MiB, end {end_rss / mib:.1f} MiB: "
            f"**{growth:+.1f} %** (limit {self.args.max_growth} %) |",
            "",
            "## RSS samples",
            "",
            "| t (s) | RSS (MiB) |",
            "|---:|---:|",
            *(f"| {t:.0f} | {rss / mib:.1f} |" for t, rss in self.rss),
            "",
            "## Answers by traffic kind",
            "",
            "| kind | status | count |",
            "|---|---:|---:|",
            *(
                f"| {name} | {status} | {count:,} |"
                for (name, status), count in sorted(tally.statuses.items())
            ),
            "",
            "## Errors by kind",
            "",
            "| where | kind | count |",
            "|---|---|---:|",
            *(f"| restart window (expected) | {k} | {v:,} |" for k, v in tally.in_window.items()),
            *(
                f"| client, outside the window | {k} | {v:,} |"
                for k, v in tally.client_errors.items()
            ),
            *(
                f"| gateway metric | {k} | {v:,.0f} |"
                for k, v in sorted(metrics.items())
                if k.startswith(
                    ("gateway_upstream_errors", "gateway_store_errors", "gateway_events_dropped")
                )
            ),  # fmt: skip
            "",
            "## Gateway outcomes",
            "",
            "| metric | count |",
            "|---|---:|",
            *(
                f"| {k} | {v:,.0f} |"
                for k, v in sorted(metrics.items())
                if k.startswith("gateway_requests_total")
            ),
            "",
        ]
        if tally.unexpected:
            out += ["## Unexpected", ""]
            out += [f"- {k}: {v}" for k, v in tally.unexpected.items()]
            out += [f"  - e.g. {example}" for example in tally.examples]
            out.append("")
        out.append(f"**Result: {'FAIL — ' + '; '.join(problems) if problems else 'PASS'}**")
        print("\n".join(out), flush=True)
        if problems:
            log_tail = self.gateway_log.read_text(errors="replace")[-4000:]
            print(f"\n<details><summary>gateway log (tail)</summary>\n\n```\n{log_tail}\n```\n"
                  "</details>", flush=True)  # fmt: skip
        return 1 if problems else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command")
    upstream = sub.add_parser("_upstream", help=argparse.SUPPRESS)
    upstream.add_argument("--port", type=int, required=True)
    parser.add_argument("--duration", type=float, default=600.0, help="seconds (default 600)")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--reload-every", type=float, default=30.0)
    parser.add_argument("--max-growth", type=float, default=10.0, help="RSS growth limit, %%")
    parser.add_argument(
        "--redis", action="store_true", help="use (and restart) a redis-server store"
    )
    args = parser.parse_args()
    if args.command == "_upstream":
        run_upstream(args.port)
        return 0
    with tempfile.TemporaryDirectory(prefix="gateway-soak-") as tmp:
        soak = Soak(args, Path(tmp))
        try:
            soak.configure()
            soak.upstream.start()
            soak.start_gateway()
            asyncio.run(soak.run())
            return soak.report()
        finally:
            soak.stop_all()


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
