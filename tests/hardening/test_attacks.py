"""Protocol attacks against a real running dkeyserver (and a real runtime client facing a fake
dkeycache). Each attack must be refused with a specific public code, be audited (or counted in
aggregate when it is malformed anonymous traffic), and leave the server serving honest callers.

Covered elsewhere and not repeated here (see docs/security.md): replayed/unknown/expired nonce,
evidence bound to another public key or audience (tests/keyserver/test_release.py), grant
signature/rollback on the cache (tests/keycache/test_cache_inprocess.py), frame limits on the
local socket (same file), policy rollback in GrantVerifier (tests/protocol/test_protocol.py).
"""

from __future__ import annotations

import base64
import copy
import os
import shutil
import socket
import ssl
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from sealtorch._secret import Secret
from sealtorch.attestation import sim
from sealtorch.attestation.attesters.sim import SimAttester
from sealtorch.errors import GrantError, ProtocolError, ReleaseDenied
from sealtorch.format.header import parse_header, read_header
from sealtorch.format.keyfile import ModelKey
from sealtorch.format.keys import derive_file_key
from sealtorch.format.writer import seal
from sealtorch.keycache.client import KeyCacheClient
from sealtorch.protocol import hpke
from sealtorch.protocol.b64 import b64d, b64e
from sealtorch.protocol.grant import Grant, sign_grant
from sealtorch.protocol.local import (
    LOCAL_PROTOCOL,
    challenge_info,
    file_key_info,
    grant_info,
    recv_frame,
    seal_grant,
    send_frame,
)
from sealtorch.protocol.release_client import KeyServerClient, tls_client_context
from sealtorch.protocol.signing import key_id

from .conftest import MODEL, World, record
from .proxy import MitmProxy

SQLI = ["x' OR '1'='1", "a'; DROP TABLE audit_log; --", "1; DELETE FROM models", "\" OR \"\"=\"",
        "a%27%20OR%201=1", "m1/**/UNION/**/SELECT/**/key/**/FROM/**/key_versions"]
TRAVERSAL = ["../../etc/passwd", "..%2f..%2fetc%2fpasswd", "/etc/passwd", "a/../../../etc/passwd",
             "..\\..\\windows", "a\x00b", "%2e%2e/%2e%2e/x", "a/./b", "a//b", "m1\n"]


def _post(w: World, path: str, *, json_body: Any = None, content: bytes | None = None,
          url: str | None = None) -> httpx.Response:
    with httpx.Client(verify=tls_client_context(w.ks.ca_cert_path), timeout=30) as h:
        if content is not None:
            return h.post((url or w.ks.url) + path, content=content,
                          headers={"content-type": "application/json"})
        return h.post((url or w.ks.url) + path, json=json_body)


def _code(r: httpx.Response) -> str:
    return str(r.json()["error"]["code"])


# --- 1. man in the middle between cache and server -----------------------------------------
def _edit_grant(field: str, value: Any) -> Any:
    def rewrite(obj: dict[str, Any]) -> dict[str, Any]:
        out = copy.deepcopy(obj)
        for g in out["grants"]:
            g["grant"]["body"][field] = value(g["grant"]["body"][field])
        return out
    return rewrite


MITM_EDITS = {
    "swap_policy": _edit_grant("policy", lambda p: {**p, "runtimes": [
        {"tee": "sim", "name": "attacker", "measurement": "ab" * 32}]}),
    "stretch_lease": _edit_grant("lease_seconds", lambda v: v * 1000),
    "swap_key_version": _edit_grant("key_version", lambda v: v + 1),
    "downgrade_policy_version": _edit_grant("policy_version", lambda v: max(0, v - 1)),
    "swap_model_id": _edit_grant("model_id", lambda v: "other-model"),
    "bump_revocation_epoch": _edit_grant("revocation_epoch", lambda v: v + 7),
}


