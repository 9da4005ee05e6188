"""The OpenAPI 3.1 document of the gateway's own endpoints, built from the code.

The request and response schemas of the entitlements API and the provisioning hook are
generated from the msgspec Structs that produce and parse those bodies
(``Entitlements``, ``ClickBody``, ``ProvisionEvent``), so the document cannot drift from
what the gateway sends; the prefix, header names and admin address come from the settings,
and, given the tier matrix, the feature names and targets a click may name come from it.

    document = openapi_document(settings, matrix)   # a dict
    body = encode_openapi(settings, matrix)         # bytes for GET {prefix}/openapi.json
"""

from __future__ import annotations

from typing import Any

import msgspec

from gateway import __version__
from gateway.clicks import MAX_EVENT_BYTES, ClickBody
from gateway.config import Settings
from gateway.entitlements import Entitlements
from gateway.matrix import APP_NAMES, TierMatrix
from gateway.provision import NOT_APPLIED, ProvisionEvent
from gateway.routes import ROLES

_REF = "#/components/schemas/{name}"


def _problem_schema() -> dict[str, Any]:
    return {
        "type": "object",
        "description": "RFC 9457 problem details; denials add feature, tier and upsell fields.",
        "required": ["type", "title", "status", "code"],
        "properties": {
            "type": {"type": "string"},
            "title": {"type": "string"},
            "status": {"type": "integer"},
            "code": {"type": "string"},
            "detail": {"type": "string"},
            "request_id": {"type": "string"},
        },
        "additionalProperties": True,
    }


def _problem(description: str, headers: dict[str, Any] | None = None) -> dict[str, Any]:
    response: dict[str, Any] = {
        "description": description,
        "content": {"application/problem+json": {"schema": {"$ref": _REF.format(name="Problem")}}},
    }
    if headers:
        response["headers"] = headers
    return response


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _admin_server(settings: Settings) -> list[dict[str, str]]:
    return [
        {
            "url": f"http://{settings.admin.listen}",
            "description": "the admin listener (admin.listen); never on a tenant-facing address",
        }
    ]


def _click_names(click: dict[str, Any], matrix: TierMatrix) -> None:
    """Narrow the click schema to what this matrix accepts: its features, and a tier or
    add-on of it as the target (anything else is 400 ``bad_event``)."""
    properties = click["properties"]
    properties["feature"]["enum"] = list(matrix.features)
    properties["target"]["enum"] = [
        *(f"tier:{name}" for name in matrix.tiers),
        *(f"addon:{name}" for name in matrix.addons),
    ]


