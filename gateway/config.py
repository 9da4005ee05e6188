"""Loading ``gateway.toml`` and, through it, the route table, tier matrix and key ring.

Every key but an app's ``listen`` and ``upstream`` has a default; unknown keys are errors;
relative paths are relative to the file's own folder (docs/design.md §3). ``load_config`` checks
all files and raises one ``ConfigError`` listing every problem it found in any of them.

Longer than ~500 lines on purpose: each ``gateway.toml`` section's struct sits next to the
check that validates it, so one file answers "which keys exist, and what refuses them".

    config = load_config(Path("gateway.toml"))
    config.routes.apps["operations"].match("GET", "/api/v1/health")
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any, Final, Literal

import msgspec

from gateway.decision import Policy
from gateway.errors import ConfigError, ConfigProblem
from gateway.jwks import JwksError, parse_jwks, read_jwks_file
from gateway.license import DEFAULT_CLASSIC_PATTERN, ClassicKeys, KeyRing
from gateway.matrix import APP_NAMES, AppName, TierMatrix, build_matrix
from gateway.peers import parse_network
from gateway.rollout import (
    PLAIN,
    CandidateSettings,
    EnforceMode,
    RolloutSettings,
    check_rollout,
    load_rollout,
)
from gateway.routes import ROLES, PathCase, RouteTable, build_routes
from gateway.sinks import resolve_sink, sink_problem
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
    # "insensitive" when the upstream routes paths case-insensitively: routes then match
    # case-folded, so /API/... cannot dodge a gated /api/... route.
    path_case: PathCase = "sensitive"
    # Features the plan lacks, for this app's UIs (GET {prefix}): "hide" (phase 1) or
    # "tag" (phase 2: shown locked, with the tier that unlocks them).
    upsell: Literal["hide", "tag"] = "hide"
    # README "Rolling out": "shadow" decides but forwards anyway, "off" does not decide.
    enforce: EnforceMode = "on"
    default_hosts: tuple[str, ...] = ()  # host names that need no host_feature
    host_feature: str | None = None  # needed by a request to any other Host


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
    sink: str = "stdout:"  # or file:///path, file://relative, http(s)://collector/path
    max_queue: int = 10_000
    license_invalid_per_second: float = 50.0  # sampled: a key flood is one incident
    # every other refusal event (role_forbidden, path_rejected, identity_*...), per kind
    refusals_per_second: float = 50.0
    feature_blocks_per_interval: int = 10  # per (tenant, feature, tier); the rest counted
    summary_interval: float = 60.0  # seconds; feature_block_summary at each end
    batch_size: int = 1000  # events per write or POST
    max_bytes: int = 0  # file sink: rotate when a write would pass this size (0: never)
    backups: int = 5  # rotated files kept: events.jsonl.1 ... .5
    http_timeout: float = 5.0  # per POST to the collector
    retry_max_backoff: float = 30.0  # seconds between retries at most
    flush_deadline: float = 5.0  # at shutdown, for what is still queued


class AccessLogSettings(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    enabled: bool = True
    sink: str = "stdout:"  # or file:///path, file://relative (an HTTP collector works too)
    sample_allowed: float = 1.0  # share of forwarded requests logged; refusals always are
    max_queue: int = 10_000
    max_bytes: int = 0
    backups: int = 5


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
    # upgrade_complete's attributed_clicks / attributed_blocks look back this far
    attribution_days: int = 14


class SeatSettings(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """``[seats]``: how Operations users and drivers are counted (README "Seats and usage")."""

    # "recorded": seats in use are what `gateway tenant usage` recorded (checked on routes
    # with a quota); "active_users": every distinct user seen within the window holds one.
    mode: Literal["recorded", "active_users"] = "recorded"
    window_days: int = 30
    overage: float = 1.25  # new users allowed up to floor(included × overage), with a warning
    tier_overage: dict[str, float] = msgspec.field(default_factory=dict)
    warning_ratio: float = 0.9  # seat_warning once per window at this share of included
    client_header: str | None = None  # names the API client in usage metering


ALGORITHMS: Final = ("RS256", "ES256", "EdDSA")  # for bearer tokens; never none or HS*
UNCONFIGURED_WARNING: Final = (
    "no [identity] section: headers trusted from any peer (tenant, user and role headers "
    'decide plans and roles; set mode = "headers" with trusted_peers, or mode = "jwt")'
)


class IdentitySettings(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """``[identity]`` (README, Identity): who is asking, from headers or bearer tokens."""

    mode: Literal["headers", "jwt"]
    tenant_mismatch: Literal["refuse", "allow"] = "refuse"  # license sub vs identified tenant
    # mode = "headers"
    trusted_peers: tuple[str, ...] = ()
    trusted_proxies: tuple[str, ...] = ()
    # mode = "jwt"
    header: str = "Authorization"
    jwks_url: str | None = None
    jwks_file: str | None = None
    issuer: str | None = None
    audience: str | None = None
    algorithms: tuple[str, ...] = ALGORITHMS
    clock_skew_seconds: int = 60
    tenant_claim: str = "tenant"
    user_claim: str = "sub"
    role_claim: str = "role"
    role_map: dict[str, str] = {}
    jwks_timeout_seconds: float = 5.0
    jwks_refresh_seconds: float = 300.0
    jwks_min_refresh_seconds: float = 10.0  # between refreshes asked for by unknown kids


# Reminders are deduplicated by claiming an id in the store's provisioning-event table, which
# forgets ids after 30 days (gateway.store: the Redis expiry and the SQLite clean-up). A
# threshold's claim is made within its lead time of the end, so it outlives that end as
# long as no lead time is longer than the retention (README "Reminders").
MAX_LEAD_DAYS = 30


class ReminderSettings(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """``[reminders]``: ``license_expiring`` events before a license, trial or grandfather
    window ends (README "Reminders")."""

    enabled: bool = True
    lead_days: tuple[int, ...] = (30, 7, 1)
    interval_seconds: float = 3600.0  # between scans of the store's tenants


class Settings(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    apps: dict[AppName, AppSettings]
    files: Files = Files()
    admin: AdminSettings = AdminSettings()
    license: LicenseSettings = LicenseSettings()
    store: StoreSettings = StoreSettings()
    events: EventSettings = EventSettings()
    access_log: AccessLogSettings = AccessLogSettings()
    entitlements: EntitlementsApi = EntitlementsApi()
    server: ServerSettings = ServerSettings()
    seats: SeatSettings = SeatSettings()
    identity: IdentitySettings | None = None  # None: headers trusted from any peer
    audit: AuditSettings = AuditSettings()
    reminders: ReminderSettings = ReminderSettings()
    rollout: RolloutSettings = RolloutSettings()
    candidate: CandidateSettings = CandidateSettings()


class Config:
    """Everything loaded from disk, validated and frozen. A reload builds a new one."""

    __slots__ = ("path", "settings", "matrix", "routes", "keyring", "classic", "policy", "rollout")

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
            seat_mode=settings.seats.mode,
        )
        self.rollout = PLAIN  # load_config reads the rollout's files (gateway.rollout)

    def resolve(self, relative: str) -> Path:
        """A path from the config, relative to the config file's folder."""
        return (self.path.parent / relative).resolve()

    @property
    def audit_log(self) -> Path | None:
        """``[audit] log``, resolved against the config file's folder; None: not configured."""
        log = self.settings.audit.log
        return self.resolve(log) if log else None

    @property
    def store_url(self) -> str:
        """``store.url``; ``sqlite://relative.db`` is relative to the config file's folder."""
        url = self.settings.store.url
        if url.startswith("sqlite://") and not url.startswith("sqlite:///"):
            return "sqlite:///" + str(self.resolve(url[len("sqlite://") :]))
        return url

    @property
    def events_sink(self) -> str:
        """``events.sink``; ``file://relative/path`` is relative to the config file's folder."""
        return resolve_sink(self.settings.events.sink, self.path.parent)

    @property
    def access_log_sink(self) -> str:
        """``access_log.sink``, resolved like ``events_sink``."""
        return resolve_sink(self.settings.access_log.sink, self.path.parent)


