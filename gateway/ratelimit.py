"""Token buckets: at most ``rate`` events per second, in bursts of up to ``burst``.

Used where a flood must not buy unbounded work: Ed25519 checks of never-seen license keys,
``license_invalid`` events, and (one bucket per tenant) ``upgrade_click`` posts.

    bucket = TokenBucket(2000)
    if bucket.take(): ...do the expensive thing...

    per_tenant = KeyedBuckets(rate=0.2, burst=10)
    wait = per_tenant.take("acme")   # 0.0: go ahead; else seconds until a token is back
"""

from __future__ import annotations

import math
from time import monotonic

from cachetools import LRUCache


class TokenBucket:
    __slots__ = ("rate", "burst", "_tokens", "_refilled", "empty_until")

    def __init__(self, rate: float, burst: float | None = None, now: float | None = None) -> None:
        self.rate = rate  # <= 0: unlimited
        self.burst = rate if burst is None else burst
        self._tokens = self.burst
        self._refilled = monotonic() if now is None else now
        # No token before then (monotonic seconds; take refused one): read-only outside.
        self.empty_until = -math.inf

    def take(self, now: float | None = None) -> bool:
        """Take one token if there is one. ``now`` (monotonic seconds) is for tests.
        (``wait`` inlined: this runs for every refusal a flood causes, and while the
        bucket is empty it is one comparison.)"""
        if now is None:
            now = monotonic()
        if now < self.empty_until:
            return False
        if self.rate <= 0:
            return True
        tokens = self._tokens + (now - self._refilled) * self.rate
        if tokens > self.burst:
            tokens = self.burst
        self._refilled = now
        if tokens >= 1:
            self._tokens = tokens - 1
            return True
        self._tokens = tokens
        self.empty_until = now + (1 - tokens) / self.rate
        return False

    def wait(self, now: float | None = None) -> float:
        """Take one token and return 0.0, or return the seconds until one is back (and
        take nothing)."""
        if self.rate <= 0:
            return 0.0
        if now is None:
            now = monotonic()
        self._tokens = min(self.burst, self._tokens + (now - self._refilled) * self.rate)
        self._refilled = now
        if self._tokens < 1:
            return (1 - self._tokens) / self.rate
        self._tokens -= 1
        return 0.0


class KeyedBuckets:
    """One ``TokenBucket`` per key (a tenant id), for at most ``max_keys`` keys: the least
    recently used bucket is forgotten first, which at worst gives that key a fresh burst."""

    __slots__ = ("rate", "burst", "_buckets")

    def __init__(self, rate: float, burst: float, max_keys: int = 10_000) -> None:
        self.rate = rate
        self.burst = burst
        self._buckets: LRUCache[str, TokenBucket] = LRUCache(maxsize=max_keys)

    def take(self, key: str, now: float | None = None) -> float:
        """0.0 when ``key`` may go ahead (a token is taken), else the seconds to wait."""
        if now is None:
            now = monotonic()
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = self._buckets[key] = TokenBucket(self.rate, self.burst, now)
        return bucket.wait(now)


def retry_after(seconds: float) -> str:
    """A ``Retry-After`` value: whole seconds, rounded up, at least 1."""
    return str(max(1, math.ceil(seconds)))
