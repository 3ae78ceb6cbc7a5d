"""AMD SEV-SNP attestation report verification with ``cryptography``.

Order of checks: parse the report (versions 2, 3, 5); find the signing certificate (VCEK or
VLEK, from the evidence's certificate table / DER or an offline directory); find the product
from the report's CPUID fields (v3+) or, for v2, from the pinned ASK that issued the
certificate, and require both to agree; verify ARK (self-signed, SHA-256 fingerprint pinned in
this file) -> ASK/ASVK -> VCEK/VLEK with RSA-PSS SHA-384; check every certificate's validity at
the verification time; match chip id (VCEK) and reported TCB against the certificate's
extensions; verify the report's ECDSA P-384 signature over bytes 0x000..0x29F.
"""

from __future__ import annotations

import hashlib
import hmac
import uuid
import warnings
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import resources
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from cryptography.hazmat.primitives.serialization import Encoding

from sealtorch.attestation.claims import Claims
from sealtorch.attestation.evidence import Evidence
from sealtorch.errors import EvidenceFormatError, VerificationError

REPORT_LEN = 0x4A0
SIGNED_LEN = 0x2A0
VERSIONS = (2, 3, 5)
SIG_ALGO_ECDSA_P384_SHA384 = 1

#: SHA-256 of each product's ARK certificate (DER); a chain is trusted only up to one of these
PINNED_ARK_SHA256 = {
    "milan": "69d063b45344d26a2e94e1f4210de49ef555308287d4c174445c95639a540bcd",
    "genoa": "4c6598d19c18719c5dfd4a7d335f674e5bfe1d8f800cea2cf270c10d103db2f1",
    "turin": "1f084161a44bb6d93778a904877d4819cafa5d05ef4193b2ded9dd9c73dd3f6a",
}
#: package data files holding ASK+ARK (VCEK chain) and ASVK+ARK (VLEK chain) per product
ROOT_FILES = {
    ("milan", "vcek"): "ask_ark_milan.pem",
    ("genoa", "vcek"): "ask_ark_genoa.pem",
    ("turin", "vcek"): "ask_ark_turin.pem",
    ("milan", "vlek"): "ask_ark_milan_vlek.pem",
}
OID_HWID = "1.3.6.1.4.1.3704.1.4"
OID_TCB = {
    "bootloader": "1.3.6.1.4.1.3704.1.3.1",
    "tee": "1.3.6.1.4.1.3704.1.3.2",
    "snp": "1.3.6.1.4.1.3704.1.3.3",
    "microcode": "1.3.6.1.4.1.3704.1.3.8",
    "fmc": "1.3.6.1.4.1.3704.1.3.9",
}
GUID_VCEK = uuid.UUID("63da758d-e664-4564-adc5-f4b93be8accd")
GUID_VLEK = uuid.UUID("a8074bc2-a25a-483e-aae6-39c045a0b8a1")
PSS = padding.PSS(mgf=padding.MGF1(hashes.SHA384()), salt_length=48)

POLICY_SMT = 1 << 16
POLICY_MIGRATE_MA = 1 << 18
POLICY_DEBUG = 1 << 19


@dataclass(frozen=True)
class Report:
    """The fields of an SNP attestation report that verification and policy use."""

    raw: bytes
    version: int
    guest_svn: int
    policy: int
    vmpl: int
    sig_algo: int
    signing_key: str  # "vcek" | "vlek"
    mask_chip_id: bool
    report_data: bytes
    measurement: bytes
    host_data: bytes
    id_key_digest: bytes
    author_key_digest: bytes
    reported_tcb_raw: bytes
    cpuid: tuple[int, int, int] | None  # family, model, stepping (v3+)
    chip_id: bytes

    @property
    def product(self) -> str | None:
        """Milan/Genoa/Turin from CPUID family/model (None for v2 reports)."""
        return product_from_cpuid(self.cpuid) if self.cpuid else None

    def reported_tcb(self, product: str) -> dict[str, int]:
        """REPORTED_TCB split into components (Turin has a different layout)."""
        return tcb_components(self.reported_tcb_raw, product)


def tcb_components(raw: bytes, product: str) -> dict[str, int]:
    """Split an 8-byte TCB_VERSION into named SPLs."""
    if product == "turin":
        return {"fmc": raw[0], "bootloader": raw[1], "tee": raw[2], "snp": raw[3],
                "microcode": raw[7]}
    return {"bootloader": raw[0], "tee": raw[1], "snp": raw[6], "microcode": raw[7]}


