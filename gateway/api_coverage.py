"""Proving a route table against an API's OpenAPI document (3.0 or 3.1, JSON or YAML).

``load_operations`` lists the document's operations (``METHOD /path``, the servers' base
path included); ``coverage`` looks each one up in an app's compiled routes the way a
request would be, with every ``{param}`` of the template standing for any one segment (no
route literal can contain ``{``), and reports the operations no route takes and the routes
no operation reaches.

    report = coverage(config.routes.apps["operations"], ("/xdispatch/",),
                      load_operations(Path("docs/openapi/operations.yaml")))
    report.unmapped, report.dead
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import msgspec
import msgspec.yaml

from gateway.routes import AppRoutes, Match, Route

# The operation keys of a Path Item Object (OpenAPI 3.0 and 3.1).
HTTP_METHODS = ("get", "put", "post", "delete", "options", "head", "patch", "trace")


class OpenApiError(ValueError):
    """A document that is not a usable OpenAPI 3.0/3.1 description; the message says why."""


class Operation(msgspec.Struct, frozen=True):
    method: str  # upper-case
    path: str  # the server's base path + the path template
    operation_id: str | None = None


class Mapped(msgspec.Struct, frozen=True):
    operation: Operation
    route: Route | None  # None: a classic path prefix
    how: str  # "route", "classic"


class Unmapped(msgspec.Struct, frozen=True):
    operation: Operation
    why: str


class Coverage(msgspec.Struct, frozen=True):
    mapped: list[Mapped]
    unmapped: list[Unmapped]
    dead: list[Route]

    @property
    def complete(self) -> bool:
        return not self.unmapped and not self.dead


def load_operations(path: Path) -> list[Operation]:
    """Every operation of the document at ``path``; ``OpenApiError`` if it cannot be read."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise OpenApiError(f"{path}: cannot read: {exc.strerror}") from exc
    return parse_operations(raw, str(path))


def parse_operations(raw: bytes, name: str = "<openapi>") -> list[Operation]:
    """Decode JSON (when it starts with ``{``) or YAML and list the operations."""
    try:
        if raw.lstrip()[:1] == b"{":
            doc = msgspec.json.decode(raw)
        else:
            doc = msgspec.yaml.decode(raw)
    except msgspec.DecodeError as exc:
        raise OpenApiError(f"{name}: not JSON or YAML: {exc}") from exc
    if not isinstance(doc, dict):
        raise OpenApiError(f"{name}: the document is not an object")
    version = doc.get("openapi")
    if not isinstance(version, str) or not version.startswith(("3.0.", "3.1.")):
        raise OpenApiError(
            f"{name}: not an OpenAPI 3.0 or 3.1 document (openapi: {version!r}; "
            "Swagger 2.0 documents need converting first)"
        )
    paths = doc.get("paths", {})
    if not isinstance(paths, dict):
        raise OpenApiError(f"{name}: `paths` is not an object")
    base = _base_path(doc.get("servers"), name, "servers")
    operations: list[Operation] = []
    for template, item in paths.items():
        where = f"paths.{template}"
        if not isinstance(template, str) or not template.startswith("/"):
            raise OpenApiError(f"{name}: {where}: a path must start with '/'")
        item = _resolve(doc, item, name, where)
        item_base = _base_path(item.get("servers"), name, f"{where}.servers", base)
        for method in HTTP_METHODS:
            operation = item.get(method)
            if operation is None:
                continue
            operation = _resolve(doc, operation, name, f"{where}.{method}")
            op_base = _base_path(operation.get("servers"), name, f"{where}.{method}", item_base)
            operation_id = operation.get("operationId")
            operations.append(
                Operation(
                    method=method.upper(),
                    path=op_base + template,
                    operation_id=operation_id if isinstance(operation_id, str) else None,
                )
            )
    return operations


def _resolve(doc: Mapping[str, Any], value: Any, name: str, where: str) -> dict[str, Any]:
    """An object, following a local ``$ref`` (``#/components/pathItems/...``) if it is one."""
    seen: set[str] = set()
    while isinstance(value, dict) and isinstance(value.get("$ref"), str):
        ref: str = value["$ref"]
        if not ref.startswith("#/") or ref in seen:
            raise OpenApiError(f"{name}: {where}: only local, acyclic $ref are followed ({ref})")
        seen.add(ref)
        value = doc
        for part in ref[2:].split("/"):
            part = part.replace("~1", "/").replace("~0", "~")
            if not isinstance(value, dict) or part not in value:
                raise OpenApiError(f"{name}: {where}: $ref {ref} points nowhere")
            value = value[part]
    if not isinstance(value, dict):
        raise OpenApiError(f"{name}: {where}: not an object")
    return value


def _base_path(servers: Any, name: str, where: str, default: str = "") -> str:
    """The path part of the first server's URL (variables at their defaults), no trailing
    slash; ``default`` when no servers are given."""
    if servers is None or servers == []:
        return default
    if not isinstance(servers, list) or not isinstance(servers[0], dict):
        raise OpenApiError(f"{name}: {where}: not a list of Server Objects")
    server = servers[0]
    url = server.get("url")
    if not isinstance(url, str):
        raise OpenApiError(f"{name}: {where}[0].url: missing")
    for variable, spec in (server.get("variables") or {}).items():
        default_value = spec.get("default") if isinstance(spec, dict) else None
        if not isinstance(default_value, str):
            raise OpenApiError(f"{name}: {where}[0].variables.{variable}: no default")
        url = url.replace("{" + variable + "}", default_value)
    if "{" in url:
        raise OpenApiError(f"{name}: {where}[0].url: {url!r} has a variable with no default")
    path = urlsplit(url).path if "://" in url else url.split("?", 1)[0]
    return path.rstrip("/")


def coverage(
    app_routes: AppRoutes, classic_prefixes: Iterable[str], operations: Iterable[Operation]
) -> Coverage:
    """Which operations map to a route (or a classic prefix), which do not, and which of
    the app's routes no operation reaches."""
    prefixes = tuple(classic_prefixes)
    mapped: list[Mapped] = []
    unmapped: list[Unmapped] = []
    reached: set[str] = set()
    for operation in operations:
        path = operation.path
        if prefixes and (path.startswith(prefixes) or path + "/" in prefixes):
            mapped.append(Mapped(operation, None, "classic"))
            continue
        found = app_routes.match(operation.method, path)
        if found.kind is Match.FULL and found.route is not None:
            reached.add(found.route.key)
            mapped.append(Mapped(operation, found.route, "route"))
        elif found.kind is Match.PARTIAL:
            owners = found.shared or ((found.route,) if found.route else ())
            names = ", ".join(route.label for route in owners)
            unmapped.append(
                Unmapped(operation, f"path of {names}, which does not list {operation.method}")
            )
        else:
            unmapped.append(
                Unmapped(operation, f'no route; unmatched = "{app_routes.unmatched}" decides')
            )
    dead = [route for route in app_routes.routes if route.key not in reached]
    return Coverage(mapped, unmapped, dead)
