"""``make bench``: the gateway against real peers, on loopback, pinned, interleaved.

One command: installs ``wrk`` and ``nginx`` (Debian packages) when missing, writes every
config into a temporary folder, starts everything on free loopback ports, runs the matrix
(each target at each connection count, A B C … A B C …, ``--reps`` times), stops
everything it started (by PID, also on Ctrl-C or an error), runs ``micro.py`` and writes
``loadtests/RESULTS.md``.

Pinning: the process under test (the gateway, each proxy, the auth_request peer with its
decision service) runs on CPU 0; ``wrk`` and the upstream nginx run on CPU 1.

    python loadtests/bench.py                   # the full run (what `make bench` does)
    python loadtests/bench.py --quick           # smoke test: 1 repetition of 2 s
    python loadtests/bench.py --only gw-allowed,aiohttp-proxy --duration 10
    python loadtests/bench.py --baseline e9b96f6  # also the gateway of that commit ("before"),
                                                 # interleaved with this tree's ("after")
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import dataclasses
import importlib.metadata
import json
import os
import platform
import resource
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

import micro  # noqa: E402 - a sibling script, not a package

UNDER_TEST_CPU = "0"
LOAD_CPU = "1"
CLASSIC_KEY = "XD7Q2-4KLMN-8PRST-2VWXY-3ABCD"
ROUTE = "/api/v1/shipments/1/optimize"  # POST; ops.basic_shipment_optimization (Fleet+)
DAY = 86400
NOISY = 0.25  # other processes using more than this share of a core: repeat the run
RETRIES_PER_RUN = 2  # repeats of one run at most; a quarter of the runs in total at most,
# and only while the time budget allows
TIME_BUDGET = 9 * 60  # seconds `make bench` may take, repeats included
RESERVED = 60  # seconds kept for micro.py and the report
TENANTS = 1_000  # distinct tenants the tenant-id scenarios cycle over
CLK_TCK = os.sysconf("SC_CLK_TCK")
BODY = (
    '{"id":"shp_000001","status":"optimized","route":{"stops":3,"distance_km":12.4,'
    '"eta_minutes":38},"driver":{"id":"drv_0017","name":"Sam Carter"},'
    '"upstream":"bench-nginx","note":"synthetic JSON body for the load test"}'
)
METRICS_SHOWN = (
    "gateway_requests_total",
    "gateway_upstream_errors_total",
    "gateway_events_dropped_total",
    "gateway_license_cache_total",
    "gateway_license_checks_total",
    "gateway_store_errors_total",
    "gateway_feature_block_total",
)


# ----------------------------------------------------------------------------- targets
@dataclass
class Target:
    name: str
    label: str
    server: str  # which started server answers (its port)
    under_test: tuple[str, ...]  # started processes whose CPU and RSS are reported
    headers: dict[str, str]
    expect: int  # the status every response must have
    seen_tier: str | None  # X-Entitlement-Tier the upstream must have seen ("" = none)
    meaning: str
    tenants: int = 0  # > 0: X-Tenant-Id cycles over bench-tenant-1 … bench-tenant-N


BEFORE_AFTER = ("gw-allowed", "gw-blocked", "gw-classic")


def baseline_targets(targets: list[Target]) -> list[Target]:
    """``--baseline``: the gateway rows again, answered by the baseline tree's gateway."""
    return [
        dataclasses.replace(
            t,
            name=f"{t.name}-base",
            label=f"{t.label} (baseline)",
            server="gateway-base",
            under_test=("gateway-base",),
            meaning=f"{t.meaning} The `--baseline` commit's gateway, interleaved with this one.",
        )
        for t in targets
        if t.name in BEFORE_AFTER
    ]


def make_targets(keys: dict[str, str]) -> list[Target]:
    fleet = {"X-License-Key": keys["fleet"]}
    core = {"X-License-Key": keys["core"]}
    return [
        Target(
            "direct",
            "nginx direct (the upstream itself)",
            "upstream",
            ("upstream",),
            fleet,
            200,
            "",
            "wrk straight to the upstream nginx (1 worker, CPU 1, like wrk): the ceiling "
            "of the setup; its answer is a fixed ~200-byte JSON body for any path.",
        ),
        Target(
            "nginx-proxy",
            "nginx reverse proxy (1 worker)",
            "nginx-proxy",
            ("nginx-proxy",),
            fleet,
            200,
            "",
            "nginx `proxy_pass` with an upstream keep-alive pool, no checks: the native "
            "ceiling for a proxy on one core.",
        ),
        Target(
            "aiohttp-proxy",
            "aiohttp pass-through proxy",
            "aiohttp-proxy",
            ("aiohttp-proxy",),
            fleet,
            200,
            "",
            "`loadtests/aiohttp_proxy.py`: aiohttp server + shared `ClientSession`, streaming, "
            "uvloop, no entitlement logic: the Python baseline.",
        ),
        Target(
            "peer-allowed",
            "peer: nginx auth_request + aiohttp decider, allowed",
            "peer-nginx",
            ("peer-nginx", "auth-service"),
            fleet,
            200,
            "fleet",
            "The architecture users would otherwise pick: nginx (1 worker) with `auth_request` "
            "to `loadtests/auth_service.py` (aiohttp, the project's KeyRing + routes + decide, "
            "verified-key cache), which returns the X-Entitlement-* headers nginx forwards. "
            "Fleet key on the gated route. CPU and RSS are nginx + the decision service.",
        ),
        Target(
            "peer-blocked",
            "peer: nginx auth_request + aiohttp decider, blocked",
            "peer-nginx",
            ("peer-nginx", "auth-service"),
            core,
            403,
            None,
            "The same peer with a Core key: the decision service says 403, nginx answers.",
        ),
        Target(
            "gw-allowed",
            "gateway: allowed gated route",
            "gateway",
            ("gateway",),
            fleet,
            200,
            "fleet",
            f"`gateway serve`: POST {ROUTE} with a Fleet key (`ops.basic_shipment_optimization`"
            "): verified-key cache, decision, X-Entitlement-* headers added, relayed upstream.",
        ),
        Target(
            "gw-allowed-logged",
            "gateway: allowed, with the access log",
            "gateway-logged",
            ("gateway-logged",),
            fleet,
            200,
            "fleet",
            "gw-allowed with `[access_log]` on (every forwarded request one JSON line, to a "
            "file): the access log's cost. Every other gateway row runs with it off, like "
            "nginx's `access_log off`.",
        ),
        Target(
            "gw-blocked",
            "gateway: blocked at the edge",
            "gateway",
            ("gateway",),
            core,
            403,
            None,
            "The same request with a Core key: 403 problem+json from the gateway itself, "
            "counted in `gateway_feature_block_total`, a `feature_block` event written.",
        ),
        Target(
            "gw-classic",
            "gateway: classic pass-through",
            "gateway",
            ("gateway",),
            {"X-License-Key": CLASSIC_KEY},
            200,
            "",
            "The same request with the classic key XD7Q2-4KLMN-8PRST-2VWXY-3ABCD: forwarded "
            "untouched, ungated.",
        ),
        *(
            Target(
                name,
                f"gateway: tenant id via the {engine} store",
                server,
                (server,),
                {"X-Tenant-Id": "bench-tenant-1"},
                200,
                "fleet",
                f"No key, only `X-Tenant-Id`, cycling over {TENANTS:,} tenants seeded into the "
                f'{url} store (`[store] seed = "tenants.toml"`): each tenant\'s Fleet license '
                "comes from the store through the gateway's tenant cache (so a few % of requests "
                "go to the store, as each tenant's cache entry expires)."
                + (" A separate gateway process; redis-server runs on CPU 1." if redis else ""),
                tenants=TENANTS,
            )
            for name, engine, server, url, redis in (
                ("gw-tenant", "in-memory", "gateway", "`memory://`", False),
                ("gw-tenant-sqlite", "SQLite", "gateway-sqlite", "`sqlite:///…`", False),
                ("gw-tenant-redis", "Redis", "gateway-redis", "`redis://…`", True),
            )
        ),
    ]


