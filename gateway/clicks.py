"""``POST {prefix}/events``: the ``upgrade_click`` a UI sends when a user clicks a nudge.

Pure: the proxy reads at most ``MAX_EVENT_BYTES + 1`` bytes of body, identifies the caller
(``gateway.entitlements.identify``) and calls ``upgrade_click``; a ``RequestError`` is the
problem+json to answer, anything else is the event to emit (then 202).

    limiter = ClickLimiter()                       # one per process
    fields = upgrade_click(body, content_type, matrix, caller, app, limiter)
    events.emit("upgrade_click", **fields, request_id=rid, revision=revision)
"""

from __future__ import annotations

import re
from typing import Annotated, Any

import msgspec

from gateway.entitlements import Caller
from gateway.errors import RequestError
from gateway.matrix import AppName, TierMatrix
from gateway.ratelimit import KeyedBuckets, retry_after

MAX_EVENT_BYTES = 4096
EVENT_KINDS = ("upgrade_click",)
# A request id as the gateway makes them ("<pid>-<time>-<n>") or as a front layer might
# send them (a UUID): short and plain, so nothing odd reaches the analytics pipeline.
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
# A person clicks a few times a minute at most; a script gets 429 after a burst.
CLICKS_PER_SECOND = 0.2
CLICK_BURST = 10


class ClickBody(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """What a UI posts (the request schema of the OpenAPI document). The constraints below
    are documented only: ``upgrade_click`` checks them and answers a precise ``detail``."""

    event: Annotated[str, msgspec.Meta(extra_json_schema={"enum": list(EVENT_KINDS)})]
    feature: str
    target: Annotated[  # "tier:<name>" | "addon:<name>"
        str, msgspec.Meta(extra_json_schema={"pattern": "^(tier|addon):"})
    ]
    source_request_id: (
        Annotated[str, msgspec.Meta(extra_json_schema={"pattern": _REQUEST_ID.pattern})] | None
    ) = None


_decoder = msgspec.json.Decoder(ClickBody)


class ClickLimiter:
    """Clicks per tenant: a token bucket each (``CLICKS_PER_SECOND``, ``CLICK_BURST``)."""

    __slots__ = ("_buckets",)

    def __init__(
        self, rate: float = CLICKS_PER_SECOND, burst: float = CLICK_BURST, max_tenants: int = 10_000
    ) -> None:
        self._buckets = KeyedBuckets(rate, burst, max_tenants)

    def check(self, tenant: str, now: float | None = None) -> None:
        """Raise 429 ``rate_limited`` with ``Retry-After`` when ``tenant`` is over its rate."""
        wait = self._buckets.take(tenant, now)
        if wait > 0:
            raise RequestError(
                429,
                "rate_limited",
                "Too many events",
                f"upgrade_click events for tenant {tenant} are limited to "
                f"{CLICK_BURST} at once, then one every {1 / CLICKS_PER_SECOND:g} s",
                (("Retry-After", retry_after(wait)),),
            )


def upgrade_click(
    body: bytes,
    content_type: str | None,
    matrix: TierMatrix,
    caller: Caller,
    app: AppName,
    limiter: ClickLimiter | None = None,
    now: float | None = None,
) -> dict[str, Any]:
    """Validate one posted event and stamp it with who sent it; the result is the fields
    of the ``upgrade_click`` event. Checks, first failure answers: role (403
    ``role_forbidden`` for ``dispatch_only``, who never sees nudges), media type (415),
    size, JSON, fields, event kind, feature, target (400 ``bad_event``), then the
    tenant's rate (429 ``rate_limited``), so only valid events spend a token."""
    if not caller.upsell:
        raise RequestError(
            403, "role_forbidden", "Role not allowed", "dispatch_only users get no upgrade nudges"
        )
    media_type = (content_type or "").split(";", 1)[0].strip().lower()
    if media_type != "application/json":
        # Also what keeps another site's plain HTML form from posting clicks with the
        # tenant's cookies: a JSON content type needs a CORS preflight we never grant.
        raise RequestError(
            415,
            "unsupported_media_type",
            "Unsupported media type",
            f"Content-Type must be application/json, not {content_type or '(none)'!r}",
        )
    if len(body) > MAX_EVENT_BYTES:
        raise _bad(f"body over {MAX_EVENT_BYTES} bytes")
    try:
        click = _decoder.decode(body)
    except msgspec.ValidationError as exc:
        raise _bad(str(exc)) from exc
    except msgspec.DecodeError as exc:
        raise _bad(f"body is not JSON: {exc}") from exc
    if click.event not in EVENT_KINDS:
        raise _bad(f"unknown event kind {click.event!r} (expected {', '.join(EVENT_KINDS)})")
    if click.feature not in matrix.features:
        raise _bad(f"unknown feature {click.feature!r}")
    kind, _, name = click.target.partition(":")
    if kind == "tier":
        if name not in matrix.tiers:
            tiers = ", ".join(matrix.tiers)
            raise _bad(f"unknown tier {name!r} in target (expected one of {tiers})")
    elif kind == "addon":
        if name not in matrix.addons:
            raise _bad(f"unknown add-on {name!r} in target")
    else:
        raise _bad(f"target {click.target!r} is not 'tier:<name>' or 'addon:<name>'")
    source = click.source_request_id
    if source is not None and not _REQUEST_ID.match(source):
        raise _bad("source_request_id is not a request id (1-128 of A-Z a-z 0-9 . _ : -)")
    tenant = caller.license.claims.sub
    if limiter is not None:
        limiter.check(tenant, now)
    return {
        "tenant": tenant,
        "tier": caller.plan.tier,
        "addons": list(caller.plan.addons),
        "user": caller.user,
        "role": caller.role,
        "app": app,
        "feature": click.feature,
        "target": click.target,
        "source_request_id": source,
    }


def _bad(detail: str) -> RequestError:
    return RequestError(400, "bad_event", "Bad event", detail)
