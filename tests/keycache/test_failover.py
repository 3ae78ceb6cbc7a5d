"""Failover between key server replicas: the pure decisions, the replica set over an injected
clock and random source (no sleeps), the lease manager moving to another replica, and the
multi-URL configuration."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from sealtorch.errors import ConfigError, ServiceUnavailableError
from sealtorch.keycache import failover
from sealtorch.keycache.config import parse_config
from sealtorch.keycache.failover import EndpointHealth
from sealtorch.keycache.replicas import ReplicaSet, expand_endpoints

PUB = "A" * 43 + "="


# --- pure decisions -----------------------------------------------------------------------
def test_backoff_doubles_is_capped_and_keeps_half_fixed() -> None:
    assert failover.backoff_delay(0, 0.5, 30, 0.9) == 0.0
    assert failover.backoff_delay(1, 0.5, 30, 0.0) == 0.25
    assert failover.backoff_delay(1, 0.5, 30, 0.999999) == pytest.approx(0.5)
    assert failover.backoff_delay(3, 0.5, 30, 0.0) == 1.0
    assert failover.backoff_delay(40, 0.5, 30, 0.0) == 15.0
    assert failover.backoff_delay(40, 0.5, 30, 1.0) == 30.0
    assert failover.backoff_delay(2, 1, 30, 7.0) == 2.0  # jitter is clamped to [0, 1]


def test_failure_backs_off_success_returns_to_rotation() -> None:
    h = failover.after_failure(EndpointHealth(), 100.0, retry_min=1, retry_max=8, jitter=0.5)
    assert h == EndpointHealth(1, 100.75)
    h2 = failover.after_failure(h, 101.0, retry_min=1, retry_max=8, jitter=0.0)
    assert h2 == EndpointHealth(2, 102.0)
    assert failover.after_success(h2) == EndpointHealth()


def test_choose_round_robins_over_available_and_skips_backing_off() -> None:
    up, down = EndpointHealth(), EndpointHealth(1, 50.0)
    eps = [up, down, up]
    assert [failover.choose(eps, 10.0, c) for c in range(3)] == [0, 2, 2]
    assert failover.available(eps, 10.0) == [0, 2]
    assert failover.available(eps, 50.0) == [0, 1, 2]  # its backoff is over
    assert failover.choose(eps, 50.0, 1) == 1


def test_choose_when_all_back_off_takes_the_first_to_come_back() -> None:
    eps = [EndpointHealth(3, 40.0), EndpointHealth(1, 12.0), EndpointHealth(2, 12.0)]
    assert failover.choose(eps, 10.0, 2) == 2  # ties: the next in rotation
    assert failover.choose(eps, 10.0, 0) == 1
    with pytest.raises(ValueError, match="no key server"):
        failover.choose([], 0.0, 0)


# --- endpoints from URLs --------------------------------------------------------------------
def test_a_name_with_several_addresses_is_several_endpoints() -> None:
    calls: list[tuple[str, int]] = []

    def resolve(host: str, port: int) -> list[str]:
        calls.append((host, port))
        return {"ks.example": ["10.0.0.1", "10.0.0.2", "fd00::3"],
                "one.example": ["10.0.0.9"]}[host]

    eps = expand_endpoints(["https://ks.example:8443", "https://127.0.0.1:9443",
                            "https://one.example", "https://ks.example:8443"], resolve)
    assert eps == [("https://10.0.0.1:8443", "ks.example"), ("https://10.0.0.2:8443", "ks.example"),
                   ("https://[fd00::3]:8443", "ks.example"), ("https://127.0.0.1:9443", None),
                   ("https://one.example", None)]
    assert ("127.0.0.1", 9443) not in calls  # IP literals are not resolved


def test_a_name_that_does_not_resolve_stays_one_endpoint() -> None:
    def resolve(host: str, port: int) -> list[str]:
        raise OSError("no such name")

    assert expand_endpoints(["https://ks.example:8443"], resolve) == [
        ("https://ks.example:8443", None)]


# --- the replica set over fake replicas -----------------------------------------------------
class FakeReplica:
    """A replica that answers or is down (raises like an unreachable server)."""

    def __init__(self, name: str) -> None:
        self.url = f"https://{name}"
        self.name = name
        self.up = True
        self.calls: list[str] = []

    def _do(self, what: str) -> str:
        self.calls.append(what)
        if not self.up:
            raise ServiceUnavailableError(f"key server at {self.url} unreachable (ConnectError)")
        return f"{what}@{self.name}"

    def challenge(self) -> bytes:
        return self._do("challenge").encode()

    def release(self, evidence: Any, public_key: bytes, nonce: bytes,
                models: list[str] | None = None, *, private_key: Any = None) -> str:
        return self._do("release")

    def status(self, cache_id: str, models: list[str] | None = None) -> str:
        return self._do("status")

    def collateral(self) -> tuple[str, ...]:
        return (self._do("collateral"),)

    def close(self) -> None:
        pass


def _set(n: int, now: list[float], rng: Callable[[], float] = lambda: 0.0
         ) -> tuple[ReplicaSet, list[FakeReplica]]:
    reps = [FakeReplica(f"r{i}") for i in range(n)]
    return ReplicaSet([], None, PUB, clients=reps, clock=lambda: now[0], rng=rng,
                      retry_min=1.0, retry_max=8.0), reps


def test_requests_spread_round_robin_and_release_follows_its_nonce() -> None:
    now = [0.0]
    rs, _reps = _set(3, now)
    assert rs.replicas == 3
    assert [rs.status("c") for _ in range(4)] == ["status@r0", "status@r1", "status@r2",
                                                  "status@r0"]
    assert rs.challenge() == b"challenge@r1"
    assert rs.release({}, b"", b"n") == "release@r1"  # where the nonce came from


def test_random_start_spreads_caches_over_replicas() -> None:
    now = [0.0]
    starts = {_set(4, now, rng=lambda u=u: u)[0].status("c") for u in (0.0, 0.3, 0.6, 0.9)}
    assert starts == {"status@r0", "status@r1", "status@r2", "status@r3"}


def test_a_down_replica_leaves_the_rotation_for_its_backoff_then_comes_back() -> None:
    now = [0.0]
    rs, reps = _set(3, now, rng=lambda: 0.1)
    reps[1].up = False
    assert rs.status("c") == "status@r0"
    with pytest.raises(ServiceUnavailableError):
        rs.status("c")
    assert rs.health[1] == EndpointHealth(1, pytest.approx(0.55)) and rs.endpoint_failures == 1
    assert rs.can_fail_over()
    assert [rs.status("c") for _ in range(3)] == ["status@r2", "status@r0", "status@r2"]
    assert reps[1].calls == ["status"]  # not tried while backing off
    now[0] = 0.75
    assert rs.status("c") == "status@r0"
    with pytest.raises(ServiceUnavailableError):
        rs.status("c")  # back in the rotation: tried again, still down, longer backoff
    assert rs.health[1] == EndpointHealth(2, pytest.approx(0.75 + 1.1))
    reps[1].up = True
    now[0] = 10.0
    assert [rs.status("c") for _ in range(3)] == ["status@r2", "status@r0", "status@r1"]
    assert rs.health[1] == EndpointHealth()


def test_all_down_no_failover_left() -> None:
    now = [0.0]
    rs, reps = _set(2, now)
    for r in reps:
        r.up = False
    for _ in range(2):
        with pytest.raises(ServiceUnavailableError):
            rs.challenge()
    assert not rs.can_fail_over()


# --- the lease manager moves to another replica ---------------------------------------------
def test_lease_manager_fails_over_within_one_operation() -> None:
    from sealtorch.keycache.leases import LeaseManager

    now = [0.0]
    rs, reps = _set(3, now)
    lm = LeaseManager(rs, lambda n, pk, aud: None, clock=lambda: now[0], rng=lambda: 0.0)
    reps[0].up = False
    lm.cache_id = "c"
    assert lm._failing_over(lambda: rs.status("c")) == "status@r1"
    assert lm.failovers == 1
    reps[1].up = reps[2].up = False
    with pytest.raises(ServiceUnavailableError):
        lm._failing_over(lambda: rs.status("c"))
    assert lm.failovers == 2  # moved once more (r2), then no replica was left


# --- configuration ---------------------------------------------------------------------------
def _cfg(url: str) -> bytes:
    return f'[keycache]\nkeyserver_url = {url}\nserver_public_key = "{PUB}"\n'.encode()


def test_config_takes_one_url_or_a_list() -> None:
    assert parse_config(_cfg('"https://127.0.0.1:8443"')).keyserver_urls == (
        "https://127.0.0.1:8443",)
    cfg = parse_config(_cfg('["https://10.0.0.1:8443", "https://ks.example:8443"]'))
    assert cfg.keyserver_urls == ("https://10.0.0.1:8443", "https://ks.example:8443")
    assert cfg.keyserver_url == "https://10.0.0.1:8443"


@pytest.mark.parametrize("value, match", [
    ("[]", "list of 1 to 32"),
    ('["https://a:1", "http://b:2"]', "https://"),
    ('["https://a:1", "https://a:1"]', "same URL twice"),
    ('"https://a:99999"', "HOST"),
    ('"https://u:p@a:1"', "HOST"),
    ('"https://a:1/?x=1"', "HOST"),
    ("[1]", "https://"),
    ('"https://"', "HOST"),
])
def test_config_refuses_bad_url_lists(value: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        parse_config(_cfg(value))
