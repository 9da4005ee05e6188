"""The compiled route table (docs/design.md §3 routes.toml): precedence, matching, path_case (config
errors, names and ambiguity are in ``test_routes_config.py``).

The property test at the end checks the trie against a brute-force reference matcher written
straight from the design's wording (most specific route wins, segment by segment).
"""

from __future__ import annotations

import textwrap
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.config import load_config, load_rules
from gateway.errors import ConfigError, ConfigProblem
from gateway.matrix import AppName, TierMatrix
from gateway.routes import Match, PathCase, RouteMatch, RouteTable, build_routes
from gateway.tomlfile import TomlDocument

RO = '[[routes]]\napp = "operations"\n'  # the first two lines of most routes below


def compile_routes(
    folder: Path, text: str, matrix: TierMatrix, path_case: dict[AppName, PathCase] | None = None
) -> RouteTable:
    path = folder / "routes.toml"
    path.write_text(textwrap.dedent(text))
    return build_routes(TomlDocument.read(path), matrix, path_case)


def config_problems(
    folder: Path, text: str, matrix: TierMatrix, path_case: dict[AppName, PathCase] | None = None
) -> tuple[ConfigProblem, ...]:
    with pytest.raises(ConfigError) as caught:
        compile_routes(folder, text, matrix, path_case)
    return caught.value.problems


def route_index(found: RouteMatch) -> int | None:
    """Which ``[[routes]]`` entry (0-based) a lookup found."""
    if found.route is None:
        return None
    assert found.route.key.startswith("routes[")
    return int(found.route.key[len("routes[") : -1])


# ---------------------------------------------------------------------------- matching

# One file, every precedence rule; the comments give each route's index.
PRECEDENCE_ROUTES = """\
[[routes]]  # 0
app = "operations"
path = "/users/me"

[[routes]]  # 1
app = "operations"
path = "/users/{id}"

[[routes]]  # 2
app = "operations"
path = "/users/{rest:path}"

[[routes]]  # 3
app = "operations"
path = "/a/{x}/c"

[[routes]]  # 4
app = "operations"
path = "/{y}/b/c"

[[routes]]  # 5
app = "operations"
path = "/p/{rest:path}"

[[routes]]  # 6
app = "operations"
path = "/{y}/q/r"

[[routes]]  # 7
app = "operations"
path = "/l/m/n"

[[routes]]  # 8
app = "operations"
path = "/{x}/m/o"

[[routes]]  # 9
app = "operations"
path = "/"

[[routes]]  # 10
app = "operations"
path = "/slash/"

[[routes]]  # 11
app = "operations"
path = "/Case"

[[routes]]  # 12
app = "operations"
path = "/only/{rest:path}"
"""


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        pytest.param("/users/me", 0, id="literal-beats-param"),
        pytest.param("/users/7", 1, id="param-beats-catchall"),
        pytest.param("/users/7/roles", 2, id="catchall-takes-deeper-paths"),
        pytest.param("/users/7/roles/admin/x", 2, id="catchall-takes-many-segments"),
        pytest.param("/users/me/roles", 2, id="catchall-below-literal-sibling"),
        pytest.param("/a/b/c", 3, id="first-segment-decides-literal-over-param"),
        pytest.param("/z/b/c", 4, id="param-first-segment-when-literal-absent"),
        pytest.param("/p/q/r", 5, id="literal-then-catchall-beats-param-then-literals"),
        pytest.param("/l/m/o", 8, id="backtracks-from-dead-literal-branch"),
        pytest.param("/l/m/n", 7, id="full-literal"),
        pytest.param("/", 9, id="root"),
        pytest.param("/slash", 10, id="pattern-trailing-slash-not-significant"),
        pytest.param("/slash/", 10, id="both-trailing-slash"),
        pytest.param("/users/me/", 0, id="path-trailing-slash-not-significant"),
        pytest.param("/users/7/", 1, id="param-with-trailing-slash"),
        pytest.param("/only/x", 12, id="catchall-one-segment"),
        pytest.param("/only", 12, id="catchall-takes-empty-remainder"),
        pytest.param("/only/", 12, id="catchall-takes-empty-remainder-trailing-slash"),
        pytest.param("/p", 5, id="catchall-empty-remainder-beats-later-param"),
        pytest.param("/users", 2, id="catchall-takes-bare-prefix"),
        pytest.param("/l/m", None, id="prefix-of-routes-is-no-match"),
        pytest.param("/case", None, id="case-sensitive"),
        pytest.param("/Case", 11, id="case-exact"),
        pytest.param("/nowhere/at/all", None, id="unknown"),
        pytest.param("/a/b/c/d", None, id="too-deep-for-fixed-routes"),
    ],
)
def test_precedence(tmp_path: Path, matrix: TierMatrix, path: str, expected: int | None) -> None:
    table = compile_routes(tmp_path, PRECEDENCE_ROUTES, matrix)
    found = table.match("operations", "GET", path)
    assert route_index(found) == expected
    assert found.kind is (Match.NONE if expected is None else Match.FULL)