def product_from_cpuid(cpuid: tuple[int, int, int]) -> str | None:
    """Product for an (extended family, extended model, stepping) triple."""
    family, model, _ = cpuid
    if family == 0x19 and model <= 0x0F:
        return "milan"
    if family == 0x19 and (0x10 <= model <= 0x1F or 0xA0 <= model <= 0xAF):
        return "genoa"
    if family == 0x1A and model <= 0x1F:
        return "turin"
    return None


def parse_report(raw: bytes) -> Report:
    """Parse an attestation report; raises :class:`EvidenceFormatError` on bad structure."""
    if len(raw) != REPORT_LEN:
        raise EvidenceFormatError(f"an SNP report must be exactly {REPORT_LEN} bytes")

    def u32(o: int) -> int:
        return int.from_bytes(raw[o : o + 4], "little")

    version = u32(0x00)
    if version not in VERSIONS:
        raise EvidenceFormatError("unsupported SNP report version (supported: 2, 3, 5)")
    if any(raw[0x330:]):
        raise EvidenceFormatError("SNP report bytes after the signature must be zero")
    key_info = u32(0x48)
    sk = (key_info >> 2) & 0x7
    if sk not in (0, 1):
        raise EvidenceFormatError("SNP report is not signed by a VCEK or VLEK")
    cpuid = None
    if version >= 3 and any(raw[0x188:0x18B]):  # all-zero CPUID: not reported by firmware
        cpuid = (raw[0x188], raw[0x189], raw[0x18A])
    return Report(
        raw=raw,
        version=version,
        guest_svn=u32(0x04),
        policy=int.from_bytes(raw[0x08:0x10], "little"),
        vmpl=u32(0x30),
        sig_algo=u32(0x34),
        signing_key="vcek" if sk == 0 else "vlek",
        mask_chip_id=bool(key_info & 0x2),
        report_data=raw[0x50:0x90],
        measurement=raw[0x90:0xC0],
        host_data=raw[0xC0:0xE0],
        id_key_digest=raw[0xE0:0x110],
        author_key_digest=raw[0x110:0x140],
        reported_tcb_raw=raw[0x180:0x188],
        cpuid=cpuid,
        chip_id=raw[0x1A0:0x1E0],
    )


def _load_cert(data: bytes, what: str) -> x509.Certificate:
    with warnings.catch_warnings():  # AMD VCEKs have serial 0; cryptography warns but loads
        warnings.simplefilter("ignore")
        try:
            if data.lstrip().startswith(b"-----BEGIN"):
                cert = x509.load_pem_x509_certificate(data)
            else:
                cert = x509.load_der_x509_certificate(data)
            # parse every field now: cryptography parses lazily and may fail later otherwise
            _ = (cert.issuer, cert.subject, cert.extensions, cert.public_key(), cert.signature,
                 cert.tbs_certificate_bytes, cert.not_valid_before_utc, cert.not_valid_after_utc)
            for e in cert.extensions:
                _ = e.value
        except Exception:  # any parse failure of untrusted DER is a format error
            raise EvidenceFormatError(f"{what} is not a well-formed X.509 certificate") from None
        return cert


def cert_from_table(table: bytes, kind: str) -> bytes | None:
    """The VCEK/VLEK DER from a configfs-tsm auxblob / SNP certificate table."""
    guid = GUID_VCEK if kind == "vcek" else GUID_VLEK
    # The table stores GUIDs as raw 16 bytes; implementations differ in byte order, so both
    # encodings are accepted (the certificate found is verified against the pinned chain).
    wanted = (guid.bytes, guid.bytes_le)
    for i in range(0, min(len(table), 64 * 24), 24):
        entry = table[i : i + 24]
        if len(entry) < 24:
            break
        g, off, ln = entry[:16], int.from_bytes(entry[16:20], "little"), int.from_bytes(
            entry[20:24], "little")
        if g == bytes(16) and off == 0 and ln == 0:
            break
        if g in wanted:
            if off + ln > len(table) or ln == 0:
                raise EvidenceFormatError("SNP certificate table entry points outside the table")
            return table[off : off + ln]
    return None


