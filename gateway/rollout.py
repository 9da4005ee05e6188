"""Rolling enforcement out (README, Rolling out): per-app enforcement modes, the cohort of
tenants enforced on a shadow app, a candidate configuration decided alongside the live one,
and features that follow the Host a request came to.

* ``[apps.<name>] enforce = "on" | "shadow" | "off"``: ``shadow`` decides every request as
  ``on`` would and forwards it anyway (outcome ``shadow_blocked``), ``off`` forwards without
  deciding (outcome ``unenforced``).
* ``[rollout] enforce_tenants`` / ``enforce_tenants_file``: on a shadow app these tenants
  are enforced, everyone else is shadowed (phase 1 in one line of config).
* ``[candidate] routes`` / ``tier_matrix``: every decided request is decided again with
  them; differences are counted and sampled, never acted on.
* ``[apps.<name>] default_hosts`` / ``host_feature``: a request to another Host needs that
  feature (personalized URLs, white labelling).

All of it is read into one ``Rollout`` with the route table (and again at every reload);
``Rollout.plain`` says there is nothing to do, so the request path pays one attribute
check when none of it is configured.

    rollout = load_rollout(config)           # ConfigError lists every problem
    app = rollout.apps.get("client_portal")  # None: enforce = "on", no host feature
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, Final, Literal

import msgspec

from gateway.decision import STATUS, Decision, Policy
from gateway.errors import ConfigError, ConfigProblem
from gateway.matrix import TierMatrix, build_matrix
from gateway.routes import RouteTable, build_routes
from gateway.tomlfile import TomlDocument

if TYPE_CHECKING:
    from gateway.config import Config, Settings
    from gateway.matrix import AppName

EnforceMode = Literal["on", "shadow", "off"]
MAX_COHORT = 1_000_000  # tenant ids in enforce_tenants(_file), a bound on memory
_HOST = re.compile(
    r"^(?=.{1,253}$)[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?(\.[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)*$"
)
_TENANT = re.compile(r"^\S{1,256}$")


class RolloutSettings(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """``[rollout]``: the tenants enforced on ``enforce = "shadow"`` apps."""

    enforce_tenants: tuple[str, ...] = ()
    enforce_tenants_file: str | None = None  # one tenant id per line, "#" comments


class CandidateSettings(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """``[candidate]``: files decided alongside the live ones (never acted on)."""

    routes: str | None = None
    tier_matrix: str | None = None


class AppRollout:
    """One app's part: its mode and its host rule."""

    __slots__ = ("mode", "default_hosts", "host_feature")

    def __init__(
        self, mode: EnforceMode, default_hosts: frozenset[bytes], host_feature: str | None
    ) -> None:
        self.mode = mode
        self.default_hosts = default_hosts  # lower-case, without port
        self.host_feature = host_feature

    def other_host(self, host: bytes | None) -> bytes | None:
        """The request's host name when it is not a default host (and a host feature
        applies), else None. No Host header counts as a default host."""
        if self.host_feature is None or host is None:
            return None
        name = host_name(host)
        return None if name in self.default_hosts else name


class Candidate:
    """The candidate configuration: its route table and decision policy."""

    __slots__ = ("routes", "matrix", "policy", "revision")

    def __init__(self, routes: RouteTable, matrix: TierMatrix, policy: Policy) -> None:
        self.routes = routes
        self.matrix = matrix
        self.policy = policy
        self.revision = f"{routes.sha}/{matrix.sha}"


class Rollout:
    """Everything of the rollout for one ``Rules`` (swapped with it on reload)."""

    __slots__ = ("apps", "cohort", "candidate", "modes", "plain")

    def __init__(
        self,
        apps: dict[AppName, AppRollout],
        cohort: frozenset[str],
        candidate: Candidate | None,
        modes: dict[AppName, EnforceMode],
    ) -> None:
        self.apps = apps  # only apps with something to do: not "on", or a host feature
        self.cohort = cohort
        self.candidate = candidate
        self.modes = modes  # every app's mode, for gateway_config_info and /admin/config
        self.plain = not apps and candidate is None

    def describe(self) -> str:
        """``operations=on,client_portal=shadow,...``: the modes as one label value."""
        return ",".join(f"{app}={mode}" for app, mode in self.modes.items())


PLAIN: Final = Rollout({}, frozenset(), None, {})


def host_name(host: bytes) -> bytes:
    """``Example.COM:8443`` → ``example.com``; ``[::1]:80`` → ``[::1]``."""
    host = host.strip().lower()
    if host.startswith(b"["):
        return host[: host.find(b"]") + 1]
    return host.partition(b":")[0].rstrip(b".")