CATCHALL_ROUTES = """\
[[routes]]  # 0
app = "operations"
path = "/phi/{rest:path}"
feature = "ops.health_data_protection"

[[routes]]  # 1
app = "operations"
methods = ["GET"]
path = "/docs"

[[routes]]  # 2
app = "operations"
path = "/docs/{rest:path}"
feature = "ops.on_demand"

[[routes]]  # 3
app = "operations"
path = "/{section}"
"""


@pytest.mark.parametrize(
    ("method", "path", "expected"),
    [
        pytest.param("GET", "/phi", 0, id="bare-prefix"),
        pytest.param("DELETE", "/phi/", 0, id="prefix-with-slash"),
        pytest.param("GET", "/phi/x/y", 0, id="deeper"),
        pytest.param("GET", "/docs", 1, id="literal-route-ending-there-wins"),
        pytest.param("HEAD", "/docs/", 1, id="literal-route-ending-there-wins-slash"),
        pytest.param("POST", "/docs", 2, id="literal-lacks-method-catchall-takes-it"),
        pytest.param("GET", "/other", 3, id="no-catchall-prefix"),
    ],
)
def test_catchall_route_also_covers_its_empty_remainder(
    tmp_path: Path, matrix: TierMatrix, method: str, path: str, expected: int
) -> None:
    """``/phi/{rest:path}`` gates ``/phi`` and ``/phi/`` too, as the upstream routers that
    send those to the catch-all's handler do; a route ending exactly there is more
    specific, and ``/phi`` beats ``/{section}`` on its first segment (literal > param)."""
    table = compile_routes(tmp_path, CATCHALL_ROUTES, matrix)
    found = table.match("operations", method, path)
    assert (found.kind, route_index(found)) == (Match.FULL, expected)


@pytest.mark.parametrize(
    ("app", "prefix", "feature"),
    [
        ("operations", "/api/v1/phi", "ops.health_data_protection"),
        ("operations", "/api/v1/distribution", "ops.route_distribution"),
        ("operations", "/api/v1/sms/templates", "ops.sms_messaging"),
        ("client_portal", "/api/v1/branding", "portal.white_labeling"),
        ("client_portal", "/api/v1/chat", "portal.chat_widget"),
        ("driver_app", "/api/v1/routes/7/stops", "driver.route_distribution"),
    ],
)
def test_shipped_catchall_routes_gate_their_bare_prefix(
    route_table: RouteTable, app: AppName, prefix: str, feature: str
) -> None:
    for path in (prefix, prefix + "/"):
        for method in ("GET", "POST", "DELETE"):
            found = route_table.match(app, method, path)
            assert found.kind is Match.FULL, (method, path)
            assert found.route is not None and found.route.feature == feature, (method, path)


CASE_ROUTES = """\
[[routes]]  # 0
app = "operations"
path = "/api/v1/Itineraries/{id}"
feature = "ops.advanced_shipment_optimization"

[[routes]]  # 1
app = "operations"
path = "/api/v1/phi/{rest:path}"
feature = "ops.health_data_protection"

[[routes]]  # 2
app = "client_portal"
path = "/api/v1/orders"
"""


@pytest.mark.parametrize(
    ("app", "path", "expected"),
    [
        pytest.param("operations", "/api/v1/itineraries/7", 0, id="pattern-case-folded"),
        pytest.param("operations", "/API/V1/ITINERARIES/Ab", 0, id="path-case-folded"),
        pytest.param("operations", "/Api/v1/PHI", 1, id="catchall-bare-prefix-folded"),
        pytest.param("operations", "/api/v1/phi/X/Y", 1, id="catchall-folded"),
        pytest.param("operations", "/api/v1/phi%C3%A9", None, id="encoded-stays-encoded"),
        pytest.param("client_portal", "/api/v1/orders", 2, id="other-app-exact"),
        pytest.param("client_portal", "/API/v1/orders", None, id="other-app-stays-sensitive"),
    ],
)
def test_path_case_insensitive_matches_case_folded(
    tmp_path: Path, matrix: TierMatrix, app: AppName, path: str, expected: int | None
) -> None:
    table = compile_routes(tmp_path, CASE_ROUTES, matrix, {"operations": "insensitive"})
    assert table.apps["operations"].path_case == "insensitive"
    assert table.apps["client_portal"].path_case == "sensitive"
    assert route_index(table.match(app, "GET", path)) == expected


