"""The attestation endpoint's evidence through the Gramine and configfs-tsm attesters (on fake
file trees, as the attester tests do) and real SGX/TDX/SNP vectors through the client's checks.

Real vectors carry their own report data, so a client must refuse them as not binding its
nonce and keys; quotes a fake kernel produced over our report data carry it, but their
signatures no longer verify. Both refusals are what a client has to see.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from tests.attestation.conftest import SGX_AT, SNP_AT, TDX_AT
from tests.attestation.test_attesters import FakeTsm, gramine_tree

from sealtorch.attestation import binding
from sealtorch.attestation.attesters import GramineAttester
from sealtorch.attestation.evidence import Evidence
from sealtorch.client import ClientPolicy, evaluate, verify_attestation
from sealtorch.client.policy import FORMAT
from sealtorch.e2e.document import AttestationDocument
from sealtorch.errors import AttestationError, BindingError, VerificationError
from sealtorch.runtime.attested import Gateway

from .conftest import IDENTITY


def _policy(runtime: dict, **verifier: str) -> ClientPolicy:
    return ClientPolicy.from_dict({
        "format": FORMAT, "runtimes": [runtime],
        "models": [{"model_id": IDENTITY.model_id}],
        "owners": [{"server_key_id": IDENTITY.server_key_id.hex()}], "verifier": verifier})


def _allowed_but_for_the_binding(pol: ClientPolicy, evidence: Evidence, at: int) -> None:
    """The genuine evidence verifies and the policy allows it: only the binding refuses it."""
    claims = pol.verifier_set().verify(evidence, now=at)
    assert evaluate(pol, claims, IDENTITY).allowed


def _expected(gw: Gateway, nonce: bytes) -> bytes:
    return binding.serve_report_data(
        nonce=nonce, kem_id=0x20, hpke_public_key=gw.key_config.public_key,
        receipt_public_key=gw.receipt_key, tls_public_key=b"", identity=IDENTITY)


def test_gramine_gets_the_serve_binding_and_real_sgx_evidence_is_refused(
        tmp_path: Path, dcap_dir: Path) -> None:
    quote = (dcap_dir / "sgx_quote").read_bytes()
    root = gramine_tree(tmp_path, quote)
    gw = Gateway(GramineAttester(root), [IDENTITY])
    nonce = os.urandom(32)
    with pytest.raises(AttestationError, match="does not carry our report data"):
        gw.attest(nonce)  # a recorded quote cannot carry our fresh binding
    assert (root / "user_report_data").read_bytes() == _expected(gw, nonce)
    # the real quote verifies, but its report data binds nothing of this server
    doc = AttestationDocument(nonce=nonce, evidence=Evidence("sgx", quote),
                              key_config=gw.key_config, receipt_key=gw.receipt_key,
                              tls_public_key=b"", identity=IDENTITY)
    pol = _policy({"tee": "sgx", "mrenclave": quote[112:144].hex(),
                   "accept_tcb": {"ConfigurationAndSWHardeningNeeded": [
                       "INTEL-SA-00289", "INTEL-SA-00615"]}},  # what this recorded quote has
                  collateral=str(dcap_dir / "sgx_quote_collateral.json"))
    _allowed_but_for_the_binding(pol, doc.evidence, SGX_AT)
    with pytest.raises(BindingError, match="does not bind"):
        verify_attestation(doc, nonce=nonce, policy=pol, verifiers=pol.verifier_set(),
                           now=SGX_AT)


def test_tsm_tdx_gets_the_serve_binding_and_the_client_checks_it(
        tmp_path: Path, dcap_dir: Path) -> None:
    q = (dcap_dir / "tdx_quote").read_bytes()
    gw = Gateway(FakeTsm(tmp_path, "tdx_guest", q, rd_at=slice(568, 632)), [IDENTITY])
    nonce = os.urandom(32)
    doc = gw.attest(nonce)
    assert doc.evidence.tee == "tdx" and doc.evidence.quote[568:632] == _expected(gw, nonce)
    pol = _policy({"tee": "tdx", "mrtd": q[48 + 136:48 + 184].hex()},
                  collateral=str(dcap_dir / "tdx_quote_collateral.json"))
    # a fake kernel's quote carries our binding but not Intel's signature over it
    with pytest.raises(VerificationError, match="DCAP quote verification failed"):
        verify_attestation(doc, nonce=nonce, policy=pol, verifiers=pol.verifier_set(),
                           now=TDX_AT)
    # the genuine quote verifies but binds another report data
    real = type(doc)(nonce=nonce, evidence=Evidence("tdx", q), key_config=doc.key_config,
                     receipt_key=doc.receipt_key, tls_public_key=b"", identity=IDENTITY)
    _allowed_but_for_the_binding(pol, real.evidence, TDX_AT)
    with pytest.raises(BindingError, match="does not bind"):
        verify_attestation(real, nonce=nonce, policy=pol, verifiers=pol.verifier_set(),
                           now=TDX_AT)


def test_tsm_snp_gets_the_serve_binding_and_the_client_checks_it(
        tmp_path: Path, snp_dir: Path) -> None:
    rep = (snp_dir / "milan-vcek/report.bin").read_bytes()
    vcek = (snp_dir / "milan-vcek/vcek.der").read_bytes()
    gw = Gateway(FakeTsm(tmp_path, "sev_guest", rep, aux=vcek), [IDENTITY])
    nonce = os.urandom(32)
    doc = gw.attest(nonce)
    assert doc.evidence.tee == "snp" and doc.evidence.quote[0x50:0x90] == _expected(gw, nonce)
    assert doc.evidence.certs == vcek
    pol = _policy({"tee": "snp", "measurement": rep[0x90:0xC0].hex(), "allow_debug": True,
                   "product": "milan",  # and this recorded report's TCB as the floor
                   "min_tcb": {"bootloader": 2, "tee": 0, "snp": 5, "microcode": 0x44}})
    with pytest.raises(VerificationError):
        verify_attestation(doc, nonce=nonce, policy=pol, verifiers=pol.verifier_set(),
                           now=SNP_AT)
    real = type(doc)(nonce=nonce, evidence=Evidence("snp", rep, vcek),
                     key_config=doc.key_config, receipt_key=doc.receipt_key,
                     tls_public_key=b"", identity=IDENTITY)
    _allowed_but_for_the_binding(pol, real.evidence, SNP_AT)
    with pytest.raises(BindingError, match="does not bind"):
        verify_attestation(real, nonce=nonce, policy=pol, verifiers=pol.verifier_set(),
                           now=SNP_AT)
