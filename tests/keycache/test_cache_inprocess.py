"""The cache's local protocol, leases and revocation against a real HTTPS key server double."""

from __future__ import annotations

import json
import os
import socket
import stat
import time
from pathlib import Path
from typing import Any

import pytest

import sealtorch
from sealtorch.attestation import sim
from sealtorch.attestation.attesters.sim import SimAttester
from sealtorch.errors import (
    AttesterUnavailableError,
    GrantError,
    LeaseExpiredError,
    ProtocolError,
    ReleaseDenied,
    RevokedError,
)
from sealtorch.format.header import read_header
from sealtorch.keycache.client import KeyCacheClient
from sealtorch.keycache.config import parse_config
from sealtorch.keycache.service import start_cache
from sealtorch.protocol import hpke
from sealtorch.protocol.local import MAX_FRAME, call, recv_frame

from .conftest import MODEL, make_policy, remove_socket_dir, runtime_attester, short_socket
from .rogue import RogueKeyServer


def _config(server: RogueKeyServer, sock: str, sim_dir: Path, **extra: Any) -> Any:
    lines = [
        "[keycache]",
        f'keyserver_url = "{server.url}"',
        f'server_public_key = "{server.public_key_b64}"',
        f'ca_cert = "{server.ca_cert}"',
        f'socket = "{sock}"',
        f'sim_platform_keys = ["{sim_dir / sim.PUBLIC_FILE}"]',
        "retry_min = 0.05",
        "retry_max = 0.2",
    ]
    lines += [f"{k} = {v}" for k, v in extra.items()]
    return parse_config(("\n".join(lines) + "\n").encode())


class Env:
    def __init__(self, sim_dir: Path, platform_fp: str, sealed: Any, *, lease_seconds: int = 60,
                 max_releases: int = 1000, local_auth: Any = None,
                 runtimes: list[dict[str, Any]] | None = None,
                 cache_claims: dict[str, Any] | None = None, pending: bool = False,
                 **cfg: Any) -> None:
        self.path, self.mk, self.sd = sealed
        self.sim_dir = sim_dir
        self.sock = short_socket()
        self.server = RogueKeyServer({MODEL: bytes(self.mk.key)}, {}, lease_seconds)
        try:  # a constructor that fails must not leave the server or the socket dir
            self.config = _config(self.server, self.sock, sim_dir, **cfg)
            self.cache_att = SimAttester(sim_dir / sim.KEY_FILE,
                                         sim.measure("dkeycache", self.config.raw),
                                         role="dkeycache")
            self.rt_att = runtime_attester(sim_dir)
            self.server.policy = make_policy(self.cache_att.measurement, self.rt_att.measurement,
                                             platform_fp, lease_seconds=lease_seconds,
                                             max_releases=max_releases)
            if runtimes is not None:
                self.server.policy["runtimes"] = runtimes
            if cache_claims is not None:
                self.server.cache_claims = cache_claims
            if pending:
                self.server.cache_state = "pending"
            self.cache = start_cache(self.config, self.cache_att, local_auth=local_auth)
        except BaseException:
            self.server.close()
            remove_socket_dir(self.sock)
            raise

    def client(self, attester: Any = "default") -> KeyCacheClient:
        return KeyCacheClient(self.sock, server_public_key=self.server.public_key_b64,
                              attester=self.rt_att if attester == "default" else attester)

    def close(self) -> None:
        self.cache.stop()
        self.server.close()
        remove_socket_dir(self.sock)


@pytest.fixture
def env(sim_dir, platform_fp, sealed):
    e = Env(sim_dir, platform_fp, sealed)
    yield e
    e.close()


