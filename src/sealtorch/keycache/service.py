"""Assemble and run one dkeycache: measured config -> attester -> leases -> local socket."""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import threading
from dataclasses import dataclass
from typing import Any

from sealtorch.errors import ConfigError
from sealtorch.keycache.config import CacheConfig
from sealtorch.keycache.health import HealthServer
from sealtorch.keycache.leases import LeaseManager
from sealtorch.keycache.metrics import CacheMetrics
from sealtorch.keycache.server import LocalServer

log = logging.getLogger("sealtorch.keycache")


def make_attester(name: str, config: CacheConfig) -> Any:
    """The cache's attester (:func:`sealtorch.attestation.attesters.select`, role ``dkeycache``,
    measuring the config file bytes for sim; bound through ``initdata`` when set)."""
    from sealtorch.attestation import attesters

    return attesters.select(name, role="dkeycache", config_bytes=config.raw,
                            initdata=config.initdata)


def make_local_auth(tee: str, config: CacheConfig, leases: LeaseManager) -> Any:
    """Evidence for SGX/sim, peer credentials judged by the VM's own server-verified claims
    for TDX/SNP (or as configured)."""
    from sealtorch.keycache.localauth import EvidenceAuth, PeerCredAuth

    mode = config.local_auth
    if mode == "auto":
        mode = "peercred" if tee in ("tdx", "snp") else "evidence"
    if mode == "peercred":
        return PeerCredAuth(tee, set(config.allowed_uids) or {os.getuid()},
                            lambda: leases.own_claims)
    from sealtorch.attestation.verifiers import VerifierSet

    if tee == "sim":
        from sealtorch.attestation import sim

        keys: list[Any] = list(config.sim_platform_keys)
        if not keys:  # same sim platform as the cache itself
            keys = [sim.default_dir() / sim.PUBLIC_FILE]
        return EvidenceAuth(VerifierSet(sim_platform_keys=keys), now=leases.server_time)
    leases.fetch_collateral = True
    return EvidenceAuth(_SgxVerifiers(leases, config.pccs_url), now=leases.server_time)


class _SgxVerifiers:
    """The SGX verifier of a cache: collateral signed by its key server (``pccs_url`` as the
    fallback, Intel-signed), rebuilt when a renewal brings new collateral."""

    def __init__(self, leases: LeaseManager, pccs_url: str | None) -> None:
        self._leases = leases
        self._pccs = pccs_url
        self._built: tuple[tuple[str, ...], Any] | None = None

    def __call__(self) -> Any:
        from sealtorch.attestation.verifiers import VerifierSet
        from sealtorch.attestation.verifiers.dcap import CollateralSource

        docs = self._leases.collateral
        if self._built is None or self._built[0] is not docs:
            if not docs and not self._pccs:
                from sealtorch.errors import CollateralError

                raise CollateralError(
                    "no DCAP collateral: the key server holds none ('dkeyserver collateral "
                    "import') and no pccs_url is configured")
            source = CollateralSource(documents=docs, pccs_url=self._pccs or None)
            self._built = (docs, VerifierSet(collateral=source, tees=("sgx",)))
        return self._built[1]


def check_own_runtime_identity(auth: Any, leases: LeaseManager) -> None:
    """In peer-credential mode, refuse to start when the VM's own claims match no runtime
    identity of any model the cache holds (it could never hand a key to anything)."""
    if auth.mode != "peercred":
        return
    policies = leases.policies()
    if not policies or leases.own_claims is None:
        return  # nothing granted yet: each request is judged when it comes
    verdicts = [auth.check_runtime(p, None) for p in policies]
    if all(code is not None for code, _ in verdicts):
        reasons = [r for _, rs in verdicts for r in rs][:5]
        raise ConfigError(
            "this VM's own claims match no runtime identity of the models it holds, so no "
            "local process may get a key here; fix the policies' [[runtimes]] or the image: "
            + "; ".join(reasons))


@dataclass
class Cache:
    """A running cache (for the CLI, tests and the benchmark)."""

    config: CacheConfig
    leases: LeaseManager
    server: LocalServer
    health: HealthServer | None

    def stop(self) -> None:
        self.server.stop()
        if self.health is not None:
            self.health.stop()
        self.leases.stop()


def start_cache(
    config: CacheConfig,
    attester: Any,
    *,
    socket_path: str | None = None,
    models: list[str] | None = None,
    upstream: Any = None,
    local_auth: Any = None,
) -> Cache:
    """Start lease loop, local socket and (if configured) health listener; returns at once."""
    from sealtorch.attestation import binding
    from sealtorch.keycache.replicas import ReplicaSet
    from sealtorch.protocol import hpke
    from sealtorch.protocol.signing import key_id, load_public_key

    if upstream is None:  # every URL, and every address of a name, is one replica
        upstream = ReplicaSet(config.keyserver_urls, config.ca_cert, config.server_public_key,
                              timeout=config.request_timeout, retry_min=config.retry_min,
                              retry_max=config.retry_max)

    def make_evidence(nonce: bytes, public_key: bytes, audience: bytes) -> Any:
        rd = binding.report_data("remote", nonce, hpke.KEM_ID, public_key, audience)
        return attester.attest(rd)

    leases = LeaseManager(
        upstream, make_evidence,
        models=models or (list(config.models) if config.models else None),
        poll_interval=config.poll_interval, renew_fraction=config.renew_fraction,
        retry_min=config.retry_min, retry_max=config.retry_max,
    )
    # ``local_auth`` (tests, benchmarks): an authenticator, or a factory given the leases
    auth = (local_auth if hasattr(local_auth, "mode") else local_auth(leases)) \
        if local_auth is not None else make_local_auth(attester.tee, config, leases)
    if config.tcp_listen is not None and auth.mode != "evidence":
        raise ConfigError(
            "tcp_listen needs evidence-based local auth, but this cache would use peer "
            "credentials (TDX/SNP): TCP has none; drop tcp_listen (a VM's Unix socket works) "
            "or set local_auth = \"evidence\""
        )
    leases.step()  # enrol and attest at start (an outage here is retried by the loop)
    try:
        check_own_runtime_identity(auth, leases)
    except BaseException:
        leases.stop()  # wipes every key
        raise
    metrics = CacheMetrics(leases.snapshot)
    server = LocalServer(
        socket_path or config.socket, leases, auth,
        server_key_id=key_id(load_public_key(config.server_public_key)), metrics=metrics,
        socket_group=config.socket_group,
        allowed_uids=config.allowed_uids,
        tcp=config.tcp_listen,
    )
    server.start()
    leases.start()
    health = None
    if config.health_port:
        health = HealthServer(config.health_port, server.health, metrics.render)
        health.start()
    return Cache(config, leases, server, health)


def run(config: CacheConfig, attester: Any, *, socket_path: str | None,
        models: list[str] | None) -> None:
    """Run until SIGTERM/SIGINT; wipes every key on the way out."""
    from sealtorch._secret import harden_process

    harden_process()
    cache = start_cache(config, attester, socket_path=socket_path, models=models)
    done = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: done.set())
    ready = {
        "event": "ready",
        "socket": cache.server.socket_path,
        "tcp": str(cache.server.tcp_address) if cache.server.tcp_address else None,
        "health_port": cache.health.port if cache.health else None,
        "tee": attester.tee,
        "state": cache.leases.snapshot()["state"],
    }
    print(json.dumps(ready), flush=True)
    try:
        while not done.wait(1.0):
            pass
    finally:
        cache.stop()
        print(json.dumps({"event": "stopped"}), file=sys.stderr, flush=True)