def _signing_cert(report: Report, evidence: Evidence, vcek_dir: Path | None) -> x509.Certificate:
    certs = evidence.certs
    if certs:
        if certs[:1] == b"\x30" or certs.lstrip().startswith(b"-----BEGIN"):
            return _load_cert(certs, f"the {report.signing_key.upper()} certificate")
        der = cert_from_table(certs, report.signing_key)
        if der is not None:
            return _load_cert(der, f"the {report.signing_key.upper()} certificate")
    if vcek_dir is not None:
        stem = report.chip_id.hex() if report.signing_key == "vcek" else "vlek"
        for suffix in (".der", ".pem", ".crt"):
            p = vcek_dir / f"{stem}{suffix}"
            if p.is_file():
                return _load_cert(p.read_bytes(), f"{p}")
    raise VerificationError(
        f"no {report.signing_key.upper()} certificate: the evidence carries none and none was "
        "found in the offline VCEK directory (named <chip_id hex>.der)"
    )


def load_roots(
    roots_dir: Path | None = None,
) -> dict[tuple[str, str], tuple[x509.Certificate, x509.Certificate]]:
    """(ASK or ASVK, ARK) per (product, key kind) from package data (or ``roots_dir``)."""
    out: dict[tuple[str, str], tuple[x509.Certificate, x509.Certificate]] = {}
    for key, name in ROOT_FILES.items():
        if roots_dir is not None:
            p = roots_dir / name
            if not p.is_file():
                continue
            data = p.read_bytes()
        else:
            pkg = resources.files("sealtorch.attestation")
            data = pkg.joinpath("data", "amd", name).read_bytes()
        certs = x509.load_pem_x509_certificates(data)
        if len(certs) != 2:
            raise VerificationError(f"AMD root file {name} must hold the ASK and the ARK")
        out[key] = (certs[0], certs[1])
    return out


def _check_validity(cert: x509.Certificate, what: str, now: int) -> None:
    t = datetime.fromtimestamp(now, UTC)
    if not cert.not_valid_before_utc <= t <= cert.not_valid_after_utc:
        raise VerificationError(
            f"the {what} certificate is not valid at {t.isoformat()} (valid "
            f"{cert.not_valid_before_utc.isoformat()} .. {cert.not_valid_after_utc.isoformat()})"
        )


def _check_signed_by(cert: x509.Certificate, issuer: x509.Certificate, what: str) -> None:
    pub = issuer.public_key()
    if not isinstance(pub, rsa.RSAPublicKey) or cert.issuer != issuer.subject:
        raise VerificationError(f"the {what} certificate is not issued by the pinned AMD chain")
    try:
        pub.verify(cert.signature, cert.tbs_certificate_bytes, PSS, hashes.SHA384())
    except InvalidSignature:
        raise VerificationError(
            f"the {what} certificate's RSA-PSS SHA-384 signature does not verify against the "
            "pinned AMD chain"
        ) from None


def _ext_int(cert: x509.Certificate, oid: str) -> int | None:
    try:
        ext = cert.extensions.get_extension_for_oid(x509.ObjectIdentifier(oid))
    except x509.ExtensionNotFound:
        return None
    raw = ext.value.value  # type: ignore[attr-defined]
    # DER INTEGER: 0x02, length, big-endian two's complement
    if len(raw) < 3 or raw[0] != 0x02 or raw[1] != len(raw) - 2:
        raise VerificationError("the certificate's TCB extension is malformed")
    return int.from_bytes(raw[2:], "big", signed=True)


def verify_chain(
    cert: x509.Certificate,
    product: str,
    kind: str,
    now: int,
    roots: dict[tuple[str, str], tuple[x509.Certificate, x509.Certificate]],
) -> None:
    """ARK (pinned) -> ASK/ASVK -> VCEK/VLEK, signatures and validity windows."""
    if (product, kind) not in roots:
        raise VerificationError(f"no pinned AMD root for {kind.upper()} on {product}")
    ask, ark = roots[(product, kind)]
    fp = hashlib.sha256(ark.public_bytes(Encoding.DER)).hexdigest()
    if not hmac.compare_digest(fp, PINNED_ARK_SHA256[product]):
        raise VerificationError(f"the ARK for {product} is not the pinned AMD root key")
    _check_signed_by(ark, ark, "ARK")
    _check_signed_by(ask, ark, "ASK" if kind == "vcek" else "ASVK")
    _check_signed_by(cert, ask, kind.upper())
    for c, what in ((ark, "ARK"), (ask, "ASK"), (cert, kind.upper())):
        _check_validity(c, what, now)


