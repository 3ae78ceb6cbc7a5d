"""The attestation document an inference server answers ``GET /v2/attestation?nonce=`` with.

JSON (``application/json``)::

    {"format": "sealtorch-serve-attestation/v1",
     "nonce": "<the client's 32 bytes, base64url without padding>",
     "evidence": {<sealtorch-evidence/v1>},
     "ohttp_key_config": "<base64 RFC 9458 Key Config: key id, KEM, public key, KDF, AEAD>",
     "receipt_key": "<base64 raw Ed25519 public key>",
     "tls_public_key": "<base64 DER SubjectPublicKeyInfo, or empty: no TLS in the TEE>",
     "identity": {name, model_id, key_version, header_digest, policy_version, factory,
                  tenant, server_key_id}}

The evidence's report data is :func:`sealtorch.attestation.binding.serve_report_data` over
these fields, so none of them can be changed without the client noticing.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from dataclasses import dataclass
from typing import Any

from sealtorch.attestation import binding
from sealtorch.attestation.binding import ServedIdentity
from sealtorch.attestation.evidence import Evidence
from sealtorch.e2e.ohttp import KeyConfig
from sealtorch.errors import (
    BindingError,
    EncapsulationError,
    EvidenceFormatError,
    ProtocolError,
)
from sealtorch.protocol.b64 import b64d, b64e
from sealtorch.protocol.canonical import canonical_json

FORMAT = "sealtorch-serve-attestation/v1"
MAX_JSON = 96 * 1024
NONCE_LEN = binding.NONCE_LEN
_FIELDS = {"format", "nonce", "evidence", "ohttp_key_config", "receipt_key", "tls_public_key",
           "identity"}
_B64URL_NONCE = re.compile(r"[A-Za-z0-9_-]{43}")


def encode_nonce(nonce: bytes) -> str:
    """Base64url without padding (how the nonce travels in the query string)."""
    return base64.urlsafe_b64encode(nonce).rstrip(b"=").decode("ascii")


def decode_nonce(value: object) -> bytes:
    """Parse a 32-byte nonce in unpadded base64url (exactly 43 characters, canonical)."""
    if not isinstance(value, str) or not _B64URL_NONCE.fullmatch(value):
        raise ProtocolError("nonce must be 32 bytes in base64url without padding "
                            "(43 characters of A-Z a-z 0-9 - _)")
    try:
        raw = base64.urlsafe_b64decode(value + "=")
    except (binascii.Error, ValueError):  # pragma: no cover - the pattern excludes these
        raise ProtocolError("nonce is not base64url") from None
    if encode_nonce(raw) != value:
        raise ProtocolError("nonce is not canonical base64url")
    return raw


@dataclass(frozen=True)
class AttestationDocument:
    """A server's answer to one attestation request (parsed; not yet verified)."""

    nonce: bytes
    evidence: Evidence
    key_config: KeyConfig
    receipt_key: bytes
    tls_public_key: bytes
    identity: ServedIdentity

    def report_data(self) -> bytes:
        """What the evidence's report data must be for these fields."""
        return binding.serve_report_data(
            nonce=self.nonce, kem_id=self.key_config.kem_id,
            hpke_public_key=self.key_config.public_key, receipt_public_key=self.receipt_key,
            tls_public_key=self.tls_public_key, identity=self.identity)

    def to_dict(self) -> dict[str, Any]:
        """The JSON form."""
        return {"format": FORMAT, "nonce": encode_nonce(self.nonce),
                "evidence": self.evidence.to_dict(),
                "ohttp_key_config": b64e(self.key_config.encode()),
                "receipt_key": b64e(self.receipt_key),
                "tls_public_key": b64e(self.tls_public_key),
                "identity": self.identity.to_dict()}

    def to_json(self) -> bytes:
        """Canonical JSON bytes (what ``sealtorch client infer --evidence`` saves)."""
        return canonical_json(self.to_dict())

    @classmethod
    def from_dict(cls, obj: object) -> AttestationDocument:
        """Parse strictly: exact fields, strict base64, size limits."""
        if not isinstance(obj, dict) or set(obj) != _FIELDS:
            raise EvidenceFormatError("the attestation document must have exactly the fields "
                                      f"{', '.join(sorted(_FIELDS))}")
        if obj["format"] != FORMAT:
            raise EvidenceFormatError(f"the attestation document format must be {FORMAT!r}")
        try:
            nonce = decode_nonce(obj["nonce"])
            key_config = KeyConfig.decode(b64d(obj["ohttp_key_config"],
                                               field="ohttp_key_config", max_len=64))
            receipt_key = b64d(obj["receipt_key"], field="receipt_key",
                               max_len=binding.RECEIPT_KEY_LEN,
                               exact_len=binding.RECEIPT_KEY_LEN)
            tls = b64d(obj["tls_public_key"], field="tls_public_key",
                       max_len=binding.MAX_TLS_PUBLIC_KEY)
            identity = ServedIdentity.from_dict(obj["identity"])
        except (ProtocolError, BindingError, EncapsulationError) as e:
            raise EvidenceFormatError(f"the attestation document is malformed: {e}") from None
        return cls(nonce=nonce, evidence=Evidence.from_dict(obj["evidence"]),
                   key_config=key_config, receipt_key=receipt_key, tls_public_key=tls,
                   identity=identity)

    @classmethod
    def from_json(cls, raw: bytes | str) -> AttestationDocument:
        """Parse the JSON form (at most :data:`MAX_JSON` bytes)."""
        if len(raw) > MAX_JSON:
            raise EvidenceFormatError(f"the attestation document is larger than {MAX_JSON} "
                                      "bytes")
        try:
            obj = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
            raise EvidenceFormatError("the attestation document is not UTF-8 JSON") from None
        return cls.from_dict(obj)
