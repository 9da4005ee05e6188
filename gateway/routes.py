"""The route table: which product feature each ``(app, method, path)`` belongs to.

``routes.toml`` (docs/design.md §3) is compiled once into a per-app segment trie: a lookup walks the
path's segments (literal child first, then ``{name}``, then ``{name:path}``), so its cost is
the length of the path, never the number of routes. The most specific route wins segment by
segment; two routes of equal specificity that can match one request are rejected at compile
time, like werkzeug's ``DuplicateRuleError``.

    table = load_routes(Path("routes.toml"), matrix)
    found = table.apps["operations"].match("POST", "/api/v1/shipments/7/optimize")
    found.kind is Match.FULL and found.route.feature == "ops.basic_shipment_optimization"
"""

from __future__ import annotations

import enum
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Literal

import msgspec

from gateway.matrix import APP_NAMES, AppName, TierMatrix
from gateway.tomlfile import TomlDocument

Role = Literal["owner", "admin", "standard", "dispatch_only"]
ROLES: tuple[Role, ...] = ("owner", "admin", "standard", "dispatch_only")
QuotaName = Literal["ops_users", "drivers"]
PathCase = Literal["sensitive", "insensitive"]

_PARAM = re.compile(r"^\{([A-Za-z_][A-Za-z0-9_]*)(:path)?\}$")
_METHOD = re.compile(r"^[A-Z][A-Z-]*$")
# Literal segments may hold only what a canonical path can hold (docs/design.md §5, RFC 3986 pchar
# without percent-encoding): a literal the canonicaliser could never produce never matches.
_LITERAL = re.compile(r"^[A-Za-z0-9\-._~!$&'()*+,=:@]+$")
_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,79}$")
_METHOD_ORDER = {m: i for i, m in enumerate(("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE"))}


class Match(enum.Enum):
    """Three-valued lookup result, like Starlette's ``Match``."""

    NONE = 0  # no route has this path
    PARTIAL = 1  # a route has this path, but not for this method
    FULL = 2