def test_path_case_insensitive_makes_case_spellings_ambiguous(
    tmp_path: Path, matrix: TierMatrix
) -> None:
    text = RO + 'path = "/Users"\n\n' + RO + 'path = "/users"\n'
    compile_routes(tmp_path, text, matrix)  # two paths when case matters
    problems = config_problems(tmp_path, text, matrix, {"operations": "insensitive"})
    assert [(p.key, p.line) for p in problems] == [("routes[1].path", 5)]
    assert "ambiguous" in problems[0].message


def test_path_case_comes_from_gateway_toml(config_dir: Path) -> None:
    path = config_dir / "gateway.toml"
    text = path.read_text()
    marker = "[apps.operations]\n"
    path.write_text(text.replace(marker, marker + 'path_case = "insensitive"\n'))
    config = load_config(path)
    assert config.routes.match("operations", "GET", "/API/V1/PHI").kind is Match.FULL
    assert config.routes.match("client_portal", "GET", "/API/V1/ORDERS").kind is Match.NONE
    _, reloaded = load_rules(config)
    assert reloaded.apps["operations"].path_case == "insensitive"

    path.write_text(text.replace(marker, marker + 'path_case = "folded"\n'))
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    (problem,) = caught.value.problems
    assert problem.key == "apps.operations.path_case" and "'folded'" in problem.message
    assert problem.line == text.splitlines().index("[apps.operations]") + 1


def test_apps_have_separate_tables(tmp_path: Path, matrix: TierMatrix) -> None:
    table = compile_routes(tmp_path, PRECEDENCE_ROUTES, matrix)
    assert table.match("client_portal", "GET", "/users/me") == RouteMatch(Match.NONE, None)
    assert table.match("driver_app", "GET", "/") == RouteMatch(Match.NONE, None)


METHOD_ROUTES = """\
[[routes]]  # 0
app = "operations"
methods = ["GET"]
path = "/items/{id}"

[[routes]]  # 1
app = "operations"
methods = ["POST"]
path = "/items/special"

[[routes]]  # 2
app = "operations"
path = "/files/{rest:path}"

[[routes]]  # 3
app = "operations"
methods = ["PUT"]
path = "/files/{name}"

[[routes]]  # 4
app = "operations"
methods = ["HEAD"]
path = "/probe"

[[routes]]  # 5
app = "operations"
methods = ["GET", "POST"]
path = "/split"

[[routes]]  # 6
app = "operations"
methods = ["DELETE"]
path = "/split/"

[[routes]]  # 7
app = "operations"
methods = ["PATCH"]
path = "/deep/{a}/x"

[[routes]]  # 8
app = "operations"
methods = ["PUT"]
path = "/deep/{b:path}"

[[routes]]  # 9
app = "operations"
methods = ["POST"]
path = "/{c}/{d}/x"
"""


