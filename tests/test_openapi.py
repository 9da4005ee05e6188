"""The OpenAPI 3.1 document: a valid document (openapi-spec-validator), the prefix and
header names from the settings, and its response schemas checked against real bodies:
entitlements built by gateway.entitlements, clicks accepted by gateway.clicks, and the
admin listener's answers from a running gateway."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import aiohttp
import msgspec
import pytest
from jsonschema import Draft202012Validator
from openapi_spec_validator import validate

from gateway.clicks import upgrade_click
from gateway.config import SeatSettings, Settings, load_settings
from gateway.decision import Policy
from gateway.entitlements import Caller, build_entitlements, encode_entitlements, identify
from gateway.errors import RequestError
from gateway.license import Seats
from gateway.matrix import APP_NAMES, TierMatrix
from gateway.openapi import encode_openapi, openapi_document
from gateway.seats import HeldSeats, seats_view
from tests.harness import Gateway
from tests.test_decision import DAY, NOW, make_license

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def shipped() -> Settings:
    return load_settings(REPO / "gateway.toml")


@pytest.fixture(scope="module")
def document(shipped: Settings, matrix: TierMatrix) -> dict[str, Any]:
    return openapi_document(shipped, matrix)


def schema_of(
    document: dict[str, Any], path: str, method: str, status: str
) -> Draft202012Validator:
    """A validator for one response's JSON schema, its $refs resolved in the document."""
    response = document["paths"][path][method]["responses"][status]
    (media,) = response["content"].values()
    return Draft202012Validator({**media["schema"], "components": document["components"]})


def test_the_document_is_valid_openapi_3_1(document: dict[str, Any]) -> None:
    validate(document)
    assert document["openapi"] == "3.1.0"


def test_it_describes_every_endpoint_of_the_gateway(document: dict[str, Any]) -> None:
    assert set(document["paths"]) == {
        "/_entitlements",
        "/_entitlements/events",
        "/_entitlements/ui",
        "/_entitlements/openapi.json",
        "/admin/provision",
        "/admin/config",
        "/healthz",
        "/readyz",
        "/metrics",
    }
    admin = document["paths"]["/healthz"]["servers"][0]["url"]
    assert admin == "http://127.0.0.1:9900"


def test_prefix_and_header_names_come_from_the_settings(shipped: Settings) -> None:
    settings = msgspec.structs.replace(
        shipped,
        entitlements=msgspec.structs.replace(shipped.entitlements, prefix="/tenant/plan"),
        license=msgspec.structs.replace(shipped.license, role_header="X-Role"),
    )
    document = msgspec.json.decode(encode_openapi(settings))
    validate(document)
    assert {"/tenant/plan", "/tenant/plan/events", "/tenant/plan/ui"} <= set(document["paths"])
    names = [p["name"] for p in document["paths"]["/tenant/plan"]["get"]["parameters"]]
    assert "X-Role" in names and "X-User-Role" not in names


@pytest.mark.parametrize("role", ["owner", "admin", "standard", "dispatch_only", None])
@pytest.mark.parametrize(
    "claims",
    [
        pytest.param({"tier": "core", "trial": True, "expiry": "restrict"}, id="core-trial"),
        pytest.param({"tier": "fleet", "addons": ("emergency_support",)}, id="fleet-addon"),
        pytest.param({"tier": "enterprise"}, id="enterprise"),
        pytest.param({"tier": "fleet", "exp": NOW - DAY}, id="grace"),
        pytest.param({"tier": "fleet", "exp": NOW - 30 * DAY}, id="restricted"),
        pytest.param({"grandfather_tier": "fleet", "grandfather_until": NOW + DAY}, id="gf"),
    ],
)
def test_entitlements_bodies_match_the_schema(
    document: dict[str, Any], matrix: TierMatrix, claims: dict[str, Any], role: str | None
) -> None:
    policy = Policy(matrix=matrix)
    caller = identify(policy, make_license(**claims), None, role, None, NOW)
    assert isinstance(caller, Caller)
    validator = schema_of(document, "/_entitlements", "get", "200")
    for app in (None, *APP_NAMES):
        body = build_entitlements(
            policy,
            caller,
            upsell={"operations": "tag"},
            app=app,
            usage=Seats(ops_users=2, drivers=9),
        )
        validator.validate(msgspec.json.decode(encode_entitlements(body).body))


