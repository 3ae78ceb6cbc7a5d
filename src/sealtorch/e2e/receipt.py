"""Signed inference receipts: COSE_Sign1 (RFC 9052) over an EAT-style CWT claims set (RFC 9711).

The attested receipt key (Ed25519, born in the TEE, bound into the server's evidence) signs, for
every end-to-end response, a claims set naming what was asked and answered::

    COSE_Sign1 (tag 18), protected header {1 (alg): -8 (EdDSA), 4 (kid): SHA-256(receipt key)}
    payload = CBOR map:
      6  iat           unix seconds at the server (the host's clock: informative)
      7  cti           16 random bytes, the receipt's id
      10 eat_nonce     the request's 16-byte nonce
      265 eat_profile  "urn:sealtorch:receipt:v1"
      "sealtorch.model"     the served identity (as in the attestation document)
      "sealtorch.target"    "POST /v2/models/NAME/infer" (the method and path the request named)
      "sealtorch.hpke_key"  SHA-256 of the attested HPKE public key the request was sent to
      "sealtorch.request"   SHA-256 of the OIP request body (plaintext)
      "sealtorch.response"  SHA-256 of the OIP response body (plaintext)
      "sealtorch.status"    the response's HTTP status

COSE is done by the ``cwt`` library; this module checks the structure strictly before and after.
"""

from __future__ import annotations

import hashlib
import hmac
import io
import os
from dataclasses import dataclass
from typing import Any

import cbor2
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from sealtorch.attestation.binding import ServedIdentity
from sealtorch.errors import BindingError, ReceiptError

PROFILE = "urn:sealtorch:receipt:v1"
MAX_RECEIPT = 4096
ALG_EDDSA = -8
IAT, CTI, EAT_NONCE, EAT_PROFILE = 6, 7, 10, 265
K_MODEL, K_TARGET, K_HPKE = "sealtorch.model", "sealtorch.target", "sealtorch.hpke_key"
K_REQUEST, K_RESPONSE, K_STATUS = "sealtorch.request", "sealtorch.response", "sealtorch.status"
_KEYS = {IAT, CTI, EAT_NONCE, EAT_PROFILE, K_MODEL, K_TARGET, K_HPKE, K_REQUEST, K_RESPONSE,
         K_STATUS}


def _loads(raw: bytes, what: str) -> Any:
    """Decode exactly one CBOR item (trailing bytes are refused: no malleable receipts)."""
    fp = io.BytesIO(raw)
    try:
        value = cbor2.CBORDecoder(fp).decode()
    except (cbor2.CBORDecodeError, ValueError, TypeError, RecursionError, OverflowError):
        raise ReceiptError(f"{what} is not CBOR") from None
    if fp.tell() != len(raw) or value is getattr(cbor2, "break_marker", None):
        raise ReceiptError(f"{what} is not exactly one CBOR item")
    return value


def receipt_key_id(public_key: bytes) -> bytes:
    """The ``kid`` of a receipt key: SHA-256 of its raw 32 bytes."""
    return hashlib.sha256(public_key).digest()


def raw_public(key: Ed25519PrivateKey) -> bytes:
    """Raw 32-byte public key of a receipt signing key."""
    return key.public_key().public_bytes(serialization.Encoding.Raw,
                                         serialization.PublicFormat.Raw)


