"""Signed revocation lists, for gateways that share no store.

``gateway revocations export`` writes every revoked license id of a store as one compact
JWS (EdDSA, header ``typ`` ``revocations+jwt``, a signing key the gateways trust); a
gateway with ``[license] revocation_list = "file"`` loads it from ``revocation_file`` and
treats the ids in it exactly like revocations in its store (401 ``license_revoked``). The
file is re-read when it changes (looked at no more than once a second); a file that does
not verify is refused and the last good list kept. Its ``typ`` keeps it from ever being
taken for a license key, and the other way round.

    token = sign_list(key, kid, {"acme": ["3bdcda9f-..."]}, issuer="ops", now=time.time())
    store = with_revocation_list(open_store(url, keyring), config)   # the gateway's hook
"""

from __future__ import annotations

import base64
import binascii
import logging
import os
import time
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path

import msgspec
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from gateway.config import Config
from gateway.decision import TenantRecord
from gateway.errors import ConfigError, ConfigProblem
from gateway.license import KeyRing, License, Seats
from gateway.store import SeatAdmission, SeatHolder, SeatKind, TenantStore, UsageCount

log = logging.getLogger(__name__)

LIST_TYPE = "revocations+jwt"
RECHECK_SECONDS = 1.0


class RevocationClaims(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    iss: str
    iat: int
    revoked: dict[str, list[str]]  # tenant -> license ids (jti)


class _Header(msgspec.Struct, frozen=True):
    alg: str
    typ: str | None = None
    kid: str | None = None


class RevocationList(msgspec.Struct, frozen=True):
    issued_at: int
    revoked: dict[str, frozenset[str]]
    kid: str


def _b64encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _b64decode(part: str) -> bytes:
    return base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))


def sign_list(
    key: Ed25519PrivateKey, kid: str, revoked: dict[str, list[str]], issuer: str, now: float
) -> str:
    claims = RevocationClaims(
        iss=issuer,
        iat=int(now),
        revoked={tenant: sorted(ids) for tenant, ids in sorted(revoked.items()) if ids},
    )
    header = msgspec.json.encode({"alg": "EdDSA", "typ": LIST_TYPE, "kid": kid})
    signing_input = f"{_b64encode(header)}.{_b64encode(msgspec.json.encode(claims))}"
    signature = key.sign(signing_input.encode("ascii"))
    return f"{signing_input}.{_b64encode(signature)}"


def verify_list(token: str, keyring: KeyRing) -> RevocationList:
    """The list, or ``ValueError`` saying why it cannot be trusted."""
    parts = token.strip().split(".")
    if len(parts) != 3:
        raise ValueError("not a compact JWS (three dot-separated parts)")
    try:
        header = msgspec.json.decode(_b64decode(parts[0]), type=_Header)
        signature = _b64decode(parts[2])
        payload = _b64decode(parts[1])
    except (binascii.Error, ValueError, msgspec.DecodeError) as exc:
        raise ValueError(f"malformed: {exc}") from exc
    if header.alg != "EdDSA" or header.typ != LIST_TYPE:
        raise ValueError(f"not a revocation list (alg {header.alg}, typ {header.typ})")
    key = keyring.keys.get(header.kid or "")
    if key is None:
        raise ValueError(f"signed with kid {header.kid!r}, which is not in the key ring")
    try:
        key.verify(signature, f"{parts[0]}.{parts[1]}".encode("ascii"))
    except InvalidSignature as exc:
        raise ValueError("signature does not verify") from exc
    try:
        claims = msgspec.json.decode(payload, type=RevocationClaims)
    except msgspec.DecodeError as exc:
        raise ValueError(f"claims: {exc}") from exc
    revoked = {tenant: frozenset(ids) for tenant, ids in claims.revoked.items()}
    return RevocationList(claims.iat, revoked, header.kid or "")


def list_path(config: Config) -> Path:
    return config.resolve(config.settings.license.revocation_file)


def load_list(path: Path, keyring: KeyRing) -> RevocationList:
    """The list in ``path`` (empty when there is none yet); ``ConfigError`` when it is bad."""
    try:
        token = path.read_text("ascii")
    except FileNotFoundError:
        return RevocationList(0, {}, "")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError.single(str(path), "license.revocation_file", str(exc)) from exc
    try:
        return verify_list(token, keyring)
    except ValueError as exc:
        raise ConfigError.single(str(path), "license.revocation_file", str(exc)) from exc


def check_config(config: Config) -> list[ConfigProblem]:
    """What ``gateway check`` reports about the revocation list of ``config``."""
    if config.settings.license.revocation_list != "file":
        return []
    try:
        load_list(list_path(config), config.keyring)
    except ConfigError as exc:
        return list(exc.problems)
    return []


