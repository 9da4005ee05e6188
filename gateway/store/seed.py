"""The tenants file: tenants and their keys in bulk, for ``[store] seed`` at start and for
``gateway tenant import`` (the migration tooling's output).

    [[tenants]]
    id = "acme"
    keys = ["eyJhbGciOi..."]            # signed license keys, any order
    suspended = false
    revoked = []                         # license ids (jti)
    classic_keys = ["XD7Q2-4KLMN-8PRST-2VWXY-3ABCD"]   # for license.classic_keys = "store"
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import msgspec

from gateway.errors import ConfigError, LicenseError
from gateway.license import decode_unverified
from gateway.store import TenantStore


class TenantEntry(msgspec.Struct, forbid_unknown_fields=True):
    id: str
    keys: list[str] = []
    suspended: bool = False
    revoked: list[str] = []
    classic_keys: list[str] = []


class TenantsFile(msgspec.Struct, forbid_unknown_fields=True):
    tenants: list[TenantEntry] = []


class ImportResult(msgspec.Struct):
    tenants: int = 0
    keys_stored: int = 0
    keys_unchanged: int = 0  # this or a newer serial was already stored
    problems: list[str] = []


def _serial(token: str) -> int:
    try:
        serial = decode_unverified(token)[1].get("serial", 0)
    except LicenseError:
        return 0  # put_license reports it
    return serial if isinstance(serial, int) else 0


def read_tenants(path: Path) -> TenantsFile:
    """Parse a tenants file (TOML); ``ConfigError`` names the file and what is wrong."""
    try:
        return msgspec.toml.decode(path.read_bytes(), type=TenantsFile)
    except OSError as exc:
        raise ConfigError.single(str(path), "", f"cannot read: {exc.strerror}") from exc
    except msgspec.DecodeError as exc:
        raise ConfigError.single(str(path), "tenants", str(exc)) from exc


async def import_tenants(
    store: TenantStore,
    tenants: TenantsFile,
    progress: Callable[[int, int], None] | None = None,
) -> ImportResult:
    """Write every tenant into the store. A key that does not verify, or belongs to another
    tenant, is reported and skipped; the rest is imported. Safe to run again."""
    result = ImportResult()
    total = len(tenants.tenants)
    for done, entry in enumerate(tenants.tenants, start=1):
        # Oldest first: a store refuses a key older than one it holds, so listing a
        # scheduled downgrade before the current license must not drop the current one.
        for token in sorted(entry.keys, key=_serial):
            try:
                lic = await store.put_license(token)
            except LicenseError as exc:
                result.problems.append(f"tenant {entry.id}: key skipped ({exc})")
                continue
            if lic is None:
                result.keys_unchanged += 1
            elif lic.claims.sub != entry.id:
                result.problems.append(
                    f"tenant {entry.id}: a key is for tenant {lic.claims.sub!r} (stored there)"
                )
            else:
                result.keys_stored += 1
        if entry.suspended:
            await store.set_suspended(entry.id, True)
        for license_id in entry.revoked:
            await store.revoke(entry.id, license_id)
        for key in entry.classic_keys:
            await store.import_classic_key(entry.id, key)
        result.tenants += 1
        if progress is not None:
            progress(done, total)
    return result
