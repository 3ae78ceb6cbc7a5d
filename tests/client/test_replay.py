"""The replay guard: each request once, bounded memory, safe whatever the clock does."""

from __future__ import annotations

import pytest

from sealtorch.e2e.replay import ReplayGuard
from sealtorch.errors import ReplayError


class Clock:
    def __init__(self, t: float) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def n(i: int) -> bytes:
    return i.to_bytes(16, "big")


def test_each_request_is_accepted_once() -> None:
    clock = Clock(1000.0)
    g = ReplayGuard(window_ms=10_000, clock=clock)
    g.check(n(1), 1_000_000)
    g.check(n(2), 1_000_000)
    with pytest.raises(ReplayError, match="already received"):
        g.check(n(1), 1_000_000)
    assert len(g) == 2


def test_window_refuses_old_and_future_requests() -> None:
    clock = Clock(1000.0)
    g = ReplayGuard(window_ms=10_000, clock=clock)
    with pytest.raises(ReplayError, match="older than the replay window"):
        g.check(n(1), 989_999)
    with pytest.raises(ReplayError, match="ahead of the server's clock"):
        g.check(n(2), 1_010_001)
    g.check(n(3), 990_000)
    g.check(n(4), 1_010_000)


def test_expired_nonces_are_forgotten_and_their_replays_still_refused() -> None:
    clock = Clock(1000.0)
    g = ReplayGuard(window_ms=10_000, clock=clock)
    g.check(n(1), 1_000_000)
    clock.t = 1011.0  # n(1) left the window: forgotten at the next check
    g.check(n(2), 1_011_000)
    assert len(g) == 1
    clock.t = 1000.0  # the host turns the clock back: the forgotten request is still refused
    with pytest.raises(ReplayError, match="no longer remembers"):
        g.check(n(1), 1_000_000)


def test_capacity_bounds_memory_and_raises_the_floor() -> None:
    clock = Clock(1000.0)
    g = ReplayGuard(window_ms=60_000, capacity=3, clock=clock)
    for i in range(3):
        g.check(n(i), 1_000_000 + i)
    g.check(n(3), 1_000_010)  # full: the oldest (time 1_000_000) is forgotten
    assert len(g) == 3 and g.floor_ms == 1_000_000
    with pytest.raises(ReplayError, match="no longer remembers"):
        g.check(n(0), 1_000_000)  # the forgotten one cannot come back
    with pytest.raises(ReplayError, match="already received"):
        g.check(n(1), 1_000_001)
    # memory full, and an unseen request as old as the oldest remembered: refused, since
    # forgetting that oldest one to make room would let it be replayed
    with pytest.raises(ReplayError, match="memory is full"):
        g.check(n(5), 1_000_001)
    assert len(g) == 2 and g.floor_ms == 1_000_001


def test_bad_settings() -> None:
    with pytest.raises(ValueError):
        ReplayGuard(window_ms=0)
    with pytest.raises(ValueError):
        ReplayGuard(capacity=0)
