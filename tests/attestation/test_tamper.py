"""Tampered evidence is rejected: byte flips over every signed region, wrong/invalid VCEKs,
an unpinned ARK, a VCEK of another product, and times outside the validity windows."""

from __future__ import annotations

import datetime as dt
import uuid
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.x509.oid import NameOID

from sealtorch.attestation.evidence import Evidence
from sealtorch.attestation.verifiers import VerifierSet, snp
from sealtorch.errors import CollateralError, EvidenceFormatError, VerificationError

from .conftest import SGX_AT, SNP_AT, TDX_AT

REJECT = (VerificationError, EvidenceFormatError)


def _regions_dcap(q: bytes, tdx: bool) -> dict[str, tuple[int, int]]:
    body_end = 632 if tdx else 432
    sig = body_end + 4
    r = {
        "header": (0, 48),
        "report_body": (48, body_end - 64),
        "report_data": (body_end - 64, body_end),
        "quote_signature": (sig, sig + 64),
        "attestation_key": (sig + 64, sig + 128),
    }
    qe = sig + 128 + (6 if tdx else 0)  # v4 wraps the QE report in certification data type 6
    r["qe_report"] = (qe, qe + 384)
    r["qe_report_signature"] = (qe + 384, qe + 448)
    auth_len = int.from_bytes(q[qe + 448 : qe + 450], "little")
    r["qe_auth_data"] = (qe + 450, qe + 450 + auth_len)
    return r


def _flip_all(vs: VerifierSet, tee: str, blob: bytes, lo: int, hi: int, at: int,
              certs: bytes | None = None, in_certs: bool = False) -> list[int]:
    accepted = []
    for pos in range(lo, hi):
        b = bytearray(certs if in_certs else blob)
        b[pos] ^= 0x01 if pos % 2 else 0x80
        ev = (Evidence(tee, blob, bytes(b)) if in_certs else Evidence(tee, bytes(b), certs))
        try:
            vs.verify(ev, now=at)
        except REJECT:
            continue
        accepted.append(pos)
    return accepted


DCAP_CASES = [
    (name, region)
    for name in ("sgx_quote", "tdx_quote")
    for region in ("header", "report_body", "report_data", "quote_signature",
                   "attestation_key", "qe_report", "qe_report_signature", "qe_auth_data")
]


@pytest.mark.parametrize("name,region", DCAP_CASES)
def test_dcap_every_byte_of_signed_regions(dcap_dir: Path, name: str, region: str) -> None:
    q = (dcap_dir / name).read_bytes()
    tdx = name.startswith("tdx")
    lo, hi = _regions_dcap(q, tdx)[region]
    assert hi > lo
    vs = VerifierSet(collateral=dcap_dir / f"{name}_collateral.json")
    assert _flip_all(vs, name[:3], q, lo, hi, TDX_AT if tdx else SGX_AT) == []


SNP_VECTORS = [("milan-vcek/report.bin", "milan-vcek/vcek.der"),
               ("trustee-vcek/test-report.bin", "trustee-vcek/test-vcek.der")]
SNP_REGIONS = {"header_and_policy": (0x00, 0x50), "report_data": (0x50, 0x90),
               "measurement_host_data_keys": (0x90, 0x180), "tcb_cpuid_chip": (0x180, 0x1E0),
               "committed_launch_reserved": (0x1E0, 0x2A0), "signature_r": (0x2A0, 0x2E8),
               "signature_s": (0x2E8, 0x330), "after_signature": (0x330, 0x4A0)}


@pytest.mark.parametrize("vec", SNP_VECTORS, ids=["milan", "trustee"])
@pytest.mark.parametrize("region", list(SNP_REGIONS))
def test_snp_every_byte_of_report(snp_dir: Path, vec: tuple[str, str], region: str) -> None:
    rep, vcek = (snp_dir / vec[0]).read_bytes(), (snp_dir / vec[1]).read_bytes()
    lo, hi = SNP_REGIONS[region]
    assert _flip_all(VerifierSet(), "snp", rep, lo, hi, SNP_AT, vcek) == []


@pytest.mark.filterwarnings("ignore:Parsed a serial number")
@pytest.mark.parametrize("part", ["tbs", "signature"])
def test_snp_vcek_certificate_flips(snp_dir: Path, part: str) -> None:
    rep = (snp_dir / "milan-vcek/report.bin").read_bytes()
    der = (snp_dir / "milan-vcek/vcek.der").read_bytes()
    cert = x509.load_der_x509_certificate(der)
    tbs = cert.tbs_certificate_bytes
    lo = der.index(tbs)
    lo, hi = (lo, lo + len(tbs)) if part == "tbs" else (len(der) - 512, len(der))
    acc = _flip_all(VerifierSet(), "snp", rep, lo, hi, SNP_AT, der, in_certs=True)
    assert acc == []


