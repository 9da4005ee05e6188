"""The caches in front of the expensive or remote parts of a decision: verified license keys
(``LicenseCache``), tenant records from the store (``TenantCache``) and, for
``license.classic_keys = "store"``, the classic keys the store imported
(``ClassicKeyCache``). All are plain dicts bounded first-in-first-out (``bounded_put``): a
hit is one C-level ``dict.get``.

    licenses = LicenseCache(keyring, metrics)
    found = licenses.resolve(token)         # License, or the LicenseError to answer with
    tenants = TenantCache(store, metrics)
    record = tenants.cached("acme")          # TenantRecord, None (absent), NO_TENANT, UNAVAILABLE
    await tenants.fetch("acme")
"""

from __future__ import annotations

import asyncio
import logging
from hashlib import blake2b
from itertools import islice
from random import random
from time import monotonic
from typing import Any, Final, Literal

import cachetools

from gateway.decision import TenantRecord
from gateway.errors import LicenseError
from gateway.license import MAX_KEY_BYTES, KeyRing, License
from gateway.metrics import Metrics
from gateway.ratelimit import TokenBucket
from gateway.store import StoreError, TenantStore

log = logging.getLogger(__name__)


class _Marker:
    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name


NO_TENANT: Final = _Marker("NO_TENANT")  # not cached: ask the store
UNAVAILABLE: Final = _Marker("UNAVAILABLE")  # never seen, and the store cannot answer now

REFUSED_TTL_SECONDS = 60.0  # a refused key is answered from memory this long
REFUSED_SIZE = 10_000  # refused keys remembered (small: a flood of new ones only cycles it)
OUTAGE_RETRY_SECONDS = 1.0  # a tenant the store could not load is asked for again after this

_NOT_A_JWS: Final = LicenseError(
    "license_malformed", "not a compact JWS (three dot-separated parts)"
)
_TOO_LONG: Final = LicenseError("license_malformed", f"key longer than {MAX_KEY_BYTES} bytes")
# Ed25519 signatures are deterministic (RFC 8032, section 5.1.6): one signing input has one
# signature from the issuer, and base64url is read canonically only, so a known signing
# input with other signature bytes is a forgery, refused without a signature check.
_RESIGNED: Final = LicenseError("license_bad_signature", "signature does not verify")
_TAG_BITS: Final = 0xFF  # a verified key's tag: small ints are shared objects in CPython


