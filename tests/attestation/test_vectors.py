"""The real SGX/TDX/SNP vectors verify exactly as the vectors' README says, offline."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from sealtorch.attestation.evidence import Evidence
from sealtorch.attestation.verifiers import VerifierSet
from sealtorch.attestation.verifiers.dcap import CollateralSource
from sealtorch.errors import CollateralError, EvidenceFormatError, VerificationError

from .conftest import SGX_AT, SNP_AT, TDX_AT, TDX_OUTDATED_AT


def dcap(dcap_dir: Path, name: str) -> tuple[VerifierSet, Evidence]:
    vs = VerifierSet(collateral=dcap_dir / f"{name}_collateral.json")
    return vs, Evidence(name[:3], (dcap_dir / name).read_bytes())


def test_sgx_vector(dcap_dir: Path) -> None:
    vs, ev = dcap(dcap_dir, "sgx_quote")
    c = vs.verify(ev, now=SGX_AT)
    assert c.tee == "sgx" and c.verified_at == SGX_AT
    assert c.tcb_status == "ConfigurationAndSWHardeningNeeded"
    assert c.advisory_ids == ("INTEL-SA-00289", "INTEL-SA-00615")
    assert c.mrenclave == bytes.fromhex(
        "33d8736db756ed4997e04ba358d27833188f1932ff7b1d156904d3f560452fbb")
    assert c.mrsigner == bytes.fromhex(
        "815f42f11cf64430c30bab7816ba596a1da0130c3b028b673133a66cf9a3e0e6")
    assert c.isv_prod_id == 0 and c.isv_svn == 0 and c.debug is False
    assert c.report_data == b"Hello, world!".ljust(64, b"\0")
    assert c.report_data == ev.quote[368:432]
    assert c.attributes == bytes.fromhex("0500000000000000e700000000000000")
    assert c.ppid == bytes.fromhex("d04ec06d4e6d92dc90d0ad3cf5ee2ddf")
    assert type(c).from_dict(c.to_dict()) == c


def test_tdx_vector(dcap_dir: Path) -> None:
    vs, ev = dcap(dcap_dir, "tdx_quote")
    c = vs.verify(ev, now=TDX_AT)
    assert c.tee == "tdx" and c.tcb_status == "UpToDate" and c.advisory_ids == ()
    assert c.mrtd == bytes.fromhex(
        "91eb2b44d141d4ece09f0c75c2c53d247a3c68edd7fafe8a3520c942a604a407de03ae6dc5f87f27428b2538873118b7")
    assert c.rtmr3 == bytes(48) and c.debug is False
    assert c.report_data == ev.quote[568:632]
    assert c.tee_tcb_svn == bytes.fromhex("06010300000000000000000000000000")
    assert c.td_attributes == bytes.fromhex("0000001000000000")


def test_outdated_tdx_vector_is_rejected(dcap_dir: Path) -> None:
    vs, ev = dcap(dcap_dir, "tdx_quote_outdated")
    with pytest.raises(VerificationError, match="No matching TCB level found"):
        vs.verify(ev, now=TDX_OUTDATED_AT)


@pytest.mark.parametrize(
    "name,at", [("sgx_quote", SGX_AT), ("tdx_quote", TDX_AT)]
)
@pytest.mark.parametrize("shift,msg", [(-40 * 86400, "future"), (40 * 86400, "expired")])
def test_dcap_outside_collateral_window(dcap_dir: Path, name: str, at: int, shift: int,
                                        msg: str) -> None:
    vs, ev = dcap(dcap_dir, name)
    with pytest.raises(CollateralError, match=msg):
        vs.verify(ev, now=at + shift)


def test_collateral_directory_keyed_by_fmspc_and_ca(dcap_dir: Path, tmp_path: Path) -> None:
    shutil.copy(dcap_dir / "sgx_quote_collateral.json", tmp_path / "00A067110000-processor.json")
    vs = VerifierSet(collateral=tmp_path)
    assert vs.verify(Evidence("sgx", (dcap_dir / "sgx_quote").read_bytes()), now=SGX_AT)
    with pytest.raises(CollateralError, match="B0C06F000000"):
        vs.verify(Evidence("tdx", (dcap_dir / "tdx_quote").read_bytes()), now=TDX_AT)
    # files with any name are found by the FMSPC and CA they hold
    shutil.copy(dcap_dir / "tdx_quote_collateral.json", tmp_path / "tdx.json")
    shutil.copy(dcap_dir / "tdx_quote_outdated_collateral.json", tmp_path / "old.json")
    (tmp_path / "junk.json").write_text("{}")
    vs = VerifierSet(collateral=tmp_path)
    assert vs.verify(Evidence("tdx", (dcap_dir / "tdx_quote").read_bytes()), now=TDX_AT)
    with pytest.raises(VerificationError, match="No matching TCB level"):
        vs.verify(Evidence("tdx", (dcap_dir / "tdx_quote_outdated").read_bytes()),
                  now=TDX_OUTDATED_AT)


def test_collateral_errors(dcap_dir: Path, tmp_path: Path) -> None:
    ev = Evidence("sgx", (dcap_dir / "sgx_quote").read_bytes())
    with pytest.raises(CollateralError, match="needs collateral"):
        VerifierSet().verify(ev, now=SGX_AT)
    with pytest.raises(CollateralError, match="does not exist"):
        CollateralSource(tmp_path / "nope.json")
    (tmp_path / "bad.json").write_text('{"tcb_info": 1}')
    with pytest.raises(CollateralError, match="QuoteCollateralV3"):
        VerifierSet(collateral=tmp_path / "bad.json").verify(ev, now=SGX_AT)
    # TDX collateral for an SGX quote: wrong FMSPC/TCB info
    with pytest.raises((CollateralError, VerificationError)):
        VerifierSet(collateral=dcap_dir / "tdx_quote_collateral.json").verify(ev, now=SGX_AT)


def test_tee_type_mismatch(dcap_dir: Path) -> None:
    vs, ev = dcap(dcap_dir, "sgx_quote")
    with pytest.raises(EvidenceFormatError, match="not that"):
        vs.verify(Evidence("tdx", ev.quote), now=SGX_AT)
    with pytest.raises(EvidenceFormatError):
        vs.verify(Evidence("sgx", b"\x03\x00" + bytes(100)), now=SGX_AT)


SNP_MILAN_MEAS = ("b07af9620f3b839b47996422ddec6058338951d984e312115131ea82705eaf5b"
                  "6bdf8a9ece31a5a608eb0cf2e4872b01")
SNP_TRUSTEE_MEAS = ("a1f3930413247bb38cfc171579ea3c12d5fe4901f0c792f63fd75d98f1ef827c"
                    "23500644e0e692e6be917f9050d3d38c")


def test_snp_milan_vector(snp_dir: Path) -> None:
    ev = Evidence("snp", (snp_dir / "milan-vcek/report.bin").read_bytes(),
                  (snp_dir / "milan-vcek/vcek.der").read_bytes())
    c = VerifierSet().verify(ev, now=SNP_AT)
    assert c.tee == "snp" and c.snp_version == 2 and c.product == "milan"
    assert c.guest_policy == 0xB0000 and c.debug is True and c.vmpl == 0
    assert c.migration_agent is False and c.smt_allowed is True
    assert c.report_data == bytes([1, 2, 3, 4, 5]) + bytes(59)
    assert c.measurement == bytes.fromhex(SNP_MILAN_MEAS)
    assert c.reported_tcb == {"bootloader": 2, "tee": 0, "snp": 5, "microcode": 0x44}
    assert c.signing_key == "vcek" and c.chip_id == ev.quote[0x1A0:0x1E0]
    assert c.tcb_status is None
    assert type(c).from_dict(c.to_dict()) == c


def test_snp_trustee_vector(snp_dir: Path) -> None:
    ev = Evidence("snp", (snp_dir / "trustee-vcek/test-report.bin").read_bytes(),
                  (snp_dir / "trustee-vcek/test-vcek.der").read_bytes())
    c = VerifierSet().verify(ev, now=SNP_AT)
    assert c.snp_version == 2 and c.product == "milan" and c.guest_policy == 0x3001F
    assert c.debug is False and c.measurement == bytes.fromhex(SNP_TRUSTEE_MEAS)
    assert c.reported_tcb == {"bootloader": 3, "tee": 0, "snp": 8, "microcode": 0x73}
    assert c.guest_svn == 4