def test_seats_counted_by_the_gateway_match_the_schema(
    document: dict[str, Any], matrix: TierMatrix
) -> None:
    """``[seats] mode = "active_users"``: each seat kind also has its ``allowance``."""
    policy = Policy(matrix=matrix)
    caller = identify(policy, make_license(tier="fleet"), None, "owner", None, NOW)
    assert isinstance(caller, Caller)
    held = HeldSeats(Seats(ops_users=3, drivers=0), Seats(ops_users=1, drivers=0))
    seats = seats_view(matrix, SeatSettings(mode="active_users"), caller.plan, held, None)
    body = build_entitlements(policy, caller, upsell={}, seats=seats)
    decoded = msgspec.json.decode(encode_entitlements(body).body)
    schema_of(document, "/_entitlements", "get", "200").validate(decoded)
    assert decoded["seats"]["ops_users"] == {"included": 6, "used": 3, "allowance": 7}
    described = document["components"]["schemas"]["SeatCount"]
    assert described["required"] == ["included", "used"]
    assert "hard limit" in described["properties"]["allowance"]["description"]


def test_the_click_schema_accepts_what_the_page_sends(document: dict[str, Any]) -> None:
    click = Draft202012Validator(
        {"$ref": "#/components/schemas/ClickBody", "components": document["components"]}
    )
    click.validate(
        {"event": "upgrade_click", "feature": "ops.sms_messaging", "target": "tier:fleet"}
    )
    assert not click.is_valid({"event": "upgrade_click", "feature": "x"})
    assert not click.is_valid({"event": "upgrade_click", "feature": "x", "target": "y", "z": 1})


@pytest.mark.parametrize(
    "body",
    [
        pytest.param({"event": "", "feature": "ops.sms_messaging", "target": "tier:fleet"},
                     id="event-kind"),
        pytest.param({"event": "upgrade_click", "feature": "ops.nope", "target": "tier:fleet"},
                     id="feature"),
        pytest.param({"event": "upgrade_click", "feature": "ops.sms_messaging",
                      "target": "tier:gold"}, id="tier"),
        pytest.param({"event": "upgrade_click", "feature": "ops.sms_messaging",
                      "target": "fleet"}, id="target-kind"),
        pytest.param({"event": "upgrade_click", "feature": "ops.sms_messaging",
                      "target": "tier:fleet", "source_request_id": "a b"}, id="request-id"),
    ],
)  # fmt: skip
def test_the_click_schema_rejects_what_the_gateway_answers_400(
    document: dict[str, Any], matrix: TierMatrix, body: dict[str, Any]
) -> None:
    """A body the schema allows must not get 400 ``bad_event``: the kinds, the matrix's
    features and targets, the request id's shape are in the schema."""
    click = Draft202012Validator(
        {"$ref": "#/components/schemas/ClickBody", "components": document["components"]}
    )
    assert not click.is_valid(body)
    caller = identify(Policy(matrix=matrix), make_license(), None, "owner", None, NOW)
    assert isinstance(caller, Caller)
    with pytest.raises(RequestError) as refused:
        upgrade_click(msgspec.json.encode(body), "application/json", matrix, caller, "operations")
    assert refused.value.code == "bad_event"


def test_the_tenant_endpoints_document_how_the_caller_is_refused(
    document: dict[str, Any],
) -> None:
    """Resolving the caller can answer a key of another tenant (403) and an unreachable
    store (503) on both tenant endpoints; the role header is any string (taken as sent)."""
    for path, method in (("/_entitlements", "get"), ("/_entitlements/events", "post")):
        operation = document["paths"][path][method]
        assert {"400", "401", "403", "503"} <= set(operation["responses"]), path
        assert "tenant_mismatch" in operation["responses"]["403"]["description"]
        role = next(p for p in operation["parameters"] if p["name"] == "X-User-Role")
        assert role["schema"] == {"type": "string"}


async def test_admin_answers_match_the_schema(
    gateway: Gateway, client: aiohttp.ClientSession
) -> None:
    document = openapi_document(gateway.runtime.config.settings)
    base = f"http://127.0.0.1:{gateway.admin}"
    async with client.get(f"{base}/healthz") as response:
        schema_of(document, "/healthz", "get", "200").validate(await response.json())
    async with client.get(f"{base}/readyz") as response:
        status = str(response.status)
        schema_of(document, "/readyz", "get", status).validate(await response.json())
    async with client.post(f"{base}/admin/provision", data=b"{}") as response:
        # No secret in this test's environment: the hook is disabled, as a problem body.
        assert response.status in (401, 503)
        body = await response.json(content_type="application/problem+json")
        schema_of(document, "/admin/provision", "post", str(response.status)).validate(body)