@pytest.mark.parametrize(
    ("method", "path", "kind", "expected"),
    [
        pytest.param("GET", "/items/7", Match.FULL, 0, id="get"),
        pytest.param("HEAD", "/items/7", Match.FULL, 0, id="head-implied-by-get"),
        pytest.param("POST", "/items/7", Match.PARTIAL, 0, id="wrong-method-partial"),
        pytest.param("POST", "/items/special", Match.FULL, 1, id="literal-allows-method"),
        pytest.param("GET", "/items/special", Match.FULL, 0, id="fallback-to-param"),
        pytest.param("HEAD", "/items/special", Match.FULL, 0, id="fallback-head-via-get"),
        pytest.param("DELETE", "/items/special", Match.PARTIAL, 1, id="partial-most-specific"),
        pytest.param("PUT", "/files/a", Match.FULL, 3, id="param-allows-method"),
        pytest.param("GET", "/files/a", Match.FULL, 2, id="fallback-to-catchall"),
        pytest.param("PUT", "/files/a/b", Match.FULL, 2, id="catchall-any-method"),
        pytest.param("HEAD", "/probe", Match.FULL, 4, id="head-only"),
        pytest.param("GET", "/probe", Match.PARTIAL, 4, id="head-does-not-imply-get"),
        pytest.param("GET", "/split", Match.FULL, 5, id="same-shape-disjoint-methods-a"),
        pytest.param("DELETE", "/split", Match.FULL, 6, id="same-shape-disjoint-methods-b"),
        pytest.param("PUT", "/split", Match.PARTIAL, None, id="same-shape-partial-has-no-route"),
        pytest.param("PATCH", "/deep/1/x", Match.FULL, 7, id="deep-param"),
        pytest.param("PUT", "/deep/1/x", Match.FULL, 8, id="deep-fallback-catchall"),
        pytest.param("POST", "/deep/1/x", Match.FULL, 9, id="deep-fallback-to-root-param"),
        pytest.param("GET", "/deep/1/x", Match.PARTIAL, 7, id="deep-partial-most-specific"),
        pytest.param("GET", "/other/1/x", Match.PARTIAL, 9, id="partial-param-first"),
        pytest.param("GET", "/nothing", Match.NONE, None, id="none"),
    ],
)
def test_method_aware_match(
    tmp_path: Path,
    matrix: TierMatrix,
    method: str,
    path: str,
    kind: Match,
    expected: int | None,
) -> None:
    table = compile_routes(tmp_path, METHOD_ROUTES, matrix)
    found = table.match("operations", method, path)
    assert (found.kind, route_index(found)) == (kind, expected)


def test_compiled_route_records_the_spec(tmp_path: Path, matrix: TierMatrix) -> None:
    table = compile_routes(
        tmp_path,
        """\
        # leading comment

        [apps.operations]
        unmatched = "deny"

        [[routes]]
        app = "operations"
        name = "ops.users"
        methods = ["GET", "POST"]
        path = "/api/v1/users"
        feature = "ops.on_demand"
        roles = ["owner", "admin"]
        quota = "ops_users"
        """,
        matrix,
    )
    found = table.match("operations", "POST", "/api/v1/users")
    route = found.route
    assert found.kind is Match.FULL and route is not None
    assert route.methods == frozenset({"GET", "HEAD", "POST"})
    assert route.feature == "ops.on_demand"
    assert route.roles == frozenset({"owner", "admin"})
    assert route.quota == "ops_users"
    assert not route.public
    assert (route.key, route.line) == ("routes[0]", 6)
    assert (route.name, route.label, route.where()) == (
        "ops.users",
        "ops.users",
        "routes[0] 'ops.users' at line 6",
    )
    assert table.by_name == {"ops.users": route}
    assert table.file == str(tmp_path / "routes.toml")
    assert table.apps["operations"].unmatched == "deny"
    assert table.apps["client_portal"].unmatched == "allow"
    assert [r.key for r in table.routes()] == ["routes[0]"]


def test_route_without_methods_allows_every_method(tmp_path: Path, matrix: TierMatrix) -> None:
    table = compile_routes(
        tmp_path, '[[routes]]\napp = "driver_app"\npath = "/x"\npublic = true\n', matrix
    )
    for method in ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "PROPFIND"):
        found = table.match("driver_app", method, "/x")
        assert found.kind is Match.FULL
        assert found.route is not None and found.route.public and found.route.methods is None


