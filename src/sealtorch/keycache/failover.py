"""Which key server replica a cache talks to next: pure decisions over immutable state.

A cache configured with several dkeyserver endpoints spreads its requests round-robin over the
ones that answer, and takes one that stopped answering out of the rotation for an exponential
backoff with jitter (half fixed, half random) before trying it again. Time and randomness come
in as arguments (the caller injects its clock and random source), so every decision is
reproducible in tests without sleeping.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class EndpointHealth:
    """What the cache knows about one endpoint: consecutive failures and when it may be
    tried again (monotonic seconds; 0 = now)."""

    failures: int = 0
    retry_at: float = 0.0


def backoff_delay(failures: int, retry_min: float, retry_max: float, jitter: float) -> float:
    """Exponential backoff after ``failures`` consecutive failures (>= 1), capped at
    ``retry_max``: half of it fixed, half scaled by ``jitter`` in [0, 1) so that many caches
    that lost the same replica do not come back in lockstep."""
    if failures < 1:
        return 0.0
    d = min(retry_max, retry_min * (2 ** min(failures - 1, 30)))
    return d / 2 + min(max(jitter, 0.0), 1.0) * d / 2


def after_failure(h: EndpointHealth, now: float, *, retry_min: float, retry_max: float,
                  jitter: float) -> EndpointHealth:
    """The endpoint did not answer (connection refused, timeout, 5xx/429): back off."""
    n = h.failures + 1
    return EndpointHealth(n, now + backoff_delay(n, retry_min, retry_max, jitter))


def after_success(h: EndpointHealth) -> EndpointHealth:
    """The endpoint answered: back in the rotation at once."""
    return EndpointHealth() if h.failures or h.retry_at else h


def available(endpoints: Sequence[EndpointHealth], now: float) -> list[int]:
    """Indexes of the endpoints whose backoff is over."""
    return [i for i, h in enumerate(endpoints) if h.retry_at <= now]


def choose(endpoints: Sequence[EndpointHealth], now: float, cursor: int) -> int:
    """The endpoint for the next request: round-robin from ``cursor`` over the available
    ones; when every endpoint is backing off, the one whose backoff ends first (the caller's
    own retry schedule already waited)."""
    if not endpoints:
        raise ValueError("no key server endpoint configured")
    n = len(endpoints)
    for k in range(n):
        i = (cursor + k) % n
        if endpoints[i].retry_at <= now:
            return i
    return min(range(n), key=lambda i: (endpoints[i].retry_at, (i - cursor) % n))
