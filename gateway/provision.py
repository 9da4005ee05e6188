"""The billing system's provisioning hook: ``POST /admin/provision`` (docs/design.md §5).

The body is signed with HMAC-SHA256 over ``"<t>.<raw body>"`` in a
``Gateway-Signature: t=<unix seconds>,v1=<hex>`` header (several ``v1`` values are
accepted, so the secret can rotate), with a 5-minute tolerance against replays. Each
``event_id`` is applied at most once; a repeat answers ``{"applied": false, "reason":
"duplicate_event"}``, and every other call that changes nothing says why too. A license
key is verified before anything is stored, and an older serial never replaces a newer one.

    signature = sign(secret, body, time.time())   # what billing computes
    body = await read_body(request.content)       # the whole body; ProvisionError(413)
    verify_signature(secret, header, body, now)   # raises ProvisionError(401)
    event = parse_event(body)                     # raises ProvisionError(400, field)
    outcome = await apply_event(event, store, keyring, policy, events, revision)
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import re
import time
from typing import Literal, NamedTuple, Protocol

import msgspec

from gateway.attribution import Attribution
from gateway.audit import AuditError, AuditLog, provision_record
from gateway.decision import Policy, TenantRecord, current_license, expiry_state
from gateway.errors import LicenseError
from gateway.events import EventLog
from gateway.license import KeyRing, License
from gateway.store import StoreError, TenantStore

TOLERANCE_SECONDS = 300
MAX_BODY_BYTES = 64 * 1024
MAX_EXTRA_SEATS = 1_000_000

# Strict, ASCII-only forms: str.isdigit() accepts "²" (which int() then refuses) and
# hmac.compare_digest() raises on non-ASCII str, so anything looser is a 500 waiting.
# Twelve digits is beyond year 30000; a longer run is not a timestamp.
_TIMESTAMP = re.compile(r"[0-9]{1,12}")
_MAC = re.compile(r"[0-9a-f]{64}")  # HMAC-SHA256, hex


class ProvisionError(Exception):
    """A refused provisioning call: HTTP status, stable code, and the field at fault."""

    def __init__(self, status: int, code: str, detail: str, field: str | None = None) -> None:
        self.status = status
        self.code = code
        self.detail = detail
        self.field = field
        super().__init__(detail)


class ProvisionEvent(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    event_id: str
    action: Literal["license", "suspend", "reinstate", "revoke", "seats"]
    tenant: str
    key: str | None = None  # action "license"
    license_id: str | None = None  # action "revoke"
    ops_users: int | None = None  # action "seats": extra seats bought, on top of the plan's
    drivers: int | None = None


def sign(secret: bytes, body: bytes, timestamp: int) -> str:
    """The ``Gateway-Signature`` header value billing sends for ``body``."""
    mac = hmac.new(secret, b"%d.%s" % (timestamp, body), hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={mac}"


class BodyStream(Protocol):
    """What ``read_body`` needs of a request body (aiohttp's ``StreamReader``)."""

    async def read(self, n: int = -1) -> bytes: ...


async def read_body(stream: BodyStream, declared: int | None = None) -> bytes:
    """The whole body, however many TCP segments or chunks it arrives in (a read returns
    only what has arrived so far), up to ``MAX_BODY_BYTES``: past that, or when the
    declared ``Content-Length`` says so up front, ``ProvisionError(413)``."""
    if declared is not None and declared > MAX_BODY_BYTES:
        raise ProvisionError(413, "body_too_large", f"over {MAX_BODY_BYTES} bytes")
    body = bytearray()
    while len(body) <= MAX_BODY_BYTES:
        piece = await stream.read(MAX_BODY_BYTES + 1 - len(body))
        if not piece:
            return bytes(body)
        body += piece
    raise ProvisionError(413, "body_too_large", f"over {MAX_BODY_BYTES} bytes")


def verify_signature(secret: bytes, header: str | None, body: bytes, now: float) -> None:
    """``t=<ASCII digits>`` once and ``v1=<64 lowercase hex digits>`` at least once; other
    schemes are ignored (room for a future ``v2``). Anything else is a 401."""
    if not header:
        raise ProvisionError(401, "signature_missing", "no Gateway-Signature header")
    timestamp: int | None = None
    candidates: list[str] = []
    for part in header.split(","):
        name, _, value = part.strip(" \t").partition("=")
        if name == "t":
            if timestamp is not None or not _TIMESTAMP.fullmatch(value):
                raise ProvisionError(401, "signature_invalid", "t must be unix seconds, once")
            timestamp = int(value)
        elif name == "v1":
            if not _MAC.fullmatch(value):
                raise ProvisionError(
                    401, "signature_invalid", "v1 must be 64 lowercase hex digits (HMAC-SHA256)"
                )
            candidates.append(value)
    if timestamp is None or not candidates:
        raise ProvisionError(401, "signature_invalid", "expected t=<unix seconds>,v1=<hex>")
    if abs(now - timestamp) > TOLERANCE_SECONDS:
        raise ProvisionError(
            401, "signature_stale", f"timestamp is {int(now - timestamp)} s away from now"
        )
    expected = hmac.new(secret, b"%d.%s" % (timestamp, body), hashlib.sha256).hexdigest()
    if not any(hmac.compare_digest(expected, candidate) for candidate in candidates):
        raise ProvisionError(401, "signature_invalid", "signature does not match the body")


def field_at_fault(error: msgspec.ValidationError) -> str | None:
    """The field a msgspec validation error names (``$.key``, or a missing field)."""
    message = str(error)
    field = message.rsplit("`$.", 1)[-1].rstrip("`") if "`$." in message else None
    if field is None and "missing required field" in message:
        field = message.rsplit("`", 2)[-2]
    return field


def parse_event(body: bytes) -> ProvisionEvent:
    try:
        event = msgspec.json.decode(body, type=ProvisionEvent)
    except msgspec.ValidationError as exc:
        raise ProvisionError(400, "bad_body", str(exc), field_at_fault(exc)) from exc
    except (msgspec.DecodeError, UnicodeDecodeError) as exc:
        raise ProvisionError(400, "bad_body", f"not JSON: {exc}") from exc
    if not event.event_id:
        raise ProvisionError(400, "bad_body", "must not be empty", "event_id")
    if not event.tenant:
        raise ProvisionError(400, "bad_body", "must not be empty", "tenant")
    if event.action == "license" and not event.key:
        raise ProvisionError(400, "bad_body", "action license needs a key", "key")
    if event.action == "revoke" and not event.license_id:
        raise ProvisionError(400, "bad_body", "action revoke needs a license_id", "license_id")
    if event.action == "seats":
        for field, value in (("ops_users", event.ops_users), ("drivers", event.drivers)):
            if value is None or not 0 <= value <= MAX_EXTRA_SEATS:
                raise ProvisionError(
                    400, "bad_body", f"action seats needs 0..{MAX_EXTRA_SEATS}", field
                )
    return event


class Outcome(NamedTuple):
    """What the hook answers: ``{"applied": true}``, or ``{"applied": false, "reason": …}``
    with ``reason`` one of ``NOT_APPLIED``."""

    applied: bool
    reason: str | None = None

    def body(self) -> dict[str, object]:
        return {"applied": True} if self.applied else {"applied": False, "reason": self.reason}


# Why a call changed nothing: a repeated event id, an older (or equal) serial than the one
# stored, a suspend of a suspended tenant, a reinstate of an active one, a revoked id again.
NOT_APPLIED = (
    "duplicate_event",
    "not_newer",
    "already_suspended",
    "not_suspended",
    "already_revoked",
)
_APPLIED = Outcome(True)


async def apply_event(
    event: ProvisionEvent,
    store: TenantStore,
    keyring: KeyRing,
    policy: Policy,
    events: EventLog,
    revision: str,
    audit: AuditLog | None = None,
    attribution: Attribution | None = None,
) -> Outcome:
    """Apply once; an ``Outcome`` that says why when the call changed nothing (a repeated
    event id, an older serial, a change already made). Raises ``ProvisionError`` for a bad
    key or an audit log that cannot be written; ``StoreError`` propagates (the event id is
    then released, so billing's retry is applied)."""
    if not await store.claim_event(event.event_id):
        return Outcome(False, "duplicate_event")
    try:
        outcome = await _apply(event, store, keyring, policy, events, revision, attribution)
        if audit is not None:
            await asyncio.to_thread(audit.append, provision_record(event, outcome.applied))
        return outcome
    except AuditError as exc:
        with contextlib.suppress(StoreError):
            await store.release_event(event.event_id)
        raise ProvisionError(503, "audit_unavailable", str(exc)) from exc
    except BaseException:
        # If the store is down this fails too; the original error is the one to report.
        with contextlib.suppress(StoreError):
            await store.release_event(event.event_id)
        raise


async def _apply(
    event: ProvisionEvent,
    store: TenantStore,
    keyring: KeyRing,
    policy: Policy,
    events: EventLog,
    revision: str,
    attribution: Attribution | None,
) -> Outcome:
    if event.action == "suspend":
        changed = await store.set_suspended(event.tenant, True)
        return _APPLIED if changed else Outcome(False, "already_suspended")
    if event.action == "reinstate":
        changed = await store.set_suspended(event.tenant, False)
        return _APPLIED if changed else Outcome(False, "not_suspended")
    if event.action == "revoke":
        assert event.license_id is not None
        changed = await store.revoke(event.tenant, event.license_id)
        return _APPLIED if changed else Outcome(False, "already_revoked")
    if event.action == "seats":
        assert event.ops_users is not None and event.drivers is not None
        await store.set_extra_seats(event.tenant, event.ops_users, event.drivers)
        return _APPLIED
    assert event.key is not None
    try:
        new = keyring.verify(event.key)  # before anything is stored
    except LicenseError as exc:
        raise ProvisionError(400, exc.reason, exc.detail, "key") from exc
    if new.claims.sub != event.tenant:
        raise ProvisionError(400, "bad_body", f"the key is for tenant {new.claims.sub!r}", "key")
    if new.claims.tier not in policy.matrix.tiers:
        raise ProvisionError(400, "bad_body", f"unknown tier {new.claims.tier!r}", "key")
    before = await store.get(event.tenant)
    stored = await store.put_license(event.key)
    if stored is None:
        return Outcome(False, "not_newer")
    _maybe_upgrade(before, stored, policy, events, revision, attribution)
    return _APPLIED


class Plan(NamedTuple):
    """What a tenant is served: a tier and its add-ons, and whether it is a trial."""

    tier: str
    addons: frozenset[str]
    trial: bool = False


def _plan_in_force(record: TenantRecord | None, policy: Policy, now: float) -> Plan | None:
    """The tier and add-ons the tenant is served now, from the license the decision
    itself would pick (``current_license``: revocations, serial order, minimum serial);
    None when there is none, or it is refused as expired."""
    current = current_license(None, record, now, policy.clock_skew_seconds)
    if current is None:
        return None
    state, _ = expiry_state(current.claims, now, policy.grace_seconds)
    if state == "expired":
        return None
    claims = current.claims
    if state == "restricted":
        return Plan(policy.matrix.lowest_tier.name, frozenset(), claims.trial)
    usable = policy.matrix.usable_addons(claims.tier, claims.addons)
    return Plan(claims.tier, frozenset(usable), claims.trial)


def _maybe_upgrade(
    before: TenantRecord | None,
    new: License,
    policy: Policy,
    events: EventLog,
    revision: str,
    attribution: Attribution | None = None,
) -> None:
    """A tenant's first license: ``license_provisioned``. Later: ``upgrade_complete`` when
    the new license raises the tier, adds add-ons, or turns a trial into a paid license
    (``trial_converted``), with the recent blocks and clicks it answers."""
    now = time.time()
    if new.claims.nbf > now + policy.clock_skew_seconds:
        return  # scheduled (a downgrade at the period's end, typically)
    claims = new.claims
    if before is None or not any(lic.claims.sub == claims.sub for lic in before.licenses):
        events.emit(
            "license_provisioned",
            tenant=claims.sub,
            tier=claims.tier,
            addons=list(claims.addons),
            license_id=claims.jti,
            trial=claims.trial,
            request_id=None,
            revision=revision,
        )
        return
    matrix = policy.matrix
    previous = _plan_in_force(before, policy, now)
    ranks = {name: tier.rank for name, tier in matrix.tiers.items()}
    old_rank = ranks.get(previous.tier, 0) if previous is not None else 0
    raised = previous is None or ranks.get(claims.tier, 0) > old_rank
    usable = matrix.usable_addons(claims.tier, claims.addons)
    added = sorted(set(usable) - (previous.addons if previous else frozenset()))
    converted = previous is not None and previous.trial and not claims.trial
    if not raised and not added and not converted:
        return
    fields: dict[str, object] = {}
    if attribution is not None:
        # What this purchase answers: the tiers now reached and the add-ons added; the
        # features the tenant did not have before.
        targets = {
            f"tier:{name}"
            for name, rank in ranks.items()
            if old_rank < rank <= ranks.get(claims.tier, 0)
        }
        targets |= {f"addon:{name}" for name in added}
        had = (
            matrix.entitlement(previous.tier, tuple(sorted(previous.addons))).features
            if previous is not None
            else frozenset()
        )
        unlocked = matrix.entitlement(claims.tier, usable).features - had
        clicks, blocks = attribution.attribute(claims.sub, targets, unlocked, now)
        fields = {"attributed_clicks": clicks, "attributed_blocks": blocks}
    events.emit(
        "upgrade_complete",
        tenant=claims.sub,
        tier=claims.tier,
        previous_tier=previous.tier if previous else None,
        addons=list(claims.addons),
        addons_added=added,
        license_id=claims.jti,
        trial_converted=converted,
        request_id=None,
        revision=revision,
        **fields,
    )
