"""Protocol primitives: HPKE sealing, signed grants and status documents, strict messages."""

from __future__ import annotations

import base64
import os

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from sealtorch.errors import GrantError, ProtocolError
from sealtorch.protocol import hpke
from sealtorch.protocol.b64 import b64d, b64e
from sealtorch.protocol.grant import (
    AuditHead,
    Grant,
    GrantVerifier,
    ModelStatus,
    Status,
    sign_audit_head,
    sign_grant,
    sign_status,
)
from sealtorch.protocol.messages import ReleaseRequest, StatusRequest, parse_json_body
from sealtorch.protocol.signing import key_id, raw_public_key


def _grant(server: Ed25519PrivateKey, nonce: bytes, rk: bytes, pv: int = 1) -> Grant:
    return Grant(
        tenant="t", model_id="m1", key_version=1, nonce=nonce, requester_key=rk,
        kem_id=hpke.KEM_ID, evidence_digest="00" * 32, cache_id="ab" * 16,
        policy={"version": pv}, policy_version=pv, lease_seconds=60, revocation_epoch=0,
        issued_at=1, server_key_id=key_id(server),
    )


def test_hpke_roundtrip_and_binding() -> None:
    sk, pk = hpke.generate_keypair()
    ct = hpke.seal(b"\x01" * 32, pk, b"info-a")
    assert hpke.open(ct, sk, b"info-a").equals(b"\x01" * 32)
    with pytest.raises(ProtocolError):
        hpke.open(ct, sk, b"info-b")
    other, _ = hpke.generate_keypair()
    with pytest.raises(ProtocolError):
        hpke.open(ct, other, b"info-a")
    bad = bytearray(ct)
    bad[-1] ^= 1
    with pytest.raises(ProtocolError):
        hpke.open(bytes(bad), sk, b"info-a")
    with pytest.raises(ProtocolError):
        hpke.seal(b"k", b"\x00" * 32, b"i")
    with pytest.raises(ProtocolError):
        hpke.seal(b"k", pk[:31], b"i")


def test_grant_verify_and_open() -> None:
    server = Ed25519PrivateKey.generate()
    sk, pk = hpke.generate_keypair()
    nonce = os.urandom(32)
    g = _grant(server, nonce, pk)
    doc = sign_grant(server, g)
    sealed = hpke.seal(b"\x07" * 32, pk, g.digest())
    v = GrantVerifier(raw_public_key(server))
    got = v.verify(doc, nonce=nonce, requester_key=pk)
    assert got == g
    assert v.open_key(got, sealed, sk).equals(b"\x07" * 32)
    with pytest.raises(GrantError):
        v.verify(doc, nonce=os.urandom(32), requester_key=pk)
    with pytest.raises(GrantError):
        v.verify(doc, nonce=nonce, requester_key=hpke.generate_keypair()[1])
    with pytest.raises(GrantError):  # not the pinned key
        GrantVerifier(raw_public_key(Ed25519PrivateKey.generate())).verify(
            doc, nonce=nonce, requester_key=pk)
    tampered = {"body": dict(doc["body"], lease_seconds=999), "signature": doc["signature"]}
    with pytest.raises(GrantError):
        v.verify(tampered, nonce=nonce, requester_key=pk)


def test_policy_version_rollback_refused() -> None:
    server = Ed25519PrivateKey.generate()
    _, pk = hpke.generate_keypair()
    v = GrantVerifier(b64e(raw_public_key(server)))
    n2, n1 = os.urandom(32), os.urandom(32)
    v.verify(sign_grant(server, _grant(server, n2, pk, pv=2)), nonce=n2, requester_key=pk)
    with pytest.raises(GrantError, match="rollback"):
        v.verify(sign_grant(server, _grant(server, n1, pk, pv=1)), nonce=n1, requester_key=pk)


