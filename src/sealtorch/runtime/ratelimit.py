"""Per-client token-bucket rate limit (clients keyed by peer address)."""

from __future__ import annotations

import time
from collections import OrderedDict


class RateLimiter:
    """``rate`` requests per second per client with bursts of ``burst``; bounded memory."""

    def __init__(self, rate: float, burst: int, *, max_clients: int = 10_000) -> None:
        self.rate = float(rate)
        self.burst = float(max(burst, 1))
        self._max = max_clients
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()

    def allow(self, client: str) -> bool:
        """Take one token for ``client``; False when it has none left."""
        if self.rate <= 0:
            return True
        now = time.monotonic()
        tokens, last = self._buckets.pop(client, (self.burst, now))
        tokens = min(self.burst, tokens + (now - last) * self.rate)
        ok = tokens >= 1.0
        if ok:
            tokens -= 1.0
        self._buckets[client] = (tokens, now)
        while len(self._buckets) > self._max:
            self._buckets.popitem(last=False)
        return ok

    def retry_after(self) -> int:
        """Seconds a refused client should wait (at least 1)."""
        return max(1, int(1.0 / self.rate + 0.999)) if self.rate > 0 else 1