def _product_of_cert(
    cert: x509.Certificate,
    kind: str,
    roots: dict[tuple[str, str], tuple[x509.Certificate, x509.Certificate]],
) -> str:
    for (product, k), (ask, _ark) in roots.items():
        if k == kind and cert.issuer == ask.subject:
            return product
    raise VerificationError(
        f"the {kind.upper()} certificate is not issued by any pinned AMD product root"
    )


def verify(
    evidence: Evidence, *, now: int, vcek_dir: Path | None = None, roots_dir: Path | None = None
) -> Claims:
    """Verify an SNP report at ``now`` and return its claims.

    ``roots_dir`` replaces the packaged AMD root files (tests); the ARK pins still apply.
    """
    report = parse_report(evidence.quote)
    if report.sig_algo != SIG_ALGO_ECDSA_P384_SHA384:
        raise VerificationError("SNP report signature algorithm is not ECDSA P-384 SHA-384")
    roots = load_roots(roots_dir)
    cert = _signing_cert(report, evidence, vcek_dir)
    cert_product = _product_of_cert(cert, report.signing_key, roots)
    if report.cpuid is not None:
        cpu_product = report.product
        if cpu_product is None:
            raise VerificationError("the SNP report's CPUID names no supported product")
        if cpu_product != cert_product:
            raise VerificationError(
                f"the {report.signing_key.upper()} belongs to {cert_product} but the report's "
                f"CPUID says {cpu_product}"
            )
    product = cert_product
    verify_chain(cert, product, report.signing_key, now, roots)
    tcb = report.reported_tcb(product)
    if report.signing_key == "vcek":
        if report.mask_chip_id:
            raise VerificationError("the report masks its chip id, so it cannot match a VCEK")
        try:
            hwid = cert.extensions.get_extension_for_oid(x509.ObjectIdentifier(OID_HWID))
            hw = bytes(hwid.value.value)  # type: ignore[attr-defined]
        except x509.ExtensionNotFound:
            raise VerificationError("the VCEK has no hwID extension") from None
        chip = report.chip_id[: len(hw)] if product == "turin" else report.chip_id
        if product == "turin" and any(report.chip_id[len(hw) :]):
            raise VerificationError("Turin chip id has non-zero bytes after the hardware id")
        if not hmac.compare_digest(hw, chip):
            raise VerificationError("the VCEK's hwID does not match the report's CHIP_ID")
    for comp, value in tcb.items():
        want = _ext_int(cert, OID_TCB[comp])
        if want is None or want != value:
            raise VerificationError(
                f"the report's reported TCB ({comp}) does not match the "
                f"{report.signing_key.upper()} certificate"
            )
    pub = cert.public_key()
    if not isinstance(pub, ec.EllipticCurvePublicKey) or pub.curve.name != "secp384r1":
        raise VerificationError(f"the {report.signing_key.upper()} key is not ECDSA P-384")
    r = int.from_bytes(report.raw[0x2A0 : 0x2A0 + 72], "little")
    s = int.from_bytes(report.raw[0x2E8 : 0x2E8 + 72], "little")
    try:
        pub.verify(encode_dss_signature(r, s), report.raw[:SIGNED_LEN], ec.ECDSA(hashes.SHA384()))
    except (InvalidSignature, ValueError):
        raise VerificationError("the SNP report signature does not verify") from None
    return Claims(
        tee="snp",
        report_data=report.report_data,
        verified_at=int(now),
        debug=bool(report.policy & POLICY_DEBUG),
        snp_version=report.version,
        product=product,
        measurement=report.measurement,
        host_data=report.host_data,
        id_key_digest=report.id_key_digest,
        author_key_digest=report.author_key_digest,
        guest_policy=report.policy,
        migration_agent=bool(report.policy & POLICY_MIGRATE_MA),
        smt_allowed=bool(report.policy & POLICY_SMT),
        vmpl=report.vmpl,
        reported_tcb=tcb,
        chip_id=report.chip_id,
        guest_svn=report.guest_svn,
        signing_key=report.signing_key,
    )