@dataclass(frozen=True)
class ReceiptClaims:
    """The claims of one receipt (what was signed)."""

    issued_at: int
    receipt_id: bytes
    nonce: bytes
    identity: ServedIdentity
    target: str
    hpke_key_digest: bytes
    request_digest: bytes
    response_digest: bytes
    status: int

    def to_cbor_map(self) -> dict[Any, Any]:
        """The CWT claims set."""
        return {IAT: self.issued_at, CTI: self.receipt_id, EAT_NONCE: self.nonce,
                EAT_PROFILE: PROFILE, K_MODEL: self.identity.to_dict(), K_TARGET: self.target,
                K_HPKE: self.hpke_key_digest, K_REQUEST: self.request_digest,
                K_RESPONSE: self.response_digest, K_STATUS: self.status}

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe form (for ``sealtorch receipt verify`` output)."""
        return {"issued_at": self.issued_at, "receipt_id": self.receipt_id.hex(),
                "nonce": self.nonce.hex(), "identity": self.identity.to_dict(),
                "target": self.target, "hpke_key_sha256": self.hpke_key_digest.hex(),
                "request_sha256": self.request_digest.hex(),
                "response_sha256": self.response_digest.hex(), "status": self.status}

    @classmethod
    def from_cbor_map(cls, obj: object) -> ReceiptClaims:
        """Parse a claims set strictly (exact keys and types)."""
        if not isinstance(obj, dict) or set(obj) != _KEYS:
            raise ReceiptError("the receipt's claims set has missing or unexpected claims")

        def b(key: Any, n: int) -> bytes:
            v = obj[key]
            if not isinstance(v, bytes) or len(v) != n:
                raise ReceiptError(f"receipt claim {key} must be {n} bytes")
            return v

        def i(key: Any) -> int:
            v = obj[key]
            if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < 2**63:
                raise ReceiptError(f"receipt claim {key} must be a non-negative integer")
            return v

        if obj[EAT_PROFILE] != PROFILE:
            raise ReceiptError(f"the receipt's eat_profile is not {PROFILE}")
        target = obj[K_TARGET]
        if not isinstance(target, str) or not 0 < len(target) <= 600 or not target.isprintable():
            raise ReceiptError("receipt claim sealtorch.target must be a short string")
        try:
            identity = ServedIdentity.from_dict(obj[K_MODEL])
        except (BindingError, TypeError) as e:
            raise ReceiptError(f"receipt claim sealtorch.model is malformed: {e}") from None
        return cls(issued_at=i(IAT), receipt_id=b(CTI, 16), nonce=b(EAT_NONCE, 16),
                   identity=identity, target=target, hpke_key_digest=b(K_HPKE, 32),
                   request_digest=b(K_REQUEST, 32), response_digest=b(K_RESPONSE, 32),
                   status=i(K_STATUS))


def new_receipt_id() -> bytes:
    """16 random bytes."""
    return os.urandom(16)


class ReceiptSigner:
    """A receipt key held for the life of a server (the ``cwt`` key object is built once)."""

    def __init__(self, key: Ed25519PrivateKey) -> None:
        from cwt import COSE, COSEKey

        self.public_key = raw_public(key)
        self.kid = receipt_key_id(self.public_key)
        pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
        self._key = COSEKey.from_pem(pem, alg="EdDSA", kid=self.kid)
        del pem
        self._cose = COSE.new()

    def __repr__(self) -> str:
        return f"ReceiptSigner(kid={self.kid.hex()[:16]}...)"

    def sign(self, claims: ReceiptClaims) -> bytes:
        """The COSE_Sign1 receipt of ``claims``."""
        out = self._cose.encode_and_sign(cbor2.dumps(claims.to_cbor_map()), self._key,
                                         protected={1: ALG_EDDSA, 4: self.kid})
        assert isinstance(out, bytes)
        return out


def verify_receipt(raw: bytes, public_key: bytes) -> ReceiptClaims:
    """Check a receipt's structure and signature under the attested ``public_key``."""
    from cwt import COSE, COSEKey, CWTError

    if not isinstance(raw, bytes) or not 0 < len(raw) <= MAX_RECEIPT:
        raise ReceiptError(f"a receipt must be 1-{MAX_RECEIPT} bytes of CBOR")
    top = _loads(raw, "the receipt")
    if not (isinstance(top, cbor2.CBORTag) and top.tag == 18 and isinstance(top.value, list)
            and len(top.value) == 4):
        raise ReceiptError("the receipt is not a tagged COSE_Sign1 message")
    protected, unprotected, payload, signature = top.value
    if not (isinstance(protected, bytes) and isinstance(unprotected, dict) and not unprotected
            and isinstance(payload, bytes) and isinstance(signature, bytes)):
        raise ReceiptError("the receipt's COSE_Sign1 fields have the wrong types")
    kid = receipt_key_id(public_key)
    header = _loads(protected, "the receipt's protected header")
    if header != {1: ALG_EDDSA, 4: kid}:
        raise ReceiptError("the receipt is not signed with EdDSA by the attested receipt key "
                           "(its protected header names another algorithm or key)")
    key = COSEKey.new({1: 1, 2: kid, -1: 6, -2: public_key, 3: ALG_EDDSA})
    try:
        signed_payload = COSE.new().decode(raw, key)
    except (CWTError, ValueError) as e:
        raise ReceiptError("the receipt's signature does not verify with the attested receipt "
                           "key (forged or altered)") from e
    if not hmac.compare_digest(signed_payload, payload):  # pragma: no cover - library contract
        raise ReceiptError("the receipt's verified payload differs from its payload")
    return ReceiptClaims.from_cbor_map(_loads(payload, "the receipt's payload"))


def check_receipt(claims: ReceiptClaims, *, nonce: bytes | None, identity: ServedIdentity,
                  target: str | None, hpke_key_digest: bytes, request_digest: bytes | None,
                  response_digest: bytes | None) -> None:
    """Compare a verified receipt with what the verifier knows; raise naming every mismatch.

    ``None`` values are not checked (an offline check without the request or response).
    """
    bad: list[str] = []
    if nonce is not None and not hmac.compare_digest(claims.nonce, nonce):
        bad.append("it answers another request (eat_nonce differs)")
    if claims.identity != identity:
        bad.append("it names another served model identity than the attested one")
    if target is not None and claims.target != target:
        bad.append("it names another method and path than the request's")
    if not hmac.compare_digest(claims.hpke_key_digest, hpke_key_digest):
        bad.append("it names another HPKE key than the attested one")
    if request_digest is not None and not hmac.compare_digest(claims.request_digest,
                                                              request_digest):
        bad.append("its request digest is not the SHA-256 of the request sent")
    if response_digest is not None and not hmac.compare_digest(claims.response_digest,
                                                               response_digest):
        bad.append("its response digest is not the SHA-256 of the response received")
    if bad:
        raise ReceiptError("the receipt does not match: " + "; ".join(bad))