def with_revocation_list(store: TenantStore, config: Config) -> TenantStore:
    """``store`` itself, or with ``revocation_list = "file"`` the store seen through the
    signed list (the one line the runtime needs: wrap the store it opens)."""
    if config.settings.license.revocation_list != "file":
        return store
    public_keys = config.resolve(config.settings.license.public_keys)
    return RevocationListStore(store, list_path(config), lambda: KeyRing.load(public_keys))


class RevocationListStore(TenantStore):
    """A store whose records also carry the revocations of a signed file."""

    def __init__(self, inner: TenantStore, path: Path, keyring: Callable[[], KeyRing]) -> None:
        self.inner = inner
        self.url = inner.url
        self.path = path
        self._keyring = keyring  # re-read per new file: the list may be signed by a new kid
        self._list = RevocationList(0, {}, "")
        self._seen: tuple[int, int, int] | None = None
        self._checked = 0.0
        self._refresh()

    def _refresh(self) -> None:
        now = time.monotonic()
        if now - self._checked < RECHECK_SECONDS and self._seen is not None:
            return
        self._checked = now
        try:
            stat = os.stat(self.path)
            seen = (stat.st_mtime_ns, stat.st_size, stat.st_ino)
        except FileNotFoundError:
            seen = (0, 0, 0)
        if seen == self._seen:
            return
        try:
            self._list = load_list(self.path, self._keyring())
        except ConfigError as exc:
            log.error("revocation list %s refused, keeping the last good one: %s", self.path, exc)
        self._seen = seen

    def revoked(self, tenant: str) -> frozenset[str]:
        self._refresh()
        return self._list.revoked.get(tenant, frozenset())

    async def get(self, tenant: str) -> TenantRecord | None:
        record = await self.inner.get(tenant)
        listed = self.revoked(tenant)
        if not listed:
            return record
        if record is None:
            return TenantRecord(tenant, revoked=listed)
        return msgspec.structs.replace(record, revoked=record.revoked | listed)

    async def put_license(self, token: str) -> License | None:
        return await self.inner.put_license(token)

    async def set_suspended(self, tenant: str, suspended: bool) -> bool:
        return await self.inner.set_suspended(tenant, suspended)

    async def revoke(self, tenant: str, license_id: str) -> bool:
        return await self.inner.revoke(tenant, license_id)

    async def set_usage(self, tenant: str, ops_users: int, drivers: int) -> None:
        await self.inner.set_usage(tenant, ops_users, drivers)

    async def claim_event(self, event_id: str) -> bool:
        return await self.inner.claim_event(event_id)

    async def release_event(self, event_id: str) -> None:
        await self.inner.release_event(event_id)

    async def import_classic_key(self, tenant: str, key: str) -> None:
        await self.inner.import_classic_key(tenant, key)

    async def remove_classic_key(self, key: str) -> bool:
        return await self.inner.remove_classic_key(key)

    async def is_classic_key(self, key: str) -> bool:
        return await self.inner.is_classic_key(key)

    async def tenants(self) -> list[str]:
        return await self.inner.tenants()

    async def list_tenants(self) -> list[TenantRecord]:
        records = await self.inner.list_tenants()
        return [
            msgspec.structs.replace(record, revoked=record.revoked | listed)
            if (listed := self.revoked(record.tenant))
            else record
            for record in records
        ]

    def use_keyring(self, keyring: KeyRing) -> None:
        self.inner.use_keyring(keyring)

    def changes(self) -> AsyncIterator[str]:
        return self.inner.changes()

    async def admit_seat(
        self, tenant: str, kind: SeatKind, user: str, now: float, window: float, hard_limit: int
    ) -> SeatAdmission:
        return await self.inner.admit_seat(tenant, kind, user, now, window, hard_limit)

    async def seat_holders(
        self, tenant: str, kind: SeatKind, now: float, window: float
    ) -> list[SeatHolder]:
        return await self.inner.seat_holders(tenant, kind, now, window)

    async def release_seat(self, tenant: str, kind: SeatKind, user: str) -> bool:
        return await self.inner.release_seat(tenant, kind, user)

    async def set_extra_seats(self, tenant: str, ops_users: int, drivers: int) -> None:
        await self.inner.set_extra_seats(tenant, ops_users, drivers)

    async def extra_seats(self, tenant: str) -> Seats | None:
        return await self.inner.extra_seats(tenant)

    async def add_usage(self, batch: Sequence[UsageCount]) -> None:
        await self.inner.add_usage(batch)

    async def usage(
        self, tenant: str, since: float, until: float | None = None
    ) -> list[UsageCount]:
        return await self.inner.usage(tenant, since, until)

    async def ping(self) -> bool:
        return await self.inner.ping()

    async def close(self) -> None:
        await self.inner.close()
