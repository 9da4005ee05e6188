"""The identity provider's signing keys: a JWKS from a URL or a file, kept fresh, fail-static.

``JwksKeys.keys`` is the last good key set by ``kid`` (PyJWT ``PyJWK`` objects, each bound
to its algorithm). It is loaded at ``start``, refreshed every ``refresh_seconds`` by a task
the object holds, and on demand (``refresh``) when a token names a ``kid`` it does not know
— at most once per ``min_refresh_seconds``, concurrent callers sharing one fetch. A refresh
that fails (endpoint down, timeout, not JSON, no usable key) keeps the keys it had and says
why in ``last_error``.

URLs are fetched with aiohttp, so a slow identity provider never blocks the event loop
(PyJWT's ``PyJWKClient`` fetches with blocking urllib, and forgets its keys once their
lifespan passes even when the refetch fails); files are read in a thread. Parsing and
verification are PyJWT's.

    keys = JwksKeys(url="https://idp.example/jwks.json", file=None,
                    algorithms=frozenset({"RS256"}), timeout=5.0,
                    refresh_seconds=300.0, min_refresh_seconds=10.0)
    await keys.start()
    key = keys.keys.get(kid)          # None: unknown kid → maybe ``await keys.refresh()``
    await keys.stop()
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from time import monotonic
from typing import Any

import aiohttp
from jwt import PyJWK
from jwt.exceptions import PyJWTError

log = logging.getLogger(__name__)

MAX_JWKS_BYTES = 1 << 20  # a key set is a few KiB; more is a misconfigured URL


class JwksError(Exception):
    """A key set that could not be fetched or used; the message says why."""


def parse_jwks(
    raw: bytes, algorithms: frozenset[str]
) -> tuple[dict[str, PyJWK], dict[str, dict[str, Any]]]:
    """The usable signing keys of a JWKS document by ``kid``, and their JWK objects (to
    tell whether a later set differs).

    A key is skipped when it is for encryption (``use = "enc"``), has no ``kid``, cannot be
    built, or its algorithm (its ``alg``, else derived from ``kty``/``crv``) is not one of
    ``algorithms`` — so an ``oct`` (HMAC) key in the set can never verify a token. The first
    key of a repeated ``kid`` wins. No usable key at all is an error."""
    try:
        document = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise JwksError(f"not JSON: {exc}") from None
    entries = document.get("keys") if isinstance(document, dict) else None
    if not isinstance(entries, list):
        raise JwksError('not a JWKS: expected an object with a "keys" list')
    keys: dict[str, PyJWK] = {}
    documents: dict[str, dict[str, Any]] = {}
    skipped: list[str] = []
    for entry in entries:
        if not isinstance(entry, dict):
            continue
        kid = entry.get("kid")
        if not isinstance(kid, str) or not kid or entry.get("use", "sig") != "sig":
            continue
        try:
            key = PyJWK(entry)
        # Keys come from the network: a member of the wrong type (``"alg": []``) raises
        # TypeError inside PyJWT rather than a PyJWTError; one bad member skips one key.
        except (PyJWTError, TypeError, ValueError, KeyError) as exc:
            skipped.append(f"{kid} ({exc})")
            continue
        if key.algorithm_name not in algorithms:
            skipped.append(f"{kid} ({key.algorithm_name} not allowed)")
            continue
        if kid not in keys:
            keys[kid], documents[kid] = key, entry
    if not keys:
        why = f": skipped {', '.join(skipped)}" if skipped else ""
        raise JwksError(f"no usable signing key{why}")
    return keys, documents


class JwksKeys:
    """The provider's current key set (see the module docstring)."""

    def __init__(
        self,
        *,
        url: str | None,
        file: Path | None,
        algorithms: frozenset[str],
        timeout: float,
        refresh_seconds: float,
        min_refresh_seconds: float,
    ) -> None:
        assert (url is None) != (file is None), "exactly one of url and file"
        self.url = url
        self.file = file
        self.source = url if url is not None else str(file)
        self.algorithms = algorithms
        self.timeout = timeout
        self.refresh_seconds = refresh_seconds
        self.min_refresh_seconds = min_refresh_seconds
        self.keys: Mapping[str, PyJWK] = {}
        self.last_error: str | None = None
        self.loaded_at: float | None = None  # wall clock of the last successful load
        self.on_change: Callable[[], None] | None = None  # called when the set changed
        self._documents: dict[str, Any] = {}  # kid → its JWK, to tell what changed
        self._last_demand = float("-inf")  # monotonic: last refresh asked for by a token
        self._pending: asyncio.Task[None] | None = None
        self._periodic: asyncio.Task[None] | None = None

    # ----------------------------------------------------------------- lifecycle
    async def start(self) -> None:
        """Load the keys once (a failure is logged: tokens are then refused with the
        reason until a refresh succeeds), then keep refreshing in the background."""
        await self._shared_load()
        self._periodic = asyncio.get_running_loop().create_task(
            self._refresh_periodically(), name="jwks-refresh"
        )

    async def stop(self) -> None:
        for task in (self._periodic, self._pending):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self._periodic = self._pending = None

    async def _refresh_periodically(self) -> None:
        while True:
            await asyncio.sleep(self.refresh_seconds)
            await self._shared_load()

    # ------------------------------------------------------------------ refresh
    def may_refresh(self) -> bool:
        """Whether an unknown ``kid`` may trigger a refresh now (or join one under way)."""
        return (
            self._pending is not None or monotonic() - self._last_demand >= self.min_refresh_seconds
        )

    async def refresh(self) -> None:
        """Reload the keys for a token that named an unknown ``kid``, unless that was done
        less than ``min_refresh_seconds`` ago (a flood of made-up kids costs the provider
        one request per interval); never raises."""
        if self._pending is None:
            if monotonic() - self._last_demand < self.min_refresh_seconds:
                return
            self._last_demand = monotonic()
        await self._shared_load()

    async def _shared_load(self) -> None:
        """One load at a time, shared by everyone asking meanwhile (so an older answer can
        never overwrite a newer one); it runs in a task of its own, so a client that goes
        away does not cancel it for the others."""
        pending = self._pending
        if pending is None:
            pending = asyncio.get_running_loop().create_task(self._load(), name="jwks-load")
            self._pending = pending
            pending.add_done_callback(self._load_done)
        await asyncio.shield(pending)

    def _load_done(self, task: asyncio.Task[None]) -> None:
        if self._pending is task:
            self._pending = None

    async def _load(self) -> None:
        try:
            raw = await (self._fetch() if self.url is not None else self._read())
            keys, documents = parse_jwks(raw, self.algorithms)
        except Exception as exc:  # any failure: a refresh must never end the refresher
            if not isinstance(exc, JwksError):
                log.exception("identity: JWKS from %s: unexpected error", self.source)
            self.last_error = str(exc)
            log.warning(
                "identity: JWKS from %s not loaded (%s); keeping %d key(s) %s",
                self.source,
                exc,
                len(self.keys),
                sorted(self.keys),
            )
            return
        changed = documents != self._documents
        self.keys, self._documents = keys, documents
        self.last_error = None
        self.loaded_at = time.time()
        if changed:
            log.info("identity: JWKS from %s: key ids %s", self.source, sorted(keys))
            if self.on_change is not None:
                self.on_change()

    async def _fetch(self) -> bytes:
        assert self.url is not None
        timeout = aiohttp.ClientTimeout(total=self.timeout)
        try:
            async with aiohttp.ClientSession(timeout=timeout) as session:
                # No redirects: the configured URL is the trust anchor, as in PyJWT.
                async with session.get(
                    self.url, allow_redirects=False, headers={"Accept": "application/json"}
                ) as response:
                    if response.status != 200:
                        raise JwksError(f"HTTP {response.status}")
                    raw = await response.content.read(MAX_JWKS_BYTES + 1)
        except TimeoutError:
            raise JwksError(f"no answer within {self.timeout:g} s") from None
        except aiohttp.ClientError as exc:
            raise JwksError(f"fetch failed: {exc or type(exc).__name__}") from None
        if len(raw) > MAX_JWKS_BYTES:
            raise JwksError(f"larger than {MAX_JWKS_BYTES} bytes")
        return raw

    async def _read(self) -> bytes:
        assert self.file is not None
        return await asyncio.to_thread(read_jwks_file, self.file)


def read_jwks_file(path: Path) -> bytes:
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise JwksError(f"cannot read {path}: {exc.strerror}") from None
    if len(raw) > MAX_JWKS_BYTES:
        raise JwksError(f"{path} is larger than {MAX_JWKS_BYTES} bytes")
    return raw