def test_wrong_vcek(snp_dir: Path) -> None:
    rep = (snp_dir / "milan-vcek/report.bin").read_bytes()
    other = (snp_dir / "trustee-vcek/test-vcek.der").read_bytes()
    with pytest.raises(VerificationError, match="hwID does not match"):
        VerifierSet().verify(Evidence("snp", rep, other), now=SNP_AT)


@pytest.mark.parametrize("bad", ["test-vcek-invalid-new.der", "test-vcek-invalid-legacy.der"])
def test_invalid_vceks_fail_the_chain(snp_dir: Path, bad: str) -> None:
    rep = (snp_dir / "trustee-vcek/test-report.bin").read_bytes()
    cert = (snp_dir / "trustee-vcek" / bad).read_bytes()
    with pytest.raises(VerificationError, match="RSA-PSS SHA-384 signature does not verify"):
        VerifierSet().verify(Evidence("snp", rep, cert), now=SNP_AT)


@pytest.mark.parametrize("at,what", [(1_640_000_000, "VCEK"), (2_600_000_000, "ARK")])
def test_snp_outside_certificate_validity(snp_dir: Path, at: int, what: str) -> None:
    ev = Evidence("snp", (snp_dir / "milan-vcek/report.bin").read_bytes(),
                  (snp_dir / "milan-vcek/vcek.der").read_bytes())
    with pytest.raises(VerificationError, match=f"the {what} certificate is not valid at"):
        VerifierSet().verify(ev, now=at)


def _with_cpuid(rep: bytes, family: int, model: int) -> bytes:
    b = bytearray(rep)
    b[0:4] = (3).to_bytes(4, "little")
    b[0x188:0x18B] = bytes([family, model, 1])
    return bytes(b)


def test_vcek_of_another_product(snp_dir: Path) -> None:
    rep = (snp_dir / "milan-vcek/report.bin").read_bytes()
    vcek = (snp_dir / "milan-vcek/vcek.der").read_bytes()
    with pytest.raises(VerificationError, match=r"belongs to milan but .* says genoa"):
        VerifierSet().verify(Evidence("snp", _with_cpuid(rep, 0x19, 0x11), vcek), now=SNP_AT)
    with pytest.raises(VerificationError, match="CPUID says turin"):
        VerifierSet().verify(Evidence("snp", _with_cpuid(rep, 0x1A, 0x02), vcek), now=SNP_AT)
    # a v3 report claiming Milan gets past the product check and fails on its signature
    with pytest.raises(VerificationError, match="signature does not verify"):
        VerifierSet().verify(Evidence("snp", _with_cpuid(rep, 0x19, 0x01), vcek), now=SNP_AT)


def test_snp_products_from_cpuid() -> None:
    assert snp.product_from_cpuid((0x19, 0x01, 1)) == "milan"
    assert snp.product_from_cpuid((0x19, 0x11, 1)) == "genoa"
    assert snp.product_from_cpuid((0x1A, 0x02, 0)) == "turin"
    assert snp.product_from_cpuid((0x17, 0x31, 0)) is None
    raw = bytes([1, 2, 3, 4, 0, 0, 0, 9])
    assert snp.tcb_components(raw, "turin") == {"fmc": 1, "bootloader": 2, "tee": 3, "snp": 4,
                                                "microcode": 9}


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _cert(subject: str, issuer: str, pub: object, key: rsa.RSAPrivateKey,
          exts: list[tuple[str, bytes]] = ()) -> x509.Certificate:
    b = (x509.CertificateBuilder().subject_name(_name(subject)).issuer_name(_name(issuer))
         .public_key(pub).serial_number(1)
         .not_valid_before(dt.datetime(2020, 1, 1, tzinfo=dt.UTC))
         .not_valid_after(dt.datetime(2040, 1, 1, tzinfo=dt.UTC)))
    for oid, value in exts:
        b = b.add_extension(x509.UnrecognizedExtension(x509.ObjectIdentifier(oid), value),
                            critical=False)
    return b.sign(key, hashes.SHA384(), rsa_padding=padding.PSS(
        mgf=padding.MGF1(hashes.SHA384()), salt_length=48))