# ----------------------------------------------------------------------------- processes
def _die_with_parent() -> None:
    """In the child: get SIGTERM if bench.py dies without cleaning up (PR_SET_PDEATHSIG)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)


def _stat_fields(pid: int) -> list[str] | None:
    try:
        data = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return data[data.rindex(")") + 2 :].split()  # field n of proc(5) is [n - 3]


def descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            fields = _stat_fields(int(entry))
            if fields is not None:
                children.setdefault(int(fields[1]), []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def cpu_seconds(pids: list[int]) -> float:
    """utime + stime of ``pids`` and all their descendants."""
    ticks = 0
    for pid in pids:
        for each in (pid, *descendants(pid)):
            fields = _stat_fields(each)
            if fields is not None:
                ticks += int(fields[11]) + int(fields[12])
    return ticks / CLK_TCK


def cpu_times(cpu: str, interrupts: bool = True) -> tuple[int, int]:
    """(busy, total) jiffies of one CPU ("" = all), from /proc/stat; steal counts as busy.
    Without ``interrupts``, irq and softirq time (mostly the loopback traffic of the bench
    itself, which the kernel does not charge to any process) is left out of busy."""
    for line in Path("/proc/stat").read_text().splitlines():
        if line.startswith(f"cpu{cpu} "):
            user, nice, system, idle, iowait, irq, softirq, steal = map(int, line.split()[1:9])
            busy = user + nice + system + steal + (irq + softirq if interrupts else 0)
            return busy, busy + idle + iowait + (0 if interrupts else irq + softirq)
    return 0, 1


def children_cpu() -> float:
    """CPU-seconds of this process's reaped children (each finished wrk)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def rss_mib(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        for each in (pid, *descendants(pid)):
            with contextlib.suppress(OSError):
                for line in Path(f"/proc/{each}/status").read_text().splitlines():
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
    return total / 1024


class Processes:
    """Everything bench.py starts, stopped by PID (children too) in reverse order."""

    def __init__(self, logs: Path) -> None:
        self.logs = logs
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def start(
        self,
        name: str,
        argv: list[str],
        cpu: str,
        env: dict[str, str] | None = None,
        cwd: Path | None = None,
    ) -> subprocess.Popen[bytes]:
        log = open(self.logs / f"{name}.log", "wb")  # noqa: SIM115 - closed with the child
        proc = subprocess.Popen(
            ["taskset", "-c", cpu, *argv],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # Ctrl-C reaches bench.py only; it stops the children
            preexec_fn=_die_with_parent,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
            cwd=cwd,
        )
        log.close()
        self.procs[name] = proc
        return proc

    def log_tail(self, name: str, lines: int = 15) -> str:
        path = self.logs / f"{name}.log"
        if not path.exists():
            return ""
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])

    def stop_all(self) -> None:
        for name in reversed(list(self.procs)):
            self._stop(self.procs.pop(name))

    @staticmethod
    def _stop(proc: subprocess.Popen[bytes]) -> None:
        kids = descendants(proc.pid)
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for kid in kids:  # e.g. an nginx worker whose master was killed
            with contextlib.suppress(ProcessLookupError):
                os.kill(kid, signal.SIGKILL)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def request(
    port: int, headers: dict[str, str], timeout: float = 5.0
) -> tuple[int, dict[str, str], bytes]:
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}{ROUTE}", data=b"", headers=headers, method="POST"
    )
    try:
        with urllib.request.urlopen(req, timeout=timeout) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


def redis_argv(tmp: Path, port: int) -> list[str]:
    binary = shutil.which("redis-server") or "redis-server"
    argv = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", ""]
    return argv + ["--appendonly", "no", "--dir", str(tmp), "--daemonize", "no"]


def wait_tcp(proc: subprocess.Popen[bytes], port: int, name: str, deadline: float = 20) -> None:
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"{name} exited with {proc.returncode} while starting")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
            return
        time.sleep(0.1)
    raise RuntimeError(f"{name} did not listen on port {port} within {deadline:.0f} s")


def wait_ready(proc: subprocess.Popen[bytes], port: int, name: str, deadline: float = 30) -> None:
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"{name} exited with {proc.returncode} while starting")
        try:
            request(port, {}, timeout=2)
            return
        except (OSError, urllib.error.URLError):
            time.sleep(0.1)
    raise RuntimeError(f"{name} did not answer on port {port} within {deadline:.0f} s")


# ----------------------------------------------------------------------------- tools
def nginx_binary() -> str | None:
    found = shutil.which("nginx")
    if found is None and os.access("/usr/sbin/nginx", os.X_OK):
        found = "/usr/sbin/nginx"
    return found


def ensure_tools(redis: bool) -> None:
    """apt-get install wrk / nginx (/ redis-server) when missing (Debian packages)."""
    need = []
    if redis and shutil.which("redis-server") is None:
        need.append("redis-server")
    if shutil.which("wrk") is None:
        need.append("wrk")
    if nginx_binary() is None:
        need.append("nginx")
    if shutil.which("taskset") is None:
        need.append("util-linux")
    if not need:
        return
    print(f"bench: installing {' '.join(need)} (apt-get)", file=sys.stderr)
    sudo = [] if os.geteuid() == 0 else ["sudo"]
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run([*sudo, "apt-get", "update", "-qq"], check=True, env=env)
    subprocess.run(
        [*sudo, "apt-get", "install", "-y", "-qq", "--no-install-recommends", *need],
        check=True,
        env=env,
    )
    for service in {"nginx", "redis-server"} & set(need):
        # Debian starts the packaged service; the bench runs its own instances
        for stop in (["systemctl", "stop", service], ["service", service, "stop"]):
            if subprocess.run([*sudo, *stop], capture_output=True, check=False).returncode == 0:
                break


