"""Reading OpenAPI 3.0/3.1 documents into operations, and their coverage by a route table."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest

from gateway.api_coverage import OpenApiError, Operation, coverage, parse_operations
from gateway.routes import RouteTable


def parse(text: str) -> list[tuple[str, str]]:
    return [(op.method, op.path) for op in parse_operations(textwrap.dedent(text).encode())]


def test_yaml_operations_with_the_servers_base_path() -> None:
    operations = parse_operations(
        textwrap.dedent(
            """\
            openapi: 3.0.3
            servers:
              - url: https://{tenant}.example.com/{base}/
                variables:
                  tenant: {default: demo}
                  base: {default: api/v1}
              - url: https://other.example.com/ignored
            paths:
              /shipments/{id}:
                parameters: [{name: id, in: path, required: true}]
                summary: not an operation
                get: {operationId: getShipment, responses: {'200': {description: OK}}}
                delete: {responses: {'200': {description: OK}}}
              /health:
                servers: [{url: /}]
                head: {}
            """
        ).encode()
    )
    assert operations == [
        Operation("GET", "/api/v1/shipments/{id}", "getShipment"),
        Operation("DELETE", "/api/v1/shipments/{id}", None),
        Operation("HEAD", "/health", None),
    ]


def test_json_31_with_path_item_refs_and_operation_servers() -> None:
    document = {
        "openapi": "3.1.0",
        "paths": {
            "/a": {"$ref": "#/components/pathItems/A"},
            "/b": {"post": {"servers": [{"url": "https://x.example.com/v2"}]}},
        },
        "components": {"pathItems": {"A": {"get": {}, "trace": {}}}},
        "webhooks": {"ignored": {"post": {}}},
    }
    operations = parse_operations(json.dumps(document).encode())
    assert [(op.method, op.path) for op in operations] == [
        ("GET", "/a"),
        ("TRACE", "/a"),
        ("POST", "/v2/b"),
    ]


def test_a_document_without_paths_has_no_operations() -> None:
    assert parse("openapi: 3.1.0\ninfo: {title: t, version: '1'}\n") == []


@pytest.mark.parametrize(
    ("text", "message"),
    [
        pytest.param("openapi: 3.0.3\nservers: [{url: '/{v}'}]\npaths: {}\n",
                     "has a variable with no default", id="server-variable-undeclared"),
        pytest.param("openapi: 3.0.3\nservers: [{url: '/{v}', variables: {v: {}}}]\npaths: {}\n",
                     "variables.v: no default", id="server-variable-without-default"),
        pytest.param("openapi: 3.0.3\nservers: {url: /}\npaths: {}\n",
                     "not a list of Server Objects", id="servers-not-a-list"),
        pytest.param("openapi: 3.0.3\npaths:\n  /a: {$ref: '#/nowhere'}\n",
                     "points nowhere", id="dangling-ref"),
        pytest.param("openapi: 3.0.3\npaths:\n  /a: {$ref: '#/paths/~1a'}\n",
                     "acyclic", id="self-ref"),
        pytest.param("openapi: 3.0.3\npaths:\n  /a: {get: 1}\n", "paths./a.get: not an object",
                     id="operation-not-an-object"),
        pytest.param("openapi: 3.2\npaths: {}\n", "not an OpenAPI 3.0 or 3.1", id="version"),
    ],
)  # fmt: skip
def test_bad_documents_are_refused_with_the_place(text: str, message: str) -> None:
    with pytest.raises(OpenApiError) as caught:
        parse_operations(text.encode(), "api.yaml")
    assert str(caught.value).startswith("api.yaml: ") and message in str(caught.value)


def test_coverage_on_the_shipped_routes(route_table: RouteTable) -> None:
    operations = [
        Operation("GET", "/api/v1/phi"),  # a catch-all's bare prefix
        Operation("DELETE", "/api/v1/phi/{recordId}/notes/{noteId}"),
        Operation("GET", "/api/v1/shipments/{shipment_id}/phi"),
        Operation("POST", "/api/v1/shipments/{id}/phi"),  # single route, method not listed
        Operation("PUT", "/api/v1/users"),  # shared path, method listed by neither
        Operation("GET", "/api/v1/Health"),
        Operation("GET", "/xdispatch/orders/{id}"),
        Operation("GET", "/xdispatch"),
    ]
    report = coverage(route_table.apps["operations"], ("/xdispatch/",), operations)
    assert [(m.operation.path, m.how, m.route and m.route.label) for m in report.mapped] == [
        ("/api/v1/phi", "route", "ops.phi"),
        ("/api/v1/phi/{recordId}/notes/{noteId}", "route", "ops.phi"),
        ("/api/v1/shipments/{shipment_id}/phi", "route", "ops.shipment.phi"),
        ("/xdispatch/orders/{id}", "classic", None),
        ("/xdispatch", "classic", None),
    ]
    assert [(u.operation.method, u.why) for u in report.unmapped] == [
        ("POST", "path of ops.shipment.phi, which does not list POST"),
        ("PUT", "path of ops.users.list, ops.users.create, which does not list PUT"),
        ("GET", 'no route; unmatched = "allow" decides'),
    ]
    dead = {route.label for route in report.dead}
    assert "ops.phi" not in dead and "ops.health" in dead and len(dead) == 32
    assert not report.complete


def test_the_shipped_samples_parse(repo_root: Path) -> None:
    from gateway.api_coverage import load_operations

    for name in ("operations.yaml", "client_portal.yaml", "driver_app.json"):
        operations = load_operations(repo_root / "docs" / "openapi" / name)
        assert operations and all(op.path.startswith("/api/v1/") for op in operations)
