"""The billing system's provisioning hook: ``POST /admin/provision`` (DESIGN §5).

The body is signed with HMAC-SHA256 over ``"<t>.<raw body>"`` in a
``Gateway-Signature: t=<unix seconds>,v1=<hex>`` header (several ``v1`` values are
accepted, so the secret can rotate), with a 5-minute tolerance against replays. Each
``event_id`` is applied at most once; a repeat answers ``{"applied": false}``. A license
key is verified before anything is stored, and an older serial never replaces a newer one.

    signature = sign(secret, body, time.time())   # what billing computes
    verify_signature(secret, header, body, now)   # raises ProvisionError(401)
    event = parse_event(body)                     # raises ProvisionError(400, field)
    applied = await apply_event(event, store, keyring, matrix, events, revision)
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import time
from typing import Literal

import msgspec

from gateway.audit import AuditError, AuditLog, provision_record
from gateway.errors import LicenseError
from gateway.events import EventLog
from gateway.license import KeyRing, License
from gateway.matrix import TierMatrix
from gateway.store import StoreError, TenantStore

TOLERANCE_SECONDS = 300
MAX_BODY_BYTES = 64 * 1024


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
    action: Literal["license", "suspend", "reinstate", "revoke"]
    tenant: str
    key: str | None = None  # action "license"
    license_id: str | None = None  # action "revoke"


def sign(secret: bytes, body: bytes, timestamp: int) -> str:
    """The ``Gateway-Signature`` header value billing sends for ``body``."""
    mac = hmac.new(secret, b"%d.%s" % (timestamp, body), hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={mac}"


def verify_signature(secret: bytes, header: str | None, body: bytes, now: float) -> None:
    if not header:
        raise ProvisionError(401, "signature_missing", "no Gateway-Signature header")
    timestamp: int | None = None
    candidates: list[str] = []
    for part in header.split(","):
        name, _, value = part.strip().partition("=")
        if name == "t" and value.isdigit():
            timestamp = int(value)
        elif name == "v1":
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
    return event


async def apply_event(
    event: ProvisionEvent,
    store: TenantStore,
    keyring: KeyRing,
    matrix: TierMatrix,
    events: EventLog,
    revision: str,
    audit: AuditLog | None = None,
) -> bool:
    """Apply once; ``False`` for a repeated event id or a change that changes nothing.
    Raises ``ProvisionError`` for a bad key or an audit log that cannot be written;
    ``StoreError`` propagates (the event id is then released, so billing's retry is
    applied)."""
    if not await store.claim_event(event.event_id):
        return False
    try:
        applied = await _apply(event, store, keyring, matrix, events, revision)
        if audit is not None:
            await asyncio.to_thread(audit.append, provision_record(event, applied))
        return applied
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
    matrix: TierMatrix,
    events: EventLog,
    revision: str,
) -> bool:
    if event.action == "suspend":
        return await store.set_suspended(event.tenant, True)
    if event.action == "reinstate":
        return await store.set_suspended(event.tenant, False)
    if event.action == "revoke":
        assert event.license_id is not None
        return await store.revoke(event.tenant, event.license_id)
    assert event.key is not None
    try:
        new = keyring.verify(event.key)  # before anything is stored
    except LicenseError as exc:
        raise ProvisionError(400, exc.reason, exc.detail, "key") from exc
    if new.claims.sub != event.tenant:
        raise ProvisionError(400, "bad_body", f"the key is for tenant {new.claims.sub!r}", "key")
    if new.claims.tier not in matrix.tiers:
        raise ProvisionError(400, "bad_body", f"unknown tier {new.claims.tier!r}", "key")
    before = await store.get(event.tenant)
    stored = await store.put_license(event.key)
    if stored is None:
        return False
    _maybe_upgrade(before.licenses if before else (), stored, matrix, events, revision)
    return True


def _maybe_upgrade(
    held: tuple[License, ...],
    new: License,
    matrix: TierMatrix,
    events: EventLog,
    revision: str,
) -> None:
    """``upgrade_complete`` when the new license raises the tier or adds add-ons."""
    now = time.time()
    if new.claims.nbf > now:
        return  # scheduled (a downgrade at the period's end, typically)
    current = next((lic for lic in held if lic.claims.nbf <= now < lic.claims.exp), None)
    old_tier = current.claims.tier if current else None
    old_addons = set(current.claims.addons) if current else set()
    ranks = {name: tier.rank for name, tier in matrix.tiers.items()}
    raised = old_tier is None or ranks.get(new.claims.tier, 0) > ranks.get(old_tier, 0)
    added = sorted(set(new.claims.addons) - old_addons)
    if current is not None and not raised and not added:
        return
    events.emit(
        "upgrade_complete",
        tenant=new.claims.sub,
        tier=new.claims.tier,
        previous_tier=old_tier,
        addons=list(new.claims.addons),
        addons_added=added,
        license_id=new.claims.jti,
        request_id=None,
        revision=revision,
    )
