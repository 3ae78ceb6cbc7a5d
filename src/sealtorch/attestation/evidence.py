"""Evidence: the bytes an attester produced, with a strict, size-limited JSON form.

``quote`` is the TEE's signed report (SGX/TDX DCAP quote, SNP attestation report, sim signed
body); ``certs`` is optional supporting material (SNP: the configfs-tsm auxblob certificate table
or a DER VCEK). The JSON form is what crosses the network; it is parsed strictly.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

from sealtorch.errors import EvidenceFormatError, ProtocolError
from sealtorch.protocol.b64 import b64d, b64e
from sealtorch.protocol.canonical import canonical_json

FORMAT = "sealtorch-evidence/v1"
TEES = ("sgx", "tdx", "snp", "sim")
MAX_QUOTE = 16 * 1024
MAX_CERTS = 24 * 1024
MAX_JSON = 60 * 1024


@dataclass(frozen=True)
class Evidence:
    """Evidence from one TEE: ``tee`` in :data:`TEES`, the signed ``quote``, optional ``certs``."""

    tee: str
    quote: bytes
    certs: bytes | None = None

    def __post_init__(self) -> None:
        if self.tee not in TEES:
            raise EvidenceFormatError(f"unknown tee type; expected one of {', '.join(TEES)}")
        if not isinstance(self.quote, bytes) or not self.quote:
            raise EvidenceFormatError("evidence quote must be non-empty bytes")
        if len(self.quote) > MAX_QUOTE:
            raise EvidenceFormatError(f"evidence quote larger than {MAX_QUOTE} bytes")
        if self.certs is not None:
            if not isinstance(self.certs, bytes):
                raise EvidenceFormatError("evidence certs must be bytes or None")
            if len(self.certs) > MAX_CERTS:
                raise EvidenceFormatError(f"evidence certs larger than {MAX_CERTS} bytes")

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe form (base64 fields)."""
        return {
            "format": FORMAT,
            "tee": self.tee,
            "quote": b64e(self.quote),
            "certs": None if self.certs is None else b64e(self.certs),
        }

    def to_json(self) -> bytes:
        """Canonical JSON bytes of :meth:`to_dict`."""
        return canonical_json(self.to_dict())

    def digest(self) -> bytes:
        """SHA-256 of the canonical JSON form: what grants and audit records name."""
        return hashlib.sha256(self.to_json()).digest()

    @classmethod
    def from_dict(cls, obj: object) -> Evidence:
        """Parse the dict form strictly (exact fields, strict base64, size limits)."""
        if not isinstance(obj, dict):
            raise EvidenceFormatError("evidence must be a JSON object")
        allowed = {"format", "tee", "quote", "certs"}
        if set(obj) - allowed or not {"tee", "quote"} <= set(obj):
            raise EvidenceFormatError(
                "evidence must have exactly the fields format, tee, quote and optional certs"
            )
        if obj.get("format", FORMAT) != FORMAT:
            raise EvidenceFormatError(f"evidence format must be {FORMAT!r}")
        tee = obj["tee"]
        if not isinstance(tee, str) or tee not in TEES:
            raise EvidenceFormatError(f"evidence tee must be one of {', '.join(TEES)}")
        try:
            quote = b64d(obj["quote"], field="evidence quote", max_len=MAX_QUOTE)
            certs_v = obj.get("certs")
            certs = (
                None
                if certs_v is None
                else b64d(certs_v, field="evidence certs", max_len=MAX_CERTS)
            )
        except ProtocolError as e:
            raise EvidenceFormatError(str(e)) from None
        return cls(tee=tee, quote=quote, certs=certs)

    @classmethod
    def from_json(cls, raw: bytes | str) -> Evidence:
        """Parse the JSON form (at most :data:`MAX_JSON` bytes)."""
        if len(raw) > MAX_JSON:
            raise EvidenceFormatError(f"evidence JSON larger than {MAX_JSON} bytes")
        try:
            obj = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
            raise EvidenceFormatError("evidence is not valid UTF-8 JSON") from e
        return cls.from_dict(obj)