def read_cohort(path: Path) -> frozenset[str]:
    """Tenant ids, one per line; blank lines and ``#`` comments ignored."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError.single(str(path), "rollout.enforce_tenants_file", str(exc)) from exc
    tenants: set[str] = set()
    problems: list[ConfigProblem] = []
    for number, line in enumerate(text.splitlines(), 1):
        tenant = line.split("#", 1)[0].strip()
        if not tenant:
            continue
        if not _TENANT.match(tenant):
            problems.append(
                ConfigProblem(str(path), "rollout.enforce_tenants_file", "not a tenant id", number)
            )
        tenants.add(tenant)
    if len(tenants) > MAX_COHORT:
        problems.append(
            ConfigProblem(str(path), "rollout.enforce_tenants_file", f"over {MAX_COHORT} tenants")
        )
    if problems:
        raise ConfigError(problems)
    return frozenset(tenants)


def check_rollout(doc: TomlDocument, settings: Settings) -> None:
    """What ``gateway check`` can tell from ``gateway.toml`` alone."""
    for name, app in settings.apps.items():
        header = f"[apps.{name}]"
        for host in app.default_hosts:
            if not _HOST.match(host.lower().rstrip(".")):
                doc.problem(
                    f"apps.{name}.default_hosts", f"{host!r} is not a host name", header=header
                )
        if app.host_feature is not None and not app.default_hosts:
            doc.problem(
                f"apps.{name}.host_feature",
                "needs default_hosts: the host names that need no feature",
                header=header,
            )
    for tenant in settings.rollout.enforce_tenants:
        if not _TENANT.match(tenant):
            doc.problem(
                "rollout.enforce_tenants", f"{tenant!r} is not a tenant id", header="[rollout]"
            )


def load_rollout(
    config: Config, settings: Settings | None = None, matrix: TierMatrix | None = None
) -> Rollout:
    """The rollout ``settings`` (default: the config's) describe, with its files read and
    checked against ``matrix`` (default: the config's); ``ConfigError`` lists every problem.
    A reload passes the settings and matrix it has just read."""
    settings = settings if settings is not None else config.settings
    matrix = matrix if matrix is not None else config.matrix
    base = config.path.parent
    problems: list[ConfigProblem] = []
    where = str(config.path)
    apps: dict[AppName, AppRollout] = {}
    modes: dict[AppName, EnforceMode] = {}
    for name, app in settings.apps.items():
        modes[name] = app.enforce
        feature = app.host_feature
        if feature is not None and feature not in matrix.features:
            problems.append(
                ConfigProblem(where, f"apps.{name}.host_feature", f"unknown feature {feature!r}")
            )
        elif feature is not None and matrix.features[feature].app != name:
            problems.append(
                ConfigProblem(
                    where, f"apps.{name}.host_feature", f"{feature!r} is not a feature of {name}"
                )
            )
        if app.enforce != "on" or feature is not None:
            hosts = frozenset(host_name(host.encode()) for host in app.default_hosts)
            apps[name] = AppRollout(app.enforce, hosts, feature)
    cohort: set[str] = set(settings.rollout.enforce_tenants)
    if settings.rollout.enforce_tenants_file is not None:
        try:
            cohort |= read_cohort(base / settings.rollout.enforce_tenants_file)
        except ConfigError as exc:
            problems.extend(exc.problems)
    candidate = None
    try:
        candidate = _candidate(config, settings, matrix)
    except ConfigError as exc:
        problems.extend(exc.problems)
    if problems:
        raise ConfigError(problems)
    return Rollout(apps, frozenset(cohort), candidate, modes)


def _candidate(config: Config, settings: Settings, matrix: TierMatrix) -> Candidate | None:
    files = settings.candidate
    if files.routes is None and files.tier_matrix is None:
        return None
    base = config.path.parent
    if files.tier_matrix is not None:
        matrix = build_matrix(TomlDocument.read(base / files.tier_matrix))
    routes_file = files.routes if files.routes is not None else settings.files.routes
    path_case = {name: app.path_case for name, app in settings.apps.items()}
    routes = build_routes(TomlDocument.read(base / routes_file), matrix, path_case)
    return Candidate(routes, matrix, msgspec.structs.replace(config.policy, matrix=matrix))


def watched_files(config: Config, settings: Settings | None = None) -> list[Path]:
    """The rollout's files the runtime watches for a reload (like routes.toml)."""
    settings = settings if settings is not None else config.settings
    names = [
        settings.rollout.enforce_tenants_file,
        settings.candidate.routes,
        settings.candidate.tier_matrix,
    ]
    return [config.resolve(name) for name in names if name is not None]


_ID_SEGMENT = re.compile(
    r"^(\d+|[0-9a-fA-F]{8,}|[0-9a-fA-F-]{32,36}"
    r"|(?=[A-Za-z0-9_-]{6,}$)[A-Za-z0-9_-]*\d[A-Za-z0-9_-]*\d[A-Za-z0-9_-]*)$"
)


def path_shape(path: str) -> str:
    """A path with its ids replaced (``/api/v1/orders/123/items/ab12cd34ef`` →
    ``/api/v1/orders/{id}/items/{id}``): what an unmapped endpoint looks like, without the
    values in it. A segment is an id when it is a number, a hex string of 8 or more, a UUID,
    or 6 characters or more with two digits or more."""
    return "/".join("{id}" if _ID_SEGMENT.match(part) else part for part in path.split("/"))


def host_denial(matrix: TierMatrix, allowed: Decision, feature: str, host: bytes) -> Decision:
    """The 403 for a request the plan allows but whose Host needs ``feature`` it lacks
    (the same answer as a route gated by that feature)."""
    tier = allowed.tier
    assert tier is not None
    required, addon = matrix.upgrade_path(tier, feature)
    title = matrix.features[feature].title
    return Decision(
        allowed=False,
        status=STATUS["feature_not_entitled"],
        code="feature_not_entitled",
        detail=f"{title} (host {host.decode('latin-1')}) is not in the "
        f"{matrix.tiers[tier].title} plan",
        feature=feature,
        tier=tier,
        required_tier=required.name if required else None,
        addon=addon.name if addon else None,
        upsell=allowed.upsell,
        license=allowed.license,
        warning=allowed.warning,
    )