@pytest.mark.parametrize(
    ("app", "method", "path", "kind", "path_pattern", "feature"),
    [
        pytest.param(
            "operations", "POST", "/api/v1/shipments/7/optimize", Match.FULL,
            "/api/v1/shipments/{id}/optimize", "ops.basic_shipment_optimization",
            id="ops-optimize",
        ),
        pytest.param(
            "operations", "GET", "/api/v1/shipments/7/optimize", Match.PARTIAL,
            "/api/v1/shipments/{id}/optimize", "ops.basic_shipment_optimization",
            id="ops-optimize-wrong-method",
        ),
        pytest.param(
            "operations", "HEAD", "/api/v1/shipments", Match.FULL,
            "/api/v1/shipments", "ops.on_demand", id="ops-head-shipments",
        ),
        pytest.param(
            "operations", "GET", "/api/v1/shipments/7/phi", Match.FULL,
            "/api/v1/shipments/{id}/phi", "ops.health_data_protection", id="ops-phi-literal",
        ),
        pytest.param(
            "operations", "DELETE", "/api/v1/distribution/a/b/c", Match.FULL,
            "/api/v1/distribution/{rest:path}", "ops.route_distribution", id="ops-catchall",
        ),
        pytest.param(
            "operations", "GET", "/api/v1/health/", Match.FULL,
            "/api/v1/health", None, id="ops-health-trailing-slash",
        ),
        pytest.param(
            "client_portal", "GET", "/api/v1/routes/9/drivers/live", Match.FULL,
            "/api/v1/routes/{id}/drivers/live", "portal.rd_driver_tracking",
            id="portal-live-tracking",
        ),
        pytest.param(
            "client_portal", "GET", "/api/v1/branding/logo.png", Match.FULL,
            "/api/v1/branding/{rest:path}", "portal.white_labeling", id="portal-branding",
        ),
        pytest.param(
            "driver_app", "POST", "/api/v1/jobs/3/pod", Match.FULL,
            "/api/v1/jobs/{id}/pod", "driver.on_demand", id="driver-literal-over-action",
        ),
        pytest.param(
            "driver_app", "POST", "/api/v1/jobs/3/accept", Match.FULL,
            "/api/v1/jobs/{id}/{action}", "driver.on_demand", id="driver-action",
        ),
        pytest.param(
            "driver_app", "GET", "/api/v1/routes/today", Match.FULL,
            "/api/v1/routes/today", "driver.route_distribution", id="driver-routes-today",
        ),
        pytest.param(
            "driver_app", "GET", "/api/v1/nope", Match.NONE, None, None, id="driver-unmapped",
        ),
    ],
)  # fmt: skip
def test_shipped_routes(
    route_table: RouteTable,
    app: AppName,
    method: str,
    path: str,
    kind: Match,
    path_pattern: str | None,
    feature: str | None,
) -> None:
    found = route_table.match(app, method, path)
    assert found.kind is kind
    assert (found.route.path if found.route else None) == path_pattern
    assert (found.route.feature if found.route else None) == feature


def test_shipped_unmatched_policies(route_table: RouteTable) -> None:
    policies = {name: app.unmatched for name, app in route_table.apps.items()}
    assert policies == {"operations": "allow", "client_portal": "allow", "driver_app": "deny"}


def test_shipped_routes_all_have_unique_names(route_table: RouteTable) -> None:
    routes = list(route_table.routes())
    assert all(route.name for route in routes)
    assert len(route_table.by_name) == len(routes)
    prefix = {"operations": "ops.", "client_portal": "portal.", "driver_app": "driver."}
    assert all(route.label.startswith(prefix[route.app]) for route in routes)


def test_shipped_routes_name_their_line(route_table: RouteTable, repo_root: Path) -> None:
    lines = (repo_root / "routes.toml").read_text().splitlines()
    routes = list(route_table.routes())
    assert len(routes) > 50
    for route in routes:
        assert route.line is not None
        assert lines[route.line - 1].strip() == "[[routes]]"
        assert f'path = "{route.path}"' in lines[route.line : route.line + 6]


# ---------------------------------------------------------------------------- property test


@dataclass(frozen=True)
class RefRoute:
    """A route as the reference matcher sees it: pattern segments and allowed methods."""

    segments: tuple[str, ...]  # "a", "{p0}", "{r1:path}"
    methods: frozenset[str] | None  # None: every method

    @property
    def pattern(self) -> str:
        return "/" + "/".join(self.segments)

    @property
    def allowed(self) -> frozenset[str] | None:
        if self.methods is None:
            return None
        return self.methods | {"HEAD"} if "GET" in self.methods else self.methods

    @property
    def specificity(self) -> tuple[int, ...]:
        return tuple(_weight(s) for s in self.segments)

    def matches(self, path: Sequence[str]) -> bool:
        kinds = self.specificity
        if kinds and kinds[-1] == 2:
            fixed = len(kinds) - 1
            if len(path) < fixed:  # a catch-all takes zero or more segments
                return False
        elif len(path) != len(kinds):
            return False
        for segment, pattern, kind in zip(path, self.segments, kinds, strict=False):
            if kind == 0 and segment != pattern:
                return False
        return True

    def allows(self, method: str) -> bool:
        allowed = self.allowed
        return allowed is None or method in allowed


def _weight(segment: str) -> int:
    if not segment.startswith("{"):
        return 0
    return 2 if segment.endswith(":path}") else 1


