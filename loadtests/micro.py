"""Micro-benchmarks of the gateway's decision path, without sockets.

* ``Enforcer.check(RequestHead)`` on a warm cache — canonical path + route match + cached
  license + decide — at 50, 5,000 and 50,000 routes (synthetic ``routes.toml`` files over
  the shipped tier matrix; the ``RequestHead`` objects are built once, up front);
* the same call for a blocked, a classic and a tenant-id (store) request;
* Ed25519 verification cold (``KeyRing.verify``) vs a cache hit (``LicenseCache.resolve``);
* a flood of distinct invalid keys mixed 1:1 into valid traffic through ``Enforcer.check``:
  how much valid-request throughput is lost compared with no flood;
* RSS of a fresh process before and after caching 100,000 tenant licenses;
* the seat holder check (``SeatBook.check`` for a known holder, 10,000 holders cached) and
  the usage count (``UsageMeter.count``) that an allowed request adds.
* the per-request cost of ``Identifier.identify``: headers mode from a trusted peer (direct,
  and through a trusted proxy), and jwt mode with a token already verified (cache hit), next
  to a token's first verification.

Timings are ``time.perf_counter_ns`` loops; each figure is the median of several rounds.
``bench.py`` runs this (pinned to CPU 0) and puts the results into ``RESULTS.md``.

    python loadtests/micro.py                 # print a table
    python loadtests/micro.py --json out.json # machine-readable, for bench.py
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import inspect
import json
import math
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
ROUTE_COUNTS = (50, 5_000, 50_000)
CLASSIC_KEY = "XD7Q2-4KLMN-8PRST-2VWXY-3ABCD"
DAY = 86400
# Operations features, cycled over the synthetic routes; the first four are in Fleet.
OPS_FEATURES = (
    "ops.on_demand",
    "ops.route_distribution",
    "ops.basic_shipment_optimization",
    "ops.sms_messaging",
    "ops.advanced_shipment_optimization",
    "ops.health_data_protection",
    "ops.emergency_support",
)
FLEET_OPS = frozenset(OPS_FEATURES[:4])


# ----------------------------------------------------------------------------- helpers
def rss_kib(pid: int | str = "self") -> int:
    with open(f"/proc/{pid}/status") as handle:
        for line in handle:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def per_call_us(
    fn: Callable[[Any], Any],
    items: Sequence[Any],
    rounds: int,
    before: Callable[[], None] | None = None,
) -> list[float]:
    """µs per call of ``fn`` over ``items``, one figure per round (``before`` is called,
    untimed, before each round)."""
    out = []
    for _ in range(rounds):
        if before is not None:
            before()
        start = time.perf_counter_ns()
        for item in items:
            fn(item)
        out.append((time.perf_counter_ns() - start) / len(items) / 1000)
    return out


def summary(samples: list[float]) -> dict[str, float]:
    return {
        "median": statistics.median(samples),
        "min": min(samples),
        "max": max(samples),
        "rounds": len(samples),
    }


class Keys:
    """A throw-away signing key and its public key folder, and licenses signed with it."""

    def __init__(self, folder: Path) -> None:
        from gateway.license import generate_keypair, load_signing_key

        generate_keypair(folder / "signing", "bench")
        (folder / "keys").mkdir(exist_ok=True)
        shutil.copy(folder / "signing" / "bench.pub", folder / "keys" / "bench.pub")
        self.folder = folder / "keys"
        self._key, self._kid = load_signing_key(folder / "signing" / "bench.key")
        self._now = int(time.time())

    def issue(self, tenant: str, tier: str, **extra: Any) -> str:
        from gateway.license import LicenseClaims, sign_license

        claims: dict[str, Any] = {
            "iss": "bench",
            "sub": tenant,
            "jti": str(uuid.uuid4()),
            "iat": self._now - 60,
            "nbf": self._now - 60,
            "exp": self._now + 365 * DAY,
            "tier": tier,
            "serial": self._now,
        }
        claims.update(extra)
        return sign_license(self._key, self._kid, LicenseClaims(**claims))


def bad_signature_keys(valid: str, count: int, seed: int) -> list[bytes]:
    """Distinct, well-formed keys with a known kid and a wrong signature that passes the
    cheap checks (R is a valid point, S < L), so each one costs a full Ed25519
    verification unless the gateway can refuse it earlier."""
    rng = random.Random(seed)
    head, payload, signature = valid.split(".")
    r_point = base64.urlsafe_b64decode(signature + "=" * (-len(signature) % 4))[:32]
    out = []
    for _ in range(count):
        s_scalar = bytearray(rng.randbytes(32))
        s_scalar[31] &= 0x0F  # S < 2^252 < L: not rejected as non-canonical
        sig = base64.urlsafe_b64encode(r_point + bytes(s_scalar)).rstrip(b"=")
        out.append(f"{head}.{payload}.".encode() + sig)
    return out


def malformed_keys(count: int, seed: int) -> list[bytes]:
    """Distinct garbage keys (not a JWS at all): the cheap kind of flood."""
    rng = random.Random(seed)
    return [base64.b32encode(rng.randbytes(20)) for _ in range(count)]


# ----------------------------------------------------------------------------- routes
def route_base(group: int) -> str:
    return f"/api/v{1 + group % 3}/s{group}"


# group 2 of every table: POST .../items/{id}/optimize, ops.basic_shipment_optimization
TARGET = f"{route_base(2)}/items/42/optimize".encode()


def write_routes(path: Path, count: int) -> None:
    """``count`` operations routes in groups of four shapes, features cycled."""
    lines = [
        "# Synthetic routes for loadtests/micro.py",
        "[apps.operations]",
        'unmatched = "allow"',
        "[apps.client_portal]",
        'unmatched = "allow"',
        "[apps.driver_app]",
        'unmatched = "deny"',
        "",
    ]
    for i in range(count):
        group, shape = divmod(i, 4)
        base = route_base(group)
        feature = OPS_FEATURES[group % len(OPS_FEATURES)]
        lines.append("[[routes]]")
        lines.append('app = "operations"')
        if shape == 0:
            lines += ['methods = ["GET", "POST"]', f'path = "{base}/items"']
        elif shape == 1:
            lines += [f'path = "{base}/items/{{id}}"']
        elif shape == 2:
            lines += ['methods = ["POST"]', f'path = "{base}/items/{{id}}/optimize"']
        else:
            lines += [f'path = "{base}/files/{{rest:path}}"']
        lines += [f'feature = "{feature}"', ""]
    path.write_text("\n".join(lines))


def sample_requests(count: int, n: int, seed: int) -> list[tuple[str, bytes]]:
    """``n`` (method, target) pairs that hit Fleet-entitled routes spread over the table."""
    rng = random.Random(seed)
    groups = [
        g for g in range((count + 3) // 4) if OPS_FEATURES[g % len(OPS_FEATURES)] in FLEET_OPS
    ]
    out: list[tuple[str, bytes]] = []
    while len(out) < n:
        group = rng.choice(groups)
        shape = rng.randrange(4)
        if group * 4 + shape >= count:
            continue
        base = route_base(group)
        ident = rng.randrange(1, 10**6)
        if shape == 0:
            out.append(("GET", f"{base}/items?page={ident % 50}".encode()))
        elif shape == 1:
            out.append(("PUT", f"{base}/items/{ident}".encode()))
        elif shape == 2:
            out.append(("POST", f"{base}/items/{ident}/optimize".encode()))
        else:
            out.append(("GET", f"{base}/files/{ident}/docs/manifest.pdf".encode()))
    return out


def _indexed_document_class() -> type:
    """``TomlDocument`` with an O(1) ``line_of`` (line numbers indexed once).

    The stock ``line_of`` scans the whole text for every route, so compiling N routes is
    O(N²) (minutes at 50,000). The harness uses this subclass so the *lookup* can be
    measured at 50,000 routes; the stock load time is measured separately and reported."""
    from gateway.tomlfile import TomlDocument

    class IndexedDocument(TomlDocument):
        __slots__ = ("_routes_lines",)

        def line_of(self, header: str, index: int = 0) -> int | None:
            if header != "[[routes]]":
                return super().line_of(header, index)
            try:
                numbers = self._routes_lines
            except AttributeError:
                numbers = [
                    number
                    for number, line in enumerate(self.text.splitlines(), start=1)
                    if line.strip().startswith(header)
                ]
                self._routes_lines = numbers
            return numbers[index] if index < len(numbers) else None

    return IndexedDocument


# ----------------------------------------------------------------------------- setup
class World:
    """An Enforcer for the operations app over a given routes file, without sockets."""

    def __init__(self, folder: Path, keys: Keys, routes: Path, *, indexed: bool) -> None:
        from gateway.config import Config, load_settings
        from gateway.enforcer import Enforcer, Shared
        from gateway.events import EventLog
        from gateway.license import KeyRing
        from gateway.matrix import build_matrix
        from gateway.metrics import Metrics
        from gateway.routes import build_routes
        from gateway.store import open_store
        from gateway.tomlfile import TomlDocument

        config_path = folder / f"gateway-{routes.stem}.toml"
        config_path.write_text(
            "[files]\n"
            f'routes = "{routes.name}"\n'
            'tier_matrix = "tier_matrix.toml"\n'
            "[apps.operations]\n"
            'listen = "127.0.0.1:1"\n'
            'upstream = "http://127.0.0.1:2"\n'
            'classic_path_prefixes = ["/xdispatch/"]\n'
            "[license]\n"
            'public_keys = "keys/"\n'
        )
        settings = load_settings(config_path)
        matrix = build_matrix(TomlDocument.read(folder / "tier_matrix.toml"))
        doc_class = _indexed_document_class() if indexed else TomlDocument
        start = time.perf_counter()
        self.route_table = build_routes(doc_class.read(routes), matrix)
        self.load_seconds = time.perf_counter() - start
        keyring = KeyRing.load(keys.folder)
        config = Config(config_path.resolve(), settings, matrix, self.route_table, keyring)
        self.metrics = Metrics()
        # As the runtime builds it ([events] defaults): refusal events sampled per second.
        self.events = EventLog.from_settings(
            f"file://{folder}/events.jsonl", settings.events, self.metrics
        )
        self.store = open_store("memory://", keyring)
        self.shared = Shared(config, self.metrics, self.events, self.store)
        self.enforcer = Enforcer("operations", config, self.shared)
        self.keyring = keyring

    def head(self, method: str, target: bytes, **fields: bytes) -> Any:
        from gateway.enforcer import RequestHead

        headers = [
            (b"Host", b"127.0.0.1:8081", b"host"),
            (b"User-Agent", b"bench/1.0", b"user-agent"),
            (b"Accept", b"application/json", b"accept"),
        ]
        head = RequestHead(method, target, headers)
        head.request_id = "bench-1"  # the relay sets one on every request before the check
        names = {"license_key": b"X-License-Key", "tenant": b"X-Tenant-Id", "role": b"X-User-Role"}
        for attr, value in fields.items():
            setattr(head, attr, value)
            headers.append((names[attr], value, names[attr].lower()))
        return head

    def refresh_tenants(self, *tenants: str) -> None:
        async def fetch() -> None:
            for tenant in tenants:
                await self.shared.tenants.fetch(tenant)

        asyncio.run(fetch())

    def refresh_key_tenants(self) -> None:
        self.refresh_tenants("bench-fleet")

    def drain_events(self) -> None:
        """Drop queued events (the runtime's writer task is not running here)."""
        queue = getattr(self.events, "_queue", None)
        if queue is not None:
            queue.clear()


# ----------------------------------------------------------------------------- benches
def loader_exponent(measured: list[tuple[int, float]]) -> float:
    """How the stock loader's time grows with N, from its two largest measurements."""
    if len(measured) < 2:
        return 2.0
    (n1, t1), (n2, t2) = measured[-2], measured[-1]
    if t1 <= 0 or t2 <= 0:
        return 2.0
    return math.log(t2 / t1) / math.log(n2 / n1)


def bench_decision(
    folder: Path, keys: Keys, fleet: str, rounds: int, calls: int
) -> list[dict[str, Any]]:
    """The three table sizes are measured round-robin (one round of each, then again), so
    other load on the machine falls on all of them alike."""
    from gateway.enforcer import FORWARD

    probe = folder / "routes-1000.toml"
    write_routes(probe, 1_000)
    per_thousand = World(folder, keys, probe, indexed=False).load_seconds
    # The stock loader is timed at each size unless the projection from the sizes measured
    # so far (quadratic until two points give the real exponent) says it would take > 10 s.
    measured: list[tuple[int, float]] = [(1_000, per_thousand)]
    setups = []
    for count in ROUTE_COUNTS:
        routes = folder / f"routes-{count}.toml"
        write_routes(routes, count)
        exponent = loader_exponent(measured)
        last_count, last_seconds = measured[-1]
        projected = last_seconds * (count / last_count) ** exponent
        stock_seconds = None
        if projected < 10.0:
            world = World(folder, keys, routes, indexed=False)
            stock_seconds = world.load_seconds
            if count > last_count:
                measured.append((count, stock_seconds))
        else:  # the same table, compiled through the harness's indexed line_of
            world = World(folder, keys, routes, indexed=True)
        heads = [
            world.head(method, target, license_key=fleet.encode())
            for method, target in sample_requests(count, 512, seed=count)
        ]
        world.refresh_tenants("bench-fleet")  # a key's tenant record (none) is cached too
        for head in heads:  # warm the caches; and every one must be allowed
            verdict = world.enforcer.check(head)
            if verdict.kind != FORWARD or not verdict.upstream_headers:
                raise SystemExit(
                    f"micro: {head.method} {head.target!r} was not allowed: "
                    f"{verdict.kind} {verdict.status} {verdict.body!r}"
                )
        items = (heads * (calls // len(heads) + 1))[:calls]
        setups.append((count, world, items, stock_seconds, projected))
    samples: dict[int, list[float]] = {count: [] for count in ROUTE_COUNTS}
    for _ in range(rounds):
        for count, world, items, _, _ in setups:
            samples[count] += per_call_us(world.enforcer.check, items, 1, world.refresh_key_tenants)
    out = []
    for count, world, _, stock_seconds, projected in setups:
        out.append(
            {
                "routes": count,
                "compiled": sum(1 for _ in world.route_table.routes()),
                "stock_load_s": stock_seconds,
                "stock_load_projected_s": projected,
                "stock_load_1000_s": per_thousand,
                "stock_load_exponent": loader_exponent(measured),
                "load_s": world.load_seconds,
                **summary(samples[count]),
            }
        )
        print(
            f"micro: decision at {count} routes: {out[-1]['median']:.2f} µs "
            f"(routes.toml load: stock {_seconds(stock_seconds, projected)}, "
            f"used {world.load_seconds:.2f} s)",
            file=sys.stderr,
        )
    return out


def bench_kinds(
    world: World, tokens: dict[str, str], rounds: int, calls: int
) -> dict[str, dict[str, float]]:
    from gateway.enforcer import CLASSIC, FORWARD, RESPOND

    target = TARGET
    cases = {
        "allowed (Fleet key)": (
            world.head("POST", target, license_key=tokens["fleet"].encode()),
            FORWARD,
        ),
        "blocked (Core key)": (
            world.head("POST", target, license_key=tokens["core"].encode()),
            RESPOND,
        ),
        "classic key": (world.head("POST", target, license_key=CLASSIC_KEY.encode()), CLASSIC),
        "tenant id (store)": (world.head("POST", target, tenant=b"bench-tenant"), FORWARD),
    }
    out = {}
    check = world.enforcer.check
    for name, (head, expected) in cases.items():
        samples = []
        for _ in range(rounds):
            world.refresh_tenants("bench-tenant", "bench-fleet", "bench-core")
            world.drain_events()
            verdict = check(head)
            if verdict.kind != expected:
                raise SystemExit(f"micro: {name}: verdict kind {verdict.kind}, expected {expected}")
            samples += per_call_us(check, [head] * calls, 1)
        world.drain_events()
        out[name] = summary(samples)
    return out


def bench_ed25519(world: World, fleet: str, rounds: int) -> dict[str, dict[str, float]]:
    from gateway.enforcer import LicenseCache

    cache = LicenseCache(world.keyring, world.metrics)
    token = fleet.encode()
    cache.resolve(token)
    cold = per_call_us(world.keyring.verify, [fleet] * 2_000, rounds)
    hit = per_call_us(cache.resolve, [token] * 50_000, rounds)
    return {"verify_cold": summary(cold), "cache_hit": summary(hit)}


def bench_identity(rounds: int, calls: int) -> dict[str, dict[str, float]]:
    """µs per ``Identifier.identify`` call, as the relay will make it (bytes in)."""
    import jwt
    import msgspec
    from cryptography.hazmat.primitives.asymmetric.ec import SECP256R1, generate_private_key
    from jwt.algorithms import ECAlgorithm

    from gateway.config import IdentitySettings
    from gateway.identity import Identifier, Identity

    names = ("X-Tenant-Id", "X-User-Id", "X-User-Role")
    headers_mode = msgspec.convert(
        {"mode": "headers", "trusted_peers": ["10.0.0.5"], "trusted_proxies": ["10.1.0.0/16"]},
        IdentitySettings,
    )
    by_headers = Identifier(headers_mode, names, REPO)

    def trusted(peer: tuple[bytes, bytes | None]) -> object:
        return by_headers.identify(
            peer[0], peer[1], b"t1", b"u1", b"admin", None, has_license=False, now=0.0
        )

    out = {
        "headers_trusted_peer": summary(
            per_call_us(trusted, [(b"10.0.0.5", None)] * calls, rounds)
        ),
        "headers_via_proxy": summary(
            per_call_us(trusted, [(b"10.1.0.9", b"203.0.113.7, 10.0.0.5")] * calls, rounds)
        ),
    }
    key = generate_private_key(SECP256R1())
    jwk = ECAlgorithm.to_jwk(key.public_key(), as_dict=True) | {"kid": "bench"}
    with tempfile.TemporaryDirectory(prefix="gateway-identity-") as tmp:
        Path(tmp, "jwks.json").write_text(json.dumps({"keys": [jwk]}))
        jwt_mode = msgspec.convert(
            {"mode": "jwt", "jwks_file": "jwks.json", "issuer": "bench", "audience": "gw"},
            IdentitySettings,
        )
        by_token = Identifier(jwt_mode, names, Path(tmp))
        asyncio.run(by_token.start())
        now = int(time.time())
        claims = {"iss": "bench", "aud": "gw", "exp": now + 3600, "tenant": "t1", "sub": "u1"}
        per_round = 1_000
        tokens = [
            b"Bearer " + jwt.encode(claims | {"n": n}, key, "ES256", {"kid": "bench"}).encode()
            for n in range(per_round * rounds)
        ]

        def identify(token: bytes) -> object:
            found = by_token.identify(
                b"", None, None, None, None, token, has_license=False, now=time.time()
            )
            assert isinstance(found, Identity), found
            return found

        first: list[float] = []
        for start in range(0, len(tokens), per_round):  # never-seen tokens in every round
            first += per_call_us(identify, tokens[start : start + per_round], 1)
        out["jwt_first_verification_es256"] = summary(first)
        out["jwt_cached_token"] = summary(per_call_us(identify, [tokens[0]] * calls, rounds))
        asyncio.run(by_token.stop())
    return out


def bench_flood(
    world: World, fleet: str, rounds: int, valid_per_round: int
) -> dict[str, dict[str, Any]]:
    """Valid-request throughput of ``Enforcer.check`` alone vs mixed 1:1 with never-seen
    invalid keys (a fresh set per round, so no invalid key is ever a cache hit)."""
    from gateway.enforcer import FORWARD, RESPOND

    check = world.enforcer.check
    target = TARGET
    valid = world.head("POST", target, license_key=fleet.encode())
    world.refresh_tenants("bench-fleet")
    check(valid)

    def fresh_heads(n: int) -> list[Any]:
        return [world.head("POST", target, license_key=fleet.encode()) for _ in range(n)]

    out: dict[str, dict[str, Any]] = {}
    kinds = {
        "bad signature": lambda r: bad_signature_keys(fleet, valid_per_round, seed=1000 + r),
        "malformed": lambda r: malformed_keys(valid_per_round, seed=2000 + r),
    }
    for kind, make in kinds.items():
        alone, mixed, invalid_cost = [], [], []
        for r in range(rounds):
            probe = world.head("POST", target, license_key=make(r + 10_000)[0])
            if check(probe).kind != RESPOND or check(valid).kind != FORWARD:
                raise SystemExit(f"micro: flood ({kind}): unexpected verdicts")
            bad_heads = [world.head("POST", target, license_key=k) for k in make(r)]
            world.refresh_tenants("bench-fleet")
            world.drain_events()
            # A head per valid request, as the relay makes one per request: each valid
            # check looks its key up in the cache, as a real one does.
            alone_heads = fresh_heads(len(bad_heads))
            goods = fresh_heads(len(bad_heads))
            pairs = [h for pair in zip(goods, bad_heads, strict=True) for h in pair]
            start = time.perf_counter_ns()
            for head in alone_heads:
                check(head)
            t_alone = time.perf_counter_ns() - start
            start = time.perf_counter_ns()
            for head in pairs:
                check(head)
            t_mixed = time.perf_counter_ns() - start
            world.drain_events()
            n = len(bad_heads)
            alone.append(n / t_alone * 1e9)
            mixed.append(n / t_mixed * 1e9)
            invalid_cost.append((t_mixed - t_alone) / n / 1000)
        loss = [1 - m / a for m, a in zip(mixed, alone, strict=True)]
        out[kind] = {
            "valid_per_s_alone": statistics.median(alone),
            "valid_per_s_flood": statistics.median(mixed),
            "loss": summary(loss),
            "invalid_us": statistics.median(invalid_cost),
            "per_round": valid_per_round,
        }
    return out


def bench_seats(rounds: int, calls: int) -> dict[str, dict[str, float]]:
    """``SeatBook.check`` for known holders (2,000 tenants × 5 users cached) and
    ``UsageMeter.count``, each in a plain loop; the same loop calling a no-op function of
    the same arity is measured too, so the figures can be read net of the loop."""
    from gateway.config import SeatSettings
    from gateway.license import KeyRing
    from gateway.matrix import load_matrix
    from gateway.seats import KNOWN, SeatBook
    from gateway.store import open_store
    from gateway.usage import UsageMeter

    store = open_store("memory://", KeyRing({}))
    book = SeatBook(store, SeatSettings(mode="active_users"))
    matrix = load_matrix(REPO / "tier_matrix.toml")
    now = time.time()
    holders = [(f"tenant-{t:04d}", f"user-{u}") for t in range(2_000) for u in range(5)]

    async def admit_all() -> None:
        for tenant, user in holders:
            await book.admit(
                tenant, "ops_users", user, matrix=matrix, tier="fleet", seats=None, now=now
            )

    asyncio.run(admit_all())
    rng = random.Random(7)
    items = [rng.choice(holders) for _ in range(calls)]
    if any(book.check(t, "ops_users", u, now) != KNOWN for t, u in items):
        raise SystemExit("micro: seats: a holder was not known")
    meter = UsageMeter(store)  # called as (tenant, feature, client, now): the same shape
    check, count = book.check, meter.count

    def noop(_a: str, _b: str, _c: str, _d: float) -> None:
        return None

    def loop(fn: Callable[[str, str, str, float], object]) -> float:
        start = time.perf_counter_ns()
        for tenant, user in items:
            fn(tenant, "ops_users", user, now)
        return (time.perf_counter_ns() - start) / len(items) / 1000

    samples: dict[str, list[float]] = {"check": [], "count": [], "loop": []}
    for fn in (check, count, noop):  # warm up, untimed
        loop(fn)
    for _ in range(rounds):
        samples["check"].append(loop(check))
        samples["count"].append(loop(count))
        samples["loop"].append(loop(noop))
    return {name: summary(values) for name, values in samples.items()}


def bench_rss(count: int) -> dict[str, Any]:
    """Run the RSS measurement in a fresh interpreter (so nothing else is in its heap)."""
    done = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--rss-child", str(count)],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    if done.returncode != 0:
        raise SystemExit(f"micro: RSS child failed:\n{done.stderr}")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def rss_child(count: int) -> None:
    """Fill a LicenseCache with ``count`` distinct tenants' verified licenses; print RSS."""
    import gc

    import gateway.runtime  # noqa: F401 - the whole gateway imported, as in a real process
    from gateway.enforcer import LicenseCache
    from gateway.license import KeyRing, License
    from gateway.metrics import Metrics

    with tempfile.TemporaryDirectory(prefix="gateway-micro-rss-") as tmp:
        keys = Keys(Path(tmp))
        ring = KeyRing.load(keys.folder)
        options: dict[str, Any] = {"size": max(count, 100_000)}
        if "verifications_per_second" in inspect.signature(LicenseCache).parameters:
            options["verifications_per_second"] = 1e12  # filling, not flood-testing
        cache = LicenseCache(ring, Metrics(), **options)
        tiers = ("core", "fleet", "enterprise")
        cache.resolve(keys.issue("tenant-000000", "fleet").encode())  # the first of count
        gc.collect()
        before = rss_kib()
        start = time.perf_counter()
        for i in range(1, count):
            extra: dict[str, Any] = {}
            if i % 5 == 0:
                extra["addons"] = ("route_distribution", "sms_messaging")
            token = keys.issue(f"tenant-{i:06d}", tiers[i % 3], **extra)
            result = cache.resolve(token.encode())
            if not isinstance(result, License):
                raise SystemExit(f"micro: RSS fill: license {i} not cached: {result}")
        del token
        gc.collect()
        after = rss_kib()
        print(
            json.dumps(
                {
                    "licenses": len(cache),
                    "rss_before_kib": before,
                    "rss_after_kib": after,
                    "fill_seconds": time.perf_counter() - start,
                }
            )
        )


# ----------------------------------------------------------------------------- main
def run(quick: bool) -> dict[str, Any]:
    rounds = 3 if quick else 7
    calls = 5_000 if quick else 20_000
    results: dict[str, Any] = {"rounds": rounds, "calls_per_round": calls}
    with tempfile.TemporaryDirectory(prefix="gateway-micro-") as tmp:
        folder = Path(tmp)
        shutil.copy(REPO / "tier_matrix.toml", folder / "tier_matrix.toml")
        keys = Keys(folder)
        tokens = {
            "fleet": keys.issue("bench-fleet", "fleet"),
            "core": keys.issue("bench-core", "core"),
            "tenant": keys.issue("bench-tenant", "fleet"),
        }
        results["decision"] = bench_decision(folder, keys, tokens["fleet"], rounds, calls)
        small = folder / "routes-50.toml"
        world = World(folder, keys, small, indexed=True)
        asyncio.run(world.store.put_license(tokens["tenant"]))
        results["kinds"] = bench_kinds(world, tokens, rounds, calls)
        results["ed25519"] = bench_ed25519(world, tokens["fleet"], rounds)
        results["flood"] = bench_flood(world, tokens["fleet"], rounds, 600 if quick else 2_000)
        results["seats"] = bench_seats(rounds, calls)
        results["identity"] = bench_identity(rounds, calls)
        world.events.close()
    results["rss"] = bench_rss(20_000 if quick else 100_000)
    return results


def _seconds(measured: float | None, projected: float) -> str:
    if measured is not None:
        return f"{measured:.2f} s"
    return f"not run (≈ {projected:,.0f} s projected)"


def _us(stat: dict[str, float]) -> str:
    return f"{stat['median']:.2f} µs ({stat['min']:.2f}–{stat['max']:.2f})"


def render(results: dict[str, Any]) -> str:
    """The "Micro-benchmarks" section of RESULTS.md (markdown)."""
    lines = [
        f"Medians of {results['rounds']} rounds of {results['calls_per_round']:,} calls "
        "(min–max in brackets), `time.perf_counter_ns`, one process pinned to CPU 0.",
        "",
        "**Decision path** — `Enforcer.check(RequestHead)` on a warm cache (canonical path + "
        "route match + cached license + decide + entitlement headers), 512 distinct allowed "
        "requests (Fleet key) spread over the table:",
        "",
        "| routes | µs per check | vs 50 routes | routes.toml load (stock loader) |",
        "|---:|---|---:|---|",
    ]
    decision = results["decision"]
    base = decision[0]["median"]
    for row in decision:
        load_text = _seconds(row["stock_load_s"], row["stock_load_projected_s"])
        lines.append(
            f"| {row['routes']:,} | {_us(row)} | {row['median'] / base:.2f}× | {load_text} |"
        )
    lines += [
        "",
        "**Per request kind** (50-route table):",
        "",
        "| request | µs per check |",
        "|---|---|",
    ]
    for name, stat in results["kinds"].items():
        lines.append(f"| {name} | {_us(stat)} |")
    ed = results["ed25519"]
    lines += [
        "",
        "**License verification**:",
        "",
        "| | µs per key |",
        "|---|---|",
        f"| `KeyRing.verify` (cold: parse + Ed25519) | {_us(ed['verify_cold'])} |",
        f"| `LicenseCache.resolve` (cache hit) | {_us(ed['cache_hit'])} |",
        f"| speed-up of a hit | {ed['verify_cold']['median'] / ed['cache_hit']['median']:.0f}× |",
        "",
        "**Invalid-key flood** — valid requests mixed 1:1 with never-seen invalid keys through "
        "`Enforcer.check` at one target (single core, so the valid rate is what is left once the "
        "invalid ones are handled; a request head per request, as the relay makes them). *Bad "
        "signature*: other signature bytes on the valid key's claims; *malformed*: random "
        "base32, no dot:",
        "",
        "| invalid keys | valid checks/s alone | valid checks/s in the flood | valid throughput "
        "lost | cost per invalid key |",
        "|---|---:|---:|---|---:|",
    ]
    for kind, row in results["flood"].items():
        loss = row["loss"]
        lines.append(
            f"| {kind} | {row['valid_per_s_alone']:,.0f} | {row['valid_per_s_flood']:,.0f} | "
            f"{loss['median'] * 100:.1f} % ({loss['min'] * 100:.1f}–{loss['max'] * 100:.1f}) | "
            f"{row['invalid_us']:.1f} µs |"
        )
    seats = results["seats"]
    loop = seats["loop"]["median"]
    lines += [
        "",
        "**Seats and usage** — what an allowed request from a known seat holder adds: "
        "`SeatBook.check` (10,000 holders cached) and `UsageMeter.count`, each in a plain "
        "loop; net = minus the same loop calling a no-op of the same arity:",
        "",
        "| call | µs per call | net of the loop |",
        "|---|---|---:|",
        f"| `SeatBook.check` (known holder) | {_us(seats['check'])} | "
        f"{seats['check']['median'] - loop:.3f} µs |",
        f"| `UsageMeter.count` | {_us(seats['count'])} | "
        f"{seats['count']['median'] - loop:.3f} µs |",
        f"| no-op call (the loop) | {_us(seats['loop'])} | — |",
    ]
    identity = results.get("identity")
    if identity:
        lines += [
            "",
            "**Identity** — `Identifier.identify` per request (README, Identity):",
            "",
            "| case | µs per call |",
            "|---|---|",
        ]
        for name, stat in identity.items():
            lines.append(f"| {name.replace('_', ' ')} | {_us(stat)} |")
    rss = results["rss"]
    delta = rss["rss_after_kib"] - rss["rss_before_kib"]
    lines += [
        "",
        f"**Memory** — a fresh process (whole gateway imported) caching {rss['licenses']:,} "
        "distinct tenants' verified licenses in `LicenseCache`:",
        "",
        "| RSS before | RSS after | growth | per license |",
        "|---:|---:|---:|---:|",
        f"| {rss['rss_before_kib'] / 1024:.1f} MiB | {rss['rss_after_kib'] / 1024:.1f} MiB | "
        f"{delta / 1024:.1f} MiB | {delta * 1024 / max(rss['licenses'], 1):,.0f} B |",
    ]
    exponent = decision[-1].get("stock_load_exponent", 2.0)
    if exponent > 1.5 or any(r["stock_load_s"] is None for r in decision):
        lines += [
            "",
            f"Note: the stock `routes.toml` loader's time grows as about N^{exponent:.1f} "
            f"(1,000 routes: {decision[0]['stock_load_1000_s']:.2f} s); where it was not run, "
            "the lookup was measured on a table compiled through an indexed "
            "`TomlDocument.line_of` (a harness-only subclass: same file, same trie). A hot "
            "reload of such a file blocks the event loop for as long as the load takes.",
        ]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description="Micro-benchmarks of the decision path")
    parser.add_argument("--json", type=Path, help="write the results here as JSON")
    parser.add_argument("--quick", action="store_true", help="fewer rounds and licenses")
    parser.add_argument("--rss-child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rss_child is not None:
        rss_child(args.rss_child)
        return 0
    results = run(args.quick)
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2))
    else:
        print(render(results))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONHASHSEED", "0")
    sys.exit(main())
