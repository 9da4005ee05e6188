"""POST {prefix}/events: what a UI may send, the precise 400s, 403 for dispatch_only,
415 for a non-JSON media type, and the per-tenant rate with Retry-After."""

from __future__ import annotations

import pytest

from gateway.clicks import (
    CLICK_BURST,
    CLICKS_PER_SECOND,
    MAX_EVENT_BYTES,
    ClickLimiter,
    upgrade_click,
)
from gateway.decision import Policy
from gateway.entitlements import Caller, identify
from gateway.errors import RequestError
from gateway.matrix import TierMatrix
from tests.test_decision import NOW, TENANT, make_license

JSON = "application/json"
CLICK = (
    b'{"event":"upgrade_click","feature":"ops.basic_shipment_optimization","target":"tier:fleet"}'
)


def caller(matrix: TierMatrix, role: str | None = "owner", **claims: object) -> Caller:
    found = identify(Policy(matrix=matrix), make_license(**claims), None, role, "user-7", NOW)
    assert isinstance(found, Caller)
    return found


def test_a_valid_click_is_stamped_with_who_sent_it(matrix: TierMatrix) -> None:
    body = (
        b'{"event": "upgrade_click", "feature": "ops.sms_messaging",'
        b' "target": "addon:sms_messaging", "source_request_id": "1a2b-6b0256c6-1f"}'
    )
    fields = upgrade_click(body, JSON, matrix, caller(matrix, "admin"), "operations")
    assert fields == {
        "tenant": TENANT,
        "tier": "core",
        "addons": [],
        "user": "user-7",
        "role": "admin",
        "app": "operations",
        "feature": "ops.sms_messaging",
        "target": "addon:sms_messaging",
        "source_request_id": "1a2b-6b0256c6-1f",
    }


def test_the_stamped_tier_is_the_effective_one(matrix: TierMatrix) -> None:
    lapsed = caller(matrix, tier="fleet", exp=NOW - 30 * 86400)
    assert upgrade_click(CLICK, JSON, matrix, lapsed, "driver_app")["tier"] == "core"


@pytest.mark.parametrize("role", ["owner", "admin", "standard", None])
def test_every_role_but_dispatch_only_may_click(matrix: TierMatrix, role: str | None) -> None:
    fields = upgrade_click(
        CLICK, "application/json; charset=utf-8", matrix, caller(matrix, role), "operations"
    )
    assert fields["role"] == role and fields["source_request_id"] is None


@pytest.mark.parametrize(
    ("body", "detail"),
    [
        pytest.param(b"", "body is not JSON: Input data was truncated", id="empty"),
        pytest.param(b"upgrade please", "body is not JSON: ", id="not-json"),
        pytest.param(b'{"event": "upgrade_click", "feature": "\xff"}', "body is not JSON: ",
                     id="bad-utf8"),
        pytest.param(b"[]", "Expected `object`, got `array`", id="array"),
        pytest.param(b'{"event": "upgrade_click", "feature": "ops.sms_messaging"}',
                     "Object missing required field `target`", id="no-target"),
        pytest.param(b'{"event": "upgrade_click", "feature": 7, "target": "tier:fleet"}',
                     "Expected `str`, got `int` - at `$.feature`", id="feature-not-a-string"),
        pytest.param(CLICK[:-1] + b', "price": 0}', "Object contains unknown field `price`",
                     id="unknown-field"),
        pytest.param(CLICK.replace(b"upgrade_click", b"feature_block"),
                     "unknown event kind 'feature_block' (expected upgrade_click)", id="kind"),
        pytest.param(CLICK.replace(b"ops.basic_shipment_optimization", b"ops.teleport"),
                     "unknown feature 'ops.teleport'", id="feature"),
        pytest.param(CLICK.replace(b"tier:fleet", b"tier:platinum"),
                     "unknown tier 'platinum' in target (expected one of core, fleet, enterprise)",
                     id="tier"),
        pytest.param(CLICK.replace(b"tier:fleet", b"addon:jetpack"),
                     "unknown add-on 'jetpack' in target", id="addon"),
        pytest.param(CLICK.replace(b"tier:fleet", b"fleet"),
                     "target 'fleet' is not 'tier:<name>' or 'addon:<name>'", id="target-shape"),
        pytest.param(CLICK[:-1] + b', "source_request_id": "<script>"}',
                     "source_request_id is not a request id", id="source-id-charset"),
        pytest.param(CLICK[:-1] + b', "source_request_id": "' + b"a" * 129 + b'"}',
                     "source_request_id is not a request id", id="source-id-length"),
        pytest.param(CLICK + b" " * MAX_EVENT_BYTES, f"body over {MAX_EVENT_BYTES} bytes",
                     id="oversized"),
    ],
)  # fmt: skip
def test_bad_events_get_a_precise_400(matrix: TierMatrix, body: bytes, detail: str) -> None:
    with pytest.raises(RequestError) as raised:
        upgrade_click(body, JSON, matrix, caller(matrix), "operations")
    assert (raised.value.status, raised.value.code) == (400, "bad_event")
    assert raised.value.detail.startswith(detail), raised.value.detail


def test_dispatch_only_gets_403_before_anything_else(matrix: TierMatrix) -> None:
    with pytest.raises(RequestError) as raised:
        upgrade_click(b"junk", None, matrix, caller(matrix, "dispatch_only"), "operations")
    assert (raised.value.status, raised.value.code) == (403, "role_forbidden")


@pytest.mark.parametrize(
    "content_type", [None, "text/plain", "application/x-www-form-urlencoded", "multipart/form-data"]
)
def test_only_json_is_accepted(matrix: TierMatrix, content_type: str | None) -> None:
    """A plain HTML form on another site cannot post a click with the tenant's cookies."""
    with pytest.raises(RequestError) as raised:
        upgrade_click(CLICK, content_type, matrix, caller(matrix), "operations")
    assert (raised.value.status, raised.value.code) == (415, "unsupported_media_type")


def test_a_tenant_over_its_rate_gets_429_with_retry_after(matrix: TierMatrix) -> None:
    limiter = ClickLimiter()
    owner = caller(matrix)
    for _ in range(CLICK_BURST):
        upgrade_click(CLICK, JSON, matrix, owner, "operations", limiter, now=100.0)
    with pytest.raises(RequestError) as raised:
        upgrade_click(CLICK, JSON, matrix, owner, "operations", limiter, now=100.0)
    assert (raised.value.status, raised.value.code) == (429, "rate_limited")
    assert raised.value.headers == (("Retry-After", str(round(1 / CLICKS_PER_SECOND))),)
    # Another tenant has its own bucket; the first one's comes back with time.
    other = caller(matrix, sub="tenant-2")
    upgrade_click(CLICK, JSON, matrix, other, "operations", limiter, now=100.0)
    upgrade_click(
        CLICK, JSON, matrix, owner, "operations", limiter, now=100.0 + 1 / CLICKS_PER_SECOND
    )


def test_invalid_events_spend_no_tokens(matrix: TierMatrix) -> None:
    limiter = ClickLimiter(rate=1, burst=1)
    owner = caller(matrix)
    for _ in range(3):
        with pytest.raises(RequestError):
            upgrade_click(b"{}", JSON, matrix, owner, "operations", limiter, now=5.0)
    upgrade_click(CLICK, JSON, matrix, owner, "operations", limiter, now=5.0)
