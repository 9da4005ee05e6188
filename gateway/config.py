"""Loading ``gateway.toml`` and, through it, the route table, tier matrix and key ring.

Every key but an app's ``listen`` and ``upstream`` has a default; unknown keys are errors;
relative paths are relative to the file's own folder (DESIGN §3). ``load_config`` checks
all files and raises one ``ConfigError`` listing every problem it found in any of them.

    config = load_config(Path("gateway.toml"))
    config.routes.apps["operations"].match("GET", "/api/v1/health")
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

import msgspec

from gateway.decision import Policy
from gateway.errors import ConfigError, ConfigProblem
from gateway.license import DEFAULT_CLASSIC_PATTERN, ClassicKeys, KeyRing
from gateway.matrix import APP_NAMES, AppName, TierMatrix, build_matrix
from gateway.routes import RouteTable, build_routes
from gateway.tomlfile import TomlDocument

_HOST_PORT = re.compile(r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+):(\d{1,5})$")
_UPSTREAM = re.compile(r"^http://(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+)(:\d{1,5})?/?$")
_HEADER = re.compile(r"^[A-Za-z0-9-]+$")


class Files(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    routes: str = "routes.toml"
    tier_matrix: str = "tier_matrix.toml"


class AppSettings(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    listen: str
    upstream: str
    classic_path_prefixes: tuple[str, ...] = ()
    host: Literal["preserve", "rewrite"] = "preserve"
    connect_timeout: float = 5.0
    read_timeout: float = 60.0
    max_connections: int = 1000  # to the upstream; more requests queue
    queue_timeout: float = 5.0  # longest wait in that queue, then 503 + Retry-After


class AdminSettings(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    listen: str = "127.0.0.1:9900"
    provision_secret_env: str = "GATEWAY_PROVISION_SECRET"


class LicenseSettings(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    public_keys: str = "keys/"
    header: str = "X-License-Key"
    tenant_header: str = "X-Tenant-Id"
    user_header: str = "X-User-Id"
    role_header: str = "X-User-Role"
    classic_key_pattern: str = DEFAULT_CLASSIC_PATTERN
    classic_keys: Literal["pattern", "store"] = "pattern"
    grace_days: int = 7
    clock_skew_seconds: int = 300
    # Ed25519 checks of never-seen keys per second per process (0: unlimited); past it a
    # new key gets 503 license_check_busy + Retry-After, cached keys are unaffected.
    max_verifications_per_second: float = 2000.0
    # "file": revoked license ids also come from a signed list (gateway.revocations), for
    # gateways that share no store.
    revocation_list: Literal["store", "file"] = "store"
    revocation_file: str = "revoked.jws"


class StoreSettings(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    url: str = "memory://"
    seed: str | None = None  # a tenants file imported at start (see tenants.example.toml)
    required_for_ready: bool = False  # /readyz fails while the store is unreachable


class EventSettings(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    sink: str = "stdout:"
    max_queue: int = 10_000
    license_invalid_per_second: float = 50.0  # sampled: a key flood is one incident


class ServerSettings(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    shutdown_deadline: float = 30.0  # seconds in-flight requests get after SIGTERM
    keepalive_timeout: float = 75.0
    max_header_bytes: int = 32 * 1024
    max_headers: int = 100
    max_body_bytes: int = 4 << 30  # larger request bodies get 413
    header_timeout: float = 10.0  # to receive a request head, once it has started
    body_timeout: float = 60.0  # longest pause inside a request body
    reload_poll_interval: float = 1.0  # seconds between checks of routes/matrix files


class AuditSettings(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    log: str | None = None  # the hash-chained audit log (gateway.audit); None: not kept


class EntitlementsApi(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    prefix: str = "/_entitlements"


class Settings(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    apps: dict[AppName, AppSettings]
    files: Files = Files()
    admin: AdminSettings = AdminSettings()
    license: LicenseSettings = LicenseSettings()
    store: StoreSettings = StoreSettings()
    events: EventSettings = EventSettings()
    entitlements: EntitlementsApi = EntitlementsApi()
    server: ServerSettings = ServerSettings()
    audit: AuditSettings = AuditSettings()


class Config:
    """Everything loaded from disk, validated and frozen. A reload builds a new one."""

    __slots__ = ("path", "settings", "matrix", "routes", "keyring", "classic", "policy")

    def __init__(
        self,
        path: Path,
        settings: Settings,
        matrix: TierMatrix,
        routes: RouteTable,
        keyring: KeyRing,
    ) -> None:
        self.path = path
        self.settings = settings
        self.matrix = matrix
        self.routes = routes
        self.keyring = keyring
        self.classic = ClassicKeys(settings.license.classic_key_pattern)
        self.policy = Policy(
            matrix=matrix,
            grace_seconds=settings.license.grace_days * 86400,
            clock_skew_seconds=settings.license.clock_skew_seconds,
            upgrade_url=f"{settings.entitlements.prefix}/ui",
        )

    def resolve(self, relative: str) -> Path:
        """A path from the config, relative to the config file's folder."""
        return (self.path.parent / relative).resolve()


