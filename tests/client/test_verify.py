"""What a client accepts: documents, bindings and its own policy (in process, sim TEE)."""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import replace
from pathlib import Path

import pytest

from sealtorch.attestation.binding import ServedIdentity
from sealtorch.client import ClientPolicy, evaluate, verify_attestation
from sealtorch.e2e.document import AttestationDocument, decode_nonce, encode_nonce
from sealtorch.e2e.ohttp import KeyConfig
from sealtorch.errors import (
    BindingError,
    EvidenceFormatError,
    PolicyDenied,
    PolicyError,
    ProtocolError,
    VerificationError,
)
from sealtorch.runtime.attested import Gateway

from .conftest import IDENTITY, SimPlatform, make_policy, policy_dict


@pytest.fixture(scope="module")
def gateway(platform: SimPlatform) -> Gateway:
    return Gateway(platform.attester(), [IDENTITY])


def _verify(doc: AttestationDocument, platform: SimPlatform, nonce: bytes | None = None,
            unsafe_sim: bool = True, **policy: object):
    pol = make_policy(platform, **policy)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        verifiers = pol.verifier_set(unsafe_sim=unsafe_sim)
    return verify_attestation(doc, nonce=doc.nonce if nonce is None else nonce, policy=pol,
                              verifiers=verifiers)


def test_a_fresh_document_verifies_and_pins_the_keys(gateway: Gateway,
                                                     platform: SimPlatform) -> None:
    nonce = os.urandom(32)
    doc = gateway.attest(nonce)
    v = _verify(doc, platform, nonce)
    assert v.identity == IDENTITY and v.claims.tee == "sim"
    assert v.key_config == gateway.key_config and v.receipt_key == gateway.receipt_key
    assert v.decision.allowed and v.decision.matched is not None
    # the JSON form round-trips exactly
    assert AttestationDocument.from_json(doc.to_json()) == doc


def test_a_replayed_document_for_an_old_nonce_is_refused(gateway: Gateway,
                                                         platform: SimPlatform) -> None:
    old = gateway.attest(os.urandom(32))
    with pytest.raises(BindingError, match="another nonce"):
        _verify(old, platform, os.urandom(32))
    # rewriting its nonce field to the client's breaks the evidence binding instead
    fresh = os.urandom(32)
    with pytest.raises(BindingError, match="does not bind"):
        _verify(replace(old, nonce=fresh), platform, fresh)


def test_substituted_keys_identity_or_evidence_break_the_binding(
        gateway: Gateway, platform: SimPlatform) -> None:
    doc = gateway.attest(os.urandom(32))
    other = Gateway(platform.attester(), [IDENTITY])
    swaps = [
        replace(doc, key_config=other.key_config),  # a proxy's HPKE key
        replace(doc, receipt_key=other.receipt_key),  # a proxy's receipt key
        replace(doc, tls_public_key=b"\x30\x00"),
        replace(doc, identity=replace(IDENTITY, key_version=9)),
        replace(doc, evidence=gateway.attest(os.urandom(32)).evidence),  # swapped evidence
        replace(doc, evidence=other.attest(doc.nonce).evidence),  # another server's evidence
    ]
    for bad in swaps:
        with pytest.raises(BindingError, match="does not bind"):
            _verify(bad, platform)


def test_sim_needs_the_explicit_flag(gateway: Gateway, platform: SimPlatform) -> None:
    doc = gateway.attest(os.urandom(32))
    with pytest.raises(VerificationError, match="sim evidence, which protects nothing"):
        _verify(doc, platform, unsafe_sim=False)


def test_the_client_policy_explains_each_refusal(platform: SimPlatform) -> None:
    cases = [
        (IDENTITY, {"measurement": b"\x43" * 32}, "runtimes[0] (sim identity 'sim-serve'): "
                                                    "measurement is 4242"),
        (replace(IDENTITY, model_id="other-model"), {"identity": IDENTITY},
         "model 'other-model' is not one this policy expects (tiny-model)"),
        (replace(IDENTITY, key_version=3), {"key_versions": [1, 2]},
         "key version 3 is not one of [1, 2]"),
        (IDENTITY, {"min_policy_version": 5}, "policy version 2 is lower than 5"),
        (IDENTITY, {"factories": ["x.y:z"]}, "factory torch.nn:PReLU is not one of"),
        (IDENTITY, {"header_digests": ["00" * 32]}, "sealed header digest"),
        (replace(IDENTITY, server_key_id=b"\x09" * 32), {"identity": IDENTITY},
         "the key was released by key server 0909"),
    ]
    for served, pol, text in cases:
        doc = Gateway(platform.attester(), [served]).attest(os.urandom(32))
        with pytest.raises(PolicyDenied) as e:
            _verify(doc, platform, **pol)
        assert any(text in r for r in e.value.reasons), e.value.reasons


