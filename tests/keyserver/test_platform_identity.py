"""A key cache is tied to its platform: SGX/TDX caches by the PPID of the PCK certificate in
their quote, SNP caches by the chip id. Checked against the real vectors in
tests/vectors/attestation, with the PPID read independently from the certificate."""

from __future__ import annotations

import hashlib
from pathlib import Path

import dcap_qvl
import pytest
from cryptography import x509

from sealtorch.attestation.evidence import Evidence
from sealtorch.attestation.verifiers import VerifierSet
from sealtorch.keyserver import attest

# (quote file, verification time inside the collateral window, PPID held by its PCK cert)
DCAP = [
    ("sgx", "sgx_quote", 1752919277, "d04ec06d4e6d92dc90d0ad3cf5ee2ddf"),
    ("tdx", "tdx_quote", 1752919234, "811dca2a26b952e85bb6448b097ba4fd"),
]
SGX_EXTENSIONS_OID = x509.ObjectIdentifier("1.2.840.113741.1.13.1")
# DER of the PPID entry inside the SGX extensions: OID 1.2.840.113741.1.13.1.1, OCTET STRING(16)
PPID_PREFIX = bytes.fromhex("060a2a864886f84d010d0101" "0410")


def _ppid_from_pck(quote: bytes) -> bytes:
    """The PPID in the leaf (PCK) certificate of the quote's certification data, read with
    ``cryptography`` (not with the verifier under test)."""
    pem = dcap_qvl.parse_quote(quote).cert_chain_pem_bytes()
    leaf = x509.load_pem_x509_certificates(pem)[0]
    ext = leaf.extensions.get_extension_for_oid(SGX_EXTENSIONS_OID).value
    der = ext.value  # type: ignore[attr-defined]  # an UnrecognizedExtension
    i = der.index(PPID_PREFIX) + len(PPID_PREFIX)
    return bytes(der[i:i + 16])


@pytest.mark.parametrize(("tee", "name", "at", "ppid_hex"), DCAP)
def test_dcap_claims_carry_the_pck_ppid(vectors: Path, tee: str, name: str, at: int,
                                        ppid_hex: str) -> None:
    d = vectors / "intel-dcap"
    quote = (d / name).read_bytes()
    assert _ppid_from_pck(quote) == bytes.fromhex(ppid_hex)
    claims = VerifierSet(collateral=d / f"{name}_collateral.json").verify(
        Evidence(tee, quote, None), now=at)
    assert claims.ppid == bytes.fromhex(ppid_hex)

    # the key server names the cache by the PPID, not by the signer identity or its key
    ident = attest.cache_identity(claims, b"k" * 32)
    assert ident.tee == tee
    assert ident.platform_id == ppid_hex and not ident.by_key
    assert attest.cache_identity(claims, b"j" * 32).cache_id == ident.cache_id


def test_cache_ids_differ_per_platform_and_tee(vectors: Path) -> None:
    d = vectors / "intel-dcap"
    ids = set()
    for tee, name, at, _ in DCAP:
        claims = VerifierSet(collateral=d / f"{name}_collateral.json").verify(
            Evidence(tee, (d / name).read_bytes(), None), now=at)
        ident = attest.cache_identity(claims, b"k" * 32)
        assert ident.cache_id == hashlib.sha256(
            b"sealtorch-cache/v1\x00" + ident.tee.encode() + b"\x00"
            + ident.platform_id.encode()).hexdigest()[:32]
        ids.add(ident.cache_id)
    assert len(ids) == 2


def test_snp_cache_identity_is_the_chip_id(vectors: Path) -> None:
    d = vectors / "amd-snp" / "trustee-vcek"
    claims = VerifierSet().verify(
        Evidence("snp", (d / "test-report.bin").read_bytes(),
                 (d / "test-vcek.der").read_bytes()))
    assert claims.chip_id is not None and len(claims.chip_id) == 64
    report = (d / "test-report.bin").read_bytes()
    assert claims.chip_id == report[0x1A0:0x1E0]  # CHIP_ID field of the SNP report
    assert attest.cache_identity(claims, b"k" * 32).platform_id == claims.chip_id.hex()


@pytest.mark.parametrize("tee", ["sgx", "tdx", "snp"])
def test_evidence_without_a_platform_id_is_named_by_its_enrolled_key(vectors: Path,
                                                                     tee: str) -> None:
    """An SNP report whose CHIP_ID is all zero (VLEK signing, MASK_CHIP_ID), or evidence
    without a PPID, never shares one cache id with other hosts (as a signer-based id would):
    the cache is named by the key it enrolled with."""
    import dataclasses

    d = vectors / "amd-snp" / "trustee-vcek"
    claims = VerifierSet().verify(
        Evidence("snp", (d / "test-report.bin").read_bytes(),
                 (d / "test-vcek.der").read_bytes()))
    blank = (dataclasses.replace(claims, chip_id=bytes(64)) if tee == "snp" else
             dataclasses.replace(claims, tee=tee, chip_id=None, ppid=None,
                                 mrenclave=b"m" * 32, mrsigner=b"s" * 32))
    a = attest.cache_identity(blank, b"a" * 32)
    b = attest.cache_identity(blank, b"b" * 32)
    assert a.by_key and b.by_key and a.cache_id != b.cache_id
    assert a.platform_id.startswith("key:") and "signer" not in a.platform_id
    assert attest.cache_identity(blank, b"a" * 32) == a  # stable for one key