def openapi_document(settings: Settings, matrix: TierMatrix | None = None) -> dict[str, Any]:
    """The document for these settings: ``{prefix}`` substituted, header names as
    configured; with ``matrix``, the names a click may carry listed."""
    prefix = settings.entitlements.prefix
    lic = settings.license
    _, components = msgspec.json.schema_components(
        (Entitlements, ClickBody, ProvisionEvent), ref_template=_REF
    )
    if matrix is not None:
        _click_names(components["ClickBody"], matrix)
    components["Problem"] = _problem_schema()
    identity = [
        {
            "name": lic.header,
            "in": "header",
            "required": False,
            "schema": {"type": "string"},
            "description": "the signed license key (or send the tenant id instead)",
        },
        {
            "name": lic.tenant_header,
            "in": "header",
            "required": False,
            "schema": {"type": "string"},
            "description": "tenant id: the tenant's current license comes from the store",
        },
        {
            "name": lic.role_header,
            "in": "header",
            "required": False,
            # Taken as sent (README, Headers): another value is no error, it only holds
            # none of these roles' rights, like a standard user.
            "schema": {"type": "string"},
            "description": f"one of {', '.join(ROLES)}: owner and admin may buy, "
            "dispatch_only sees no upsell; here any other value (or none) counts as standard",
        },
        {"name": lic.user_header, "in": "header", "required": False, "schema": {"type": "string"}},
    ]
    unlicensed = _problem("no license, or the license is not valid (license_* codes)")
    # How the caller is resolved, as for any request (README, Answers and status codes).
    mismatch = "tenant_mismatch: the license key is another tenant's than the tenant header"
    unavailable = _problem(
        "store_unavailable or license_check_busy: retry shortly",
        {"Retry-After": {"schema": {"type": "integer"}}},
    )
    tags = [
        {"name": "tenant", "description": "on every app listener, under [entitlements] prefix"},
        {"name": "admin", "description": "on the admin listener only"},
    ]
    cache_headers = {
        "ETag": {"schema": {"type": "string"}, "description": "strong tag of the body"},
        "Cache-Control": {"schema": {"type": "string"}, "description": "private, max-age=..."},
    }
    paths: dict[str, Any] = {
        prefix: {
            "get": {
                "tags": ["tenant"],
                "operationId": "getEntitlements",
                "summary": "The caller's plan: tier, every feature's state, add-ons, seats",
                "parameters": [
                    {
                        "name": "app",
                        "in": "query",
                        "required": False,
                        "schema": {"type": "string", "enum": list(APP_NAMES)},
                        "description": "only this app's features and the add-ons that unlock them",
                    },
                    {
                        "name": "If-None-Match",
                        "in": "header",
                        "required": False,
                        "schema": {"type": "string"},
                    },
                    *identity,
                ],
                "responses": {
                    "200": {
                        **_json({"$ref": _REF.format(name="Entitlements")}, "the plan"),
                        "headers": cache_headers,
                    },
                    "304": {"description": "not modified", "headers": cache_headers},
                    "400": _problem("bad_request: unknown app in ?app=; bad_header"),
                    "401": unlicensed,
                    "403": _problem(mismatch),
                    "503": unavailable,
                },
            }
        },
        f"{prefix}/events": {
            "post": {
                "tags": ["tenant"],
                "operationId": "postEvent",
                "summary": "A UI reports an upgrade_click",
                "parameters": identity,
                "requestBody": {
                    "required": True,
                    "description": f"at most {MAX_EVENT_BYTES} bytes",
                    "content": {
                        "application/json": {"schema": {"$ref": _REF.format(name="ClickBody")}}
                    },
                },
                "responses": {
                    "202": {"description": "accepted; emitted to the event sinks"},
                    "400": _problem(
                        "bad_event: not JSON, too large, unknown kind/feature/target; bad_header"
                    ),
                    "401": unlicensed,
                    "403": _problem(
                        f"role_forbidden: dispatch_only users get no nudges; {mismatch}"
                    ),
                    "415": _problem("unsupported_media_type: not application/json"),
                    "429": _problem(
                        "rate_limited: too many events for this tenant",
                        {"Retry-After": {"schema": {"type": "integer"}}},
                    ),
                    "503": unavailable,
                },
            }
        },
        f"{prefix}/ui": {
            "get": {
                "tags": ["tenant"],
                "operationId": "getPlanPage",
                "summary": "The plan page (HTML; loads ui.css and ui.js beside it)",
                "parameters": [
                    {
                        "name": "from",
                        "in": "query",
                        "required": False,
                        "schema": {"type": "string"},
                        "description": "request id of the 403 that linked here",
                    },
                    {
                        "name": "feature",
                        "in": "query",
                        "required": False,
                        "schema": {"type": "string"},
                        "description": "the feature to highlight",
                    },
                ],
                "responses": {
                    "200": {
                        "description": "the page",
                        "content": {"text/html": {"schema": {"type": "string"}}},
                    }
                },
            }
        },
        f"{prefix}/openapi.json": {
            "get": {
                "tags": ["tenant"],
                "operationId": "getOpenApi",
                "summary": "This document",
                "responses": {"200": _json({"type": "object"}, "OpenAPI 3.1")},
            }
        },
        "/admin/provision": {
            "servers": _admin_server(settings),
            "post": {
                "tags": ["admin"],
                "operationId": "provision",
                "summary": "The billing hook (HMAC-signed)",
                "parameters": [
                    {
                        "name": "Gateway-Signature",
                        "in": "header",
                        "required": True,
                        "schema": {"type": "string", "pattern": "^t=\\d+(,v1=[0-9a-f]{64})+$"},
                        "description": "t=<unix time>,v1=<hex HMAC-SHA256(secret, '<t>.<body>')>",
                    },
                ],
                "requestBody": {
                    "required": True,
                    "content": {
                        "application/json": {"schema": {"$ref": _REF.format(name="ProvisionEvent")}}
                    },
                },
                "responses": {
                    "200": _json(
                        {
                            "type": "object",
                            "required": ["applied"],
                            "properties": {
                                "applied": {"type": "boolean"},
                                "reason": {"enum": list(NOT_APPLIED)},
                            },
                        },
                        "applied, or not, and then why (`reason`)",
                    ),
                    "400": _problem("bad body; `field` names the field"),
                    "401": _problem("bad or stale signature"),
                    "413": _problem("body_too_large"),
                    "503": _problem("provisioning_disabled or store_unavailable"),
                },
            },
        },
        "/admin/config": {
            "servers": _admin_server(settings),
            "get": {
                "tags": ["admin"],
                "operationId": "getConfig",
                "summary": "What the running process loaded: revisions, key ids, apps",
                "responses": {"200": _json({"type": "object"}, "the loaded configuration")},
            },
        },
        "/healthz": {
            "servers": _admin_server(settings),
            "get": {
                "tags": ["admin"],
                "operationId": "healthz",
                "summary": "Alive: the event loop answers",
                "responses": {
                    "200": _json(
                        {
                            "type": "object",
                            "required": ["status", "pid"],
                            "properties": {
                                "status": {"const": "ok"},
                                "pid": {"type": "integer", "description": "the answering process"},
                            },
                        },
                        "alive",
                    )
                },
            },
        },
        "/readyz": {
            "servers": _admin_server(settings),
            "get": {
                "tags": ["admin"],
                "operationId": "readyz",
                "summary": "Ready: config loaded and every upstream accepts connections",
                "responses": {
                    "200": _json({"$ref": _REF.format(name="Readiness")}, "ready"),
                    "503": _json({"$ref": _REF.format(name="Readiness")}, "not ready"),
                },
            },
        },
        "/metrics": {
            "servers": _admin_server(settings),
            "get": {
                "tags": ["admin"],
                "operationId": "metrics",
                "summary": "Prometheus metrics",
                "responses": {
                    "200": {
                        "description": "text exposition format",
                        "content": {"text/plain": {"schema": {"type": "string"}}},
                    }
                },
            },
        },
    }
    components["Readiness"] = {
        "type": "object",
        "required": ["ready", "config", "upstreams", "store", "draining"],
        "properties": {
            "ready": {"type": "boolean"},
            "config": {
                "type": "object",
                "properties": {"routes": {"type": "string"}, "matrix": {"type": "string"}},
            },
            "upstreams": {"type": "object", "additionalProperties": {"type": "boolean"}},
            "store": {"enum": ["up", "down"]},
            "draining": {"type": "boolean"},
        },
    }
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "Entitlement gateway",
            "version": __version__,
            "description": "The gateway's own endpoints. Tenant endpoints are answered by "
            "the gateway on every app listener and never forwarded; admin endpoints are on "
            "the admin listener only.",
        },
        "servers": [{"url": "/", "description": "an app listener"}],
        "tags": tags,
        "paths": paths,
        "components": {"schemas": dict(sorted(components.items()))},
    }


def encode_openapi(settings: Settings, matrix: TierMatrix | None = None) -> bytes:
    return msgspec.json.encode(openapi_document(settings, matrix))
