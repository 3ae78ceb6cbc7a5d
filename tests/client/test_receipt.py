"""Receipts: COSE_Sign1 over an EAT-style claims set, verified strictly."""

from __future__ import annotations

import hashlib
from dataclasses import replace

import cbor2
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cwt import COSE, COSEKey

from sealtorch.e2e.receipt import (
    PROFILE,
    ReceiptClaims,
    ReceiptSigner,
    check_receipt,
    receipt_key_id,
    verify_receipt,
)
from sealtorch.errors import ReceiptError

from .conftest import IDENTITY

CLAIMS = ReceiptClaims(
    issued_at=1_700_000_000, receipt_id=b"\x01" * 16, nonce=b"\x02" * 16, identity=IDENTITY,
    target="POST /v2/models/tiny/infer", hpke_key_digest=b"\x03" * 32,
    request_digest=hashlib.sha256(b"req").digest(),
    response_digest=hashlib.sha256(b"res").digest(), status=200)


@pytest.fixture(scope="module")
def signer() -> ReceiptSigner:
    return ReceiptSigner(Ed25519PrivateKey.generate())


def test_roundtrip_and_standard_structure(signer: ReceiptSigner) -> None:
    raw = signer.sign(CLAIMS)
    assert verify_receipt(raw, signer.public_key) == CLAIMS
    top = cbor2.loads(raw)
    assert top.tag == 18  # COSE_Sign1
    assert cbor2.loads(top.value[0]) == {1: -8, 4: receipt_key_id(signer.public_key)}
    payload = cbor2.loads(top.value[2])
    assert payload[6] == CLAIMS.issued_at and payload[10] == CLAIMS.nonce
    assert payload[265] == PROFILE and payload["sealtorch.model"] == IDENTITY.to_dict()
    # any COSE implementation verifies it with the public key alone
    key = COSEKey.new({1: 1, -1: 6, -2: signer.public_key, 3: -8,
                       2: receipt_key_id(signer.public_key)})
    assert COSE.new().decode(raw, key) == top.value[2]


def test_forged_and_altered_receipts_are_refused(signer: ReceiptSigner) -> None:
    raw = signer.sign(CLAIMS)
    forger = ReceiptSigner(Ed25519PrivateKey.generate())
    with pytest.raises(ReceiptError, match="not signed with EdDSA by the attested"):
        verify_receipt(forger.sign(CLAIMS), signer.public_key)  # another key (kid differs)
    # a forger who copies the attested kid still cannot sign
    top = cbor2.loads(raw)
    forged = forger.sign(replace(CLAIMS, status=500))
    ftop = cbor2.loads(forged)
    spoof = cbor2.dumps(cbor2.CBORTag(18, [top.value[0], {}, ftop.value[2], ftop.value[3]]))
    with pytest.raises(ReceiptError, match="signature does not verify"):
        verify_receipt(spoof, signer.public_key)
    # the payload changed under a valid signature
    payload = cbor2.loads(top.value[2])
    payload["sealtorch.status"] = 201
    bad = cbor2.dumps(cbor2.CBORTag(18, [top.value[0], {}, cbor2.dumps(payload),
                                         top.value[3]]))
    with pytest.raises(ReceiptError, match="signature does not verify"):
        verify_receipt(bad, signer.public_key)
    # algorithm confusion, untagged, unprotected extras, junk
    alg = cbor2.dumps(cbor2.CBORTag(18, [cbor2.dumps({1: -7, 4: receipt_key_id(
        signer.public_key)}), {}, top.value[2], top.value[3]]))
    with pytest.raises(ReceiptError, match="another algorithm"):
        verify_receipt(alg, signer.public_key)
    with pytest.raises(ReceiptError, match="tagged COSE_Sign1"):
        verify_receipt(cbor2.dumps(top.value), signer.public_key)
    with pytest.raises(ReceiptError, match="wrong types"):
        verify_receipt(cbor2.dumps(cbor2.CBORTag(18, [top.value[0], {33: b"x"}, top.value[2],
                                                      top.value[3]])), signer.public_key)
    with pytest.raises(ReceiptError, match="not CBOR"):
        verify_receipt(b"\x1c", signer.public_key)
    with pytest.raises(ReceiptError, match="exactly one CBOR item"):
        verify_receipt(b"\xff\xff", signer.public_key)
    with pytest.raises(ReceiptError, match="exactly one CBOR item"):
        verify_receipt(raw + b"\x00", signer.public_key)  # trailing bytes
    with pytest.raises(ReceiptError, match="bytes of CBOR"):
        verify_receipt(b"", signer.public_key)


def test_claims_set_is_strict(signer: ReceiptSigner) -> None:
    m = CLAIMS.to_cbor_map()
    for mutate in (lambda d: d.pop(7), lambda d: d.update({"extra": 1}),
                   lambda d: d.update({10: b"short"}), lambda d: d.update({6: -1}),
                   lambda d: d.update({265: "urn:other"}),
                   lambda d: d.update({"sealtorch.model": {"name": "x"}})):
        d = dict(m)
        mutate(d)
        with pytest.raises(ReceiptError):
            ReceiptClaims.from_cbor_map(d)


def test_check_names_every_mismatch() -> None:
    kw = dict(nonce=CLAIMS.nonce, identity=IDENTITY, target=CLAIMS.target,
              hpke_key_digest=CLAIMS.hpke_key_digest, request_digest=CLAIMS.request_digest,
              response_digest=CLAIMS.response_digest)
    check_receipt(CLAIMS, **kw)
    check_receipt(CLAIMS, **{**kw, "nonce": None, "target": None, "request_digest": None,
                             "response_digest": None})
    for key, value, text in (
            ("nonce", b"\x09" * 16, "another request"),
            ("identity", replace(IDENTITY, key_version=2), "another served model"),
            ("target", "POST /v2/models/x/infer", "another method and path"),
            ("hpke_key_digest", b"\x00" * 32, "another HPKE key"),
            ("request_digest", b"\x00" * 32, "request digest"),
            ("response_digest", b"\x00" * 32, "response digest")):
        with pytest.raises(ReceiptError, match=text):
            check_receipt(CLAIMS, **{**kw, key: value})