_SECTIONS: dict[str, type[Any]] = {
    "files": Files,
    "admin": AdminSettings,
    "license": LicenseSettings,
    "store": StoreSettings,
    "events": EventSettings,
    "entitlements": EntitlementsApi,
    "server": ServerSettings,
    "audit": AuditSettings,
}


def load_settings(path: Path) -> Settings:
    """Parse and check ``gateway.toml`` alone."""
    doc, settings = _read_settings(path)
    doc.raise_if_problems()
    assert settings is not None
    return settings


def _read_settings(path: Path) -> tuple[TomlDocument, Settings | None]:
    """Convert ``gateway.toml`` section by section, so each problem names its own key and
    line; the problems stay in the returned document."""
    doc = TomlDocument.read(path)
    data = doc.data
    for unknown in sorted(set(data) - {"apps", *_SECTIONS}):
        doc.problem(
            unknown,
            f"unknown section (expected apps, {', '.join(_SECTIONS)})",
            line=doc.line_of_key(unknown),
        )
    sections: dict[str, Any] = {}
    for name, type_ in _SECTIONS.items():
        converted = doc.convert(data.get(name, {}), type_, key=name, header=f"[{name}]")
        sections[name] = converted if converted is not None else type_()
    apps: dict[AppName, AppSettings] = {}
    raw_apps = data.get("apps", {})
    if not isinstance(raw_apps, dict):
        doc.problem("apps", "must be a table of apps", line=doc.line_of_key("apps"))
        raw_apps = {}
    for name, raw in raw_apps.items():
        header = f"[apps.{name}]"
        if name not in APP_NAMES:
            doc.problem(
                f"apps.{name}",
                f"unknown app (expected one of {', '.join(APP_NAMES)})",
                header=header,
            )
            continue
        app = doc.convert(raw, AppSettings, key=f"apps.{name}", header=header)
        if app is not None:
            apps[name] = app
    if doc.problems:
        return doc, None
    settings = Settings(apps=apps, **sections)
    _check_settings(doc, settings)
    return doc, (None if doc.problems else settings)