# ----------------------------------------------------------------------------- configs
def nginx_conf(tmp: Path, name: str, http: str) -> Path:
    user = ""
    if os.geteuid() == 0:  # a root master needs an explicit worker user
        import grp

        group = "nogroup"
        try:
            grp.getgrnam(group)
        except KeyError:
            group = "nobody"
        user = f"user nobody {group};"
    temp = tmp / "nginx-temp" / name
    temp.mkdir(parents=True, exist_ok=True)
    text = f"""
{user}
worker_processes 1;
daemon off;
master_process on;
pid {tmp}/{name}.pid;
error_log {tmp}/logs/{name}.error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    server_tokens off;
    keepalive_timeout 75s;
    keepalive_requests 1000000;
    client_body_temp_path {temp}/body;
    proxy_temp_path {temp}/proxy;
    fastcgi_temp_path {temp}/fastcgi;
    uwsgi_temp_path {temp}/uwsgi;
    scgi_temp_path {temp}/scgi;
{http}
}}
"""
    path = tmp / f"{name}.conf"
    path.write_text(text)
    return path


def upstream_http(port: int) -> str:
    return f"""
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        location / {{
            default_type application/json;
            # echoes what the gateway / the peer told the upstream, for the sanity checks
            add_header X-Seen-Tier $http_x_entitlement_tier;
            return 200 '{BODY}';
        }}
    }}"""


def proxy_http(port: int, upstream: int) -> str:
    return f"""
    upstream backend {{
        server 127.0.0.1:{upstream};
        keepalive 128;
        keepalive_requests 1000000;
    }}
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        location / {{
            proxy_pass http://backend;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host $http_host;
        }}
    }}"""


def peer_http(port: int, upstream: int, auth: int) -> str:
    return f"""
    upstream backend {{
        server 127.0.0.1:{upstream};
        keepalive 128;
        keepalive_requests 1000000;
    }}
    upstream decider {{
        server 127.0.0.1:{auth};
        keepalive 128;
        keepalive_requests 1000000;
    }}
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        location / {{
            auth_request /_entitlement_check;
            auth_request_set $ent_tenant $upstream_http_x_entitlement_tenant;
            auth_request_set $ent_tier $upstream_http_x_entitlement_tier;
            auth_request_set $ent_features $upstream_http_x_entitlement_features;
            auth_request_set $ent_addons $upstream_http_x_entitlement_addons;
            proxy_pass http://backend;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host $http_host;
            proxy_set_header X-Entitlement-Tenant $ent_tenant;
            proxy_set_header X-Entitlement-Tier $ent_tier;
            proxy_set_header X-Entitlement-Features $ent_features;
            proxy_set_header X-Entitlement-Addons $ent_addons;
        }}
        location = /_entitlement_check {{
            internal;
            proxy_pass http://decider/check;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_pass_request_body off;
            proxy_set_header Content-Length "";
            proxy_set_header X-Original-URI $request_uri;
            proxy_set_header X-Original-Method $request_method;
        }}
    }}"""


def issue_keys(folder: Path) -> dict[str, str]:
    from gateway.license import LicenseClaims, generate_keypair, load_signing_key, sign_license

    generate_keypair(folder / "signing", "bench")
    (folder / "keys").mkdir(exist_ok=True)
    shutil.copy(folder / "signing" / "bench.pub", folder / "keys" / "bench.pub")
    key, kid = load_signing_key(folder / "signing" / "bench.key")
    now = int(time.time())

    def issue(tenant: str, tier: str) -> str:
        claims = LicenseClaims(
            iss="bench",
            sub=tenant,
            jti=str(uuid.uuid4()),
            iat=now - 60,
            nbf=now - 60,
            exp=now + 365 * DAY,
            tier=tier,
            serial=now,
        )
        return sign_license(key, kid, claims)

    keys = {"fleet": issue("bench-fleet", "fleet"), "core": issue("bench-core", "core")}
    seed = []
    for i in range(1, TENANTS + 1):
        tenant = f"bench-tenant-{i}"
        seed.append(f'[[tenants]]\nid = "{tenant}"\nkeys = ["{issue(tenant, "fleet")}"]\n')
    (folder / "tenants.toml").write_text("\n".join(seed))
    return keys


def gateway_toml(
    folder: Path,
    name: str,
    ports: dict[str, int],
    upstream: int,
    store: str,
    source: Path = REPO,
) -> Path:
    """A gateway.toml for one server; ``source`` is the tree whose route table and matrix it
    uses (another tree's for ``--baseline``, whose code may not know newer keys)."""
    shutil.copy(source / "routes.toml", folder / "routes.toml")
    shutil.copy(source / "tier_matrix.toml", folder / "tier_matrix.toml")
    lines = ["[files]", 'routes = "routes.toml"', 'tier_matrix = "tier_matrix.toml"', ""]
    for app in ("operations", "client_portal", "driver_app"):
        lines += [
            f"[apps.{app}]",
            f'listen = "127.0.0.1:{ports[app]}"',
            f'upstream = "http://127.0.0.1:{upstream}"',
            'classic_path_prefixes = ["/xdispatch/"]',
            "",
        ]
    lines += [
        "[admin]",
        f'listen = "127.0.0.1:{ports["admin"]}"',
        "",
        "[license]",
        'public_keys = "keys/"',
        "",
        "[store]",
        f'url = "{store}"',
        'seed = "tenants.toml"',
        "",
        "[events]",
        f'sink = "file://events-{name}.jsonl"',
        "",
    ]
    if (source / "gateway" / "accesslog.py").exists():  # older gateways do not know it
        # Off like nginx's (access_log off) for every row but gw-allowed-logged, the row
        # that measures what the access log costs.
        logged = name == "gateway-logged"
        lines += ["[access_log]", f"enabled = {'true' if logged else 'false'}"]
        lines += [f'sink = "file://access-{name}.jsonl"', ""]
    path = folder / f"{name}.toml"
    path.write_text("\n".join(lines))
    return path


def wrk_script(tmp: Path, target: Target) -> Path:
    lines = ['wrk.method = "POST"', 'wrk.body = ""']
    for name, value in target.headers.items():
        lines.append(f'wrk.headers["{name}"] = "{value}"')
    if target.tenants:  # requests formatted once in init(), handed out in turn
        lines.append(
            f"""
local requests, n, i = {{}}, {target.tenants}, 0
init = function(args)
  for k = 1, n do
    requests[k] = wrk.format(nil, nil, {{["X-Tenant-Id"] = "bench-tenant-" .. k}})
  end
end
request = function()
  i = i % n + 1
  return requests[i]
end
"""
        )
    lines.append(
        """
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRKJSON {"requests":%d,"duration_us":%d,"bytes":%d,"connect":%d,"read":%d,' ..
    '"write":%d,"status":%d,"timeout":%d,"p50":%.1f,"p90":%.1f,"p99":%.1f,' ..
    '"mean":%.1f,"max":%.1f}\\n',
    summary.requests, summary.duration, summary.bytes, e.connect, e.read, e.write,
    e.status, e.timeout, latency:percentile(50), latency:percentile(90),
    latency:percentile(99), latency.mean, latency.max))
end
"""
    )
    path = tmp / f"wrk-{target.name}.lua"
    path.write_text("\n".join(lines))
    return path