def wait_for(pred, timeout: float = 15.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return
        time.sleep(0.02)
    raise AssertionError("condition not reached")


def test_load_through_cache(env: Env) -> None:
    with env.client() as kc:
        out = sealtorch.load(env.path, key_provider=kc)
        assert set(out) == {"w", "b"}
        assert all(out[k].equal(env.sd[k]) for k in out)
        # the session is kept: a second fetch reuses it
        h = read_header(env.path)
        k2 = kc.file_key(h)
        assert len(k2) == 32
        pol = kc.policy(MODEL)
        assert pol.factories == ("sealtorch.models.resnet:resnet50",)
    snap = env.cache.leases.snapshot()
    assert snap["state"] == "ok" and snap["leases"][0]["releases"] == 2


def test_socket_is_private(env: Env) -> None:
    mode = stat.S_IMODE(os.stat(env.sock).st_mode)
    assert mode == 0o600


def test_runtime_with_other_measurement_denied(env: Env) -> None:
    other = runtime_attester(env.sim_dir, config=b"other build")
    with env.client(other) as kc, pytest.raises(ReleaseDenied) as ei:
        kc.file_key(read_header(env.path))
    assert ei.value.denial == "policy_denied"
    assert env.cache.leases.snapshot()["leases"][0]["releases"] == 0


def test_runtime_without_evidence_refused(env: Env) -> None:
    with env.client(None) as kc, pytest.raises(AttesterUnavailableError):
        kc.file_key(read_header(env.path))


def test_unregistered_sim_platform_refused(env: Env, tmp_path: Path) -> None:
    sim.init_platform_key(tmp_path)
    att = SimAttester(tmp_path / sim.KEY_FILE, env.rt_att.measurement, role="runtime")
    with env.client(att) as kc, pytest.raises(ReleaseDenied) as ei:
        kc.connect()
    assert ei.value.denial == "evidence_invalid"


def test_evidence_bound_to_other_nonce_refused(env: Env) -> None:
    """Replaying evidence made for an earlier nonce fails the binding check."""
    from sealtorch.attestation import binding
    from sealtorch.protocol import hpke
    from sealtorch.protocol.b64 import b64d, b64e
    from sealtorch.protocol.local import cache_audience

    s = socket.socket(socket.AF_UNIX)
    s.connect(env.sock)
    h1 = call(s, {"op": "hello"}, timeout=5)
    _sk, pk = hpke.generate_keypair()
    ck = b64d(h1["cache_key"], field="ck", max_len=32)
    rd = binding.report_data("local", b64d(h1["nonce"], field="n", max_len=32), hpke.KEM_ID, pk,
                             cache_audience(ck))
    ev = env.rt_att.attest(rd).to_dict()
    call(s, {"op": "hello"}, timeout=5)  # a new nonce replaces the first
    ans = call(s, {"op": "session", "public_key": b64e(pk), "evidence": ev}, timeout=5)
    assert ans["ok"] is False and ans["error"]["code"] == "binding_mismatch"
    # and the nonce is burned: the same session message again has no nonce at all
    ans = call(s, {"op": "session", "public_key": b64e(pk), "evidence": ev}, timeout=5)
    assert ans["ok"] is False and ans["error"]["code"] == "protocol_error"
    s.close()


def test_file_key_needs_session_and_valid_header(env: Env) -> None:
    s = socket.socket(socket.AF_UNIX)
    s.connect(env.sock)
    from sealtorch.protocol.b64 import b64e

    raw = read_header(env.path).raw
    ans = call(s, {"op": "file_key", "model_id": MODEL, "header": b64e(raw)}, timeout=5)
    assert ans["error"]["code"] == "no_session"
    ans = call(s, {"op": "nope"}, timeout=5)
    assert ans["error"]["code"] == "protocol_error"
    s.close()
    with env.client() as kc:
        kc.connect()
        bad = bytearray(raw)
        bad[-1] ^= 1
        from sealtorch.format.header import parse_header

        with pytest.raises(ProtocolError):  # header MAC fails at the cache
            kc.file_key(parse_header(bytes(bad)))


def test_file_key_needs_a_challenge_the_cache_can_open(env: Env) -> None:
    """Finding 5: the cache answers only a challenge sealed to its own key, for this file and
    session (proof of possession of the key its grant was issued to)."""
    from sealtorch.protocol.b64 import b64e
    from sealtorch.protocol.local import challenge_info

    header = read_header(env.path)
    with env.client() as kc:
        kc.connect()
        assert kc._sock is not None and kc._nonce is not None and kc._cache_key is not None
        base = {"op": "file_key", "model_id": MODEL, "header": b64e(header.raw)}
        _, other_pk = hpke.generate_keypair()
        right = challenge_info(header.digest(), kc._nonce)
        bad = {
            "missing": None,
            "short": b64e(b"x" * 79),
            "other_key": b64e(hpke.seal(os.urandom(32), other_pk, right)),
            "other_session": b64e(hpke.seal(os.urandom(32), kc._cache_key,
                                            challenge_info(header.digest(), os.urandom(32)))),
        }
        for name, ch in bad.items():
            req = dict(base) if ch is None else {**base, "challenge": ch}
            ans = call(kc._sock, req, timeout=5)
            assert ans["ok"] is False and ans["error"]["code"] == "protocol_error", name
            assert "sealed_key" not in ans
        ans = call(kc._sock, {**base, "challenge": b64e(hpke.seal(os.urandom(32),
                                                                   kc._cache_key, right))},
                   timeout=5)
        assert ans["ok"] is True and "sealed_key" in ans
        assert kc.file_key(header).wipe() is None  # the client path still works


def test_oversized_and_malformed_frames(env: Env) -> None:
    s = socket.socket(socket.AF_UNIX)
    s.connect(env.sock)
    s.sendall((MAX_FRAME + 1).to_bytes(4, "big"))
    ans = recv_frame(s, deadline=time.monotonic() + 5)
    assert ans is not None and ans["error"]["code"] == "protocol_error"
    assert recv_frame(s, deadline=time.monotonic() + 5) is None  # connection closed
    s.close()
    s = socket.socket(socket.AF_UNIX)
    s.connect(env.sock)
    s.sendall((5).to_bytes(4, "big") + b"[1,2]")
    ans = recv_frame(s, deadline=time.monotonic() + 5)
    assert ans is not None and "JSON object" in ans["error"]["message"]
    s.close()


def test_bad_grant_signature_refused(sim_dir, platform_fp, sealed) -> None:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    e = Env(sim_dir, platform_fp, sealed)
    try:
        e.server.grant_key = Ed25519PrivateKey.generate()
        e.server.policy_version = 2
        with pytest.raises(GrantError, match="signature does not verify"):
            e.cache.leases.refresh()
        # the lease from the honest start is kept; nothing from the forged grant was taken
        assert e.cache.leases.snapshot()["leases"][0]["policy_version"] == 1
    finally:
        e.close()


def test_lower_policy_version_refused(sim_dir, platform_fp, sealed) -> None:
    e = Env(sim_dir, platform_fp, sealed)
    try:
        e.server.policy_version = 3
        e.cache.leases.refresh()
        with e.client() as kc:
            kc.file_key(read_header(e.path))
        e.server.policy_version = 2
        with pytest.raises(GrantError, match="lower than version 3"):
            e.cache.leases.refresh()
        assert e.cache.leases.snapshot()["leases"][0]["policy_version"] == 3
    finally:
        e.close()


def test_client_refuses_grant_for_other_cache(env: Env) -> None:
    """A grant relayed by a cache must name the cache key the runtime attested to."""
    with env.client() as kc:
        kc.connect()
        kc._cache_key = hpke.generate_keypair()[1]  # as if it had attested to another cache
        # every request's challenge is sealed to that other key, so the genuine cache cannot
        # open it and refuses before any grant or key is sealed (proof of possession)
        with pytest.raises(ProtocolError, match="challenge does not open"):
            kc.grant(MODEL)
        with pytest.raises(ProtocolError, match="challenge does not open"):
            kc.file_key(read_header(env.path))


def test_forged_revocation_refused_then_real_one_applies(sim_dir, platform_fp, sealed) -> None:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    e = Env(sim_dir, platform_fp, sealed, poll_interval=0.2)
    try:
        e.server.revoked.add(MODEL)
        e.server.status_key = Ed25519PrivateKey.generate()  # forged status document
        n = e.server.statuses
        wait_for(lambda: e.server.statuses >= n + 2)
        assert e.cache.leases.snapshot()["invalid_documents"] >= 1
        with e.client() as kc:
            assert len(kc.file_key(read_header(e.path))) == 32  # still served
            e.server.status_key = e.server.signing_key  # now the genuine revocation
            wait_for(lambda: MODEL in e.cache.leases.snapshot()["denied"])
            with pytest.raises(RevokedError):
                kc.file_key(read_header(e.path))
        assert e.cache.leases.snapshot()["leases"] == []
    finally:
        e.close()


def test_outage_serves_until_expiry_then_denies_and_recovers(sim_dir, platform_fp, sealed
                                                            ) -> None:
    e = Env(sim_dir, platform_fp, sealed, lease_seconds=2, poll_interval=0.2)
    try:
        e.server.up = False
        with e.client() as kc:
            h = read_header(e.path)
            wait_for(lambda: e.cache.leases.snapshot()["state"] == "degraded")
            assert len(kc.file_key(h)) == 32  # unexpired lease still served
            wait_for(lambda: e.cache.leases.snapshot()["leases"] == [])
            with pytest.raises(LeaseExpiredError):
                kc.file_key(h)
            assert e.cache.leases.snapshot()["state"] == "down"
            e.server.up = True  # the key server is back: service resumes, same cache
            wait_for(lambda: e.cache.leases.snapshot()["leases"] != [])
            assert e.cache.leases.snapshot()["state"] == "ok"
            assert len(kc.file_key(h)) == 32
    finally:
        e.close()


def test_release_cap_per_lease(sim_dir, platform_fp, sealed) -> None:
    e = Env(sim_dir, platform_fp, sealed, max_releases=2)
    try:
        with e.client() as kc:
            h = read_header(e.path)
            kc.file_key(h)
            kc.file_key(h)
            with pytest.raises(ReleaseDenied) as ei:
                kc.file_key(h)
            assert ei.value.denial == "release_cap"
            e.cache.leases.refresh()  # a renewed lease resets the count
            kc.file_key(h)
    finally:
        e.close()


def test_metrics_and_status(env: Env) -> None:
    with env.client() as kc:
        assert kc.status()["leases"] == []  # a session sees only the models it was allowed
        kc.file_key(read_header(env.path))
        st = kc.status()
    assert st["state"] == "ok" and st["leases"][0]["model_id"] == MODEL
    text = env.cache.server.metrics.render().decode()
    assert 'dkeycache_local_requests_total{op="file_key"} 1.0' in text
    assert "dkeycache_leases 1.0" in text and MODEL not in text  # aggregates, no model ids
    assert set(st["leases"][0]) == {"model_id", "key_version", "policy_version",
                                    "remaining_seconds", "releases", "max_releases", "state"}


def test_status_needs_a_session_and_health_tells_no_model(env: Env) -> None:
    from sealtorch.keycache.address import connect, parse_endpoint

    with env.client() as kc:
        kc.file_key(read_header(env.path))
        health = kc.health()
    assert health["state"] == "ok" and health["leases"] == 1
    assert MODEL not in json.dumps(health)
    s = connect(parse_endpoint(env.sock), 5)
    try:  # a process that did not attest asks for the detailed status: refused
        ans = call(s, {"op": "status"}, timeout=5)
    finally:
        s.close()
    assert ans["ok"] is False and ans["error"]["code"] == "no_session"


def test_health_listener(sim_dir, platform_fp, sealed) -> None:
    import httpx

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    e = Env(sim_dir, platform_fp, sealed, health_port=port)
    try:
        with e.client(runtime_attester(sim_dir, b"x")) as kc, pytest.raises(ReleaseDenied):
            kc.file_key(read_header(e.path))
        r = httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=5)
        assert r.status_code == 200 and r.json()["state"] == "ok"
        # state and counts only: no model, lease, peer or reason on a host-reachable listener
        assert r.json()["decisions"] == {"allow": 1, "deny": 1}  # the session, the file key
        assert r.json()["leases"] == 1
        assert MODEL not in r.text and "pid" not in r.text and "reasons" not in r.text
        recent = e.cache.server.decisions.recent()  # the reasons stay in the cache's log
        assert recent[-1]["code"] == "policy_denied" and recent[-1]["reasons"]
        m = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
        assert 'dkeycache_denials_total{code="policy_denied"} 1.0' in m
        assert 'dkeycache_health{state="ok"} 1.0' in m and MODEL not in m
    finally:
        e.close()