def test_tenants_are_checked(platform: SimPlatform) -> None:
    from sealtorch.attestation.claims import Claims

    d = policy_dict(platform)
    d["owners"][0]["tenants"] = ["other"]
    pol = ClientPolicy.from_dict(d)
    claims = Claims(tee="sim", report_data=bytes(64), verified_at=0, debug=False,
                    measurement=platform.measurement, platform_key=platform.fingerprint)
    dec = evaluate(pol, claims, IDENTITY)
    assert not dec and dec.reasons == ("owners[0]: tenant 'acme' is not one of ['other']",)
    assert evaluate(make_policy(platform), claims, IDENTITY).allowed


def test_policy_file_and_strict_parsing(tmp_path: Path, platform: SimPlatform) -> None:
    from sealtorch.protocol.b64 import b64e

    key = b"\x01" * 32  # any 32 bytes are an Ed25519 public key encoding here
    text = f'''format = "sealtorch-client-policy/v1"
[[runtimes]]
tee = "sim"
measurement = "{"42" * 32}"
platform_key = "{platform.fingerprint}"
[[models]]
model_id = "tiny-model"
key_versions = [1]
[[owners]]
server_key = "{b64e(key)}"
[verifier]
sim_platform_keys = ["{platform.public.name}"]
collateral = "collateral"
'''
    (tmp_path / "platform_key.pub").write_bytes(platform.public.read_bytes())
    (tmp_path / "p.toml").write_text(text)
    pol = ClientPolicy.load(tmp_path / "p.toml")
    assert pol.verifier.collateral == tmp_path / "collateral"
    assert pol.verifier.sim_platform_keys == (str(tmp_path / "platform_key.pub"),)
    from sealtorch.protocol.signing import key_id
    assert pol.owners[0].server_key_id.hex() == key_id(key)
    (tmp_path / "p.json").write_text(json.dumps(policy_dict(platform)))
    assert ClientPolicy.load(tmp_path / "p.json").models[0].model_id == "tiny-model"
    base = policy_dict(platform)
    bad_cases = [
        ({**base, "format": "x"}, "format"), ({**base, "extra": 1}, "unknown"),
        ({**base, "runtimes": []}, "at least one runtime"), ({**base, "owners": []}, "owner"),
        ({**base, "models": [{"model_id": "../x"}]}, "valid model id"),
        ({**base, "models": [{"model_id": "m", "key_versions": [0]}]}, "integers >= 1"),
        ({**base, "owners": [{"server_key": "nope"}]}, "Ed25519"),
        ({**base, "owners": [{"server_key_id": "ab"}]}, "64 hex"),
        ({**base, "verifier": {"pccs_url": "http://x"}}, "https"),
        ({**base, "verifier": {"max_receipt_skew_seconds": 0}}, "1-86400"),
    ]
    for obj, text in bad_cases:
        with pytest.raises(PolicyError, match=text):
            ClientPolicy.from_dict(obj)
    (tmp_path / "bad.toml").write_text("format = ")
    with pytest.raises(PolicyError, match="not valid TOML"):
        ClientPolicy.load(tmp_path / "bad.toml")
    with pytest.raises(PolicyError, match="cannot read"):
        ClientPolicy.load(tmp_path / "missing.toml")


def test_document_parsing_is_strict(gateway: Gateway) -> None:
    doc = gateway.attest(os.urandom(32))
    d = doc.to_dict()
    bad = [
        {**d, "extra": 1}, {**d, "format": "x"}, {**d, "nonce": "AAAA"},
        {**d, "receipt_key": "AAAA"}, {**d, "ohttp_key_config": "AAAA"},
        {**d, "identity": {**d["identity"], "key_version": 0}}, {**d, "evidence": {}},
    ]
    for obj in bad:
        with pytest.raises(EvidenceFormatError):
            AttestationDocument.from_dict(obj)
    with pytest.raises(EvidenceFormatError, match="larger"):
        AttestationDocument.from_json(b" " * (100 * 1024))
    with pytest.raises(EvidenceFormatError, match="not UTF-8 JSON"):
        AttestationDocument.from_json(b"{")
    assert isinstance(doc.key_config, KeyConfig)


def test_nonce_encoding() -> None:
    n = os.urandom(32)
    assert decode_nonce(encode_nonce(n)) == n and len(encode_nonce(n)) == 43
    for bad in ("", "A" * 42, "A" * 44, encode_nonce(n) + "=", "+" * 43, None,
                encode_nonce(n)[:-1] + "B" if encode_nonce(n)[-1] != "B" else "A" * 42 + "B"):
        with pytest.raises(ProtocolError):
            decode_nonce(bad)


def test_gateway_refuses_unknown_models(gateway: Gateway) -> None:
    with pytest.raises(KeyError):
        gateway.attest(os.urandom(32), "other")
    two = Gateway(gateway.attester, [IDENTITY, replace(IDENTITY, name="tiny2")])
    with pytest.raises(KeyError):
        two.attest(os.urandom(32))
    assert two.attest(os.urandom(32), "tiny2").identity.name == "tiny2"


def test_served_identity_in_the_document(gateway: Gateway) -> None:
    doc = gateway.attest(os.urandom(32))
    assert ServedIdentity.from_dict(doc.to_dict()["identity"]) == IDENTITY
