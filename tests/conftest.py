"""Shared fixtures. Keys are generated per test session, never committed."""

from __future__ import annotations

import contextlib
import itertools
import shutil
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from gateway.config import Config, load_config
from gateway.license import KeyRing, LicenseClaims, generate_keypair, load_signing_key, sign_license
from gateway.matrix import APP_NAMES, TierMatrix, load_matrix
from gateway.proxy.exchange import Exchange
from gateway.proxy.state import check_transitions
from gateway.routes import RouteTable, load_routes
from gateway.store import TenantStore
from tests.enforcing import EnforcerWorld
from tests.harness import EchoUpstream, Gateway, running_gateway
from tests.provisioning import SECRET
from tests.redis_server import RedisServer, start_redis
from tests.stores import Backend, make_backend

REPO = Path(__file__).resolve().parent.parent


def pytest_configure(config: pytest.Config) -> None:
    # The request path stores an exchange's state unchecked; here every store is checked
    # against the legal transitions, so a test that reaches an illegal one fails.
    check_transitions(Exchange)


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--screenshots",
        action="store_true",
        help="the browser tests also write docs/screenshots/*.png (commit them)",
    )


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO


@pytest.fixture(scope="session")
def matrix() -> TierMatrix:
    return load_matrix(REPO / "tier_matrix.toml")


@pytest.fixture(scope="session")
def route_table(matrix: TierMatrix) -> RouteTable:
    return load_routes(REPO / "routes.toml", matrix)


@pytest.fixture(scope="session")
def key_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder with one generated key pair, kid ``test``: ``test.key`` and ``test.pub``."""
    folder = tmp_path_factory.mktemp("keys")
    generate_keypair(folder, "test")
    return folder


@pytest.fixture(scope="session")
def signing_key(key_dir: Path) -> Ed25519PrivateKey:
    return load_signing_key(key_dir / "test.key")[0]


@pytest.fixture(scope="session")
def keyring(key_dir: Path) -> KeyRing:
    public_only = key_dir.parent / "public-keys"
    public_only.mkdir(exist_ok=True)
    shutil.copy(key_dir / "test.pub", public_only / "test.pub")
    return KeyRing.load(public_only)


IssueKey = Callable[..., str]


def sign_key(private_key: Ed25519PrivateKey, kid: str, **overrides: object) -> str:
    """A signed key with test defaults (valid now, Core, serial 1); ``overrides`` win."""
    now = int(time.time())
    fields: dict[str, object] = {
        "iss": "tests",
        "sub": "tenant-1",
        "jti": str(uuid.uuid4()),
        "iat": now - 60,
        "nbf": now - 60,
        "exp": now + 86400,
        "tier": "core",
        "serial": 1,
    }
    fields.update(overrides)
    return sign_license(private_key, kid, LicenseClaims(**fields))  # type: ignore[arg-type]


@pytest.fixture(scope="session")
def issue_key(signing_key: Ed25519PrivateKey) -> IssueKey:
    """``issue_key(tier="fleet", addons=("sms_messaging",), exp=..., ...)`` → a signed key."""

    def issue(**overrides: object) -> str:
        return sign_key(signing_key, "test", **overrides)

    return issue


@pytest.fixture
def config_dir(tmp_path: Path, key_dir: Path) -> Path:
    """A copy of the shipped gateway.toml, routes.toml and tier_matrix.toml with test keys,
    for tests that break one file and look at the errors."""
    for name in ("gateway.toml", "routes.toml", "tier_matrix.toml"):
        shutil.copy(REPO / name, tmp_path / name)
    (tmp_path / "keys").mkdir()
    shutil.copy(key_dir / "test.pub", tmp_path / "keys" / "test.pub")
    return tmp_path


@pytest.fixture
def config(config_dir: Path) -> Config:
    return load_config(config_dir / "gateway.toml")


@pytest.fixture
async def upstreams() -> AsyncIterator[dict[str, EchoUpstream]]:
    """A real echo upstream (aiohttp on loopback) for each of the three apps."""
    servers: dict[str, EchoUpstream] = {app: EchoUpstream(app) for app in APP_NAMES}
    for server in servers.values():
        await server.start()
    yield servers
    for server in servers.values():
        await server.stop()


@pytest.fixture
def upstream_ports(upstreams: dict[str, EchoUpstream]) -> dict[str, int]:
    return {app: server.port for app, server in upstreams.items()}


GatewayFactory = Callable[..., Awaitable[Gateway]]


@pytest.fixture
async def gateway_factory(tmp_path: Path, key_dir: Path) -> AsyncIterator[GatewayFactory]:
    """``await gateway_factory(upstream, tenants=..., extra=..., app_extra=...)``: a gateway
    runtime with the shipped routes and matrix in front of ``upstream`` (one port for every
    app, or a port per app), stopped after the test. The first lives in ``tmp_path``, later
    ones in folders of their own; ``tenants`` (TOML text) is written as ``tenants.toml``
    beside its gateway.toml, for ``[store] seed = "tenants.toml"``."""
    folders = itertools.count()
    async with contextlib.AsyncExitStack() as stack:

        async def start(
            upstream: int | Mapping[str, int], *, tenants: str | None = None, **config: Any
        ) -> Gateway:
            number = next(folders)
            folder = tmp_path if number == 0 else tmp_path / f"gateway-{number}"
            folder.mkdir(exist_ok=True)
            if tenants is not None:
                (folder / "tenants.toml").write_text(tenants)
            ports: Mapping[str, int] = (
                {app: upstream for app in APP_NAMES} if isinstance(upstream, int) else upstream
            )
            return await stack.enter_async_context(
                running_gateway(folder, key_dir, ports, **config)
            )

        yield start


@pytest.fixture
async def gateway(gateway_factory: GatewayFactory, upstream_ports: dict[str, int]) -> Gateway:
    """A gateway runtime with the shipped routes and matrix in front of ``upstreams``."""
    return await gateway_factory(upstream_ports)


@pytest.fixture
def redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A real ``redis-server`` of this test's own (the test fails, never skips, without one):
    for outages, and for tests that want an empty server."""
    server = start_redis(tmp_path / "redis")
    yield server
    server.stop()


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """One server for the session; each test uses its own key prefix (tests.stores)."""
    server = start_redis(tmp_path_factory.mktemp("redis"))
    yield server
    server.stop()


