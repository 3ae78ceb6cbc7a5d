"""Three real dkeyserver replicas on one PostgreSQL, several caches configured with all three,
one replica SIGKILLed while the caches renew (and restarted): every cache keeps its lease (no
gap longer than its retry budget), the audit chain verifies, no nonce is accepted twice."""

from __future__ import annotations

import json
import shutil
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from tests.servers import RunningKeyServer, keyserver_cli, sim_policy, start_keyserver

from sealtorch.attestation import binding
from sealtorch.attestation.attesters.sim import SimAttester
from sealtorch.errors import ReleaseDenied
from sealtorch.keycache.leases import LeaseManager
from sealtorch.keycache.replicas import ReplicaSet
from sealtorch.protocol import hpke

LEASE_SECONDS = 4
RETRY_MIN, RETRY_MAX = 0.05, 0.5
#: the longest a cache may be without a live lease: one backoff step (renewals start at half
#: the lease, so a working failover leaves no gap at all)
RETRY_BUDGET = RETRY_MAX


class RecordingReplicas(ReplicaSet):
    """A cache's replica set that remembers the nonce of every grant it was given."""

    nonces: list[bytes]

    def release(self, *args: Any, **kw: Any) -> Any:
        result = super().release(*args, **kw)
        self.nonces.extend(rk.grant.nonce for rk in result.grants)
        return result


def _replica(first: RunningKeyServer, tmp_path: Path, name: str) -> RunningKeyServer:
    """Another replica: a copy of the first one's data dir (signing key, TLS, config, state
    mark) on the same database, on its own port."""
    d = tmp_path / name
    shutil.copytree(first.data_dir, d, ignore=shutil.ignore_patterns("run.json", "*.writelock"))
    return start_keyserver(tmp_path, data_dir=d)


def _cache(replicas: list[RunningKeyServer], attester: SimAttester) -> LeaseManager:
    first = replicas[0]
    up = RecordingReplicas([r.url for r in replicas], first.ca_cert_path,
                           first.signing_public_key, timeout=5, retry_min=RETRY_MIN,
                           retry_max=RETRY_MAX)
    up.nonces = []

    def evidence(nonce: bytes, pk: bytes, audience: bytes) -> Any:
        return attester.attest(binding.report_data("remote", nonce, hpke.KEM_ID, pk, audience))

    return LeaseManager(up, evidence, models=["m"], poll_interval=0.3, renew_fraction=0.5,
                        retry_min=RETRY_MIN, retry_max=RETRY_MAX)


def _longest_gap(samples: list[tuple[float, int]]) -> float:
    """The longest time without a live lease after the first one."""
    gap, since = 0.0, None
    started = False
    for t, live in samples:
        if live:
            if since is not None:
                gap = max(gap, t - since)
            since, started = None, True
        elif started and since is None:
            since = t
    if since is not None:
        gap = max(gap, samples[-1][0] - since)
    return gap