def test_trickled_frame_is_cut_off(env: Env) -> None:
    env.cache.server._frame_timeout = 0.3
    s = socket.socket(socket.AF_UNIX)
    s.connect(env.sock)
    s.sendall((100).to_bytes(4, "big") + b"{")
    assert recv_frame(s, deadline=time.monotonic() + 5) is None  # closed by the cache
    s.close()


def test_changed_policy_applies_at_poll(sim_dir, platform_fp, sealed) -> None:
    """A new policy version (here: another runtime measurement) is picked up by re-attesting."""
    e = Env(sim_dir, platform_fp, sealed, poll_interval=0.2)
    try:
        with e.client() as kc:
            h = read_header(e.path)
            kc.file_key(h)
            other = runtime_attester(sim_dir, b"v2 build")
            e.server.policy = make_policy(e.cache_att.measurement, other.measurement,
                                          platform_fp, version=2)
            e.server.policy_version = 2
            wait_for(lambda: e.cache.leases.snapshot()["leases"][0]["policy_version"] == 2)
            with pytest.raises(ReleaseDenied) as ei:
                kc.file_key(h)
            assert ei.value.denial == "policy_denied"
        with e.client(other) as kc2:
            assert len(kc2.file_key(h)) == 32
            assert kc2.grant(MODEL).policy_version == 2
    finally:
        e.close()


