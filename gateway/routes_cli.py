"""The route-table verbs of the ``gateway`` command: prove, export and test ``routes.toml``.

    gateway routes coverage --config gateway.toml --app operations --openapi ops.yaml
    gateway routes export --config gateway.toml --format csv
    gateway test tests/route_tests.toml --config gateway.toml

``gateway.cli`` registers them with ``add_parsers(commands)`` and dispatches through
``HANDLERS``. Exit codes as for every verb: 0 success, 1 the thing checked fails, 2 usage.
"""

from __future__ import annotations

import argparse
import csv
import io
from collections.abc import Callable
from pathlib import Path

import msgspec

from gateway.api_coverage import coverage, load_operations
from gateway.config import Config, load_config
from gateway.matrix import APP_NAMES, TierMatrix
from gateway.routes import ROLES, Route, sorted_methods
from gateway.routetest import case_title, load_cases, run_case

EXIT_OK, EXIT_INVALID = 0, 1


def add_parsers(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    routes = commands.add_parser("routes", help="prove and export the route table").add_subparsers(
        dest="routes_command", required=True, metavar="VERB"
    )
    covered = routes.add_parser(
        "coverage", help="every OpenAPI operation has a route, every route an operation"
    )
    covered.add_argument("--config", type=Path, default=Path("gateway.toml"))
    covered.add_argument("--app", required=True, choices=APP_NAMES)
    covered.add_argument("--openapi", type=Path, required=True, help="OpenAPI 3.0/3.1, JSON/YAML")

    export = routes.add_parser("export", help="one row per route and method, for sign-off")
    export.add_argument("--config", type=Path, default=Path("gateway.toml"))
    export.add_argument("--format", choices=("csv", "markdown"), default="csv")
    export.add_argument("--app", choices=APP_NAMES, help="only this app's routes")

    test = commands.add_parser("test", help="run declarative decision tests ([[case]])")
    test.add_argument("file", type=Path, help="a TOML file of [[case]] tables")
    test.add_argument("--config", type=Path, default=Path("gateway.toml"))


def _routes(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    if args.routes_command == "coverage":
        return _coverage(args, config)
    rows = export_rows(config, args.app)
    print(to_csv(rows) if args.format == "csv" else to_markdown(rows), end="")
    return EXIT_OK


def _coverage(args: argparse.Namespace, config: Config) -> int:
    operations = load_operations(args.openapi)
    app_routes = config.routes.apps[args.app]
    settings = config.settings.apps.get(args.app)
    prefixes = settings.classic_path_prefixes if settings is not None else ()
    report = coverage(app_routes, prefixes, operations)
    print(
        f"{args.app}: {len(operations)} operations in {args.openapi}, "
        f"{len(app_routes.routes)} routes; {len(report.mapped)} operations mapped"
    )
    if report.unmapped:
        print(f"unmapped operations ({len(report.unmapped)}):")
        for unmapped in report.unmapped:
            operation = unmapped.operation
            print(f"  {operation.method} {operation.path}  ({unmapped.why})")
    if report.dead:
        print(f"dead routes, reached by no operation ({len(report.dead)}):")
        for route in report.dead:
            methods = ", ".join(_listed_methods(route))
            print(f"  {route.label} {route.path} [{methods}]  ({config.routes.file}:{route.line})")
    print("OK" if report.complete else "FAILED")
    return EXIT_OK if report.complete else EXIT_INVALID


def _test(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    results = [run_case(case, config) for case in load_cases(args.file, config)]
    failed = [result for result in results if not result.passed]
    for result in failed:
        print(f"FAIL {result.case.where} {case_title(result.case)}")
        for line in result.diff:
            print(f"  {line}")
    passed = len(results) - len(failed)
    print(f"{len(results)} cases: {passed} passed, {len(failed)} failed")
    return EXIT_INVALID if failed else EXIT_OK


HANDLERS: dict[str, Callable[[argparse.Namespace], int]] = {"routes": _routes, "test": _test}


# --------------------------------------------------------------------------- export


class ExportRow(msgspec.Struct, frozen=True):
    """One route and method: what the board signs off."""

    app: str
    name: str
    method: str  # "*": every method
    path: str
    access: str  # "public", "license" (any tier), "feature"
    feature: str
    tiers: str  # the tiers whose plan includes it
    addons: str  # "add-on (tier: price, ...)": what unlocks it for the other tiers
    roles: str
    quota: str
    line: int | None


COLUMNS = tuple(ExportRow.__struct_fields__)


def export_rows(config: Config, app: str | None = None) -> list[ExportRow]:
    rows: list[ExportRow] = []
    for route in config.routes.routes():
        if app is not None and route.app != app:
            continue
        tiers, addons = _unlocked_by(config.matrix, route)
        access = "public" if route.public else ("feature" if route.feature else "license")
        roles = [role for role in ROLES if route.roles is not None and role in route.roles]
        for method in _listed_methods(route):
            rows.append(
                ExportRow(
                    app=route.app,
                    name=route.label,
                    method=method,
                    path=route.path,
                    access=access,
                    feature=route.feature or "",
                    tiers=tiers,
                    addons=addons,
                    roles=", ".join(roles),
                    quota=route.quota or "",
                    line=route.line,
                )
            )
    return rows


def _listed_methods(route: Route) -> list[str]:
    if route.methods is None:
        return ["*"]
    methods = set(route.methods)
    if "GET" in methods:
        methods.discard("HEAD")  # implied by GET, not written by the author
    return sorted_methods(methods)


def _unlocked_by(matrix: TierMatrix, route: Route) -> tuple[str, str]:
    if route.public:
        return "", ""
    if route.feature is None:
        return ", ".join(matrix.tiers), ""
    feature = route.feature
    tiers = [name for name, tier in matrix.tiers.items() if feature in tier.features]
    addons = []
    for name, addon in matrix.addons.items():
        buyers = [t for t in addon.available_to if t not in tiers and feature in addon.features]
        if buyers:
            offers = ", ".join(f"{t}: {addon.prices.get(t, '?')}" for t in buyers)
            addons.append(f"{name} ({offers})")
    return ", ".join(tiers), "; ".join(addons)


def to_csv(rows: list[ExportRow]) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(COLUMNS)
    for row in rows:
        writer.writerow(["" if v is None else v for v in msgspec.structs.astuple(row)])
    return out.getvalue()


def to_markdown(rows: list[ExportRow]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for row in rows:
        cells = ("" if v is None else str(v) for v in msgspec.structs.astuple(row))
        lines.append("| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |")
    return "\n".join(lines) + "\n"