@pytest.mark.parametrize("attack", sorted(MITM_EDITS))
def test_mitm_grant_edits_are_refused(world: World, attack: str) -> None:
    proxy = MitmProxy(world.ks.url, world.ks.ca_cert_path)
    try:
        proxy.rewrite = MITM_EDITS[attack]
        client = KeyServerClient(proxy.url, proxy.ca_cert, world.ks.signing_public_key)
        ev, sk, pk, n = world.cache.request(client)
        with pytest.raises(GrantError) as ei:
            client.release(ev, pk, n, [MODEL], private_key=sk)
        assert proxy.rewritten == 1
        assert "signature" in str(ei.value).lower()
        record("attack", name=f"mitm:{attack}", refused=True, code=ei.value.code)
    finally:
        proxy.close()
    world.release_ok()


def test_mitm_sealed_key_swap_and_stale_grant_are_refused(world: World) -> None:
    """Swapping the sealed key for one sealed to the right key but another grant, or replaying
    an older (genuine) grant, fails: HPKE info binds the grant digest, grants bind the nonce."""
    old = world.release_ok()
    old_doc = old.grants[0].document
    proxy = MitmProxy(world.ks.url, world.ks.ca_cert_path)
    try:
        client = KeyServerClient(proxy.url, proxy.ca_cert, world.ks.signing_public_key)

        def reseal(obj: dict[str, Any]) -> dict[str, Any]:
            out = copy.deepcopy(obj)
            pk = b64d(out["grants"][0]["grant"]["body"]["requester_key"], field="pk", max_len=32)
            out["grants"][0]["sealed_key"] = b64e(hpke.seal(os.urandom(32), pk, b"wrong info"))
            return out

        proxy.rewrite = reseal
        ev, sk, pk, n = world.cache.request(client)
        with pytest.raises(Exception) as ei:
            client.release(ev, pk, n, [MODEL], private_key=sk)
        assert ei.value.__class__.__module__ == "sealtorch.errors"
        record("attack", name="mitm:sealed_key_other_info", refused=True, code=ei.value.code)

        proxy.rewrite = lambda obj: {**obj, "grants": [{"grant": old_doc,
                                                        "sealed_key": obj["grants"][0]
                                                        ["sealed_key"]}]}
        ev, sk, pk, n = world.cache.request(client)
        with pytest.raises(GrantError) as gi:
            client.release(ev, pk, n, [MODEL], private_key=sk)
        assert "nonce" in str(gi.value)
        record("attack", name="mitm:replay_old_grant", refused=True, code=gi.value.code)
    finally:
        proxy.close()


def test_mitm_swapping_the_requester_key_in_flight(world: World) -> None:
    """Genuine evidence bound to the cache's key, sent with an attacker's key: evidence_invalid,
    counted (an anonymous failure: never one audit row each), and the nonce is burned so the
    genuine request cannot be completed later either."""
    with world.ks.client() as client:
        ev, sk, pk, n = world.cache.request(client)
        _, attacker_pk = hpke.generate_keypair()
        seq, counts = world.head(), world.anon_counts()
        with pytest.raises(ReleaseDenied) as ei:
            client.release(ev, attacker_pk, n, [MODEL])
        assert ei.value.denial == "evidence_invalid"
        assert world.audit_since(seq) == []
        assert world.anon_counts()["evidence_invalid"] == counts.get("evidence_invalid", 0) + 1
        with pytest.raises(ReleaseDenied) as ei2:
            client.release(ev, pk, n, [MODEL], private_key=sk)
        assert ei2.value.denial == "nonce_invalid"
    record("attack", name="evidence_bound_to_attacker_key", refused=True,
           code="evidence_invalid")
    world.release_ok()