def test_second_cache_on_same_socket_refused(env: Env) -> None:
    from sealtorch.errors import ConfigError
    from sealtorch.keycache.server import LocalServer

    other = LocalServer(env.sock, env.cache.leases, env.cache.server.auth, server_key_id="x")
    with pytest.raises(ConfigError, match="already listening"):
        other.bind()
    with env.client() as kc:  # the running cache is untouched
        assert len(kc.file_key(read_header(env.path))) == 32


def _tdx_vm_claims(vectors: Path) -> dict[str, Any]:
    """What the key server verifies about a real TDX VM (the shared vector, at its time)."""
    from sealtorch.attestation.evidence import Evidence
    from sealtorch.attestation.verifiers import VerifierSet

    d = vectors / "intel-dcap"
    return VerifierSet(collateral=d / "tdx_quote_collateral.json").verify(
        Evidence("tdx", (d / "tdx_quote").read_bytes()), now=1752919234).to_dict()


@pytest.mark.parametrize("allowed_ok", [True, False])
def test_peercred_mode(sim_dir, platform_fp, sealed, vectors, allowed_ok: bool) -> None:
    """TDX/SNP mode: no per-process evidence, the kernel's peer uid must be allowed, and the
    runtimes allow-list is evaluated on the VM's own (server-verified) claims."""
    from sealtorch.keycache.localauth import PeerCredAuth

    vm = _tdx_vm_claims(vectors)
    uid = os.getuid() if allowed_ok else os.getuid() + 1
    e = Env(sim_dir, platform_fp, sealed, runtimes=[{"tee": "tdx", "mrtd": vm["mrtd"]}],
            local_auth=lambda leases: PeerCredAuth("tdx", {uid}, lambda: leases.own_claims),
            cache_claims=vm)
    try:
        with e.client(None) as kc:
            if allowed_ok:
                assert len(kc.file_key(read_header(e.path))) == 32
                assert kc.auth_mode == "peercred"
            else:
                with pytest.raises(ReleaseDenied) as ei:
                    kc.file_key(read_header(e.path))
                assert ei.value.denial == "uid_not_allowed"
    finally:
        e.close()