def test_caches_keep_their_leases_when_a_replica_is_killed(pg_url: str, tmp_path: Path) -> None:
    from sealtorch.attestation import sim

    ks = start_keyserver(tmp_path, db_url=pg_url, auto_approve=True)
    replicas = [ks]
    caches: list[LeaseManager] = []
    try:
        platform = ks.sim_platform()
        meas = sim.measure("dkeycache", b"fleet")
        ks.add_model("m", b"k" * 32)
        ks.set_policy("m", sim_policy(meas, platform, lease_seconds=LEASE_SECONDS))
        replicas += [_replica(ks, tmp_path, f"replica{i}") for i in (2, 3)]
        assert len({r.url for r in replicas}) == 3
        caches = [_cache(replicas, SimAttester(platform, meas, role="dkeycache"))
                  for _ in range(4)]
        samples: list[list[tuple[float, int]]] = [[] for _ in caches]
        stop = threading.Event()

        def sample() -> None:
            while not stop.wait(0.02):
                for i, lm in enumerate(caches):
                    samples[i].append((time.monotonic(), lm.summary()["leases"]))

        for lm in caches:
            lm.start()
        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        deadline = time.monotonic() + 30
        while not all(lm.summary()["leases"] for lm in caches):
            assert time.monotonic() < deadline, [lm.last_error for lm in caches]
            time.sleep(0.05)
        time.sleep(LEASE_SECONDS / 2)
        victim = replicas[1]
        port = victim.url.rsplit(":", 1)[1]
        refreshes_before = [lm.refreshes for lm in caches]
        victim.kill9()  # while the caches renew and poll
        time.sleep(LEASE_SECONDS * 1.5)  # every lease has been renewed at least once since
        assert all(lm.refreshes > r for lm, r in zip(caches, refreshes_before, strict=True))
        replicas[1] = victim.restart(SEALTORCH_KS_RELEASE_PORT=port)
        answered = [lm._up.answered[1] for lm in caches]  # type: ignore[attr-defined]
        time.sleep(LEASE_SECONDS / 2)
        stop.set()
        sampler.join(5)
        for lm in caches:
            lm.stop()

        for i, lm in enumerate(caches):
            gap = _longest_gap(samples[i])
            assert gap <= RETRY_BUDGET, f"cache {i} had no lease for {gap:.2f} s"
            assert lm.failovers >= 1  # it did reach the killed replica, and moved on
            assert lm.invalid_documents == 0
        # the restarted replica is back in every cache's rotation
        assert all(lm._up.answered[1] > a  # type: ignore[attr-defined]
                   for lm, a in zip(caches, answered, strict=True))
        nonces = [n for lm in caches for n in lm._up.nonces]  # type: ignore[attr-defined]
        assert len(nonces) >= 4 * 3
        assert len(set(nonces)) == len(nonces), "a nonce was accepted twice"
        # a nonce burned at one replica is refused by another
        with replicas[2].client() as c:
            used = caches[0]._up.nonces[-1]  # type: ignore[attr-defined]
            att = SimAttester(platform, meas, role="dkeycache")
            sk, pk = hpke.generate_keypair()
            ev = att.attest(binding.report_data("remote", used, hpke.KEM_ID, pk, c.audience))
            with pytest.raises(ReleaseDenied) as e:
                c.release(ev, pk, used, ["m"], private_key=sk)
            assert e.value.denial == "nonce_invalid"
            # a poll answered by one replica holds a revocation committed through another
            # just before it, though this replica has served polls from its cached state
            sk, pk = hpke.generate_keypair()
            n = c.challenge()
            ev = att.attest(binding.report_data("remote", n, hpke.KEM_ID, pk, c.audience))
            res = c.release(ev, pk, n, ["m"], private_key=sk)
            assert c.status(res.cache_id, ["m"]).models["m"].state == "active"
            replicas[0].admin("POST", "/v1/admin/model-revoke/m", {})
            assert c.status(res.cache_id, ["m"]).models["m"].state == "revoked"
        for r in replicas:
            out = keyserver_cli("audit", "verify", "--data-dir", str(r.data_dir), env=r.env)
            assert json.loads(out.stdout)["ok"] is True
    finally:
        for lm in caches:
            lm.stop()
        for r in replicas:
            r.stop()


def test_a_name_with_two_addresses_is_two_replicas_checked_by_name(tmp_path: Path) -> None:
    """A name resolving to two addresses: the cache connects to each address, TLS checks the
    server's certificate against the name (its SAN), and a dead address is failed over."""
    from sealtorch.attestation import sim

    ks = start_keyserver(tmp_path, auto_approve=True)
    try:
        platform = ks.sim_platform()
        meas = sim.measure("dkeycache", b"dns")
        ks.add_model("m", b"k" * 32)
        ks.set_policy("m", sim_policy(meas, platform))
        port = int(ks.url.rsplit(":", 1)[1])
        resolved: list[tuple[str, int]] = []

        def resolve(host: str, p: int) -> list[str]:
            resolved.append((host, p))
            return ["127.0.0.2", "127.0.0.1"]  # nothing listens on the first one

        up = ReplicaSet([f"https://localhost:{port}"], ks.ca_cert_path, ks.signing_public_key,
                        timeout=5, resolve=resolve, rng=lambda: 0.0, retry_min=5,
                        retry_max=10)
        assert resolved == [("localhost", port)]
        assert up.urls == [f"https://127.0.0.2:{port}", f"https://127.0.0.1:{port}"]
        att = SimAttester(platform, meas, role="dkeycache")
        lm = LeaseManager(
            up, lambda n, pk, aud: att.attest(binding.report_data("remote", n, hpke.KEM_ID, pk,
                                                                  aud)),
            models=["m"], retry_min=RETRY_MIN, retry_max=RETRY_MAX)
        lm.refresh()
        assert lm.summary()["leases"] == 1 and lm.failovers == 1
        assert up.answered == [0, 2]  # challenge and release, by name over the second address
        assert lm.poll() is False and up.answered == [0, 3]  # the first is still backing off
        up.close()
    finally:
        ks.stop()
