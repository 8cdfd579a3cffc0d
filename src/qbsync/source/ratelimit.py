"""Pure timing helpers: the global token bucket and the reconnect backoff.

Both take the current time as an argument instead of reading a clock, so they can be tested
without sleeping; the async callers pass ``trio.current_time()``.
"""

from __future__ import annotations

import random

MiB = 1024 * 1024


class TokenBucket:
    """``--rate-limit``: a token bucket over piece payload bytes, shared by every sender.

    Tokens accrue at ``rate`` bytes/s up to ``burst``. :meth:`reserve` takes ``n`` tokens at
    once and may drive the balance negative ("debt"); the caller then sleeps for the returned
    delay. Debt makes a piece larger than the burst work without chunking, keeps callers in
    FIFO order (each reservation waits behind the debt of earlier ones) and keeps the long-run
    rate exact.
    """

    def __init__(self, rate: float, burst: float = MiB, now: float = 0.0) -> None:
        if rate <= 0:
            raise ValueError("rate must be positive")
        self.rate = float(rate)
        self.burst = float(max(burst, 1))
        self.tokens = self.burst
        self._last = now

    def _refill(self, now: float) -> None:
        if now > self._last:
            self.tokens = min(self.burst, self.tokens + (now - self._last) * self.rate)
            self._last = now

    def reserve(self, n: int, now: float) -> float:
        """Take ``n`` tokens; return how long to wait before using them (0 if available)."""
        self._refill(now)
        self.tokens -= n
        return 0.0 if self.tokens >= 0 else -self.tokens / self.rate


class Backoff:
    """Jittered exponential backoff for reconnects; it *does* reset
    (docs/design-decisions.md#reconnect-backoff-resets).

    ``next_delay()`` returns base, 2*base, 4*base ... capped at ``maximum``, each multiplied
    by a random factor in [1 - jitter, 1 + jitter] (and never above ``maximum``). Callers call
    :meth:`reset` after a healthy period, so one failure days later starts again at ``base``.
    """

    def __init__(
        self,
        base: float,
        maximum: float,
        *,
        jitter: float = 0.2,
        rng: random.Random | None = None,
    ) -> None:
        self.base = base
        self.maximum = max(maximum, base)
        self.jitter = jitter
        self.failures = 0
        self._rng = rng or random.Random()

    def next_delay(self) -> float:
        raw = min(self.maximum, self.base * 2.0 ** min(self.failures, 30))
        self.failures += 1
        factor = 1 + self._rng.uniform(-self.jitter, self.jitter)
        return min(self.maximum, raw * factor)

    def reset(self) -> None:
        self.failures = 0
