"""A token bucket: at most ``rate`` events per second, in bursts of up to ``rate``.

Used where a flood must not buy unbounded work: Ed25519 checks of never-seen license keys
and ``license_invalid`` events.

    bucket = TokenBucket(2000)
    if bucket.take(): ...do the expensive thing...
"""

from __future__ import annotations

from time import monotonic


class TokenBucket:
    __slots__ = ("rate", "_tokens", "_refilled")

    def __init__(self, rate: float) -> None:
        self.rate = rate  # <= 0: unlimited
        self._tokens = rate
        self._refilled = monotonic()

    def take(self) -> bool:
        if self.rate <= 0:
            return True
        now = monotonic()
        self._tokens = min(self.rate, self._tokens + (now - self._refilled) * self.rate)
        self._refilled = now
        if self._tokens < 1:
            return False
        self._tokens -= 1
        return True