# --- 2. a fake dkeycache serving an attacker's key to a runtime ------------------------------
class FakeCache:
    """Speaks the local protocol; ``file_key`` answers with whatever the test configured. With
    ``private_key`` it holds its own cache key (a host-run cache the runtime attests to), and
    can open the runtime's challenges; without, it advertises a key it does not hold."""

    def __init__(self, server_key_id: str, cache_key: bytes, answer: Any,
                 private_key: Any = None) -> None:
        self.server_key_id, self.cache_key, self.answer = server_key_id, cache_key, answer
        self.private_key = private_key
        self._dir = tempfile.mkdtemp(prefix="fk-")
        self.path = os.path.join(self._dir, "c.sock")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(self.path)
        self.sock.listen(4)
        threading.Thread(target=self._loop, daemon=True).start()

    def _loop(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        nonce = os.urandom(32)
        runtime_pk = b""
        with conn:
            while True:
                try:
                    req = recv_frame(conn, deadline=time.monotonic() + 10)
                except Exception:
                    return
                if req is None:
                    return
                if req["op"] == "hello":
                    send_frame(conn, {"ok": True, "protocol": LOCAL_PROTOCOL,
                                      "nonce": b64e(nonce), "cache_key": b64e(self.cache_key),
                                      "kem_id": 32, "auth": "evidence",
                                      "server_key_id": self.server_key_id})
                elif req["op"] == "session":
                    runtime_pk = b64d(req["public_key"], field="pk", max_len=32)
                    send_frame(conn, {"ok": True, "auth": "evidence"})
                else:
                    challenge = None
                    if self.private_key is not None:
                        h = parse_header(b64d(req["header"], field="h", max_len=1 << 20))
                        opened = hpke.open(
                            b64d(req["challenge"], field="c", max_len=80), self.private_key,
                            challenge_info(h.digest(), nonce))
                        challenge = bytes(opened.view())  # before ``opened`` is wiped
                    send_frame(conn, self.answer(req, runtime_pk, nonce, challenge))

    def close(self) -> None:
        self.sock.close()
        shutil.rmtree(self._dir, ignore_errors=True)


@pytest.fixture(scope="module")
def sealed_file(world: World, tmp_path_factory: pytest.TempPathFactory) -> Path:
    p = tmp_path_factory.mktemp("sealed") / "m.sealed"
    mk = ModelKey(MODEL, 1, Secret(world.model_key), "2026-01-01T00:00:00Z")
    seal({"w": torch.arange(64, dtype=torch.float32)}, p, mk, chunk_size=4096)
    return p


def _runtime(world: World, path: str) -> KeyCacheClient:
    att = SimAttester(world.cache.platform_key, sim.measure("runtime"), role="runtime")
    return KeyCacheClient(path, server_public_key=world.ks.signing_public_key, attester=att,
                          timeout=10)


def test_fake_cache_cannot_hand_a_runtime_an_attacker_key(
        world: World, sealed_file: Path, tmp_path: Path) -> None:
    header = read_header(sealed_file)
    genuine = world.release_ok().grants[0]  # a real grant, as a host could capture it
    cache_pk = genuine.grant.requester_key
    attacker_key = os.urandom(32)
    attacker_sk = Ed25519PrivateKey.generate()
    server_kid = key_id(world.ks.signing_public_key)
    # finding 5: the host also swaps in a whole file sealed under the attacker's own key
    swapped = tmp_path / "swapped.sealed"
    seal({"w": torch.zeros(64, dtype=torch.float32)}, swapped,
         ModelKey(MODEL, 1, Secret(attacker_key), "2026-01-01T00:00:00Z"), chunk_size=4096)
    swapped_header = read_header(swapped)
    seen_challenges: list[str] = []

    def answer_with(grant_doc: dict[str, Any]) -> Any:
        def answer(req: Any, rpk: bytes, nonce: bytes, challenge: bytes | None
                   ) -> dict[str, Any]:
            # without the cache key the fake cannot open the runtime's challenge: it keeps
            # the ciphertext and guesses the secret it must bind the answer to
            seen_challenges.append(req.get("challenge", ""))
            secret = challenge if challenge is not None else os.urandom(32)
            h = swapped_header if req["header"] == b64e(swapped_header.raw) else header
            fk = derive_file_key(Secret(attacker_key), h)
            sealed = hpke.seal(fk, rpk, file_key_info(genuine.grant.digest(), h.digest(), nonce,
                                                      secret))
            grant = seal_grant(grant_doc, rpk, grant_info(h.digest(), nonce, secret))
            return {"ok": True, "sealed_grant": b64e(grant), "sealed_key": b64e(sealed)}
        return answer

    genuine_grant = answer_with(genuine.document)
    self_signed = answer_with(sign_grant(attacker_sk, Grant(
        **{**genuine.grant.__dict__, "server_key_id": server_kid})))
    own_sk, own_pk = hpke.generate_keypair()  # a cache run by the host, with its own key
    not_for_this_request = "does not open for this request"
    cases = [("attacker_key_genuine_grant", header, cache_pk, None, server_kid,
              genuine_grant, ProtocolError, not_for_this_request),
             ("attacker_key_genuine_grant_swapped_file", swapped_header, cache_pk, None,
              server_kid, genuine_grant, ProtocolError, not_for_this_request),
             ("self_signed_grant", header, own_pk, own_sk, server_kid, self_signed, GrantError,
              "signature"),
             ("grant_for_other_cache", header, own_pk, own_sk, server_kid, genuine_grant,
              GrantError, "another key cache"),
             ("other_server_key", header, cache_pk, None, "00" * 32, genuine_grant,
              GrantError, "another key server")]
    for name, hdr, ck, sk, kid, answer, exc, match in cases:
        fake = FakeCache(kid, ck, answer, sk)
        try:
            with _runtime(world, fake.path) as rt, pytest.raises(exc, match=match) as ei:
                rt.file_key(hdr)
            record("attack", name=f"fake_cache:{name}", refused=True, code=ei.value.code)
        finally:
            fake.close()
    # the runtime did send a challenge, sealed to the genuine cache key (80 bytes), each fresh
    assert seen_challenges and all(len(b64d(c, field="c", max_len=80)) == 80
                                   for c in seen_challenges)
    assert len(set(seen_challenges)) == len(seen_challenges)


# --- 3. policy downgrade, other tenants --------------------------------------------------------
def test_policy_version_downgrade_refused_and_audited(world: World) -> None:
    from tests.servers import sim_policy

    from .conftest import MEAS

    world.ks.set_policy(MODEL, sim_policy(MEAS, world.cache.platform_key, version=5))
    seq = world.head()
    r = world.ks.set_policy(MODEL, sim_policy(MEAS, world.cache.platform_key, version=4),
                             expect=None)
    assert r.status_code in (400, 409) and _code(r) in ("policy_invalid", "store_error",
                                                         "tampered", "conflict")
    assert "4" not in r.text or "version" in r.text
    assert world.audit_since(seq) == []  # nothing changed, nothing to audit as a change
    assert world.release_ok().grants[0].grant.policy_version == 5
    record("attack", name="policy_version_downgrade", refused=True, code=_code(r))


def test_other_tenant_cannot_touch_models_or_use_tokens(world: World) -> None:
    tok2 = world.ks.add_tenant("tenant2")
    ks = world.ks
    probes = [("GET", f"/v1/admin/policy/{MODEL}", None),
              ("PUT", f"/v1/admin/policy/{MODEL}", {"policy": {"version": 99}}),
              ("POST", f"/v1/admin/model-revoke/{MODEL}", None),
              ("POST", f"/v1/admin/model-rotate/{MODEL}", {}),
              ("POST", f"/v1/admin/model-export/{MODEL}", {"key_version": 1,
                                                             "public_key": "AA=="}),
              ("POST", f"/v1/admin/policy-test/{MODEL}", {"evidence": {}})]
    for method, path, body in probes:
        r = ks.admin(method, path, body, token_file=tok2, expect=None)
        assert r.status_code in (400, 404), (path, r.status_code)
        assert "tenant" not in r.text.lower() or "not found" in r.text.lower()
        record("attack", name=f"other_tenant:{method} {path.split('/')[3]}", refused=True,
               code=_code(r))
    # tenant2 sees none of tenant1's models or audit rows
    assert ks.admin("GET", "/v1/admin/models", token_file=tok2)["models"] == []
    rows = ks.admin("GET", "/v1/admin/audit?limit=1000", token_file=tok2)["entries"]
    assert all(e.get("tenant") in (None, "tenant2") for e in rows)
    # forged, truncated, revoked and SQL-injection tokens
    fake = world.ks.data_dir.parent / "fake.token"
    for tok in ["stk_" + "A" * 43, "x", "x' OR '1'='1", "stk_" + "A" * 4000,
                Path(tok2).read_text().strip()[:-1]]:
        fake.write_text(tok)
        r = ks.admin("GET", "/v1/admin/whoami", token_file=fake, expect=None)
        assert r.status_code == 401 and _code(r) == "unauthorized"
        assert len(tok) < 8 or tok[4:24] not in r.text
    new = ks.admin("POST", "/v1/admin/tokens", {"ttl_seconds": 600}, token_file=tok2)
    ks.admin("DELETE", f"/v1/admin/tokens/{new['token_id']}", token_file=tok2)
    fake.write_text(new["token"])
    r = ks.admin("GET", "/v1/admin/whoami", token_file=fake, expect=None)
    assert r.status_code == 401
    record("attack", name="forged_or_revoked_admin_tokens", refused=True, code="unauthorized")
    world.release_ok()


# --- 4. malformed and oversized input -----------------------------------------------------------
def _ev(world: World) -> tuple[dict[str, Any], bytes, bytes]:
    with world.ks.client() as client:
        ev, _, pk, n = world.cache.request(client)
    return ev.to_dict(), pk, n


MALFORMED: dict[str, Any] = {
    "huge_body": b"{" + b" " * (80 * 1024) + b"}",
    "deep_nesting": b"[" * 50000 + b"]" * 50000,
    "bad_utf8": b'{"nonce": "\xff\xfe"}',
    "not_object": b"[1, 2, 3]",
    "nan": b'{"evidence": NaN}',
    "dup_keys_and_garbage": b'{"nonce": 1, "nonce": 2} trailing',
}


@pytest.mark.parametrize("name", sorted(MALFORMED))
def test_malformed_bodies_are_refused_and_counted(world: World, name: str) -> None:
    before = world.anon_counts()
    for path in ("/v1/challenge", "/v1/release", "/v1/status"):
        r = _post(world, path, content=MALFORMED[name])
        assert r.status_code in (400, 413), (path, r.status_code)
        assert _code(r) in ("bad_request", "too_large")
    after = world.anon_counts()
    assert sum(after.values()) >= sum(before.values()) + 3
    record("attack", name=f"malformed:{name}", refused=True, code=_code(r))
    world.release_ok()


def test_malformed_fields_evidence_and_hpke(world: World) -> None:
    ev, pk, n = _ev(world)
    good = {"evidence": ev, "public_key": b64e(pk), "nonce": b64e(n), "models": [MODEL]}
    marker = "QUJDREVGR0hJSktMTU5PUFFSU1RVVldYWVo"
    cases: dict[str, dict[str, Any]] = {
        "nonce_non_canonical_b64": {**good, "nonce": b64e(n)[:-1] + "=="},
        "nonce_urlsafe_b64": {**good, "nonce": base64.urlsafe_b64encode(b"\xfb\xff" * 16).decode()},
        "nonce_too_long": {**good, "nonce": b64e(n + b"x")},
        "public_key_short": {**good, "public_key": b64e(pk[:31])},
        "public_key_marker": {**good, "public_key": marker},
        "kem_id_other": {**good, "kem_id": 16},
        "kem_id_bool": {**good, "kem_id": True},
        "models_not_list": {**good, "models": MODEL},
        "models_33": {**good, "models": [f"m{i}" for i in range(33)]},
        "extra_field": {**good, "admin": True},
        "evidence_not_object": {**good, "evidence": "x"},
    }
    for name, body in cases.items():
        r = _post(world, "/v1/release", json_body=body)
        assert r.status_code == 400, name
        assert _code(r) == "bad_request" and marker not in r.text
        record("attack", name=f"malformed_field:{name}", refused=True, code=_code(r))
    # evidence that parses as JSON but not as evidence, or does not verify: audited denials
    bad_evidence = {
        "unknown_tee": {**ev, "tee": "quantum"},
        "quote_b64_garbage": {**ev, "quote": "!!!" + marker},
        "quote_flipped": {**ev, "quote": b64e(bytes([b ^ 1 for b in b64d(
            ev["quote"], field="q", max_len=1 << 20)]))},
        "quote_huge": {**ev, "quote": b64e(os.urandom(48 * 1024))},
        "certs_garbage": {**ev, "certs": b64e(b"-----BEGIN CERTIFICATE-----\nAAAA")},
    }
    for name, evx in bad_evidence.items():
        _, pk2, n2 = _ev(world)
        seq, counts = world.head(), world.anon_counts()
        r = _post(world, "/v1/release", json_body={**good, "evidence": evx,
                                                    "public_key": b64e(pk2), "nonce": b64e(n2)})
        assert r.status_code in (400, 403, 413), name
        assert _code(r) in ("bad_request", "evidence_invalid", "too_large"), name
        assert marker not in r.text
        assert world.audit_since(seq) == []  # counted, not audited
        code = "evidence_invalid" if r.status_code == 403 else _code(r)
        assert world.anon_counts()[code] == counts.get(code, 0) + 1, name
        record("attack", name=f"evidence:{name}", refused=True, code=_code(r))
    # a low-order / all-zero X25519 public key bound in genuine evidence: refused, never a 500
    with world.ks.client() as client:
        for name, weak in (("zero_point", bytes(32)), ("one_point", b"\x01" + bytes(31))):
            ev3, _, _, n3 = world.cache.request(client, bind_key=weak)
            r = _post(world, "/v1/release", json_body={
                "evidence": ev3.to_dict(), "public_key": b64e(weak), "nonce": b64e(n3),
                "models": [MODEL]})
            assert r.status_code in (400, 403), (name, r.status_code, r.text[:200])
            record("attack", name=f"hpke:{name}", refused=True, code=_code(r))
    world.release_ok()
    assert world.chain_ok()


# --- 5. traversal and injection strings in every text field -----------------------------------
def test_traversal_and_sql_injection_strings(world: World) -> None:
    ks = world.ks
    before_models = ks.admin("GET", "/v1/admin/models")["models"]
    for s in SQLI + TRAVERSAL:
        # as a model id in the release API
        ev, pk, n = _ev(world)
        r = _post(world, "/v1/release", json_body={"evidence": ev, "public_key": b64e(pk),
                                                    "nonce": b64e(n), "models": [s]})
        assert r.status_code in (200, 400), (s, r.status_code)
        if r.status_code == 200:  # a syntactically valid id that does not exist
            assert r.json()["grants"] == [] and r.json()["denials"][0]["code"] == "not_approved"
        # as a model id in the admin API (body and path), raw and percent-encoded
        r = ks.admin("POST", "/v1/admin/models", {"model_id": s, "key_version": 1,
                                                  "key": b64e(os.urandom(32))}, expect=None)
        assert r.status_code == 400 and _code(r) in ("protocol_error", "bad_request"), s
        from urllib.parse import quote

        for enc in (quote(s, safe="/.%"), quote(s, safe="")):
            r = ks.admin("GET", "/v1/admin/policy/" + enc, expect=None)
            assert r.status_code in (400, 404), (s, r.status_code)
        # as a cache id and in the audit query
        r = ks.admin("POST", f"/v1/admin/caches/{quote(s, safe='')}/approve", expect=None)
        assert r.status_code in (400, 404), (s, r.status_code)
        r = ks.admin("GET", f"/v1/admin/audit?after={quote(s)}&limit={quote(s)}", expect=None)
        assert r.status_code == 400, (s, r.status_code)
        # as a policy identity name: stored as data, never interpreted
        # as a status-request cache id
        r = _post(world, "/v1/status", json_body={"nonce": b64e(os.urandom(32)),
                                                   "cache_id": s, "models": None})
        assert r.status_code == 400
    # tenant names on the local CLI
    from tests.servers import keyserver_cli

    for s in SQLI[:2] + TRAVERSAL[:2]:
        p = keyserver_cli("tenant-add", "--data-dir", str(ks.data_dir), "--tenant", s,
                          "--token-out", str(ks.data_dir.parent / "t.tok"), env=ks.env,
                          check=False)
        assert p.returncode != 0 and "Traceback" not in p.stderr
    # policy identity names hold the strings as data
    from tests.servers import sim_policy

    from .conftest import MEAS

    pol = sim_policy(MEAS, world.cache.platform_key, version=50)
    pol["caches"][0]["name"] = SQLI[1]
    ks.set_policy(MODEL, pol)
    assert ks.admin("GET", f"/v1/admin/policy/{MODEL}")["policy"]["caches"][0]["name"] == SQLI[1]
    after_models = ks.admin("GET", "/v1/admin/models")["models"]
    assert [m["model_id"] for m in after_models] == [m["model_id"] for m in before_models]
    assert world.chain_ok()
    world.release_ok()
    record("attack", name="sql_injection_strings", refused=True, code="bad_request",
           tried=len(SQLI) * 7)
    record("attack", name="path_traversal_strings", refused=True, code="bad_request",
           tried=len(TRAVERSAL) * 7)


# --- 6. slow clients ----------------------------------------------------------------------------
def _slow_sockets(world: World, n: int, first: bytes = b"POST /v1/release HTTP/1.1\r\nHost: x"
                  b"\r\nContent-Length: 60000\r\n\r\n{"
                  ) -> tuple[list[ssl.SSLSocket], list[socket.socket]]:
    host, port = "127.0.0.1", int(world.ks.url.rsplit(":", 1)[1])
    ctx = ssl.create_default_context(cafile=str(world.ks.ca_cert_path))
    slow = []
    for _ in range(n):
        s = ctx.wrap_socket(socket.create_connection((host, port)), server_hostname=host)
        s.sendall(first)
        slow.append(s)
    raw = [socket.create_connection((host, port)) for _ in range(n)]  # never handshake
    return slow, raw


def test_slow_clients_do_not_block_honest_callers(world: World) -> None:
    slow, raw = _slow_sockets(world, 20)
    try:
        for _ in range(3):
            world.release_ok()
    finally:
        for s in [*slow, *raw]:
            s.close()
    record("attack", name="slow_clients_others_served", refused=True, code="served", tried=40)


def _cut_off(s: ssl.SSLSocket, within: float) -> bool:
    s.settimeout(within)
    try:
        while s.recv(4096):
            pass
        return True
    except (ConnectionError, ssl.SSLError):
        return True
    except TimeoutError:
        return False
    finally:
        s.close()


def test_slow_body_is_cut_off_by_a_deadline(world: World) -> None:
    """Headers sent, body dribbled: the server's body deadline closes the connection."""
    slow, raw = _slow_sockets(world, 1)
    closed = _cut_off(slow[0], 60)  # bounded liveness; the server's deadline is 10 s
    raw[0].close()
    record("attack", name="slow_body_deadline", refused=closed, code="timeout")
    assert closed


def test_slow_headers_are_cut_off_by_a_deadline(world: World) -> None:
    """Headers never finished: the server's header deadline (10 s) closes the connection."""
    slow, raw = _slow_sockets(world, 1, first=b"POST /v1/release HTTP/1.1\r\nHost: x\r\n")
    closed = _cut_off(slow[0], 20)
    raw[0].close()
    record("attack", name="slow_headers_deadline", refused=closed, code="timeout")
    assert closed