def reference_match(routes: Sequence[RefRoute], method: str, path: str) -> tuple[Match, int | None]:
    """Brute force: every route is tried. A path that several same-shape routes share
    (disjoint methods) and none of them allows the method is PARTIAL without a route: the
    unmatched policy decides, whatever the file order."""
    trimmed = path[:-1] if len(path) > 1 and path.endswith("/") else path
    segments = trimmed.split("/")[1:] if trimmed != "/" else []
    candidates = [i for i, route in enumerate(routes) if route.matches(segments)]
    allowed = [i for i in candidates if routes[i].allows(method)]

    def most_specific(indices: list[int]) -> list[int]:
        best = min(routes[i].specificity for i in indices)
        return [i for i in indices if routes[i].specificity == best]

    if allowed:
        (chosen,) = most_specific(allowed)  # same shape and both allowing: ambiguous
        return Match.FULL, chosen
    if candidates:
        tied = most_specific(candidates)
        return Match.PARTIAL, tied[0] if len(tied) == 1 else None
    return Match.NONE, None


def reference_ambiguous(routes: Sequence[RefRoute]) -> bool:
    """Equal specificity and able to match one request: same shape, same literals, and
    methods that overlap (no methods overlaps everything)."""

    def shape(route: RefRoute) -> tuple[str, ...]:
        return tuple(s if _weight(s) == 0 else str(_weight(s)) for s in route.segments)

    for i, first in enumerate(routes):
        for second in routes[i + 1 :]:
            if shape(first) != shape(second):
                continue
            a, b = first.allowed, second.allowed
            if a is None or b is None or a & b:
                return True
    return False


LITERALS = ("a", "b", "c")
METHODS = ("GET", "HEAD", "POST", "DELETE")


@st.composite
def ref_routes(draw: st.DrawFn) -> RefRoute:
    length = draw(st.integers(min_value=0, max_value=3))
    segments: list[str] = []
    for position in range(length):
        kinds = ["literal", "param"] + (["catchall"] if position == length - 1 else [])
        kind = draw(st.sampled_from(kinds))
        name = draw(st.sampled_from(("x", "id")))  # different names, same shape
        if kind == "literal":
            segments.append(draw(st.sampled_from(LITERALS)))
        elif kind == "param":
            segments.append(f"{{{name}{position}}}")
        else:
            segments.append(f"{{{name}{position}:path}}")
    methods = draw(
        st.none() | st.frozensets(st.sampled_from(METHODS), min_size=1, max_size=len(METHODS))
    )
    return RefRoute(tuple(segments), methods)


def routes_toml(routes: Sequence[RefRoute], trailing: Sequence[bool]) -> str:
    blocks = []
    for route, slash in zip(routes, trailing, strict=True):
        pattern = route.pattern + ("/" if slash and route.segments else "")
        block = f'[[routes]]\napp = "operations"\npath = "{pattern}"\n'
        if route.methods is not None:
            block += f"methods = {sorted(route.methods)!r}\n".replace("'", '"')
        blocks.append(block)
    return "\n".join(blocks)


request_paths = st.builds(
    lambda segments, slash: "/" + "/".join(segments) + ("/" if slash and segments else ""),
    st.lists(st.sampled_from((*LITERALS, "d")), max_size=4),
    st.booleans(),
)


@pytest.fixture(scope="module")
def scratch(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("routes-property")


@settings(max_examples=300, deadline=None)
@given(
    data=st.data(),
    routes=st.lists(ref_routes(), min_size=1, max_size=6),
    requests=st.lists(
        st.tuples(st.sampled_from((*METHODS, "PUT")), request_paths), min_size=1, max_size=12
    ),
)
def test_matches_brute_force_reference(
    scratch: Path,
    matrix: TierMatrix,
    data: st.DataObject,
    routes: list[RefRoute],
    requests: list[tuple[str, str]],
) -> None:
    trailing = data.draw(st.lists(st.booleans(), min_size=len(routes), max_size=len(routes)))
    text = routes_toml(routes, trailing)
    if reference_ambiguous(routes):
        problems = config_problems(scratch, text, matrix)
        assert problems and all("ambiguous" in p.message for p in problems)
        return
    table = compile_routes(scratch, text, matrix)
    # Every literal the table knows, plus the requests drawn, so matches are not rare; and
    # each catch-all's bare prefix, with and without the slash (its empty remainder).
    probes = list(requests) + [(m, r.pattern) for r in routes for m in ("GET", "PUT")]
    for route in routes:
        if route.specificity and route.specificity[-1] == 2:
            bare = "/" + "/".join(route.segments[:-1])
            probes += [("GET", bare), ("POST", bare.rstrip("/") + "/")]
    for method, path in probes:
        found = table.match("operations", method, path)
        assert (found.kind, route_index(found)) == reference_match(routes, method, path), (
            method,
            path,
            text,
        )