def test_peercred_runtime_identity_is_checked_against_the_vm(sim_dir, platform_fp, sealed,
                                                             vectors) -> None:
    """A peer-credential runtime whose VM matches no runtime identity is denied, and a cache
    whose own VM matches none of the models it holds refuses to start."""
    from sealtorch.errors import ConfigError
    from sealtorch.keycache.localauth import PeerCredAuth
    from sealtorch.keycache.service import check_own_runtime_identity

    vm = _tdx_vm_claims(vectors)
    uid = os.getuid()
    e = Env(sim_dir, platform_fp, sealed, runtimes=[{"tee": "tdx", "mrtd": vm["mrtd"]}],
            local_auth=lambda leases: PeerCredAuth("tdx", {uid}, lambda: leases.own_claims),
            cache_claims=vm)
    try:
        # the owner now allows only another image as runtime
        e.server.policy = {**e.server.policy, "runtimes": [{"tee": "tdx", "mrtd": "ab" * 48}]}
        e.server.policy_version = 2
        e.cache.leases.refresh()
        with e.client(None) as kc, pytest.raises(ReleaseDenied) as ei:
            kc.file_key(read_header(e.path))
        assert ei.value.denial == "policy_denied"
        reasons = e.cache.server.decisions.recent()[-1]["reasons"]
        assert any("mrtd is " + vm["mrtd"] in r for r in reasons)
        with pytest.raises(ConfigError, match="match no runtime identity"):
            check_own_runtime_identity(e.cache.server.auth, e.cache.leases)
    finally:
        e.close()


def test_peercred_refused_outside_tdx_snp() -> None:
    from sealtorch.errors import ConfigError
    from sealtorch.keycache.localauth import PeerCredAuth

    with pytest.raises(ConfigError, match="TDX/SNP"):
        PeerCredAuth("sim", {0})


def test_a_pending_cache_says_how_to_approve_it_then_serves(sim_dir, platform_fp, sealed
                                                            ) -> None:
    env = Env(sim_dir, platform_fp, sealed, pending=True)
    try:
        header = read_header(env.path)
        cache_id = env.cache.leases.snapshot()["cache_id"]
        assert cache_id
        with env.client() as kc, pytest.raises(ReleaseDenied) as ei:
            kc.file_key(header)
        assert ei.value.denial == "cache_pending"
        assert f"`dkeyserver cache approve {cache_id}`" in str(ei.value)
        env.server.cache_state = "approved"  # the owner ran the command
        assert env.cache.leases.poll() is True  # the next poll sees it and renews at once
        env.cache.leases.refresh()
        with env.client() as kc:
            kc.file_key(header).wipe()
    finally:
        env.close()
