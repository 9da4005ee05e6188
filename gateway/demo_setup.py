"""What ``make demo`` writes before it starts anything: ports, files, keys and secrets.

Everything goes into the demo folder (``demo/``, git-ignored; ``GATEWAY_DEMO_DIR`` moves it):

    demo/gateway.toml   demo/issuer.toml   demo/tenants.toml   demo/keys.env
    demo/signing/demo.key (+ .pub)         the private signing key: the issuer's key folder
    demo/keys/demo.pub                     the gateway's public key folder
    demo/store.db  demo/issuer.db  demo/audit.jsonl  demo/events.jsonl  demo/access.jsonl

The signing key survives restarts; the state files start empty on every run, so the
printed examples (a Core key blocked, then upgraded) hold each time.

    ports = demo_ports(None)                # today's fixed ports; demo_ports(18000): 18000-18007
    setup = prepare(Path("demo"), ports)
"""

from __future__ import annotations

import secrets
import shlex
import time
import uuid
from pathlib import Path

import msgspec

from gateway.audit import AuditLog, AuditRecord
from gateway.license import (
    LicenseClaims,
    fingerprint,
    generate_keypair,
    load_signing_key,
    sign_license,
)

ROOT = Path(__file__).resolve().parent.parent
APPS = ("operations", "client_portal", "driver_app")
PORT_COUNT = 8  # three listeners, three upstreams, admin, issuer
KID = "demo"
CLASSIC_KEY = "XD7Q2-4KLMN-8PRST-2VWXY-3ABCD"
DAY = 86400
STATE_FILES = ("store.db", "issuer.db", "audit.jsonl", "events.jsonl", "access.jsonl")
# SQLite's companions of the two databases
STATE_SUFFIXES = ("", "-wal", "-shm", "-journal")


class DemoPorts(msgspec.Struct, frozen=True):
    listeners: dict[str, int]  # app -> the gateway's listener
    upstreams: dict[str, int]  # app -> its demo upstream
    admin: int
    issuer: int

    def named(self) -> list[tuple[str, int]]:
        """Every port with what it is for, in the order of ``--port-base``."""
        return [
            *((f"{app} listener", port) for app, port in self.listeners.items()),
            *((f"{app} upstream", port) for app, port in self.upstreams.items()),
            ("admin", self.admin),
            ("issuer", self.issuer),
        ]


class PortError(ValueError):
    """A port base that cannot hold the demo's ports."""


def demo_ports(base: int | None) -> DemoPorts:
    """Without a base, the ports of the shipped gateway.toml and issuer.toml; with one,
    ``base`` .. ``base + 7``: the three listeners, the three upstreams, admin, issuer."""
    if base is None:
        return DemoPorts(
            listeners=dict(zip(APPS, (8081, 8082, 8083), strict=True)),
            upstreams=dict(zip(APPS, (9001, 9002, 9003), strict=True)),
            admin=9900,
            issuer=9800,
        )
    if not 1024 <= base <= 65535 - (PORT_COUNT - 1):
        raise PortError(
            f"port base {base}: the demo uses {PORT_COUNT} ports from it; "
            f"choose 1024..{65535 - (PORT_COUNT - 1)}"
        )
    return DemoPorts(
        listeners={app: base + index for index, app in enumerate(APPS)},
        upstreams={app: base + 3 + index for index, app in enumerate(APPS)},
        admin=base + 6,
        issuer=base + 7,
    )