def test_status_and_audit_head_domain_separation() -> None:
    server = Ed25519PrivateKey.generate()
    v = GrantVerifier(raw_public_key(server))
    nonce = os.urandom(32)
    st = Status(nonce=nonce, cache_id="ab" * 16, revocation_epoch=3, cache_state="approved",
                models={"m1": ModelStatus("active", (1, 2), 4)}, issued_at=5,
                server_key_id=key_id(server))
    doc = sign_status(server, st)
    assert v.verify_status(doc, nonce=nonce, cache_id="ab" * 16) == st
    with pytest.raises(GrantError):
        v.verify_status(doc, nonce=os.urandom(32))
    # a revoked entry (policy version 0) after a higher version was seen is not a rollback
    n2 = os.urandom(32)
    st2 = Status(nonce=n2, cache_id="ab" * 16, revocation_epoch=4, cache_state="approved",
                 models={"m1": ModelStatus("revoked", (), 0)}, issued_at=6,
                 server_key_id=key_id(server))
    assert v.verify_status(sign_status(server, st2), nonce=n2).models["m1"].state == "revoked"
    head = sign_audit_head(server, AuditHead(7, "11" * 32, 1, key_id(server)))
    assert v.verify_audit_head(head).seq == 7
    with pytest.raises(GrantError):  # an audit head is not a status document
        v.verify_status(head, nonce=nonce)


def test_strict_base64_and_messages() -> None:
    assert b64d(b64e(b"abc"), field="f", max_len=3) == b"abc"
    for bad in ["YWJj\n", "YW Jj", "YWJ", "YWI=x", "YWJj!", 5]:
        with pytest.raises(ProtocolError):
            b64d(bad, field="f", max_len=16)
    with pytest.raises(ProtocolError):  # non-canonical padding bits
        b64d("YWK=", field="f", max_len=16)
    with pytest.raises(ProtocolError):
        b64d(b64e(b"x" * 40), field="f", max_len=32)
    nonce, pk = os.urandom(32), hpke.generate_keypair()[1]
    req = ReleaseRequest(evidence={"tee": "sim"}, public_key=pk, nonce=nonce, models=["a", "b"])
    assert ReleaseRequest.from_json(req.to_json()) == req
    for patch in [{"models": ["a"] * 2}, {"models": [f"m{i}" for i in range(33)]},
                  {"models": ["../x"]}, {"extra": 1}, {"kem_id": 0x10},
                  {"nonce": base64.b64encode(b"x" * 31).decode()}]:
        with pytest.raises(ProtocolError):
            ReleaseRequest.from_json({**req.to_json(), **patch})
    with pytest.raises(ProtocolError):
        StatusRequest.from_json({"nonce": b64e(nonce), "cache_id": "XY"})
    with pytest.raises(ProtocolError):
        parse_json_body(b"[1]")
    with pytest.raises(ProtocolError):
        parse_json_body(b"{" * 70000)


def test_error_messages_do_not_echo_input() -> None:
    secret = "c2VjcmV0LXZhbHVlLXRoYXQtbXVzdC1ub3QtYXBwZWFy!"
    with pytest.raises(ProtocolError) as ei:
        b64d(secret, field="f", max_len=64)
    assert secret not in str(ei.value)


def test_sign_grant_digest_matches_separate_sign_and_digest() -> None:
    import os as _os

    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from sealtorch.protocol.grant import Grant, sign_grant, sign_grant_digest
    from sealtorch.protocol.signing import key_id

    sk = Ed25519PrivateKey.generate()
    g = Grant("t", "m", 1, _os.urandom(32), _os.urandom(32), 32, "00" * 32, "ab" * 16,
              {"version": 1, "caches": []}, 1, 300, 0, 0, key_id(sk))
    doc, digest = sign_grant_digest(sk, g)
    assert doc == sign_grant(sk, g)  # Ed25519 signatures are deterministic
    assert digest == g.digest()


def test_seal_accepts_a_checked_key_object() -> None:
    from sealtorch.protocol import hpke
    from sealtorch.protocol.messages import ReleaseRequest

    sk, pk = hpke.generate_keypair()
    req = ReleaseRequest.from_json({"evidence": {"tee": "sim"}, "public_key": b64e(pk),
                                    "nonce": b64e(b"n" * 32), "models": ["a"]})
    assert req.checked_key is not None and req.public_key == pk
    sealed = hpke.seal(b"k" * 32, req.recipient(), b"info")
    assert bytes(hpke.open(sealed, sk, b"info")) == b"k" * 32