# ----------------------------------------------------------------------------- measuring
@dataclass
class Run:
    rps: float
    p50_ms: float
    p99_ms: float
    cpu_per_10k: float  # CPU-seconds of the process(es) under test per 10,000 requests
    busy: float  # CPU-seconds per wall second
    load_cpu_busy: float  # share of CPU 1 (wrk + upstream) that was busy
    other_load: float  # CPU-seconds per second used by processes bench.py did not start
    rss: float  # MiB
    requests: int
    non_2xx: int
    socket_errors: int


@dataclass
class Bench:
    args: argparse.Namespace
    tmp: Path
    procs: Processes
    targets: list[Target]
    ports: dict[str, int] = field(default_factory=dict)
    runs: dict[tuple[str, int], list[Run]] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    dead: set[str] = field(default_factory=set)
    wrk: str = "wrk"
    counters: str = ""  # the gateway's non-zero counters, read before it is stopped
    retries: int = 0  # runs repeated because other processes loaded the machine
    micro_other_load: float | None = None  # the same, during micro.py

    def url(self, target: Target) -> str:
        return f"http://127.0.0.1:{self.ports[target.server]}{ROUTE}"

    def wrk_argv(self, target: Target, conns: int, duration: int) -> list[str]:
        return [
            "taskset",
            "-c",
            LOAD_CPU,
            self.wrk,
            "-t1",
            f"-c{conns}",
            f"-d{duration}s",
            "--timeout",
            "5s",
            "--latency",
            "-s",
            str(self.tmp / f"wrk-{target.name}.lua"),
            self.url(target),
        ]

    def pids(self, target: Target) -> list[int]:
        return [self.procs.procs[name].pid for name in target.under_test]

    def alive(self, target: Target) -> bool:
        for name in target.under_test:
            proc = self.procs.procs[name]
            if proc.poll() is not None and name not in self.dead:
                self.dead.add(name)
                self.problems.append(
                    f"**{name} died** (exit {proc.returncode}) during or before "
                    f"`{target.name}`. Last log lines:\n\n```\n{self.procs.log_tail(name)}\n```"
                )
        return not any(name in self.dead for name in target.under_test)

    def run_wrk(self, target: Target, conns: int, duration: int) -> Run | None:
        if not self.alive(target):
            return None
        pids = self.pids(target)
        argv = self.wrk_argv(target, conns, duration)
        ours = [proc.pid for proc in self.procs.procs.values()]
        all_before = cpu_times("", interrupts=False)
        ours_before = cpu_seconds(ours) + children_cpu()
        cpu_before = cpu_seconds(pids)
        load_before = cpu_times(LOAD_CPU)
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            out, err = proc.communicate(timeout=duration + 60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        cpu = cpu_seconds(pids) - cpu_before
        load_after = cpu_times(LOAD_CPU)
        load_busy = (load_after[0] - load_before[0]) / max(load_after[1] - load_before[1], 1)
        ours_cpu = cpu_seconds(ours) + children_cpu() - ours_before
        all_busy = (cpu_times("", interrupts=False)[0] - all_before[0]) / CLK_TCK
        rss = rss_mib(pids)
        line = next((x for x in out.splitlines() if x.startswith("WRKJSON ")), None)
        if line is None:
            self.problems.append(
                f"`{target.name}` -c{conns}: wrk printed no summary "
                f"(exit {proc.returncode}): `{err.strip()[:300]}`"
            )
            self.alive(target)
            return None
        data = json.loads(line[len("WRKJSON ") :])
        requests = data["requests"]
        seconds = data["duration_us"] / 1e6
        socket_errors = data["connect"] + data["read"] + data["write"] + data["timeout"]
        run = Run(
            rps=requests / seconds,
            p50_ms=data["p50"] / 1000,
            p99_ms=data["p99"] / 1000,
            cpu_per_10k=cpu / max(requests, 1) * 10_000,
            busy=cpu / seconds,
            load_cpu_busy=load_busy,
            other_load=max(0.0, all_busy - ours_cpu) / seconds,
            rss=rss,
            requests=requests,
            non_2xx=data["status"],
            socket_errors=socket_errors,
        )
        wrong = run.non_2xx if target.expect < 300 else requests - run.non_2xx
        if wrong or socket_errors:
            self.problems.append(
                f"`{target.name}` at -c{conns}: {wrong} of {requests} responses were not "
                f"{target.expect}, socket errors: connect {data['connect']}, read "
                f"{data['read']}, write {data['write']}, timeout {data['timeout']}. "
                f"Reproduce: `{shlex.join(argv)}` (config in {self.tmp})"
            )
        self.alive(target)
        return run

    def sanity(self, target: Target) -> None:
        """One request by hand: the status, the body, what the upstream was told."""
        status, headers, body = request(self.ports[target.server], target.headers)
        issues = []
        if status != target.expect:
            issues.append(f"status {status}, expected {target.expect}")
        if target.expect == 200 and body != BODY.encode():
            issues.append(f"body is not the upstream's: {body[:200]!r}")
        if target.seen_tier is not None:
            seen = headers.get("X-Seen-Tier", "")
            if seen != target.seen_tier:
                issues.append(
                    f"upstream saw X-Entitlement-Tier {seen!r}, expected {target.seen_tier!r}"
                )
        if target.name == "gw-blocked" and b"feature_not_entitled" not in body:
            issues.append(f"not the feature_not_entitled problem: {body[:200]!r}")
        if issues:
            curl = " ".join(f"-H {shlex.quote(f'{k}: {v}')}" for k, v in target.headers.items())
            self.problems.append(
                f"`{target.name}` sanity check failed: {'; '.join(issues)}. Reproduce: "
                f"`curl -si -X POST {self.url(target)} {curl}`"
            )


def start_servers(bench: Bench) -> None:
    tmp, procs, ports = bench.tmp, bench.procs, bench.ports
    needed = {name for t in bench.targets for name in (t.server, *t.under_test)}
    nginx = nginx_binary()
    assert nginx is not None
    python = sys.executable
    ports["upstream"] = free_port()
    conf = nginx_conf(tmp, "upstream", upstream_http(ports["upstream"]))
    started = [("upstream", procs.start("upstream", [nginx, "-c", str(conf)], LOAD_CPU))]
    if "nginx-proxy" in needed:
        ports["nginx-proxy"] = free_port()
        conf = nginx_conf(tmp, "nginx-proxy", proxy_http(ports["nginx-proxy"], ports["upstream"]))
        started.append(
            ("nginx-proxy", procs.start("nginx-proxy", [nginx, "-c", str(conf)], UNDER_TEST_CPU))
        )
    if "aiohttp-proxy" in needed:
        ports["aiohttp-proxy"] = free_port()
        argv = [
            python,
            str(HERE / "aiohttp_proxy.py"),
            "--port",
            str(ports["aiohttp-proxy"]),
            "--upstream",
            f"http://127.0.0.1:{ports['upstream']}",
        ]
        started.append(("aiohttp-proxy", procs.start("aiohttp-proxy", argv, UNDER_TEST_CPU)))
    configs: dict[str, Path] = {}
    for name in ("gateway", "gateway-sqlite", "gateway-redis", "gateway-logged"):
        if name not in needed and not (name == "gateway" and "auth-service" in needed):
            continue
        if name == "gateway-redis":
            ports["redis"] = free_port()
            redis = procs.start("redis", redis_argv(tmp, ports["redis"]), LOAD_CPU)
            wait_tcp(redis, ports["redis"], "redis")
            store = f"redis://127.0.0.1:{ports['redis']}/0"
        elif name == "gateway-sqlite":
            store = f"sqlite://{tmp}/tenants.db"
        else:
            store = "memory://"
        gw_ports = {
            app: free_port() for app in ("operations", "client_portal", "driver_app", "admin")
        }
        configs[name] = gateway_toml(tmp, name, gw_ports, ports["upstream"], store)
        ports[name] = gw_ports["operations"]
        ports[f"{name}-admin"] = gw_ports["admin"]
        if name in needed:
            argv = [python, "-m", "gateway.cli", "serve", "--config", str(configs[name])]
            argv += ["--log-level", "WARNING"]
            started.append((name, procs.start(name, argv, UNDER_TEST_CPU)))
    if "gateway-base" in needed:
        base = bench.args.baseline_tree
        folder = tmp / "base"
        folder.mkdir()
        shutil.copytree(tmp / "keys", folder / "keys")
        shutil.copy(tmp / "tenants.toml", folder / "tenants.toml")
        gw_ports = {
            app: free_port() for app in ("operations", "client_portal", "driver_app", "admin")
        }
        upstream = ports["upstream"]
        config = gateway_toml(folder, "gateway-base", gw_ports, upstream, "memory://", base)
        ports["gateway-base"] = gw_ports["operations"]
        ports["gateway-base-admin"] = gw_ports["admin"]
        argv = [python, "-m", "gateway.cli", "serve", "--config", str(config)]
        argv += ["--log-level", "WARNING"]
        # `python -m` puts the working folder first on sys.path, ahead of the editable
        # install of this tree: run in the baseline tree, which then is what is imported.
        env = {"PYTHONPATH": str(base)}
        proc = procs.start("gateway-base", argv, UNDER_TEST_CPU, env, cwd=base)
        started.append(("gateway-base", proc))
    if "auth-service" in needed:
        ports["auth-service"] = free_port()
        argv = [python, str(HERE / "auth_service.py"), "--config", str(configs["gateway"])]
        argv += ["--port", str(ports["auth-service"])]
        started.append(("auth-service", procs.start("auth-service", argv, UNDER_TEST_CPU)))
        ports["peer-nginx"] = free_port()
        conf = nginx_conf(
            tmp,
            "peer-nginx",
            peer_http(ports["peer-nginx"], ports["upstream"], ports["auth-service"]),
        )
        started.append(
            ("peer-nginx", procs.start("peer-nginx", [nginx, "-c", str(conf)], UNDER_TEST_CPU))
        )
    for name, proc in started:
        try:
            wait_ready(proc, ports[name], name)
        except RuntimeError as exc:
            raise RuntimeError(f"{exc}\n{procs.log_tail(name)}") from exc


def run_matrix(
    bench: Bench, connections: list[int], duration: int, reps: int, started: float
) -> None:
    """Every target at every connection count, ``reps`` times over (interleaved). A run
    during which other processes loaded the machine is repeated while the budget allows."""
    targets = bench.targets
    warmup = 1 if duration >= 3 else 0
    for target in targets:
        wrk_script(bench.tmp, target)
        bench.sanity(target)
        if warmup:  # caches, pools, allocator, CPU frequency
            bench.run_wrk(target, max(connections), warmup)
    total = reps * len(connections) * len(targets)
    done = 0
    for rep in range(reps):
        for conns in connections:
            for target in targets:
                done += 1
                run = bench.run_wrk(target, conns, duration)
                repeats = 0
                while (
                    run is not None
                    and run.other_load > NOISY
                    and repeats < RETRIES_PER_RUN
                    and bench.retries < total // 4
                    and time.monotonic() + (total - done + 1) * (duration + 0.7) + 2 + RESERVED
                    < started + TIME_BUDGET
                ):
                    repeats += 1
                    bench.retries += 1
                    print(
                        f"bench: other processes used {run.other_load * 100:.0f} % of a core "
                        f"during {target.name} -c{conns}; running it again",
                        file=sys.stderr,
                    )
                    time.sleep(2)
                    again = bench.run_wrk(target, conns, duration)
                    if again is None:
                        break
                    if again.other_load < run.other_load:
                        run = again
                if run is not None:
                    bench.runs.setdefault((target.name, conns), []).append(run)
                    print(
                        f"bench: {time.monotonic() - started:5.0f} s [{done}/{total}] rep {rep + 1}"
                        f" -c{conns:<3} {target.name:<16}"
                        f" {run.rps:>9,.0f} req/s  p99 {run.p99_ms:6.2f} ms  "
                        f"{run.cpu_per_10k:.2f} CPU-s/10k  busy {run.busy * 100:.0f} %  "
                        f"other load {run.other_load * 100:.0f} %",
                        file=sys.stderr,
                    )
                time.sleep(0.2)


def gateway_counters(bench: Bench) -> str:
    """The non-zero request/cache/error counters of every gateway process, from /metrics."""
    out = []
    for name in ("gateway", "gateway-sqlite", "gateway-redis", "gateway-logged"):
        port = bench.ports.get(f"{name}-admin")
        if port is None or name not in bench.procs.procs or name in bench.dead:
            continue
        url = f"http://127.0.0.1:{port}/metrics"
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                text = response.read().decode()
        except OSError as exc:
            out.append(f"# {name}: could not read /metrics: {exc}")
            continue
        out.append(f"# {name}")
        for line in text.splitlines():
            if line.startswith(METRICS_SHOWN) and not line.rstrip().endswith(" 0.0"):
                out.append(line)
    return "\n".join(out)


# ----------------------------------------------------------------------------- report
def median_range(values: list[float], fmt: str) -> str:
    med = statistics.median(values)
    if len(values) == 1:
        return format(med, fmt)
    return f"{format(med, fmt)} ({format(min(values), fmt)}–{format(max(values), fmt)})"


def med(bench: Bench, name: str, conns: int) -> float | None:
    runs = bench.runs.get((name, conns))
    return statistics.median(r.rps for r in runs) if runs else None


def med_cpu(bench: Bench, name: str, conns: int) -> float | None:
    runs = bench.runs.get((name, conns))
    return statistics.median(r.cpu_per_10k for r in runs) if runs else None


def results_table(bench: Bench, conns: int) -> list[str]:
    refs = (("aiohttp-proxy", "× aiohttp"), ("peer-allowed", "× peer"), ("nginx-proxy", "× nginx"))
    lines = [
        "| target | req/s | p50 ms | p99 ms | CPU-s / 10k req | CPU busy | CPU 1 busy | other load "
        "| RSS MiB | " + " | ".join(label for _, label in refs) + " | errors |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|" + "---:|" * len(refs) + "---:|",
    ]
    for target in bench.targets:
        runs = bench.runs.get((target.name, conns))
        if not runs:
            lines.append(f"| {target.label} | not measured |" + " |" * (8 + len(refs) + 1))
            continue
        rps = statistics.median(r.rps for r in runs)
        ratios = []
        for ref, _ in refs:
            base = med(bench, ref, conns)
            ratios.append(f"{rps / base:.2f}" if base else "–")
        wrong = sum(
            (r.non_2xx if target.expect < 300 else r.requests - r.non_2xx) + r.socket_errors
            for r in runs
        )
        lines.append(
            f"| {target.label} | {median_range([r.rps for r in runs], ',.0f')} | "
            f"{median_range([r.p50_ms for r in runs], '.2f')} | "
            f"{median_range([r.p99_ms for r in runs], '.2f')} | "
            f"{median_range([r.cpu_per_10k for r in runs], '.2f')} | "
            f"{statistics.median(r.busy for r in runs) * 100:.0f} % | "
            f"{statistics.median(r.load_cpu_busy for r in runs) * 100:.0f} % | "
            f"{statistics.median(r.other_load for r in runs) * 100:.0f} % | "
            f"{statistics.median(r.rss for r in runs):.1f} | "
            + " | ".join(ratios)
            + f" | {wrong} |"
        )
    return lines


def verdict(value: float | None, threshold: float, mode: str) -> tuple[str, str]:
    """PASS/MISS and by how much. ``mode``: "min" (value ≥ threshold), "max" (value ≤
    threshold) or "within" (a ratio within ± threshold of 1)."""
    if value is None:
        return "n/a", "not measured"
    if mode == "within":
        ok = abs(value - 1) <= threshold
        side = "faster" if value >= 1 else "slower"
        how = f"classic {abs(value - 1) * 100:.0f} % {side} than allowed"
        if not ok:
            how += f" (limit ±{threshold * 100:.0f} %)"
    elif mode == "min":
        ok = value >= threshold
        gap = value / threshold - 1
        how = f"{gap * 100:.0f} % above the target" if ok else f"short by {-gap * 100:.0f} %"
    else:
        ok = value <= threshold
        if ok:
            how = f"{(1 - value / threshold) * 100:.0f} % below the limit"
        else:
            how = f"over by {(value / threshold - 1) * 100:.0f} %"
    return ("**PASS**" if ok else "**MISS**"), how


def before_after_table(bench: Bench) -> list[str]:
    """``--baseline``: this tree's gateway rows against the baseline commit's, run for run
    interleaved; the spread of each (min–max over the repetitions) next to the ratio."""
    lines = [
        "| target | connections | before req/s | after req/s | after ÷ before "
        "| before CPU-s / 10k | after CPU-s / 10k |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name in BEFORE_AFTER:
        for conns in bench.args.connections:
            before = bench.runs.get((f"{name}-base", conns))
            after = bench.runs.get((name, conns))
            if not before or not after:
                continue
            ratio = statistics.median(r.rps for r in after) / statistics.median(
                r.rps for r in before
            )
            lines.append(
                f"| {name} | {conns} | {median_range([r.rps for r in before], ',.0f')} "
                f"| {median_range([r.rps for r in after], ',.0f')} | {ratio:.2f}× "
                f"| {median_range([r.cpu_per_10k for r in before], '.2f')} "
                f"| {median_range([r.cpu_per_10k for r in after], '.2f')} |"
            )
    return lines


def targets_table(bench: Bench, micro_results: dict[str, Any] | None) -> list[str]:
    conns = bench.args.connections
    main = 16 if 16 in conns else conns[0]
    other = [c for c in conns if c != main]

    def ratio(a: str, b: str, c: int) -> float | None:
        x, y = med(bench, a, c), med(bench, b, c)
        return x / y if x and y else None

    def by_cpu(a: str, b: str, c: int) -> float | None:
        """The same ratio in requests per CPU-second of the process under test."""
        x, y = med_cpu(bench, a, c), med_cpu(bench, b, c)
        return y / x if x and y else None

    http_rows = [
        ("allowed ≥ 3× the aiohttp proxy", "gw-allowed", "aiohttp-proxy", 3.0, "min"),
        ("allowed ≥ 35 % of nginx's req/s", "gw-allowed", "nginx-proxy", 0.35, "min"),
        ("allowed ≥ 2× the auth_request peer", "gw-allowed", "peer-allowed", 2.0, "min"),
        ("blocked ≥ 1.5× allowed", "gw-blocked", "gw-allowed", 1.5, "min"),
        ("classic within 10 % of allowed", "gw-classic", "gw-allowed", 0.10, "within"),
    ]
    head = f"| target | measured (-c{main}) | result | margin |"
    rule = "|---|---:|---|---|"
    for c in other:
        head += f" -c{c} (for information) |"
        rule += "---:|"
    head += f" per CPU-second (-c{main}, for information) |"
    rule += "---:|"
    lines = [head, rule]
    for text, a, b, threshold, mode in http_rows:
        value = ratio(a, b, main)
        result, how = verdict(value, threshold, mode)
        row = f"| {text} | {value:.2f}× |" if value else f"| {text} | – |"
        row += f" {result} | {how} |"
        for c in other:
            extra = ratio(a, b, c)
            row += f" {extra:.2f}× |" if extra else " – |"
        efficiency = by_cpu(a, b, main)
        row += f" {efficiency:.2f}× |" if efficiency else " – |"
        lines.append(row)
    blank = " |" * (len(other) + 1)
    if micro_results:
        decision = micro_results["decision"]
        worst = max(r["median"] for r in decision)
        growth = decision[-1]["median"] / decision[0]["median"]
        flood = micro_results["flood"]["bad signature"]["loss"]["median"]
        rss = micro_results["rss"]
        rss_after = rss["rss_after_kib"] / 1024
        micro_rows = [
            (
                "decision path ≤ 5 µs median (worst table size)",
                worst,
                5.0,
                "max",
                f"{worst:.2f} µs",
            ),
            (
                "decision grows < 1.5× from 50 to 50,000 routes",
                growth,
                1.5,
                "max",
                f"{growth:.2f}×",
            ),
            (
                "valid throughput drops < 20 % under an equal-rate invalid-key flood",
                flood * 100,
                20.0,
                "max",
                f"{flood * 100:.1f} %",
            ),
            (
                f"RSS ≤ 150 MiB with {rss['licenses']:,} cached licenses",
                rss_after,
                150.0,
                "max",
                f"{rss_after:.1f} MiB",
            ),
        ]
        for text, value, threshold, mode, shown in micro_rows:
            result, how = verdict(value, threshold, mode)
            lines.append(f"| {text} | {shown} | {result} | {how} |{blank}")
    return lines


def machine_facts(wrk: str) -> list[str]:
    cpu = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    nginx = nginx_binary() or "nginx"
    nginx_v = subprocess.run([nginx, "-v"], capture_output=True, text=True, check=False)
    wrk_v = subprocess.run([wrk, "-v"], capture_output=True, text=True, check=False)
    versions = []
    for package in ("uvloop", "aiohttp", "httptools", "msgspec", "cryptography"):
        try:
            versions.append(f"{package} {importlib.metadata.version(package)}")
        except importlib.metadata.PackageNotFoundError:
            versions.append(f"{package} (not installed)")
    commit = subprocess.run(
        ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    dirty = subprocess.run(
        ["git", "-C", str(REPO), "status", "--porcelain", "--", "gateway"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    state = f"`{commit or 'unknown'}`" + (" + uncommitted changes in gateway/" if dirty else "")
    return [
        f"- CPU: {cpu}, {os.cpu_count()} logical CPUs",
        f"- Kernel: {platform.system()} {platform.release()}",
        f"- Python {platform.python_version()}; " + ", ".join(versions),
        f"- {(nginx_v.stderr or nginx_v.stdout).strip()}; "
        f"{(wrk_v.stdout or wrk_v.stderr).splitlines()[0].strip()}",
        f"- Gateway code: {state}",
    ]


def noise(bench: Bench) -> str:
    runs = [run for group in bench.runs.values() for run in group]
    if not runs:
        return "no runs."
    noisy = sum(1 for run in runs if run.other_load > 0.10)
    worst = max(run.other_load for run in runs)
    text = (
        f"processes this bench did not start used at most {worst * 100:.0f} % of a core during "
        f"a run; {noisy} of {len(runs)} runs saw more than 10 %"
    )
    if bench.retries:
        text += f"; {bench.retries} run(s) were repeated because of it (the quieter one is kept)"
    return text + " (column *other load*)."


def how_to_run(targets: list[Target]) -> list[str]:
    lines = [
        "## How to run it, and what the scenarios are",
        "",
        "`make bench` (= `.venv/bin/python loadtests/bench.py`) installs `wrk` and `nginx` with "
        "apt-get if they are missing, writes every config (nginx confs, `gateway.toml`, a fresh "
        "Ed25519 key pair and licenses, `tenants.toml`, wrk Lua scripts) into a temporary "
        "folder, starts everything on free loopback ports, runs the matrix, stops what it "
        "started (by PID, also on Ctrl-C), runs `loadtests/micro.py`, and rewrites this file. "
        "Options: `--duration S` (per run, default 5), `--reps N` (default 3), `--quick` "
        "(1 repetition of 2 s, fewer micro rounds: a smoke test), `--only a,b` (target names "
        "or prefixes, e.g. `--only gw`), `--connections 16,64`, `--skip-micro`, `--output PATH`, "
        "`--baseline COMMIT` (that commit's gateway too, for the before/after table). "
        "`loadtests/relay_loop.py [--baseline COMMIT]` times the relay without sockets, for a "
        "quick before/after of a request-path change (not part of this file).",
        "",
        "Method: `wrk -t1 -cN --latency` with a Lua script (method, headers, a `done()` hook "
        "that prints requests, errors and latency percentiles). Every target gets the same "
        f"request, `POST {ROUTE}` with an empty body, differing only in the key header. "
        "The process under test is pinned to CPU 0 with `taskset`; wrk and the upstream nginx "
        "share CPU 1. The repetitions are interleaved (every target at every connection count, "
        "then again), after a 1 s warm-up of each target; tables show the median and, in "
        "brackets, the min–max over the repetitions. CPU-s / 10k req is utime+stime "
        "(`/proc/<pid>/stat`, children included: nginx master + worker; the peer counts nginx "
        "+ its decision service) over the run, per 10,000 requests (0.50 = 50 µs of CPU per "
        "request); CPU busy is the same per wall second (100 % = its one core is saturated; "
        "well below means the bottleneck was elsewhere). CPU 1 busy is how busy the load "
        "generator's core (wrk + upstream + the kernel's loopback work) was; other load is "
        "user + system CPU used during the run by processes this bench did not start (on a "
        "shared machine, a run with more than 25 % is repeated, at most twice and for a "
        "quarter of the runs in all, within the 9-minute budget, keeping the quieter one). "
        "RSS is VmRSS after the run. Ratio columns divide "
        "the median req/s by the reference's median at the same connection count. A sanity "
        "request checks every target first (status, body, and the X-Entitlement-Tier the "
        "upstream saw, echoed by the upstream as `X-Seen-Tier`); any wrong status or socket "
        "error under load is listed under Problems.",
        "",
        "Reading the numbers: this is a 2-vCPU VM that other work may share. Look at the "
        "min–max ranges, at *CPU busy* (a process under test well below ~95 % was held back by "
        "something other than its own CPU: the load core, a neighbour, the hypervisor) and at "
        "*other load*; CPU-s / 10k req is the steadiest figure. Rerun (or `--only` the targets "
        "in question with a longer `--duration`) when the ranges are wide.",
        "",
        "| name (`--only`) | scenario |",
        "|---|---|",
    ]
    for target in targets:
        lines.append(f"| `{target.name}` | {target.meaning} |")
    lines += [
        "",
        "Micro-benchmarks (`python loadtests/micro.py`, also run by bench.py pinned to CPU 0) "
        "call the gateway's code directly; see the section above for what each measures.",
    ]
    return lines


def write_report(
    bench: Bench,
    micro_results: dict[str, Any] | None,
    elapsed: float,
    loads: tuple[str, str],
) -> None:
    args = bench.args
    lines = [
        "# Load-test results",
        "",
        f"Generated by `make bench` (`{' '.join(['loadtests/bench.py', *sys.argv[1:]])}`) on "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} in {elapsed / 60:.1f} min. "
        "Do not edit by hand; rerun the command.",
        "",
        "## Machine",
        "",
        *machine_facts(bench.wrk),
        f"- Pinning: process under test on CPU {UNDER_TEST_CPU}; wrk and upstream nginx on "
        f"CPU {LOAD_CPU} (`taskset`). Load average before / after: {loads[0]} / {loads[1]} "
        "(other work on the machine shows up as noise).",
        f"- Runs: {args.duration} s each, {args.reps} repetition(s), interleaved; "
        f"connections {', '.join(map(str, args.connections))}; `wrk -t1`.",
        f"- Noise: {noise(bench)}",
        "",
        "## Targets",
        "",
        "Ratios of median req/s from this run (the issue's measure); the micro-benchmark "
        "targets come from the section below. The last column gives the same ratios in "
        "requests per CPU-second of the process under test (from the CPU-s / 10k column): "
        "what a sidecar costs in cores, and much less sensitive to other load on the machine "
        "than req/s, since a run slowed down by a neighbour also uses less CPU.",
        "",
        *targets_table(bench, micro_results),
        "",
    ]
    for conns in args.connections:
        lines += [f"## Results at {conns} connections", "", *results_table(bench, conns), ""]
    if getattr(args, "baseline_commit", None):
        lines += [
            f"## Before and after (baseline {args.baseline_commit})",
            "",
            "The gateway of the baseline commit (`--baseline`, run from `git archive` of it "
            "with this venv) and this tree's, each run interleaved with the other, same "
            "requests, same upstream. Medians with (min–max) over the repetitions: a ratio "
            "inside both spreads is no measurable change.",
            "",
            *before_after_table(bench),
            "",
        ]
    lines += ["## Micro-benchmarks", ""]
    if micro_results:
        lines += [micro.render(micro_results), ""]
        if bench.micro_other_load is not None:
            lines += [
                f"Other load while these ran: {bench.micro_other_load * 100:.0f} % of a core "
                "(processes this bench did not start).",
                "",
            ]
    else:
        lines += ["Not run (`--skip-micro`).", ""]
    lines += ["## Problems found", ""]
    if bench.problems:
        lines += [f"- {p}" for p in bench.problems] + [""]
    else:
        lines += [
            "None: every response had the expected status, no socket errors, no crashes.",
            "",
        ]
    counters = bench.counters
    if counters:
        lines += [
            "Gateway counters after the run (non-zero, from its `/metrics`):",
            "",
            "```",
            counters,
            "```",
            "",
        ]
    analysis = HERE / "ANALYSIS.md"
    if analysis.exists():  # the profile behind the numbers, kept by hand beside this script
        lines += ["", *analysis.read_text().splitlines()]
    lines += how_to_run(bench.targets)
    lines += soak_section()
    args.output.write_text("\n".join(lines) + "\n")


def soak_section() -> list[str]:
    """The last long soak, recorded in SOAK.md by loadtests/soak.py: kept in this
    report so a new bench run does not lose it."""
    soak = HERE / "SOAK.md"
    if not soak.exists():
        return []
    body = [line for line in soak.read_text().splitlines() if not line.startswith("<!--")]
    body = [("##" + line) if line.startswith("#") else line for line in body]  # nest headings
    return [
        "",
        "## Soak (10 minutes; not part of `make bench`)",
        "",
        "Recorded with `.venv/bin/python loadtests/soak.py --duration 600 --redis > "
        "loadtests/SOAK.md` (mixed allowed / blocked / classic / invalid-key / tenant-id "
        "traffic, a reload every 30 s alternating a routes.toml edit and SIGHUP, the Redis "
        "store restarted once half-way). `make test` runs a 30-second version.",
        "",
        *body,
    ]


# ----------------------------------------------------------------------------- main
def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Load tests of the gateway against real peers")
    parser.add_argument("--duration", type=int, default=5, help="seconds per run (default 5)")
    parser.add_argument("--reps", type=int, default=3, help="interleaved repetitions (3)")
    parser.add_argument("--quick", action="store_true", help="smoke test: 1 rep of 2 s")
    parser.add_argument("--only", help="comma-separated target names or prefixes")
    parser.add_argument("--connections", default="16,64", help="wrk -c values (16,64)")
    parser.add_argument("--skip-micro", action="store_true", help="no micro-benchmarks")
    parser.add_argument("--output", type=Path, default=HERE / "RESULTS.md")
    parser.add_argument(
        "--baseline",
        metavar="COMMIT",
        help="also run the gateway rows against this commit's gateway (before/after)",
    )
    args = parser.parse_args()
    if args.quick:
        args.duration, args.reps = 2, 1
    args.connections = [int(c) for c in args.connections.split(",")]
    if args.duration < 1 or args.reps < 1:
        parser.error("--duration and --reps must be at least 1")
    return args


def export_tree(commit: str, tmp: Path) -> tuple[Path, str]:
    """The baseline commit's files in ``tmp/baseline-tree`` (``git archive``), and its id."""
    full = subprocess.run(
        ["git", "-C", str(REPO), "rev-parse", "--verify", f"{commit}^{{commit}}"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    tree = tmp / "baseline-tree"
    tree.mkdir()
    archive = subprocess.run(
        ["git", "-C", str(REPO), "archive", full], check=True, capture_output=True
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(tree)], input=archive, check=True)
    return tree, full[:12]


def select(targets: list[Target], only: str | None) -> list[Target]:
    if not only:
        return targets
    wanted = [w.strip() for w in only.split(",") if w.strip()]
    chosen = [t for t in targets if any(t.name == w or t.name.startswith(w) for w in wanted)]
    if not chosen:
        names = ", ".join(t.name for t in targets)
        raise SystemExit(f"bench: --only {only!r} matches no target ({names})")
    return chosen


@contextlib.contextmanager
def stop_on_sigterm() -> Iterator[None]:
    def on_term(*_: object) -> None:
        raise SystemExit(143)

    previous = signal.signal(signal.SIGTERM, on_term)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def main() -> int:
    args = parse_args()
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even if started in background
    started = time.monotonic()
    everything = make_targets({"fleet": "", "core": ""})
    if args.baseline:
        everything += baseline_targets(everything)
    names = {t.name for t in select(everything, args.only)}
    ensure_tools(redis="gw-tenant-redis" in names)
    wrk = shutil.which("wrk") or "wrk"
    loads = [Path("/proc/loadavg").read_text().split()[0], ""]
    tmp = Path(tempfile.mkdtemp(prefix="gateway-bench-"))
    (tmp / "logs").mkdir()
    procs = Processes(tmp / "logs")
    keep = False
    micro_results: dict[str, Any] | None = None
    with stop_on_sigterm():
        try:
            keys = issue_keys(tmp)
            targets = make_targets(keys)
            if args.baseline:
                args.baseline_tree, args.baseline_commit = export_tree(args.baseline, tmp)
                targets += baseline_targets(targets)
            targets = [t for t in targets if t.name in names]
            bench = Bench(args, tmp, procs, targets, wrk=wrk)
            start_servers(bench)
            run_matrix(bench, args.connections, args.duration, args.reps, started)
            bench.counters = gateway_counters(bench)
            procs.stop_all()
            keep = bool(bench.problems)
            if not args.skip_micro:
                print("bench: micro-benchmarks", file=sys.stderr)
                out = tmp / "micro.json"
                argv = ["taskset", "-c", UNDER_TEST_CPU, sys.executable, str(HERE / "micro.py")]
                argv += ["--json", str(out)] + (["--quick"] if args.quick else [])
                wall, all_before = time.monotonic(), cpu_times("", interrupts=False)[0]
                mine = children_cpu()
                subprocess.run(argv, check=True, timeout=600)
                foreign = (cpu_times("", interrupts=False)[0] - all_before) / CLK_TCK
                foreign -= children_cpu() - mine
                bench.micro_other_load = max(0.0, foreign) / (time.monotonic() - wall)
                micro_results = json.loads(out.read_text())
        except KeyboardInterrupt:
            print("\nbench: interrupted; stopping what it started", file=sys.stderr)
            return 130
        finally:
            procs.stop_all()
            if not keep:
                shutil.rmtree(tmp, ignore_errors=True)
    loads[1] = Path("/proc/loadavg").read_text().split()[0]
    write_report(bench, micro_results, time.monotonic() - started, (loads[0], loads[1]))
    print(f"bench: wrote {args.output} in {(time.monotonic() - started) / 60:.1f} min")
    if keep:
        print(f"bench: problems found; configs and logs kept in {tmp}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
