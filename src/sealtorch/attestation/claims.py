"""Claims: the normalized, typed result of verifying evidence from any TEE.

Verifiers fill the common fields and the fields of their TEE; fields of other TEEs stay ``None``.
Byte fields are ``bytes`` here and lowercase hex in :meth:`Claims.to_dict`.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

from sealtorch.errors import EvidenceFormatError

#: TCB statuses (Intel's names; SNP and sim carry ``None``: their TCB is checked by value)
TCB_STATUSES = (
    "UpToDate",
    "SWHardeningNeeded",
    "ConfigurationNeeded",
    "ConfigurationAndSWHardeningNeeded",
    "OutOfDate",
    "OutOfDateConfigurationNeeded",
    "Revoked",
)


@dataclass(frozen=True)
class Claims:
    """What verified evidence says about the TEE that produced it."""

    # --- common ---
    tee: str  # "sgx" | "tdx" | "snp" | "sim"
    report_data: bytes  # 64 bytes chosen by the attester's caller (see binding.py)
    verified_at: int  # unix seconds the verification was done at
    debug: bool  # the TEE is debuggable (memory readable by the host)
    tcb_status: str | None = None  # sgx/tdx: Intel TCB status; snp/sim: None
    advisory_ids: tuple[str, ...] = ()
    ppid: bytes | None = None  # sgx/tdx: platform provisioning id from the PCK certificate
    # --- sgx ---
    mrenclave: bytes | None = None
    mrsigner: bytes | None = None
    isv_prod_id: int | None = None
    isv_svn: int | None = None
    attributes: bytes | None = None  # 16 bytes; bit 1 of byte 0 = DEBUG
    config_id: bytes | None = None  # 64 bytes (KSS)
    config_svn: int | None = None  # (KSS)
    isv_ext_prod_id: bytes | None = None  # 16 bytes (KSS)
    isv_family_id: bytes | None = None  # 16 bytes (KSS)
    # --- tdx ---
    mrtd: bytes | None = None
    rtmr0: bytes | None = None
    rtmr1: bytes | None = None
    rtmr2: bytes | None = None
    rtmr3: bytes | None = None
    mrconfigid: bytes | None = None
    mrowner: bytes | None = None
    mrownerconfig: bytes | None = None
    td_attributes: bytes | None = None  # 8 bytes; bit 0 of byte 0 = DEBUG
    tee_tcb_svn: bytes | None = None  # 16 bytes
    xfam: bytes | None = None
    # --- snp (measurement is shared with sim) ---
    snp_version: int | None = None  # report format version (2, 3, 5)
    product: str | None = None  # "milan" | "genoa" | "turin"
    measurement: bytes | None = None  # snp: 48 bytes; sim: 32 bytes
    host_data: bytes | None = None
    id_key_digest: bytes | None = None
    author_key_digest: bytes | None = None
    guest_policy: int | None = None
    migration_agent: bool | None = None
    smt_allowed: bool | None = None
    vmpl: int | None = None
    reported_tcb: dict[str, int] | None = field(default=None, hash=False)
    chip_id: bytes | None = None
    guest_svn: int | None = None
    signing_key: str | None = None  # "vcek" | "vlek"
    # --- sim ---
    platform_key: str | None = None  # SHA-256 fingerprint (hex) of the sim platform key
    role: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict: bytes as lowercase hex, tuples as lists, ``None`` fields omitted."""
        out: dict[str, Any] = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if v is None:
                continue
            if isinstance(v, bytes):
                out[f.name] = v.hex()
            elif isinstance(v, tuple):
                out[f.name] = list(v)
            elif isinstance(v, dict):
                out[f.name] = dict(v)
            else:
                out[f.name] = v
        return out

    @classmethod
    def from_dict(cls, obj: dict[str, Any]) -> Claims:
        """Inverse of :meth:`to_dict` (for claims stored or relayed by a trusted party)."""
        if not isinstance(obj, dict):
            raise EvidenceFormatError("claims must be a JSON object")
        kinds = {f.name: f for f in fields(cls)}
        kw: dict[str, Any] = {}
        for k, v in obj.items():
            if k not in kinds:
                raise EvidenceFormatError("claims contain an unknown field")
            t = str(kinds[k].type)
            try:
                if "bytes" in t and isinstance(v, str):
                    kw[k] = bytes.fromhex(v)
                elif k == "advisory_ids":
                    kw[k] = tuple(str(a) for a in v)
                else:
                    kw[k] = v
            except (ValueError, TypeError) as e:
                raise EvidenceFormatError(f"claims field {k} is malformed") from e
        try:
            return cls(**kw)
        except TypeError as e:
            raise EvidenceFormatError("claims are missing a required field") from e