def _check_settings(doc: TomlDocument, settings: Settings) -> None:
    if not settings.apps:
        doc.problem("apps", f"at least one app is required ({', '.join(APP_NAMES)})")
    listens: dict[str, str] = {}
    for name, app in settings.apps.items():
        header = f"[apps.{name}]"
        if not _HOST_PORT.match(app.listen):
            doc.problem(f"apps.{name}.listen", f"{app.listen!r} is not host:port", header=header)
        if not _UPSTREAM.match(app.upstream):
            doc.problem(
                f"apps.{name}.upstream",
                f"{app.upstream!r} is not http://host[:port]",
                header=header,
            )
        for prefix in app.classic_path_prefixes:
            if not prefix.startswith("/"):
                doc.problem(
                    f"apps.{name}.classic_path_prefixes",
                    f"{prefix!r} must start with '/'",
                    header=header,
                )
        for key in ("connect_timeout", "read_timeout", "queue_timeout", "max_connections"):
            if getattr(app, key) <= 0:
                doc.problem(f"apps.{name}.{key}", "must be positive", header=header)
        if app.listen in listens:
            doc.problem(
                f"apps.{name}.listen",
                f"{app.listen} is also the listener of {listens[app.listen]}",
                header=header,
            )
        listens[app.listen] = name
    if not _HOST_PORT.match(settings.admin.listen):
        doc.problem("admin.listen", f"{settings.admin.listen!r} is not host:port", header="[admin]")
    elif settings.admin.listen in listens:
        doc.problem("admin.listen", "same address as an app listener", header="[admin]")
    lic = settings.license
    for key in ("header", "tenant_header", "user_header", "role_header"):
        if not _HEADER.match(getattr(lic, key)):
            doc.problem(f"license.{key}", "not a valid header name", header="[license]")
    try:
        re.compile(lic.classic_key_pattern)
    except re.error as exc:
        doc.problem(
            "license.classic_key_pattern", f"bad regular expression: {exc}", header="[license]"
        )
    if lic.grace_days < 0 or lic.clock_skew_seconds < 0:
        doc.problem(
            "license", "grace_days and clock_skew_seconds must not be negative", header="[license]"
        )
    if not settings.entitlements.prefix.startswith("/") or settings.entitlements.prefix == "/":
        doc.problem(
            "entitlements.prefix", "must start with '/' and not be '/'", header="[entitlements]"
        )
    if not settings.store.url.startswith(("memory://", "sqlite://", "redis://", "rediss://")):
        doc.problem(
            "store.url",
            "expected memory://, sqlite:///path, redis://host:port/db or rediss:// (TLS)",
            header="[store]",
        )
    audit_log = settings.audit.log
    if audit_log is not None and not (doc.path.parent / audit_log).parent.is_dir():
        doc.problem("audit.log", "its folder does not exist", header="[audit]")
    if not settings.events.sink.startswith(("stdout:", "file://")):
        doc.problem(
            "events.sink",
            "expected stdout: or file:///path (an HTTP collector sink is not available yet)",
            header="[events]",
        )


def load_config(path: Path) -> Config:
    """Load ``gateway.toml`` and the files it names; ``ConfigError`` lists every problem
    in every file (a broken file never hides the problems of another)."""
    doc, settings = _read_settings(path)
    problems: list[ConfigProblem] = list(doc.problems)
    if settings is None:  # still check the other files, where gateway.toml says they are
        files = doc.convert(doc.data.get("files", {}), Files, key="files") or Files()
        lic = doc.convert(doc.data.get("license", {}), LicenseSettings, key="license")
        public_keys = (lic or LicenseSettings()).public_keys
    else:
        files, public_keys = settings.files, settings.license.public_keys
    base = path.parent
    matrix: TierMatrix | None = None
    routes: RouteTable | None = None
    keyring: KeyRing | None = None
    try:
        matrix = build_matrix(TomlDocument.read(base / files.tier_matrix))
    except ConfigError as exc:
        problems.extend(exc.problems)
    try:
        routes = build_routes(TomlDocument.read(base / files.routes), matrix)
    except ConfigError as exc:
        problems.extend(exc.problems)
    try:
        keyring = KeyRing.load(base / public_keys)
    except ConfigError as exc:
        problems.extend(exc.problems)
    if problems or settings is None or matrix is None or routes is None or keyring is None:
        raise ConfigError(problems)
    return Config(path.resolve(), settings, matrix, routes, keyring)


def load_rules(config: Config) -> tuple[TierMatrix, RouteTable]:
    """Re-read the two hot-reloadable files (routes, matrix) for a reload."""
    base = config.path.parent
    files = config.settings.files
    matrix = build_matrix(TomlDocument.read(base / files.tier_matrix))
    routes = build_routes(TomlDocument.read(base / files.routes), matrix)
    return matrix, routes