class AppPolicy(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    unmatched: Literal["allow", "deny"] = "allow"


class RouteSpec(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    app: AppName
    path: str
    name: str | None = None  # stable, unique: shown by explain, events, the access log
    methods: tuple[str, ...] | None = None
    feature: str | None = None
    public: bool = False
    roles: tuple[Role, ...] | None = None  # None: every role
    quota: QuotaName | None = None  # this call adds one of these seats


class Route(msgspec.Struct, frozen=True):
    """One compiled route. ``key`` and ``line`` point back into ``routes.toml``; ``name``
    is the author's stable name for it, when given."""

    app: AppName
    path: str
    methods: frozenset[str] | None
    feature: str | None
    public: bool
    roles: frozenset[str] | None
    quota: QuotaName | None
    key: str
    line: int | None
    name: str | None = None

    @property
    def label(self) -> str:
        """How tools name the route: its ``name``, else its place (``routes[12]``)."""
        return self.name or self.key

    def where(self) -> str:
        """``routes[12] 'ops.users.create' at line 40``: enough to find it in the file."""
        name = f" {self.name!r}" if self.name else ""
        line = f" at line {self.line}" if self.line is not None else ""
        return f"{self.key}{name}{line}"


class RouteMatch(msgspec.Struct, frozen=True):
    """A lookup's answer. A PARTIAL match on a path that several same-shape routes share
    (none of them listing the method) has no ``route``: the app's ``unmatched`` policy
    decides, so the answer never depends on which of them comes first in the file;
    ``shared`` names them for ``explain``."""

    kind: Match
    route: Route | None
    shared: tuple[Route, ...] = ()


NO_MATCH = RouteMatch(Match.NONE, None)


class _Leaf:
    """Routes that end at one trie position (one shape), by method; results are built
    once here."""

    __slots__ = ("by_method", "any_method", "partial", "routes")

    def __init__(self) -> None:
        self.by_method: dict[str, RouteMatch] = {}
        self.any_method: RouteMatch | None = None
        self.partial: RouteMatch | None = None
        self.routes: list[Route] = []


class _Node:
    __slots__ = ("literal", "param", "catchall", "leaf")

    def __init__(self) -> None:
        self.literal: dict[str, _Node] = {}
        self.param: _Node | None = None
        self.catchall: _Leaf | None = None
        self.leaf: _Leaf | None = None


class AppRoutes:
    """The compiled routes of one app and its policy for unmatched paths.

    Build one with ``app_routes(...)``: an app with ``path_case = "insensitive"`` gets the
    subclass that folds the case, so the case-sensitive lookup pays nothing for it."""

    __slots__ = ("app", "unmatched", "path_case", "routes", "_root", "_leaves")

    def __init__(
        self,
        app: AppName,
        unmatched: Literal["allow", "deny"],
        path_case: PathCase = "sensitive",
    ) -> None:
        self.app = app
        self.unmatched = unmatched
        self.path_case = path_case
        self.routes: list[Route] = []
        self._root = _Node()
        self._leaves: list[_Leaf] = []

    def match(self, method: str, path: str) -> RouteMatch:
        """Look up a canonical path (docs/design.md §5); one trailing slash is not significant.

        Depth-first in specificity order (literal child, then ``{name}``, then
        ``{name:path}``), so the first FULL match found is the most specific one and the
        first path match is the PARTIAL answer. Iterative, with a branch stack that only
        grows where a node offers alternatives: no recursion, no per-level tuples.

        A ``{name:path}`` also takes the empty remainder (``/phi`` and ``/phi/`` for
        ``/phi/{rest:path}``), after a route ending exactly there: upstream routers
        (Starlette ``{x:path}``, Express ``/*``, Spring ``/**``) send those paths to the
        catch-all's handler, so leaving them unmatched would forward them ungated."""
        if len(path) > 1 and path[-1] == "/":
            path = path[:-1]
        segments = path.split("/")
        # "/" splits into ["", ""]: zero segments after the leading slash.
        count = len(segments) if len(path) > 1 else 1
        partial: RouteMatch | None = None
        branches: list[tuple[_Node, int, int]] = []
        node = self._root
        i = 1
        stage = 0  # 0: literal child next, 1: {name} next, 2: {name:path} next
        while True:
            if i == count:
                leaf = node.leaf
                if leaf is not None:
                    found = leaf.by_method.get(method) or leaf.any_method
                    if found is not None:
                        return found
                    if partial is None:
                        partial = leaf.partial
                catchall = node.catchall  # with the empty remainder, after the exact end
            else:
                segment = segments[i]
                if stage == 0:
                    child = node.literal.get(segment)
                    if child is not None:
                        if node.param is not None or node.catchall is not None:
                            branches.append((node, i, 1))
                        node = child
                        i += 1
                        continue
                    stage = 1
                if stage == 1:
                    if node.param is not None and segment:
                        if node.catchall is not None:
                            branches.append((node, i, 2))
                        node = node.param
                        i += 1
                        stage = 0
                        continue
                    stage = 2
                catchall = node.catchall if segment else None
            if catchall is not None:
                found = catchall.by_method.get(method) or catchall.any_method
                if found is not None:
                    return found
                if partial is None:
                    partial = catchall.partial
            if not branches:
                return partial if partial is not None else NO_MATCH
            node, i, stage = branches.pop()

    def _add(self, route: Route, segments: list[str]) -> Route | None:
        """Insert ``route``; return the route it conflicts with, if any."""
        node = self._root
        leaf: _Leaf | None = None
        for position, segment in enumerate(segments):
            param = _PARAM.match(segment)
            if param and param.group(2):
                assert position == len(segments) - 1
                if node.catchall is None:
                    node.catchall = _Leaf()
                leaf = node.catchall
                break
            if param:
                if node.param is None:
                    node.param = _Node()
                node = node.param
            else:
                if self.path_case == "insensitive":
                    segment = segment.lower()
                node = node.literal.setdefault(segment, _Node())
        if leaf is None:
            if node.leaf is None:
                node.leaf = _Leaf()
            leaf = node.leaf
        if not leaf.routes:
            self._leaves.append(leaf)
        full = RouteMatch(Match.FULL, route)
        if route.methods is None:
            clash = leaf.any_method or next(iter(leaf.by_method.values()), None)
            if clash is not None:
                return clash.route
            leaf.any_method = full
        else:
            for method in sorted(route.methods):
                clash = leaf.by_method.get(method) or leaf.any_method
                if clash is not None:
                    return clash.route
            for method in route.methods:
                leaf.by_method[method] = full
        leaf.routes.append(route)
        if len(leaf.routes) == 1:
            # One route: a method it does not list is still gated by it (leaving a method
            # out can lock something, never open it).
            leaf.partial = RouteMatch(Match.PARTIAL, route)
        else:
            leaf.partial = RouteMatch(Match.PARTIAL, None, tuple(leaf.routes))
        self.routes.append(route)
        return None

    def shared_paths(self) -> list[tuple[Route, ...]]:
        """The groups of same-shape routes (disjoint methods) sharing one path, in file
        order: a method none of them lists follows the ``unmatched`` policy."""
        return [tuple(leaf.routes) for leaf in self._leaves if len(leaf.routes) > 1]


class _CaseFoldedAppRoutes(AppRoutes):
    """An app whose upstream routes paths case-insensitively (Express by default, ASP.NET
    Core): literals are compiled lower-case and each path is looked up lower-cased, so
    ``/API/v1/Itineraries`` is gated like ``/api/v1/itineraries``. Canonical paths are
    ASCII (anything else arrives percent-encoded), so ``str.lower`` is the whole fold; the
    upstream still receives the path as the client sent it."""

    __slots__ = ()

    def match(self, method: str, path: str) -> RouteMatch:
        return AppRoutes.match(self, method, path.lower())


def app_routes(
    app: AppName, unmatched: Literal["allow", "deny"], path_case: PathCase = "sensitive"
) -> AppRoutes:
    """An empty compiled table for one app, case-folding when ``path_case`` says so."""
    kind = _CaseFoldedAppRoutes if path_case == "insensitive" else AppRoutes
    return kind(app, unmatched, path_case)


class RouteTable:
    """All apps' compiled routes; ``sha`` identifies the file revision in events and metrics,
    ``file`` is where they were read from, ``by_name`` finds a route by its ``name``."""

    __slots__ = ("apps", "sha", "file", "by_name")

    def __init__(self, apps: dict[AppName, AppRoutes], sha: str, file: str = "") -> None:
        self.apps = apps
        self.sha = sha
        self.file = file
        self.by_name: dict[str, Route] = {
            route.name: route for app in apps.values() for route in app.routes if route.name
        }

    def match(self, app: AppName, method: str, path: str) -> RouteMatch:
        return self.apps[app].match(method, path)

    def routes(self) -> Iterable[Route]:
        for app in self.apps.values():
            yield from app.routes


def load_routes(path: Path, matrix: TierMatrix) -> RouteTable:
    """Read, validate and compile ``routes.toml``; ``ConfigError`` lists every problem."""
    return build_routes(TomlDocument.read(path), matrix)


def build_routes(
    doc: TomlDocument,
    matrix: TierMatrix | None,
    path_case: Mapping[AppName, PathCase] | None = None,
) -> RouteTable:
    """Compile ``routes.toml``. Without a matrix (it failed to load) features are not
    checked, but everything else is, so ``gateway check`` lists all problems at once.
    ``path_case`` comes from ``gateway.toml`` (``[apps.<name>] path_case``; default
    case-sensitive)."""
    data = dict(doc.data)
    for unknown in sorted(set(data) - {"apps", "routes"}):
        doc.problem(
            unknown,
            "unknown top-level key (expected apps, routes)",
            line=doc.line_of_key(unknown),
        )
    raw_apps = data.get("apps", {})
    if not isinstance(raw_apps, dict):
        doc.problem("apps", "must be a table")
        raw_apps = {}
    apps: dict[AppName, AppRoutes] = {}
    for name in APP_NAMES:
        raw = raw_apps.get(name, {})
        policy = doc.convert(raw, AppPolicy, key=f"apps.{name}", header=f"[apps.{name}]")
        case = path_case.get(name, "sensitive") if path_case else "sensitive"
        apps[name] = app_routes(name, policy.unmatched if policy else "allow", case)
    for name in sorted(set(raw_apps) - set(APP_NAMES)):
        doc.problem(
            f"apps.{name}",
            f"unknown app (expected one of {', '.join(APP_NAMES)})",
            header=f"[apps.{name}]",
        )

    raw_routes = data.get("routes", [])
    if not isinstance(raw_routes, list):
        doc.problem("routes", "must be an array of tables ([[routes]])")
        raw_routes = []
    names: dict[str, Route] = {}
    for index, raw in enumerate(raw_routes):
        _compile_route(doc, matrix, apps, names, index, raw)
    doc.raise_if_problems()
    return RouteTable(apps, doc.sha, doc.name)


def _compile_route(
    doc: TomlDocument,
    matrix: TierMatrix | None,
    apps: dict[AppName, AppRoutes],
    names: dict[str, Route],
    index: int,
    raw: Any,
) -> None:
    key = f"routes[{index}]"
    where: dict[str, Any] = {"header": "[[routes]]", "index": index}
    spec = doc.convert(raw, RouteSpec, key=key, **where)
    if spec is None:
        return
    problems_before = len(doc.problems)
    segments = _pattern_segments(doc, spec.path, f"{key}.path", where)
    methods: frozenset[str] | None = None
    if spec.methods is not None:
        if not spec.methods:
            doc.problem(f"{key}.methods", "empty list (omit the key for all methods)", **where)
        bad = [m for m in spec.methods if not _METHOD.match(m)]
        if bad:
            doc.problem(f"{key}.methods", f"not upper-case HTTP methods: {bad}", **where)
        methods = frozenset(spec.methods)
        if "GET" in methods:  # HEAD is a GET without the body: gate it the same way
            methods |= {"HEAD"}
    if spec.name is not None:
        if not _NAME.match(spec.name):
            doc.problem(
                f"{key}.name",
                f"{spec.name!r}: use lower-case letters, digits and . _ - (at most 80)",
                **where,
            )
        elif spec.name in names:
            doc.problem(f"{key}.name", f"{spec.name!r} is also {names[spec.name].where()}", **where)
    if spec.public and spec.feature is not None:
        doc.problem(key, "a public route cannot name a feature", **where)
    if spec.public and (spec.roles is not None or spec.quota is not None):
        doc.problem(key, "a public route cannot restrict roles or count quota", **where)
    if spec.feature is not None and matrix is not None:
        feature = matrix.features.get(spec.feature)
        if feature is None:
            doc.problem(f"{key}.feature", f"unknown feature {spec.feature!r}", **where)
        elif feature.app != spec.app:
            doc.problem(
                f"{key}.feature",
                f"feature {spec.feature!r} belongs to app {feature.app!r}, not {spec.app!r}",
                **where,
            )
    if len(doc.problems) != problems_before or segments is None:
        return
    route = Route(
        app=spec.app,
        path=spec.path,
        methods=methods,
        feature=spec.feature,
        public=spec.public,
        roles=frozenset(spec.roles) if spec.roles is not None else None,
        quota=spec.quota,
        key=key,
        line=doc.line_of("[[routes]]", index),
        name=spec.name,
    )
    clash = apps[spec.app]._add(route, segments)
    if clash is not None:
        doc.problem(f"{key}.path", _ambiguity(route, clash), **where)
    elif route.name is not None:
        names[route.name] = route


def _ambiguity(route: Route, clash: Route) -> str:
    """Why two same-shape routes clash, and the edit that resolves it."""
    first, second = clash.where(), route.where()
    if route.methods is None or clash.methods is None:
        listed = route.methods if route.methods is not None else clash.methods
        both = "every method" if listed is None else _method_list(listed)
        fix = f"add `methods = [...]` to {first} or {second} so that no method is in both"
    else:
        overlap = route.methods & clash.methods
        both = _method_list(overlap)
        if "HEAD" in overlap and "GET" not in overlap:
            both += " (GET implies HEAD)"
        fix = f"remove {both} from the `methods` of {first} or of {second}"
    return (
        f"ambiguous: {route.path!r} and {clash.path!r} ({first}) have the same shape and can "
        f"both take {both}; give each method to one route: {fix}"
    )


def sorted_methods(methods: Iterable[str]) -> list[str]:
    """Methods in the order people list them: GET, HEAD, POST, PUT, PATCH, DELETE, others."""
    return sorted(methods, key=lambda m: (_METHOD_ORDER.get(m, len(_METHOD_ORDER)), m))


def _method_list(methods: Iterable[str]) -> str:
    return ", ".join(sorted_methods(methods))


def _pattern_segments(
    doc: TomlDocument, pattern: str, key: str, where: dict[str, Any]
) -> list[str] | None:
    if not pattern.startswith("/"):
        doc.problem(key, "must start with '/'", **where)
        return None
    trimmed = pattern[:-1] if len(pattern) > 1 and pattern.endswith("/") else pattern
    segments = trimmed.split("/")[1:] if trimmed != "/" else []
    names: set[str] = set()
    for position, segment in enumerate(segments):
        param = _PARAM.match(segment)
        if param:
            if param.group(1) in names:
                doc.problem(key, f"parameter {{{param.group(1)}}} appears twice", **where)
                return None
            names.add(param.group(1))
            if param.group(2) and position != len(segments) - 1:
                doc.problem(key, f"{segment} must be the last segment", **where)
                return None
        elif segment in ("", ".", "..") or not _LITERAL.match(segment):
            doc.problem(
                key,
                f"segment {segment!r} is not a literal a canonical path can contain "
                "(or a {name} / {name:path} parameter)",
                **where,
            )
            return None
    return segments
