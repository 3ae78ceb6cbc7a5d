"""Per-client rate limits: token buckets with a hard cap on the number of clients tracked,
evicting the least recently seen client (never everyone at once)."""

from __future__ import annotations

from sealtorch.keyserver.ops import RateLimiter


def test_bucket_refills_at_its_rate() -> None:
    now = [0.0]
    rl = RateLimiter(2.0, clock=lambda: now[0])  # 2/s, burst 4
    assert [rl.allow("a") for _ in range(5)] == [True] * 4 + [False]
    now[0] += 0.5  # one token back
    assert rl.allow("a") and not rl.allow("a")


def test_a_flood_of_new_clients_evicts_only_the_least_recently_seen() -> None:
    now = [0.0]
    rl = RateLimiter(1.0, max_keys=3, clock=lambda: now[0])  # burst 2
    for _ in range(2):
        assert rl.allow("busy")
    assert not rl.allow("busy")  # "busy" has used its burst
    assert rl.allow("x") and rl.allow("y")
    assert rl.allow("busy") is False  # seen again: now the most recent, still limited
    for i in range(10):  # new addresses push out x and y, then each other, never "busy"
        assert rl.allow(f"new{i}")
        assert rl.allow("busy") is False
    assert len(rl) == 3