def test_self_consistent_chain_with_unpinned_ark_is_refused(snp_dir: Path,
                                                            tmp_path: Path) -> None:
    """A perfect chain and signature, but under an ARK whose fingerprint is not pinned."""
    rep = bytearray((snp_dir / "milan-vcek/report.bin").read_bytes())
    ark_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ask_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    vcek_key = ec.generate_private_key(ec.SECP384R1())
    ark = _cert("ARK-Milan", "ARK-Milan", ark_key.public_key(), ark_key)
    ask = _cert("SEV-Milan", "ARK-Milan", ask_key.public_key(), ark_key)
    exts = [(snp.OID_HWID, bytes(rep[0x1A0:0x1E0]))] + [
        (snp.OID_TCB[k], bytes([2, 1, v])) for k, v in
        {"bootloader": 2, "tee": 0, "snp": 5, "microcode": 0x44}.items()]
    vcek = _cert("SEV-VCEK", "SEV-Milan", vcek_key.public_key(), ask_key, exts)
    r, s = decode_dss_signature(vcek_key.sign(bytes(rep[:0x2A0]), ec.ECDSA(hashes.SHA384())))
    rep[0x2A0:0x2E8] = r.to_bytes(72, "little")
    rep[0x2E8:0x330] = s.to_bytes(72, "little")
    pem = b"".join(c.public_bytes(serialization.Encoding.PEM) for c in (ask, ark))
    (tmp_path / "ask_ark_milan.pem").write_bytes(pem)
    ev = Evidence("snp", bytes(rep), vcek.public_bytes(serialization.Encoding.DER))
    with pytest.raises(VerificationError, match="not the pinned AMD root key"):
        snp.verify(ev, now=SNP_AT, roots_dir=tmp_path)
    # and with the genuine roots, the forged VCEK does not chain
    with pytest.raises(VerificationError, match="not issued by"):
        VerifierSet().verify(ev, now=SNP_AT)


def _table(entries: list[tuple[uuid.UUID, bytes]]) -> bytes:
    head = b""
    data = b""
    off = 24 * (len(entries) + 1)
    for guid, blob in entries:
        head += guid.bytes + (off + len(data)).to_bytes(4, "little") + len(blob).to_bytes(
            4, "little")
        data += blob
    return head + bytes(24) + data


def test_vcek_from_certificate_table_and_offline_dir(snp_dir: Path, tmp_path: Path) -> None:
    rep = (snp_dir / "milan-vcek/report.bin").read_bytes()
    vcek = (snp_dir / "milan-vcek/vcek.der").read_bytes()
    ask_guid = uuid.UUID("4ab7b379-bbac-4fe4-a02f-05aef327c782")
    table = _table([(ask_guid, b"\x30junk"), (snp.GUID_VCEK, vcek)])
    assert VerifierSet().verify(Evidence("snp", rep, table), now=SNP_AT).product == "milan"
    with pytest.raises(VerificationError, match="no VCEK certificate"):
        VerifierSet().verify(Evidence("snp", rep, _table([(ask_guid, vcek)])), now=SNP_AT)
    bad = bytearray(table)
    bad[44:48] = (10**6).to_bytes(4, "little")
    with pytest.raises(EvidenceFormatError, match="outside the table"):
        VerifierSet().verify(Evidence("snp", rep, bytes(bad)), now=SNP_AT)
    with pytest.raises(VerificationError, match="offline VCEK directory"):
        VerifierSet(vcek_dir=tmp_path).verify(Evidence("snp", rep), now=SNP_AT)
    (tmp_path / f"{rep[0x1A0:0x1E0].hex()}.der").write_bytes(vcek)
    assert VerifierSet(vcek_dir=tmp_path).verify(Evidence("snp", rep), now=SNP_AT).debug


def test_snp_malformed(snp_dir: Path) -> None:
    rep = (snp_dir / "milan-vcek/report.bin").read_bytes()
    vcek = (snp_dir / "milan-vcek/vcek.der").read_bytes()
    with pytest.raises(EvidenceFormatError, match="exactly 1184"):
        VerifierSet().verify(Evidence("snp", rep[:-1], vcek), now=SNP_AT)
    with pytest.raises(EvidenceFormatError, match=r"X\.509"):
        VerifierSet().verify(Evidence("snp", rep, b"\x30\x03\x02\x01\x00"), now=SNP_AT)
    b = bytearray(rep)
    b[0] = 4
    with pytest.raises(EvidenceFormatError, match="version"):
        VerifierSet().verify(Evidence("snp", bytes(b), vcek), now=SNP_AT)


def test_collateral_error_is_not_a_quote_error(dcap_dir: Path) -> None:
    ev = Evidence("sgx", (dcap_dir / "sgx_quote").read_bytes())
    vs = VerifierSet(collateral=dcap_dir / "sgx_quote_collateral.json")
    with pytest.raises(CollateralError):
        vs.verify(ev, now=SGX_AT + 365 * 86400)
