"""Delivering minted licenses to the fleet: gateway provisioning hooks or a shared store.

Every license has one delivery per configured target in the ledger. ``Deliveries.run``
looks for due ones every ``poll_seconds`` (so a retry requested by ``gateway issuer retry``
in another process is picked up too); a failed attempt is retried with exponential backoff
and, after ``max_attempts``, dead-lettered until someone retries it.

- A hook target gets ``POST /admin/provision`` with ``{"event_id": "<issuer>:<license id>",
  "action": "license", ...}``, HMAC-signed like billing's own calls; any 200 counts as
  delivered (``applied: false`` means the gateway had it, or a newer one, already), and the
  stable event id makes a repeated delivery harmless.
- A store target (``redis://``, ``sqlite://``) gets the key through ``put_license``; the
  change feed of the store tells every gateway on it. The issuer appends the ``provision``
  audit line itself there (a hook's gateway writes its own).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time

import aiohttp
import msgspec

from gateway.audit import AuditError, AuditLog
from gateway.errors import ConfigError, LicenseError
from gateway.issuer_config import IssuerConfig, Target
from gateway.issuing import license_record
from gateway.ledger import Delivery, Ledger, LedgerLicense
from gateway.license import KeyRing
from gateway.provision import sign
from gateway.store import StoreError, TenantStore, open_store

log = logging.getLogger(__name__)


class Deliveries:
    """Attempts deliveries and keeps the ledger's delivery state. Owned by the issuer app."""

    def __init__(self, config: IssuerConfig, ledger: Ledger, audit: AuditLog) -> None:
        self.config = config
        self.ledger = ledger
        self.audit = audit
        self.targets = {target.name: target for target in config.settings.targets}
        self._session: aiohttp.ClientSession | None = None
        self._stores: dict[str, tuple[frozenset[str], TenantStore]] = {}
        self._in_flight: set[tuple[str, str]] = set()
        self.wake = asyncio.Event()

    async def start(self) -> None:
        timeout = aiohttp.ClientTimeout(total=self.config.settings.delivery.timeout_seconds)
        self._session = aiohttp.ClientSession(timeout=timeout)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
        for _, store in self._stores.values():
            with contextlib.suppress(StoreError):
                await store.close()

    async def run(self) -> None:
        """Attempt due deliveries until cancelled."""
        poll = self.config.settings.delivery.poll_seconds
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.wake.wait(), poll)
            self.wake.clear()
            try:
                due = await asyncio.to_thread(self.ledger.due, time.time())
            except Exception:  # the ledger is briefly unusable: look again next time
                log.exception("deliveries: cannot read the ledger")
                continue
            await asyncio.gather(*(self.attempt(delivery, lic) for delivery, lic in due))

    async def deliver_new(self, lic: LedgerLicense) -> None:
        """The first attempt for a just-minted license, before the order is answered."""
        pending = [
            Delivery(lic.license_id, name, "pending", 0, 0.0, None, None) for name in self.targets
        ]
        await asyncio.gather(*(self.attempt(delivery, lic) for delivery in pending))

    async def attempt(self, delivery: Delivery, lic: LedgerLicense) -> None:
        key = (delivery.license_id, delivery.target)
        target = self.targets.get(delivery.target)
        if key in self._in_flight:
            return
        self._in_flight.add(key)
        try:
            await self._attempt(delivery, target, lic)
        except Exception:  # the ledger could not record it: the next poll tries again
            log.exception("delivery of %s to %s", lic.license_id, delivery.target)
        finally:
            self._in_flight.discard(key)

    async def _attempt(self, delivery: Delivery, target: Target | None, lic: LedgerLicense) -> None:
        if target is None:
            error: str | None = "target no longer configured"
        elif target.provision_url is not None:
            error = await self._post_hook(target, lic)
        else:
            error = await self._put_store(target, lic)
        now = time.time()
        if error is None:
            await asyncio.to_thread(self.ledger.delivered, lic.license_id, delivery.target, now)
            log.info("delivered %s to %s", lic.license_id, delivery.target)
            return
        settings = self.config.settings.delivery
        attempts = delivery.attempts + 1
        retry_at = None
        if attempts < settings.max_attempts:
            delay = settings.backoff_seconds * 2 ** (attempts - 1)
            retry_at = now + min(delay, settings.max_backoff_seconds)
        await asyncio.to_thread(
            self.ledger.failed, lic.license_id, delivery.target, error, retry_at
        )
        log.warning(
            "delivery of %s to %s failed (attempt %d): %s%s",
            lic.license_id, delivery.target, attempts, error,
            "" if retry_at is not None else "; dead-lettered",
        )  # fmt: skip

    async def _post_hook(self, target: Target, lic: LedgerLicense) -> str | None:
        assert self._session is not None and target.provision_url is not None
        secret = os.environ.get(target.secret_env or "", "")
        if not secret:
            return f"the provisioning secret ${target.secret_env} is not set"
        body = msgspec.json.encode(
            {
                "event_id": f"{self.config.settings.issuer.name}:{lic.license_id}",
                "action": "license",
                "tenant": lic.tenant,
                "key": lic.token,
            }
        )
        headers = {
            "Gateway-Signature": sign(secret.encode(), body, int(time.time())),
            "Content-Type": "application/json",
        }
        try:
            async with self._session.post(target.provision_url, data=body, headers=headers) as r:
                if r.status == 200:
                    return None
                text = (await r.text())[:300]
                return f"HTTP {r.status}: {text}"
        except (aiohttp.ClientError, TimeoutError) as exc:
            return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__

    async def _put_store(self, target: Target, lic: LedgerLicense) -> str | None:
        try:
            store = await self._store(target)
            stored = await store.put_license(lic.token)
        except (StoreError, LicenseError, ConfigError, ValueError) as exc:
            return str(exc)
        try:
            await self._audit_provision(target, lic, stored is not None)
        except AuditError as exc:  # stored, but unrecorded: retried (then "applied": false)
            return f"stored, but {exc}"
        return None

    async def _audit_provision(self, target: Target, lic: LedgerLicense, applied: bool) -> None:
        actor = f"issuer:{self.config.settings.issuer.name}"
        detail = {"target": target.name, "applied": applied}
        entry = license_record(lic, "provision", actor, None, detail)
        await asyncio.to_thread(self.audit.append, entry)

    async def _store(self, target: Target) -> TenantStore:
        """The target's store, verifying with the issuer's current public keys (reopened
        when a rotation changed them: a store checks every key it is given)."""
        assert target.store is not None
        keyring = await asyncio.to_thread(KeyRing.load, self.config.keys_dir)
        kids = frozenset(keyring.keys)
        held = self._stores.get(target.name)
        if held is not None and held[0] == kids:
            return held[1]
        if held is not None:
            with contextlib.suppress(StoreError):
                await held[1].close()
        url = target.store
        if url.startswith("sqlite://") and not url.startswith("sqlite:///"):
            url = "sqlite:///" + str(self.config.resolve(url[len("sqlite://") :]))
        store = open_store(url, keyring)
        self._stores[target.name] = (kids, store)
        return store
