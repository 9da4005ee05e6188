"""Declarative decision tests for a route table and tier matrix (``gateway test FILE``).

Each ``[[case]]`` of a TOML file is one request and the outcome it must get, decided by
``gateway.explain.evaluate`` (the proxy's steps and the pure decision core), like Envoy's
router check tool or ``opa test``:

    [[case]]
    app = "operations"
    method = "POST"
    path = "/api/v1/shipments/1/optimize"
    tier = "core"                       # or key = "<license key>"; neither: no license
    addons = ["advanced_shipment_optimization"]
    role = "standard"                   # optional
    expect = "allow"                    # or a reason code: "feature_not_entitled", ...
    route = "ops.shipment.optimize"     # optional: the route that must decide it

    cases = load_cases(Path("tests/route_tests.toml"), config)   # ConfigError on bad cases
    results = [run_case(case, config) for case in cases]
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import msgspec

from gateway.config import Config
from gateway.decision import STATUS
from gateway.explain import Explanation, evaluate, hypothetical_license
from gateway.matrix import AppName
from gateway.routes import Role
from gateway.tomlfile import TomlDocument

# "allow" is any forwarded request; the others name one outcome exactly.
OUTCOMES = frozenset({"allow", "allowed", "public", "classic", "path_rejected", *STATUS})


class CaseSpec(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    app: AppName
    method: str
    path: str
    expect: str
    tier: str | None = None
    key: str | None = None
    addons: tuple[str, ...] = ()
    role: Role | None = None
    route: str | None = None  # the name of the route expected to decide it
    name: str | None = None  # a label for the report


class Case(msgspec.Struct, frozen=True):
    spec: CaseSpec
    where: str  # "file:line"


class Result(msgspec.Struct, frozen=True):
    case: Case
    outcome: Explanation
    diff: tuple[str, ...]  # empty: passed

    @property
    def passed(self) -> bool:
        return not self.diff


def load_cases(path: Path, config: Config) -> list[Case]:
    """Read and check every case; ``ConfigError`` lists each problem with its line."""
    doc = TomlDocument.read(path)
    data = doc.data
    for unknown in sorted(set(data) - {"case"}):
        doc.problem(unknown, "unknown top-level key (expected [[case]])")
    raw_cases = data.get("case", [])
    if not isinstance(raw_cases, list):
        doc.problem("case", "must be an array of tables ([[case]])")
        raw_cases = []
    cases: list[Case] = []
    for index, raw in enumerate(raw_cases):
        where: dict[str, Any] = {"header": "[[case]]", "index": index}
        key = f"case[{index}]"
        spec = doc.convert(raw, CaseSpec, key=key, **where)
        if spec is None:
            continue
        before = len(doc.problems)
        _check_case(doc, config, spec, key, where)
        if len(doc.problems) == before:
            line = doc.line_of("[[case]]", index)
            cases.append(Case(spec, f"{doc.name}:{line}"))
    if not raw_cases and not doc.problems:
        doc.problem("case", "no [[case]] in the file")
    doc.raise_if_problems()
    return cases


def _check_case(
    doc: TomlDocument, config: Config, spec: CaseSpec, key: str, where: dict[str, Any]
) -> None:
    matrix = config.matrix
    if spec.expect not in OUTCOMES:
        known = ", ".join(sorted(OUTCOMES))
        doc.problem(f"{key}.expect", f"unknown outcome {spec.expect!r} (known: {known})", **where)
    if spec.tier is not None and spec.key is not None:
        doc.problem(key, "give tier or key, not both", **where)
    if spec.tier is not None and spec.tier not in matrix.tiers:
        doc.problem(f"{key}.tier", f"unknown tier {spec.tier!r}", **where)
    for addon in spec.addons:
        if addon not in matrix.addons:
            doc.problem(f"{key}.addons", f"unknown add-on {addon!r}", **where)
    if spec.addons and spec.tier is None:
        doc.problem(f"{key}.addons", "add-ons go with a tier (a key carries its own)", **where)
    if spec.route is not None and spec.route not in config.routes.by_name:
        doc.problem(f"{key}.route", f"no route is named {spec.route!r}", **where)
    if not spec.path.startswith("/"):
        doc.problem(f"{key}.path", "must start with '/'", **where)
    if not spec.method.isascii() or not spec.method.isalpha():
        doc.problem(f"{key}.method", f"not an HTTP method: {spec.method!r}", **where)


def run_case(case: Case, config: Config, now: float | None = None) -> Result:
    """Decide the case's request and compare it with what the case expects."""
    spec = case.spec
    hypothetical = (
        hypothetical_license(config.matrix, spec.tier, spec.addons, now)
        if spec.tier is not None
        else None
    )
    outcome = evaluate(
        config,
        spec.app,
        spec.method,
        spec.path,
        key=spec.key,
        license=hypothetical,
        role=spec.role,
        now=now,
    )
    diff: list[str] = []
    if not _meets(spec.expect, outcome):
        diff += [f"- expect: {spec.expect}", f"+ got:    {describe(outcome)}"]
    if spec.route is not None:
        match = outcome.found
        got = match.route.label if match is not None and match.route is not None else "(none)"
        if got != spec.route:
            diff += [f"- route:  {spec.route}", f"+ route:  {got}"]
    return Result(case, outcome, tuple(diff))


def _meets(expect: str, outcome: Explanation) -> bool:
    if expect == "allow":
        return outcome.allowed
    return outcome.code == expect


def describe(outcome: Explanation) -> str:
    """``feature_not_entitled (403) by route ops.shipment.optimize, feature ...``."""
    status = f" ({outcome.status})" if outcome.status is not None else ""
    text = f"{outcome.code}{status}"
    match = outcome.found
    if match is not None and match.route is not None:
        text += f" by route {match.route.label}"
    elif match is not None and match.shared:
        text += " (a method none of " + ", ".join(r.label for r in match.shared) + " lists)"
    elif match is not None:
        text += " (no route)"
    decision = outcome.decision
    if decision is not None and decision.feature is not None:
        text += f", feature {decision.feature}"
    return text


def case_title(case: Case) -> str:
    spec = case.spec
    who = (
        f"tier {'+'.join((spec.tier, *spec.addons))}"
        if spec.tier is not None
        else ("key" if spec.key is not None else "no license")
    )
    role = f", role {spec.role}" if spec.role else ""
    label = f"{spec.name}: " if spec.name else ""
    return f"{label}{spec.app} {spec.method.upper()} {spec.path} ({who}{role})"
