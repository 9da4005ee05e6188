"""Compiling ``routes.toml``: every problem reported with its key and line, ambiguity errors
that name both routes and the fix, route names, and the rule for a method that no route of
a shared path lists."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.decision import Policy, decide
from gateway.errors import ConfigError
from gateway.license import License, LicenseClaims
from gateway.matrix import TierMatrix
from gateway.routes import Match
from gateway.tomlfile import TomlDocument
from tests.test_routes import RO, compile_routes, config_problems

# ---------------------------------------------------------------------------- config errors


@pytest.mark.parametrize(
    ("text", "key", "line", "fragment"),
    [
        pytest.param(
            RO + 'path = "/a"\n\n' + RO + 'path = "/a"\n',
            "routes[1].path", 5, "ambiguous", id="ambiguous-same-literal",
        ),
        pytest.param(
            RO + 'path = "/a/{x}"\n\n' + RO + 'path = "/a/{y}"\n',
            "routes[1].path", 5, "ambiguous", id="ambiguous-different-param-names",
        ),
        pytest.param(
            RO + 'path = "/f/{a:path}"\n\n' + RO + 'path = "/f/{b:path}"\n',
            "routes[1].path", 5, "ambiguous", id="ambiguous-catchalls",
        ),
        pytest.param(
            RO + 'methods = ["GET"]\npath = "/a/{x}"\n\n' + RO + 'path = "/a/{y}"\n',
            "routes[1].path", 6, "ambiguous", id="ambiguous-second-has-no-methods",
        ),
        pytest.param(
            RO + 'path = "/a/{x}"\n\n' + RO + 'methods = ["GET"]\npath = "/a/{y}"\n',
            "routes[1].path", 5, "ambiguous", id="ambiguous-first-has-no-methods",
        ),
        pytest.param(
            RO + 'methods = ["GET", "POST"]\npath = "/a"\n\n'
            + RO + 'methods = ["PUT", "POST"]\npath = "/a"\n',
            "routes[1].path", 6, "ambiguous", id="ambiguous-overlapping-methods",
        ),
        pytest.param(
            RO + 'methods = ["GET"]\npath = "/a"\n\n' + RO + 'methods = ["HEAD"]\npath = "/a"\n',
            "routes[1].path", 6, "ambiguous", id="ambiguous-implied-head",
        ),
        pytest.param(
            RO + 'path = "/a"\n\n' + RO + 'path = "/a/"\n',
            "routes[1].path", 5, "ambiguous", id="ambiguous-trailing-slash",
        ),
        pytest.param(
            RO + 'path = "/"\n\n' + RO + 'path = "/"\n',
            "routes[1].path", 5, "ambiguous", id="ambiguous-root",
        ),
        pytest.param(
            RO + 'path = "/b/{x:path}/c"\n',
            "routes[0].path", 1, "must be the last segment", id="catchall-not-last",
        ),
        pytest.param(
            RO + 'path = "/b/{x}/{x}"\n',
            "routes[0].path", 1, "appears twice", id="duplicate-param",
        ),
        pytest.param(
            RO + 'path = "/b/{x}/{x:path}"\n',
            "routes[0].path", 1, "appears twice", id="duplicate-param-catchall",
        ),
        pytest.param(
            "\n\n" + RO + 'path = "/b"\nfeature = "ops.nope"\n',
            "routes[0].feature", 3, "unknown feature 'ops.nope'", id="unknown-feature",
        ),
        pytest.param(
            RO + 'path = "/b"\nfeature = "portal.on_demand"\n',
            "routes[0].feature", 1, "belongs to app 'client_portal'", id="feature-of-other-app",
        ),
        pytest.param(
            RO + 'path = "/b"\nfeature = "ops.on_demand"\npublic = true\n',
            "routes[0]", 1, "public route cannot name a feature", id="public-and-feature",
        ),
        pytest.param(
            RO + 'path = "/b"\npublic = true\nroles = ["owner"]\n',
            "routes[0]", 1, "public route cannot restrict roles", id="public-and-roles",
        ),
        pytest.param(
            RO + 'path = "/b"\npublic = true\nquota = "drivers"\n',
            "routes[0]", 1, "public route cannot restrict roles", id="public-and-quota",
        ),
        pytest.param(
            RO + 'path = "/a b"\n', "routes[0].path", 1, "'a b'", id="literal-with-space",
        ),
        pytest.param(
            RO + 'path = "/a//b"\n', "routes[0].path", 1, "''", id="literal-empty-segment",
        ),
        pytest.param(
            RO + 'path = "/a/./b"\n', "routes[0].path", 1, "'.'", id="literal-dot",
        ),
        pytest.param(
            RO + 'path = "/a/../b"\n', "routes[0].path", 1, "'..'", id="literal-dot-dot",
        ),
        pytest.param(
            RO + 'path = "/caf%C3%A9"\n', "routes[0].path", 1, "caf%C3%A9", id="literal-percent",
        ),
        pytest.param(
            RO + 'path = "/a;v=1"\n', "routes[0].path", 1, "a;v=1", id="literal-semicolon",
        ),
        pytest.param(
            RO + 'path = "/a?b"\n', "routes[0].path", 1, "a?b", id="literal-question-mark",
        ),
        pytest.param(
            RO + 'path = "/café"\n', "routes[0].path", 1, "café", id="literal-non-ascii",
        ),
        pytest.param(
            RO + 'path = "/{x:int}"\n', "routes[0].path", 1, "{x:int}", id="unknown-converter",
        ),
        pytest.param(
            RO + 'path = "/{1x}"\n', "routes[0].path", 1, "{1x}", id="bad-param-name",
        ),
        pytest.param(
            RO + 'path = "/x{id}"\n', "routes[0].path", 1, "x{id}", id="param-inside-literal",
        ),
        pytest.param(
            RO + 'path = "api/v1"\n', "routes[0].path", 1, "must start with '/'", id="relative",
        ),
        pytest.param(
            RO + 'methods = ["get"]\npath = "/b"\n',
            "routes[0].methods", 1, "not upper-case HTTP methods", id="lower-case-method",
        ),
        pytest.param(
            RO + 'methods = ["GET POST"]\npath = "/b"\n',
            "routes[0].methods", 1, "not upper-case HTTP methods", id="two-methods-in-one",
        ),
        pytest.param(
            RO + 'methods = []\npath = "/b"\n',
            "routes[0].methods", 1, "empty list", id="no-methods",
        ),
        pytest.param(
            RO + 'methods = "GET"\npath = "/b"\n',
            "routes[0].methods", 1, "got `str`", id="methods-not-a-list",
        ),
        pytest.param(
            RO + 'path = "/b"\nfeatures = "ops.on_demand"\n',
            "routes[0]", 1, "unknown field `features`", id="unknown-field",
        ),
        pytest.param(
            '[[routes]]\napp = "billing"\npath = "/b"\n',
            "routes[0].app", 1, "'billing'", id="unknown-app",
        ),
        pytest.param(
            RO + 'path = "/b"\nroles = ["root"]\n',
            "routes[0].roles[0]", 1, "'root'", id="unknown-role",
        ),
        pytest.param(
            RO + 'path = "/b"\nquota = "tenants"\n',
            "routes[0].quota", 1, "'tenants'", id="unknown-quota",
        ),
        pytest.param(
            '[[routes]]\napp = "operations"\n', "routes[0]", 1, "`path`", id="missing-path",
        ),
        pytest.param(
            RO + 'name = "a"\npath = "/a"\n\n' + RO + 'name = "a"\npath = "/b"\n',
            "routes[1].name", 6, "'a' is also routes[0] 'a' at line 1", id="duplicate-name",
        ),
        pytest.param(
            RO + 'name = "a"\npath = "/a"\n\n[[routes]]\napp = "driver_app"\nname = "a"\n'
            'path = "/b"\n',
            "routes[1].name", 6, "'a' is also routes[0]", id="duplicate-name-across-apps",
        ),
        pytest.param(
            RO + 'name = "Users List"\npath = "/a"\n',
            "routes[0].name", 1, "lower-case letters", id="bad-name",
        ),
        pytest.param(
            RO + 'name = ""\npath = "/a"\n', "routes[0].name", 1, "lower-case", id="empty-name",
        ),
        pytest.param(
            '\n[apps.operations]\nunmatched = "block"\n',
            "apps.operations.unmatched", 2, "'block'", id="bad-unmatched-policy",
        ),
        pytest.param(
            '[apps.billing]\nunmatched = "deny"\n',
            "apps.billing", 1, "unknown app", id="policy-for-unknown-app",
        ),
        pytest.param(
            '\n\nroute = []\n', "route", 3, "unknown top-level key", id="unknown-top-level-key",
        ),
        pytest.param(
            '\n[route]\nx = 1\n', "route", 2, "unknown top-level key", id="unknown-top-level-table",
        ),
    ],
)  # fmt: skip
def test_config_errors(
    tmp_path: Path, matrix: TierMatrix, text: str, key: str, line: int, fragment: str
) -> None:
    problems = config_problems(tmp_path, text, matrix)
    assert len(problems) == 1, problems
    problem = problems[0]
    assert problem.file == str(tmp_path / "routes.toml")
    assert (problem.key, problem.line) == (key, line)
    assert fragment in problem.message


def test_ambiguity_names_both_routes(tmp_path: Path, matrix: TierMatrix) -> None:
    text = '# routes\n\n[[routes]]\napp = "operations"\npath = "/a/{x}"\n\n'
    text += '[[routes]]\napp = "operations"\npath = "/a/{y}"\n'
    (problem,) = config_problems(tmp_path, text, matrix)
    assert (problem.key, problem.line) == ("routes[1].path", 7)
    assert "'/a/{y}'" in problem.message and "'/a/{x}'" in problem.message
    assert "routes[0]" in problem.message and "line 3" in problem.message


@pytest.mark.parametrize(
    ("first", "second", "message"),
    [
        pytest.param(
            'name = "a.get"\nmethods = ["GET"]\n', 'name = "a.any"\n',
            "ambiguous: '/a' and '/a' (routes[0] 'a.get' at line 1) have the same shape and "
            "can both take GET, HEAD; give each method to one route: add `methods = [...]` to "
            "routes[0] 'a.get' at line 1 or routes[1] 'a.any' at line 7 so that no method is "
            "in both",
            id="one-without-methods",
        ),
        pytest.param(
            "", "",
            "ambiguous: '/a' and '/a' (routes[0] at line 1) have the same shape and can both "
            "take every method; give each method to one route: add `methods = [...]` to "
            "routes[0] at line 1 or routes[1] at line 5 so that no method is in both",
            id="neither-has-methods",
        ),
        pytest.param(
            'methods = ["GET", "POST", "DELETE"]\n', 'name = "a.b"\nmethods = ["DELETE", "POST"]\n',
            "ambiguous: '/a' and '/a' (routes[0] at line 1) have the same shape and can both "
            "take POST, DELETE; give each method to one route: remove POST, DELETE from the "
            "`methods` of routes[0] at line 1 or of routes[1] 'a.b' at line 6",
            id="overlapping-methods",
        ),
        pytest.param(
            'methods = ["GET"]\n', 'methods = ["HEAD"]\n',
            "can both take HEAD (GET implies HEAD); give each method to one route: remove "
            "HEAD (GET implies HEAD) from the `methods` of routes[0] at line 1 or of routes[1] "
            "at line 6",
            id="implied-head",
        ),
    ],
)  # fmt: skip
def test_ambiguity_error_suggests_the_fix(
    tmp_path: Path, matrix: TierMatrix, first: str, second: str, message: str
) -> None:
    text = RO + first + 'path = "/a"\n\n' + RO + second + 'path = "/a"\n'
    (problem,) = config_problems(tmp_path, text, matrix)
    assert message in problem.message


SHARED_PATH = (
    RO + 'name = "reports.read"\nmethods = ["GET"]\npath = "/reports"\nfeature = "ops.on_demand"\n',
    RO + 'name = "reports.delete"\nmethods = ["DELETE"]\npath = "/reports"\n'
    'feature = "ops.health_data_protection"\nroles = ["owner"]\n',
)


@pytest.mark.parametrize("order", [(0, 1), (1, 0)], ids=["read-first", "delete-first"])
@pytest.mark.parametrize("unmatched", ["allow", "deny"])
def test_method_no_same_shape_route_lists_follows_the_unmatched_policy_in_any_file_order(
    tmp_path: Path, matrix: TierMatrix, order: tuple[int, int], unmatched: str
) -> None:
    """``GET`` gated by one feature, ``DELETE`` by another: ``PUT`` is neither route's, so the
    app's ``unmatched`` policy decides it, not whichever route comes first in the file."""
    text = f'[apps.operations]\nunmatched = "{unmatched}"\n\n'
    text += "\n".join(SHARED_PATH[i] for i in order)
    table = compile_routes(tmp_path, text, matrix)
    found = table.match("operations", "PUT", "/reports")
    assert (found.kind, found.route) == (Match.PARTIAL, None)
    assert [r.name for r in found.shared] == [["reports.read", "reports.delete"][i] for i in order]
    assert table.match("operations", "HEAD", "/reports").route == table.by_name["reports.read"]
    groups = table.apps["operations"].shared_paths()
    assert [[r.name for r in group] for group in groups] == [[r.name for r in found.shared]]

    now = 1_800_000_000
    claims = LicenseClaims(
        iss="t", sub="t", jti="j", iat=now, nbf=now, exp=now + 60, tier="core", serial=1
    )
    presented = License(claims, kid="-", fingerprint="-")
    policy = Policy(matrix=matrix)
    decision = decide(policy, found, table.apps["operations"].unmatched, presented, None, None, now)
    if unmatched == "allow":
        assert (decision.allowed, decision.code, decision.feature) == (True, "allowed", None)
    else:
        assert (decision.allowed, decision.code) == (False, "route_unmatched")