def parse_port_base(text: str, source: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise PortError(f"{source}={text!r}: expected a port number") from None


class DemoSetup(msgspec.Struct, frozen=True):
    folder: Path
    ports: DemoPorts
    keys: dict[str, str]  # the sample keys, by their variable name in keys.env
    provision_secret: str
    billing_secret: str

    def path(self, name: str) -> Path:
        return self.folder / name

    @property
    def signing_key(self) -> Path:
        return self.folder / "signing" / f"{KID}.key"


def prepare(folder: Path, ports: DemoPorts) -> DemoSetup:
    """Write the demo folder for one run (see the module docstring)."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in STATE_FILES:
        for suffix in STATE_SUFFIXES:
            (folder / (name + suffix)).unlink(missing_ok=True)
    signing = folder / "signing"
    if not (signing / f"{KID}.key").exists():
        generate_keypair(signing, KID)
    (folder / "keys").mkdir(exist_ok=True)
    (folder / "keys" / f"{KID}.pub").write_bytes((signing / f"{KID}.pub").read_bytes())
    (folder / "gateway.toml").write_text(_gateway_toml(ports))
    (folder / "issuer.toml").write_text(_issuer_toml(ports))
    keys = _issue_sample_keys(folder)
    setup = DemoSetup(
        folder=folder,
        ports=ports,
        keys=keys,
        # fresh each run: the demo's processes get them in their environment, a second
        # terminal from keys.env
        provision_secret=secrets.token_hex(16),
        billing_secret=secrets.token_hex(16),
    )
    exports = {
        **keys,
        "GATEWAY_PROVISION_SECRET": setup.provision_secret,
        "ISSUER_BILLING_SECRET": setup.billing_secret,
    }
    env = "".join(f"export {name}={shlex.quote(value)}\n" for name, value in exports.items())
    (folder / "keys.env").write_text(env)
    return setup


def _gateway_toml(ports: DemoPorts) -> str:
    lines = [
        "# Generated by `make demo` (gateway/demo_setup.py); rewritten on every start.",
        "[files]",
        f'routes = "{ROOT / "routes.toml"}"',
        f'tier_matrix = "{ROOT / "tier_matrix.toml"}"',
        "",
    ]
    for app in APPS:
        lines += [
            f"[apps.{app}]",
            f'listen = "127.0.0.1:{ports.listeners[app]}"',
            f'upstream = "http://127.0.0.1:{ports.upstreams[app]}"',
            'classic_path_prefixes = ["/xdispatch/"]',
            "",
        ]
    lines += [
        "[admin]",
        f'listen = "127.0.0.1:{ports.admin}"',
        'provision_secret_env = "GATEWAY_PROVISION_SECRET"',
        "",
        "[license]",
        'public_keys = "keys/"',
        "",
        "[store]",
        'url = "sqlite://store.db"',
        'seed = "tenants.toml"',
        "",
        "[events]",
        'sink = "file://events.jsonl"',
        "",
        "[access_log]",
        'sink = "file://access.jsonl"',
        "",
        "[audit]",
        'log = "audit.jsonl"',
        "",
    ]
    return "\n".join(lines)


def _issuer_toml(ports: DemoPorts) -> str:
    return f"""\
# Generated by `make demo` (gateway/demo_setup.py); rewritten on every start.
[issuer]
listen = "127.0.0.1:{ports.issuer}"
name = "demo-issuer"
tier_matrix = "{ROOT / "tier_matrix.toml"}"
ledger = "issuer.db"

[keys]
dir = "signing/"
publish = ["keys/"]

[[billing]]
key_id = "demo-billing"
secret_env = "ISSUER_BILLING_SECRET"

[audit]
log = "audit.jsonl"

[delivery]
max_attempts = 5
backoff_seconds = 0.5
max_backoff_seconds = 5.0

[[targets]]
name = "demo-gateway"
provision_url = "http://127.0.0.1:{ports.admin}/admin/provision"
secret_env = "GATEWAY_PROVISION_SECRET"
"""


def _issue_sample_keys(folder: Path) -> dict[str, str]:
    """A key per tier and situation, each recorded in the audit log (actor ``make-demo``);
    demo-fleet's also goes into the store through ``tenants.toml``."""
    key, kid = load_signing_key(folder / "signing" / f"{KID}.key")
    audit = AuditLog(folder / "audit.jsonl")
    now = int(time.time())

    def issue(tenant: str, tier: str, **extra: object) -> str:
        claims: dict[str, object] = {
            "iss": "make-demo",
            "sub": tenant,
            "jti": str(uuid.uuid4()),
            "iat": now - 60,
            "nbf": now - 60,
            "exp": now + 365 * DAY,
            "tier": tier,
            "serial": now,
        }
        claims.update(extra)
        lic = LicenseClaims(**claims)  # type: ignore[arg-type]
        token = sign_license(key, kid, lic)
        audit.append(
            AuditRecord(
                actor="make-demo",
                action="issue",
                tenant=tenant,
                license_id=lic.jti,
                fingerprint=fingerprint(token),
                kid=kid,
                tier=tier,
                addons=lic.addons,
                reason="sample key",
                detail={"serial": lic.serial, "nbf": lic.nbf, "exp": lic.exp, "trial": lic.trial},
            )
        )
        return token

    keys = {
        "CORE_KEY": issue("demo-core", "core"),
        "FLEET_KEY": issue("demo-fleet", "fleet"),
        "ENTERPRISE_KEY": issue("demo-enterprise", "enterprise"),
        "CORE_RD_KEY": issue("demo-core-rd", "core", addons=("route_distribution",)),
        "TRIAL_KEY": issue("demo-trial", "fleet", trial=True, exp=now + 14 * DAY),
        "GRACE_KEY": issue(
            "demo-grace", "fleet", iat=now - 400 * DAY, nbf=now - 400 * DAY, exp=now - 2 * DAY
        ),
        "CLASSIC_KEY": CLASSIC_KEY,
    }
    (folder / "tenants.toml").write_text(
        '[[tenants]]\nid = "demo-fleet"\nkeys = ["' + keys["FLEET_KEY"] + '"]\n'
    )
    return keys