def bounded_put(mapping: dict[Any, Any], key: Any, value: Any, size: int) -> None:
    """Insert; when ``mapping`` holds ``size`` entries already, the oldest eighth goes first.

    In batches, not one at a time: a dict keeps the slots of deleted entries until it next
    resizes, and ``next(iter(mapping))`` walks over all of them, so evicting the oldest entry
    per insert cost microseconds once full (2 µs at 10,000 entries, measured), paid by
    every never-seen key of a flood."""
    if key not in mapping and len(mapping) >= size:
        for old in list(islice(mapping, max(1, size // 8))):
            del mapping[old]
    mapping[key] = value


class LicenseCache:
    """Verified keys by digest; refused keys, briefly; and a budget of signature checks per
    second, so a flood of never-seen keys cannot eat the core.

    Costs, in order: a cached key is one digest and one ``dict.get``. A never-seen key
    meets the cheap checks first, with no base64 or JSON work: its size and shape (a
    compact JWS has two dots), the negative cache of keys refused in the last minute, and
    the signing inputs already verified (the same claims with other signature bytes are a
    forgery). Then ``KeyRing.parse`` (base64, JSON, ``kid``: microseconds) and, while the
    budget lasts, one Ed25519 check (~70 µs); past the budget the key is answered 503
    ``license_check_busy`` with ``Retry-After`` and not remembered, so a legitimate new key
    gets in a moment later. Keys already verified are never affected by a flood.

    Each call is one look-up in ``gateway_license_cache_total`` (a hit: verified or refused
    before), and each check of a never-seen key one ``gateway_license_checks_total``; the
    caller resolves a request's key once (``Enforcer`` keeps the answer on the request)."""

    def __init__(
        self,
        keyring: KeyRing,
        metrics: Metrics,
        size: int = 100_000,
        verifications_per_second: float = 2000.0,
        refused_size: int = REFUSED_SIZE,
    ) -> None:
        self.keyring = keyring
        self._size = size
        self._refused_size = refused_size
        self._valid: dict[bytes, License] = {}
        self._refused: dict[bytes, tuple[LicenseError, float]] = {}
        # Hash of a signing input -> the verified key's tag (see ``quick_refusal``).
        self._signed: dict[int, int] = {}
        # The signing input and tag of the last forgery quick_refusal found: a flood of
        # forgeries reuses one key's claims, and comparing bytes is cheaper than hashing.
        self._forged: bytes | None = None
        self._forged_tag = 0
        self._metrics = metrics
        self._budget = TokenBucket(verifications_per_second)

    def resolve(self, token: bytes) -> License | LicenseError:
        if len(token) > MAX_KEY_BYTES:
            # Cheaper than remembering it: not cached, counted as a miss.
            self._metrics.cache_miss.inc()
            return self._failed(_TOO_LONG)
        digest = blake2b(token, digest_size=16).digest()
        found = self._valid.get(digest)
        if found is not None:  # (a verified key has its two dots: no need to count them)
            self._metrics.cache_hit.inc()
            return found
        if token.count(b".") != 2:  # as cheap to find again as to remember
            self._metrics.cache_miss.inc()
            return self._failed(_NOT_A_JWS)
        refused = self._refused.get(digest)
        if refused is not None and refused[1] > monotonic():
            self._metrics.cache_hit.inc()
            return refused[0]
        self._metrics.cache_miss.inc()
        # Python's keyed hash, not a digest: a collision could only refuse a key wrongly
        # (never admit one), and it is a third of the price.
        cut = token.rindex(b".")
        signing_input = hash(token[:cut])
        if signing_input in self._signed:
            # Not the key verified with these claims (that one is in _valid: the two dicts
            # are filled and emptied together), so a forgery.
            return self._failed(_RESIGNED)  # as cheap to find again as to remember
        try:
            parsed = self.keyring.parse(token.decode("ascii"))
        except UnicodeDecodeError:
            return self._refuse(digest, LicenseError("license_malformed", "key is not ASCII"))
        except LicenseError as exc:
            return self._refuse(digest, LicenseError(exc.reason, exc.detail))
        if not self._budget.take():
            busy = LicenseError("license_check_busy", "too many new license keys at once")
            return self._failed(busy)
        try:
            lic = self.keyring.check_signature(parsed)
        except LicenseError as exc:
            # Remember only the reason: the raised error holds a traceback and the chained
            # InvalidSignature (~2.6 KB each, measured under a forged-key flood).
            return self._refuse(digest, LicenseError(exc.reason, exc.detail))
        self._metrics.license_result["valid"].inc()
        bounded_put(self._valid, digest, lic, self._size)
        bounded_put(self._signed, signing_input, hash(token[cut:]) & _TAG_BITS, self._size)
        return lic

    def quick_refusal(self, token: bytes) -> LicenseError | Literal[True] | None:
        """For a flood: a refusal found without a digest — a key too long or with no dot,
        or other signature bytes on a signing input verified before — or True (the key
        verified before, most likely), or None (``resolve`` decides). A refusal is not
        counted: the caller counts it (``count_refusal``) once it knows the key is not
        classic (a classic key has no dot either).

        A signing input's entry holds a tag of the verified key: 8 bits of Python's keyed
        hash of its signature (a small int, a shared object, so tags cost no memory).
        Another tag proves another key, a forgery; the same tag (the verified key, or one
        forgery in 256, unpredictably) is left to ``resolve``, which tells them apart."""
        if len(token) > MAX_KEY_BYTES:
            return _TOO_LONG
        cut = token.rfind(b".")
        if cut < 0:
            return _NOT_A_JWS
        forged = self._forged
        if forged is not None and cut == len(forged) and token.startswith(forged):
            signing_input, tag = None, self._forged_tag
        else:
            signing_input = token[:cut]
            found = self._signed.get(hash(signing_input))
            if found is None:
                return None
            tag = found
        if tag == hash(token[cut:]) & _TAG_BITS:
            return True
        if signing_input is not None:
            self._forged, self._forged_tag = signing_input, tag
        return _RESIGNED

    def count_refusal(self, error: LicenseError) -> LicenseError:
        """Count a ``quick_refusal`` as ``resolve`` counts the same refusal."""
        self._metrics.cache_miss.inc()
        return self._failed(error)

    def _refuse(self, digest: bytes, error: LicenseError) -> LicenseError:
        bounded_put(
            self._refused, digest, (error, monotonic() + REFUSED_TTL_SECONDS), self._refused_size
        )
        return self._failed(error)

    def _failed(self, error: LicenseError) -> LicenseError:
        self._metrics.license_result[error.reason].inc()
        return error

    def clear(self) -> None:
        self._valid.clear()
        self._refused.clear()
        self._signed.clear()
        self._forged = None

    def __len__(self) -> int:
        return len(self._valid)


class TenantCache:
    """Tenant records from the store for ``ttl`` seconds; misses go to the store
    asynchronously. Fail-static: when the store cannot answer, the last record known is
    kept (an outage never revokes). Any other tenant is ``UNAVAILABLE`` while the store
    cannot answer (asked again after a second; the request is answered 503
    ``store_unavailable``), never "absent": an outage must not refuse a stored tenant, nor
    be remembered as its absence (an absence known from before may be stale by now).

    Entries are ``(record, expires_at)`` in a plain dict bounded first-in-first-out, read
    with one ``dict.get`` and one clock read on the hot path."""

    def __init__(
        self, store: TenantStore, metrics: Metrics, ttl: float = 5.0, size: int = 100_000
    ) -> None:
        self.store = store
        self.ttl = ttl
        self._size = size
        self._records: dict[str, tuple[TenantRecord | None | _Marker, float]] = {}
        self._pending: dict[str, asyncio.Task[None]] = {}
        self._errors = metrics.store_errors.labels(op="get")

    def cached(self, tenant: str) -> TenantRecord | None | _Marker:
        """The cached record, None (known absent), ``UNAVAILABLE`` (the store could not
        answer a moment ago) or ``NO_TENANT`` (not cached)."""
        entry = self._records.get(tenant)
        if entry is None or entry[1] < monotonic():
            return NO_TENANT
        return entry[0]

    async def fetch(self, tenant: str) -> None:
        """Load one tenant; concurrent requests for the same tenant share one store read,
        which runs in a task of its own (held in ``_pending`` until done), so a client
        that goes away does not cancel it for the others."""
        pending = self._pending.get(tenant)
        if pending is None:
            pending = asyncio.get_running_loop().create_task(self._load(tenant))
            self._pending[tenant] = pending
            pending.add_done_callback(lambda _: self._pending.pop(tenant, None))
        await asyncio.shield(pending)

    async def _load(self, tenant: str) -> None:
        try:
            record = await self.store.get(tenant)
        except StoreError as exc:
            self._errors.inc()
            log.warning("tenant store: get %s failed: %s", tenant, exc)
            stale = self._records.get(tenant)
            if stale is not None and isinstance(stale[0], TenantRecord):
                self._put(tenant, stale[0])
            else:
                expires = monotonic() + OUTAGE_RETRY_SECONDS
                bounded_put(self._records, tenant, (UNAVAILABLE, expires), self._size)
            return
        self._put(tenant, record)

    def _put(self, tenant: str, record: TenantRecord | None) -> None:
        # Jittered (80-120 % of the TTL): tenants cached together must not all expire, and
        # go back to the store, in the same instant.
        expires = monotonic() + self.ttl * (0.8 + 0.4 * random())
        bounded_put(self._records, tenant, (record, expires), self._size)

    def invalidate(self, tenant: str | None = None) -> None:
        if tenant is None:
            self._records.clear()
        else:
            self._records.pop(tenant, None)


class ClassicKeyCache:
    """For ``license.classic_keys = "store"``: which classic keys the store imported,
    remembered for ``ttl`` seconds (unknown ones too, so a flood cannot hammer the store)."""

    def __init__(self, store: TenantStore, metrics: Metrics, ttl: float = 60.0) -> None:
        self.store = store
        self.ttl = ttl
        self._known: cachetools.TTLCache[bytes, bool] = cachetools.TTLCache(100_000, ttl)
        self._errors = metrics.store_errors.labels(op="classic_key")

    def get(self, key: bytes) -> bool | None:
        return self._known.get(key)

    async def fetch(self, key: bytes) -> None:
        try:
            self._known[key] = await self.store.is_classic_key(key.decode("latin-1"))
        except StoreError as exc:
            self._errors.inc()
            log.warning("tenant store: classic key look-up failed: %s", exc)