def test_every_problem_is_listed(tmp_path: Path, matrix: TierMatrix) -> None:
    text = RO + 'path = "/a/{x:path}/b"\n\n'  # line 1
    text += RO + 'path = "/b"\nfeature = "ops.nope"\n\n'  # line 5
    text += RO + 'path = "/c"\n\n'  # line 10: fine
    text += RO + 'path = "/c"\n\n'  # line 14: ambiguous with routes[2]
    text += RO + 'methods = ["get"]\npath = "/d"\n'  # line 18
    problems = config_problems(tmp_path, text, matrix)
    assert [(p.key, p.line) for p in problems] == [
        ("routes[0].path", 1),
        ("routes[1].feature", 5),
        ("routes[3].path", 14),
        ("routes[4].methods", 18),
    ]


@pytest.mark.parametrize(
    "text",
    [
        pytest.param(
            RO + 'methods = ["GET"]\npath = "/a/{x}"\n\n'
            + RO + 'methods = ["POST"]\npath = "/a/{y}"\n',
            id="same-shape-disjoint-methods",
        ),
        pytest.param(RO + 'path = "/a/{x}"\n\n' + RO + 'path = "/a/b"\n', id="literal-and-param"),
        pytest.param(
            RO + 'path = "/a/{x}"\n\n' + RO + 'path = "/a/{x:path}"\n', id="param-and-catchall"
        ),
        pytest.param(
            RO + 'path = "/a/{x}/c"\n\n' + RO + 'path = "/{x}/b/c"\n', id="crossed-params"
        ),
        pytest.param(
            '[[routes]]\napp = "operations"\npath = "/a"\n\n'
            '[[routes]]\napp = "client_portal"\npath = "/a"\n',
            id="same-path-different-apps",
        ),
        pytest.param(
            RO + 'path = "/a/{id}"\n\n' + RO + 'path = "/b/{id}"\n', id="param-name-reused"
        ),
        pytest.param("", id="empty-file"),
    ],
)  # fmt: skip
def test_not_ambiguous(tmp_path: Path, matrix: TierMatrix, text: str) -> None:
    compile_routes(tmp_path, text, matrix)


def test_toml_syntax_error_names_the_line(tmp_path: Path, matrix: TierMatrix) -> None:
    path = tmp_path / "routes.toml"
    path.write_text(RO + 'path = "/a"\n\n[[routes]\n')
    with pytest.raises(ConfigError) as caught:
        TomlDocument.read(path)
    (problem,) = caught.value.problems
    assert (problem.file, problem.line) == (str(path), 5)
    assert "TOML syntax error" in problem.message
