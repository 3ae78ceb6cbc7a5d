"""The cache's upstream when several dkeyserver replicas serve it: one client per endpoint.

Every configured URL is an endpoint, and a host name that resolves to several addresses is one
endpoint per address (TLS still checks the name). Challenges, releases and status polls go
round-robin to the endpoints that answer (:mod:`sealtorch.keycache.failover` decides); the
release of an attestation goes to the replica that issued its nonce. All endpoints share one
:class:`GrantVerifier` (the pinned key, the policy and state rollback watermarks) and the
per-cache status key: a grant or status from any replica verifies with the same pinned key,
and a replica serving older state than another one already showed is refused.
"""

from __future__ import annotations

import ipaddress
import os
import random
import socket
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, TypeVar
from urllib.parse import urlsplit

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from sealtorch._secret import Secret
from sealtorch.errors import ConfigError, ServiceUnavailableError
from sealtorch.keycache import failover
from sealtorch.protocol.grant import GrantVerifier
from sealtorch.protocol.release_client import KeyServerClient

T = TypeVar("T")
#: resolves ``(host, port)`` to IP address strings
Resolver = Callable[[str, int], list[str]]


def resolve_addresses(host: str, port: int) -> list[str]:
    """Every distinct address of ``host`` (TCP), in the resolver's order."""
    out: list[str] = []
    for *_, addr in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM):
        ip = str(addr[0])
        if ip not in out:
            out.append(ip)
    return out


def expand_endpoints(urls: Sequence[str], resolve: Resolver = resolve_addresses
                     ) -> list[tuple[str, str | None]]:
    """``(url, server name)`` per endpoint: an IP-literal URL as is (no name); a host name
    that resolves to several addresses, one endpoint per address named by the host. A name
    that does not resolve now stays one endpoint by name (an outage at start is not fatal:
    the connection fails and is retried like any other)."""
    out: list[tuple[str, str | None]] = []
    for url in urls:
        u = urlsplit(url)
        host, port = u.hostname or "", u.port or 443
        try:
            ipaddress.ip_address(host)
            literal = True
        except ValueError:
            literal = False
        addrs: list[str] = []
        if not literal:
            try:
                addrs = resolve(host, port)
            except OSError:
                addrs = []
        if literal or len(addrs) < 2:
            out.append((url, None))
            continue
        path = u.path.rstrip("/")
        for ip in addrs:
            h = f"[{ip}]" if ":" in ip else ip
            out.append((f"https://{h}:{port}{path}", host))
    unique = list(dict.fromkeys(out))  # the same endpoint twice is one endpoint
    if not unique:
        raise ConfigError("no key server URL configured")
    return unique


class ReplicaSet:
    """An :class:`~sealtorch.keycache.lease.Upstream` over several dkeyserver endpoints.

    ``clock`` and ``rng`` (uniform in [0, 1)) are injected: the failover decisions are pure
    functions of them. ``clients`` replaces the HTTPS clients (tests); they must share the
    ``verifier``.
    """

    def __init__(
        self,
        urls: Sequence[str],
        ca_cert: str | os.PathLike[str] | None,
        pinned_signing_key: Ed25519PublicKey | bytes | str,
        *,
        timeout: float = 30.0,
        retry_min: float = 0.5,
        retry_max: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
        rng: Callable[[], float] = random.random,
        resolve: Resolver = resolve_addresses,
        clients: Sequence[Any] | None = None,
        verifier: GrantVerifier | None = None,
    ) -> None:
        self.verifier = verifier or GrantVerifier(pinned_signing_key)
        self._status_keys: dict[str, Secret] = {}
        if clients is None:
            clients = [KeyServerClient(url, ca_cert, pinned_signing_key, timeout=timeout,
                                       verifier=self.verifier, status_keys=self._status_keys,
                                       server_name=name)
                       for url, name in expand_endpoints(urls, resolve)]
        if not clients:
            raise ConfigError("no key server URL configured")
        self.clients = list(clients)
        self.health = [failover.EndpointHealth() for _ in self.clients]
        self._retry = (retry_min, retry_max)
        self._clock, self._rng = clock, rng
        self._cursor = int(rng() * len(self.clients)) % len(self.clients)  # spread caches
        self._lock = threading.Lock()
        self._release_at: int | None = None  # the endpoint that issued the last nonce
        #: requests that an endpoint did not answer (each moved the cache to another one)
        self.endpoint_failures = 0
        #: requests each endpoint answered
        self.answered = [0] * len(self.clients)

    @property
    def urls(self) -> list[str]:
        return [c.url for c in self.clients]

    @property
    def audience(self) -> bytes:
        return bytes.fromhex(self.verifier.server_key_id)

    @property
    def replicas(self) -> int:
        """How many endpoints one operation may try before it gives up."""
        return len(self.clients)

    def can_fail_over(self) -> bool:
        """Whether an endpoint is in the rotation now (an operation that failed may move)."""
        with self._lock:
            return bool(failover.available(self.health, self._clock()))

    def _pick(self) -> int:
        with self._lock:
            i = failover.choose(self.health, self._clock(), self._cursor)
            self._cursor = (i + 1) % len(self.clients)
            return i

    def _call(self, i: int, fn: Callable[[Any], T]) -> T:
        try:
            out = fn(self.clients[i])
        except (ServiceUnavailableError, OSError):
            with self._lock:
                self.health[i] = failover.after_failure(
                    self.health[i], self._clock(), retry_min=self._retry[0],
                    retry_max=self._retry[1], jitter=self._rng())
                self.endpoint_failures += 1
            raise
        with self._lock:
            self.health[i] = failover.after_success(self.health[i])
            self.answered[i] += 1
        return out

    # --- the Upstream protocol -----------------------------------------------------------
    def challenge(self) -> bytes:
        i = self._pick()
        nonce = self._call(i, lambda c: c.challenge())
        self._release_at = i
        return nonce

    def release(self, evidence: Any, public_key: bytes, nonce: bytes,
                models: list[str] | None = None, *,
                private_key: X25519PrivateKey | None = None) -> Any:
        i = self._release_at if self._release_at is not None else self._pick()
        self._release_at = None
        return self._call(i, lambda c: c.release(evidence, public_key, nonce, models,
                                                 private_key=private_key))

    def status(self, cache_id: str, models: list[str] | None = None) -> Any:
        return self._call(self._pick(), lambda c: c.status(cache_id, models))

    def collateral(self) -> tuple[str, ...]:
        return self._call(self._pick(), lambda c: c.collateral())

    def close(self) -> None:
        for c in self.clients:
            c.close()

    def __enter__(self) -> ReplicaSet:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