# -- the tenant-store engines (tests/stores.py) ----------------------------------------------


@pytest.fixture(params=["memory", "sqlite", "redis"])
async def backend(
    request: pytest.FixtureRequest, tmp_path: Path, keyring: KeyRing
) -> AsyncIterator[Backend]:
    opened = make_backend(request.param, request, tmp_path, keyring)
    yield opened
    await opened.close()


@pytest.fixture(params=["sqlite", "redis"])
async def shared(
    request: pytest.FixtureRequest, tmp_path: Path, keyring: KeyRing
) -> AsyncIterator[Backend]:
    """The engines where two store objects (two processes) share the data."""
    opened = make_backend(request.param, request, tmp_path, keyring)
    yield opened
    await opened.close()


@pytest.fixture
def store(backend: Backend) -> TenantStore:
    return backend.open()


@pytest.fixture
def provision_secret(monkeypatch: pytest.MonkeyPatch) -> str:
    """``GATEWAY_PROVISION_SECRET`` set to the secret tests.provisioning signs with (also seen
    by processes the test starts, e.g. an issuer delivering to a gateway's hook)."""
    monkeypatch.setenv("GATEWAY_PROVISION_SECRET", SECRET)
    return SECRET


@pytest.fixture
async def client() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


@pytest.fixture
def make_world(tmp_path: Path) -> Iterator[Callable[..., EnforcerWorld]]:
    """``make_world(config, store=None, per_second=1000.0)`` → an ``EnforcerWorld`` (the
    enforcer without sockets, tests/enforcing.py), closed after the test."""
    made: list[EnforcerWorld] = []

    def make(config: Config, store: TenantStore | None = None, **options: Any) -> EnforcerWorld:
        world = EnforcerWorld(config, tmp_path / f"world-{len(made)}", store, **options)
        made.append(world)
        return world

    yield make
    for world in made:
        world.close()
