"""Strict identities on real evidence: SNP needs a product and a TCB floor for every component,
TDX identities constrain TD_ATTRIBUTES and XFAM (and deny odd attributes by default), SGX
identities constrain the KSS fields (and deny PROVISIONKEY by default)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest

from sealtorch.attestation.claims import Claims
from sealtorch.attestation.evidence import Evidence
from sealtorch.attestation.policy import Identity, ModelPolicy, identity_from_claims
from sealtorch.attestation.verifiers import VerifierSet
from sealtorch.errors import PolicyError

TRUSTEE_MEAS = ("a1f3930413247bb38cfc171579ea3c12d5fe4901f0c792f63fd75d98f1ef827c"
                "23500644e0e692e6be917f9050d3d38c")


def _snp(vectors: Path) -> Claims:
    d = vectors / "amd-snp" / "trustee-vcek"
    return VerifierSet().verify(Evidence("snp", (d / "test-report.bin").read_bytes(),
                                         (d / "test-vcek.der").read_bytes()))


def _dcap(vectors: Path, tee: str, name: str, at: int) -> Claims:
    d = vectors / "intel-dcap"
    return VerifierSet(collateral=d / f"{name}_collateral.json").verify(
        Evidence(tee, (d / name).read_bytes(), None), now=at)


def _policy(ident: dict[str, Any]) -> ModelPolicy:
    return ModelPolicy.from_dict({"version": 1, "caches": [ident]})


def test_snp_needs_a_product_and_a_floor_for_every_tcb_component(vectors: Path) -> None:
    claims = _snp(vectors)
    bare = {"tee": "snp", "measurement": TRUSTEE_MEAS, "max_vmpl": 3}
    with pytest.raises(PolicyError, match="needs product"):
        _policy(bare)
    with pytest.raises(PolicyError, match="add bootloader, tee, snp, microcode"):
        _policy({**bare, "product": "milan"})
    with pytest.raises(PolicyError, match=r"add microcode \(the lowest firmware"):
        _policy({**bare, "product": "milan",
                 "min_tcb": {"bootloader": 3, "tee": 0, "snp": 8}})
    with pytest.raises(PolicyError, match="milan has no TCB component fmc"):
        _policy({**bare, "product": "milan", "min_tcb": {
            "bootloader": 3, "tee": 0, "snp": 8, "microcode": 115, "fmc": 1}})
    full = {**bare, "product": "milan",
            "min_tcb": {"bootloader": 3, "tee": 0, "snp": 8, "microcode": 115}}
    assert _policy(full).evaluate_cache(claims).allowed
    newer = {**full, "min_tcb": {**full["min_tcb"], "microcode": 116}}  # type: ignore[dict-item]
    d = _policy(newer).evaluate_cache(claims)
    assert not d.allowed and "reported_tcb.microcode is 115" in d.reasons[0]
    # pinning from evidence fills in product and every component
    pinned = identity_from_claims(claims)
    assert pinned.product == "milan" and pinned.min_tcb == claims.reported_tcb


def test_tdx_attributes_and_xfam(vectors: Path) -> None:
    claims = _dcap(vectors, "tdx", "tdx_quote", 1752919234)
    assert claims.td_attributes == bytes.fromhex("0000001000000000")  # SEPT_VE_DISABLE
    base = {"tee": "tdx", "mrtd": claims.mrtd.hex()}  # type: ignore[union-attr]
    assert _policy(base).evaluate_cache(claims).allowed  # default-safe bits only
    assert _policy({**base, "td_attributes": "0000001000000000",
                    "xfam": claims.xfam.hex()}).evaluate_cache(claims).allowed  # type: ignore
    d = _policy({**base, "xfam": "e700000000000000"}).evaluate_cache(claims)
    assert not d.allowed and "xfam is e702060000000000" in d.reasons[0]
    d = _policy({**base, "td_attributes": "0000000000000000"}).evaluate_cache(claims)
    assert not d.allowed and "td_attributes" in d.reasons[0]
    # PERFMON (bit 63) is not something a production TD has: denied unless named exactly
    perfmon = dataclasses.replace(claims, td_attributes=bytes.fromhex("0000001000000080"))
    d = _policy(base).evaluate_cache(perfmon)
    assert not d.allowed and "set bits a production TD does not have" in d.reasons[0]
    assert _policy({**base, "td_attributes": "0000001000000080"}).evaluate_cache(perfmon).allowed
    pinned = identity_from_claims(claims)
    assert pinned.td_attributes == "0000001000000000" and pinned.xfam == claims.xfam.hex()  # type: ignore[union-attr]


def test_sgx_kss_fields_and_provision_key(vectors: Path) -> None:
    claims = _dcap(vectors, "sgx", "sgx_quote", 1752919277)
    assert claims.isv_ext_prod_id == bytes(16) and claims.isv_family_id == bytes(16)
    assert claims.config_id == bytes(64) and claims.config_svn == 0
    base = {"tee": "sgx", "mrenclave": claims.mrenclave.hex(),  # type: ignore[union-attr]
            "accept_tcb": {"ConfigurationAndSWHardeningNeeded": ["INTEL-SA-00289",
                                                                 "INTEL-SA-00615"]}}
    assert _policy({**base, "isv_family_id": "00" * 16, "isv_ext_prod_id": "00" * 16,
                    "config_id": "00" * 64, "min_config_svn": 0}).evaluate_cache(claims).allowed
    for field, value, msg in (("isv_family_id", "01" * 16, "isv_family_id is 00"),
                              ("isv_ext_prod_id", "02" * 16, "isv_ext_prod_id is 00"),
                              ("config_id", "03" * 64, "config_id is 00"),
                              ("min_config_svn", 1, "config_svn is 0")):
        d = _policy({**base, field: value}).evaluate_cache(claims)
        assert not d.allowed and msg in d.reasons[0], field
    # an enclave that may read the provisioning key is denied unless the identity allows it
    prov = dataclasses.replace(claims, attributes=bytes([0x15]) + claims.attributes[1:])  # type: ignore[index]
    d = _policy(base).evaluate_cache(prov)
    assert not d.allowed and "PROVISIONKEY" in d.reasons[0]
    assert _policy({**base, "allow_provision_key": True}).evaluate_cache(prov).allowed
    assert Identity.from_dict({**base, "allow_provision_key": True}).to_dict()[
        "allow_provision_key"] is True