_SECTIONS: dict[str, type[Any]] = {
    "files": Files,
    "admin": AdminSettings,
    "license": LicenseSettings,
    "store": StoreSettings,
    "events": EventSettings,
    "access_log": AccessLogSettings,
    "entitlements": EntitlementsApi,
    "server": ServerSettings,
    "seats": SeatSettings,
    "audit": AuditSettings,
    "reminders": ReminderSettings,
    "rollout": RolloutSettings,
    "candidate": CandidateSettings,
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
    for unknown in sorted(set(data) - {"apps", "identity", *_SECTIONS}):
        doc.problem(
            unknown,
            f"unknown section (expected apps, {', '.join(_SECTIONS)}, identity)",
            line=doc.line_of_key(unknown),
        )
    sections: dict[str, Any] = {}
    for name, type_ in _SECTIONS.items():
        converted = doc.convert(data.get(name, {}), type_, key=name, header=f"[{name}]")
        sections[name] = converted if converted is not None else type_()
    if "identity" in data:  # optional, and without defaults: mode must be chosen
        sections["identity"] = doc.convert(
            data["identity"], IdentitySettings, key="identity", header="[identity]"
        )
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
            if not _positive(getattr(app, key)):
                doc.problem(f"apps.{name}.{key}", "must be positive", header=header)
        if app.listen in listens:
            doc.problem(
                f"apps.{name}.listen",
                f"{app.listen} is also the listener of {listens[app.listen]}",
                header=header,
            )
        listens[app.listen] = name
    # Every [server] setting is a timeout or a limit: zero or less would spin a watchdog
    # (a zero header timeout fires at once, over and over), refuse every request or never
    # drain. nan passes "<= 0" (TOML has nan and inf), hence the explicit check.
    for field in msgspec.structs.fields(ServerSettings):
        if not _positive(getattr(settings.server, field.name)):
            doc.problem(f"server.{field.name}", "must be positive", header="[server]")
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
    if settings.entitlements.attribution_days < 1:
        doc.problem("entitlements.attribution_days", "must be at least 1", header="[entitlements]")
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
    _check_seats(doc, settings.seats)
    check_rollout(doc, settings)
    _check_spools(doc, settings)
    _check_reminders(doc, settings.reminders)
    if settings.identity is not None:
        _check_identity(doc, settings.identity, lic)


def _check_spools(doc: TomlDocument, settings: Settings) -> None:
    """``[events]`` and ``[access_log]``: where their lines go and the bounds on them."""
    events, access = settings.events, settings.access_log
    checks: list[tuple[str, bool, str]] = [
        ("events.feature_blocks_per_interval", events.feature_blocks_per_interval >= 0, ">= 0"),
        ("events.license_invalid_per_second", events.license_invalid_per_second >= 0, ">= 0"),
        ("events.refusals_per_second", events.refusals_per_second >= 0, ">= 0"),
        ("access_log.sample_allowed", 0 <= access.sample_allowed <= 1, "between 0 and 1"),
    ]
    for key in ("batch_size", "summary_interval", "http_timeout", "retry_max_backoff"):
        checks.append((f"events.{key}", getattr(events, key) > 0, "> 0"))
    checks.append(("events.flush_deadline", events.flush_deadline >= 0, ">= 0"))
    for section, spool in (("events", events), ("access_log", access)):
        problem = sink_problem(spool.sink)
        if problem is not None:
            doc.problem(f"{section}.sink", problem, header=f"[{section}]")
        checks.append((f"{section}.max_queue", spool.max_queue > 0, "> 0"))
        checks.append((f"{section}.max_bytes", spool.max_bytes >= 0, ">= 0 (0: never rotate)"))
        checks.append((f"{section}.backups", spool.backups >= 1, ">= 1"))
    for key, ok, expected in checks:
        if not ok:
            doc.problem(key, f"must be {expected}", header=f"[{key.split('.')[0]}]")


def _positive(value: float) -> bool:
    """Above zero and finite (``nan`` compares false with everything)."""
    return value > 0 and math.isfinite(value)


def _check_seats(doc: TomlDocument, seats: SeatSettings) -> None:
    if seats.window_days < 1:
        doc.problem("seats.window_days", "must be at least 1", header="[seats]")
    for key, overage in [("overage", seats.overage)] + [
        (f"tier_overage.{tier}", value) for tier, value in seats.tier_overage.items()
    ]:
        if not 1.0 <= overage <= 100.0:
            doc.problem(f"seats.{key}", "must be between 1.0 and 100", header="[seats]")
    if not 0.0 < seats.warning_ratio <= 1.0:
        doc.problem("seats.warning_ratio", "must be above 0 and at most 1", header="[seats]")
    if seats.client_header is not None and not _HEADER.match(seats.client_header):
        doc.problem("seats.client_header", "not a valid header name", header="[seats]")


_HEADERS_ONLY = ("trusted_peers", "trusted_proxies")
_JWT_ONLY = tuple(
    name
    for name in IdentitySettings.__struct_fields__
    if name not in (*_HEADERS_ONLY, "mode", "tenant_mismatch")
)


def _check_identity(doc: TomlDocument, ident: IdentitySettings, lic: LicenseSettings) -> None:
    found: list[tuple[str, str]] = []
    other, mode = (_JWT_ONLY, "jwt") if ident.mode == "headers" else (_HEADERS_ONLY, "headers")
    found += [
        (key, f'only used with mode = "{mode}"') for key in other if key in doc.data["identity"]
    ]
    if ident.mode == "headers":
        if not ident.trusted_peers:
            why = 'required with mode = "headers": where the identity headers come from'
            found.append(("trusted_peers", why + ', e.g. ["10.0.0.5/32"]'))
        for key in _HEADERS_ONLY:
            for text in getattr(ident, key):
                try:
                    parse_network(text)
                except ValueError as exc:
                    found.append((key, f"{text!r} is not an address or network: {exc}"))
    else:
        found += _jwt_problems(ident, lic)
    for key, message in found:
        doc.problem(f"identity.{key}", message, header="[identity]")


def _jwt_problems(ident: IdentitySettings, lic: LicenseSettings) -> list[tuple[str, str]]:
    found: list[tuple[str, str]] = []
    if (ident.jwks_url is None) == (ident.jwks_file is None):
        found.append(("jwks_url", 'exactly one of jwks_url and jwks_file with mode = "jwt"'))
    if ident.jwks_url is not None and not ident.jwks_url.startswith(("https://", "http://")):
        found.append(("jwks_url", "must be an https:// (or http://) URL"))
    for key in ("issuer", "audience"):
        if not getattr(ident, key):
            found.append((key, f'required with mode = "jwt": every token\'s {key} must match'))
    if not ident.algorithms:
        found.append(("algorithms", f"at least one of {', '.join(ALGORITHMS)}"))
    for alg in ident.algorithms:
        if alg.lower() == "none":
            why = "refused: unsigned tokens would be accepted"
        elif alg.upper().startswith("HS"):
            why = "refused: with a shared secret, whoever holds the provider's public key signs"
        elif alg not in ALGORITHMS:
            why = f"not supported (use {', '.join(ALGORITHMS)})"
        else:
            continue
        found.append(("algorithms", f"{alg!r} is {why}"))
    reserved = {
        h.lower() for h in (lic.header, lic.tenant_header, lic.user_header, lic.role_header)
    }
    if not _HEADER.match(ident.header):
        found.append(("header", "not a valid header name"))
    elif ident.header.lower() in reserved:
        found.append(("header", "already read by [license] for another purpose"))
    found += [
        (k, "must not be empty")
        for k in ("tenant_claim", "user_claim", "role_claim")
        if not getattr(ident, k)
    ]
    for value, role in ident.role_map.items():
        if role not in ROLES:
            found.append(("role_map", f"{value!r} maps to {role!r}, not one of {', '.join(ROLES)}"))
    checks = [
        ("clock_skew_seconds", ident.clock_skew_seconds >= 0, "must not be negative"),
        ("jwks_timeout_seconds", ident.jwks_timeout_seconds > 0, "must be > 0"),
        ("jwks_refresh_seconds", ident.jwks_refresh_seconds > 0, "must be > 0"),
        ("jwks_min_refresh_seconds", ident.jwks_min_refresh_seconds >= 0, "must not be negative"),
    ]
    return found + [(key, message) for key, ok, message in checks if not ok]


def _jwks_file_problem(settings: Settings, base: Path) -> ConfigProblem | None:
    """``jwks_file`` is read and parsed now, so ``gateway check`` finds a broken one."""
    ident = settings.identity
    if ident is None or ident.mode != "jwt" or ident.jwks_file is None:
        return None
    try:
        parse_jwks(read_jwks_file(base / ident.jwks_file), frozenset(ident.algorithms))
    except JwksError as exc:
        return ConfigProblem(str(base / "gateway.toml"), "identity.jwks_file", str(exc))
    return None


def _check_reminders(doc: TomlDocument, reminders: ReminderSettings) -> None:
    if not _positive(reminders.interval_seconds):
        doc.problem("reminders.interval_seconds", "must be positive", header="[reminders]")
    if reminders.enabled and not reminders.lead_days:
        doc.problem(
            "reminders.lead_days", "must list at least one lead time (or enabled = false)",
            header="[reminders]",
        )  # fmt: skip
    for days in reminders.lead_days:
        if not 1 <= days <= MAX_LEAD_DAYS:
            doc.problem(
                "reminders.lead_days",
                f"{days}: each lead time must be 1 to {MAX_LEAD_DAYS} days (the store "
                f"remembers a sent reminder for {MAX_LEAD_DAYS} days)",
                header="[reminders]",
            )
    if len(set(reminders.lead_days)) != len(reminders.lead_days):
        doc.problem("reminders.lead_days", "lists a lead time twice", header="[reminders]")


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
        jwks = _jwks_file_problem(settings, path.parent)
        problems += [jwks] if jwks is not None else []
    base = path.parent
    matrix: TierMatrix | None = None
    routes: RouteTable | None = None
    keyring: KeyRing | None = None
    try:
        matrix = build_matrix(TomlDocument.read(base / files.tier_matrix))
    except ConfigError as exc:
        problems.extend(exc.problems)
    try:
        path_case = _path_case(settings) if settings is not None else None
        routes = build_routes(TomlDocument.read(base / files.routes), matrix, path_case)
    except ConfigError as exc:
        problems.extend(exc.problems)
    try:
        keyring = KeyRing.load(base / public_keys)
    except ConfigError as exc:
        problems.extend(exc.problems)
    if settings is not None and matrix is not None:
        for tier in settings.seats.tier_overage:
            if tier not in matrix.tiers:
                problems.append(
                    ConfigProblem(
                        doc.name,
                        f"seats.tier_overage.{tier}",
                        f"unknown tier {tier!r} (known: {', '.join(matrix.tiers)})",
                        doc.line_of("[seats]"),
                    )
                )
    if problems or settings is None or matrix is None or routes is None or keyring is None:
        raise ConfigError(problems)
    config = Config(path.resolve(), settings, matrix, routes, keyring)
    config.rollout = load_rollout(config)
    return config


def load_rules(config: Config) -> tuple[TierMatrix, RouteTable]:
    """Re-read the two hot-reloadable files (routes, matrix) for a reload."""
    base = config.path.parent
    files = config.settings.files
    matrix = build_matrix(TomlDocument.read(base / files.tier_matrix))
    routes = build_routes(
        TomlDocument.read(base / files.routes), matrix, _path_case(config.settings)
    )
    return matrix, routes


def _path_case(settings: Settings) -> dict[AppName, PathCase]:
    return {name: app.path_case for name, app in settings.apps.items()}


def config_warnings(config: Config) -> list[str]:
    """What ``gateway check`` warns about (errors under ``--strict``): valid, but probably
    not what is meant."""
    found: list[str] = []
    routes = list(config.routes.routes())
    unrouted = sorted(set(config.matrix.features) - {r.feature for r in routes if r.feature})
    if unrouted:
        found.append(f"features with no route (nothing is gated by them): {', '.join(unrouted)}")
    for name in config.settings.apps:
        app_routes = config.routes.apps[name]
        if app_routes.unmatched != "allow":
            continue
        found.append(
            f'apps.{name}: unmatched = "allow": unmapped paths, and case or suffix '
            "variants of gated ones (/API/..., /x.json) a lenient upstream may route to "
            'the gated handler, pass with any valid license; use "deny" or path_case '
            "(docs/route-authoring.md#the-unmatched-policy)"
        )
        for group in app_routes.shared_paths():
            features = sorted({route.feature for route in group if route.feature})
            listed = {m for route in group for m in route.methods or ()}
            open_methods = [m for m in _COMMON_METHODS if m not in listed]
            if features and open_methods:
                found.append(
                    f"{' and '.join(route.where() for route in group)} share "
                    f"{group[0].path!r}: {', '.join(open_methods)} (listed by none) pass with "
                    f'any valid license under unmatched = "allow", not gated by '
                    f"{', '.join(features)}; list them in one route's `methods`"
                )
    if not config.keyring.keys:
        found.append("no public keys: every signed license will be refused")
    return found + _identity_warnings(config.settings)


def _identity_warnings(settings: Settings) -> list[str]:
    ident = settings.identity
    if ident is None:
        return [UNCONFIGURED_WARNING]
    found: list[str] = []
    for text in ident.trusted_peers if ident.mode == "headers" else ():
        if parse_network(text).prefixlen == 0:
            found.append(f"identity.trusted_peers: {text} trusts every address")
    if ident.mode == "jwt" and (ident.jwks_url or "").startswith("http://"):
        found.append(
            "identity.jwks_url is plain http: whoever can alter the traffic can swap the "
            "provider's keys and sign any identity"
        )
    return found


_COMMON_METHODS = ("GET", "POST", "PUT", "PATCH", "DELETE")
