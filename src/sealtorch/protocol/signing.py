"""Ed25519-signed JSON documents with a domain-separated, canonical encoding.

A signed document is ``{"body": {...}, "signature": base64}``; the signature covers
``b"sealtorch/v1 " + kind + b"\\x00" + canonical_json(body)`` so a grant can never be replayed
as a status document or an audit head (and vice versa).
"""

from __future__ import annotations

import hashlib
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from sealtorch.errors import GrantError, ProtocolError
from sealtorch.protocol.b64 import b64d, b64e
from sealtorch.protocol.canonical import canonical_json

KIND_GRANT = "grant"
KIND_STATUS = "status"
KIND_AUDIT_HEAD = "audit-head"
KIND_KEY_EXPORT = "key-export"
KIND_CLAIMS = "claims"
KIND_COLLATERAL = "collateral"
_KINDS = frozenset({KIND_GRANT, KIND_STATUS, KIND_AUDIT_HEAD, KIND_KEY_EXPORT, KIND_CLAIMS,
                    KIND_COLLATERAL})


def _message(kind: str, body: dict[str, Any]) -> bytes:
    if kind not in _KINDS:
        raise ValueError(f"unknown document kind {kind!r}")
    return b"sealtorch/v1 " + kind.encode("ascii") + b"\x00" + canonical_json(body)


def body_digest(body: dict[str, Any]) -> bytes:
    """SHA-256 of the canonical body: the digest a grant puts in HPKE ``info``."""
    return hashlib.sha256(canonical_json(body)).digest()


def raw_public_key(key: Ed25519PublicKey | Ed25519PrivateKey) -> bytes:
    """The raw 32-byte Ed25519 public key."""
    pub = key.public_key() if isinstance(key, Ed25519PrivateKey) else key
    return pub.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def key_id(key: Ed25519PublicKey | Ed25519PrivateKey | bytes) -> str:
    """Hex SHA-256 of the raw public key: the server's *audience* and its key id."""
    raw = key if isinstance(key, bytes) else raw_public_key(key)
    return hashlib.sha256(raw).hexdigest()


def load_public_key(key: Ed25519PublicKey | bytes | str) -> Ed25519PublicKey:
    """Accept a key object, raw 32 bytes, base64 text of those, or PEM (SubjectPublicKeyInfo)."""
    if isinstance(key, Ed25519PublicKey):
        return key
    if isinstance(key, str):
        s = key.strip()
        if s.startswith("-----BEGIN"):
            loaded = serialization.load_pem_public_key(s.encode("ascii"))
            if not isinstance(loaded, Ed25519PublicKey):
                raise ProtocolError("pinned server key is not an Ed25519 public key")
            return loaded
        key = b64d(s, field="signing public key", max_len=32, exact_len=32)
    if isinstance(key, bytes) and len(key) == 32:
        return Ed25519PublicKey.from_public_bytes(key)
    if isinstance(key, bytes) and key.startswith(b"-----BEGIN"):
        return load_public_key(key.decode("ascii"))
    raise ProtocolError("pinned server key must be a raw 32-byte Ed25519 key, base64 or PEM")


def sign_document(
    private_key: Ed25519PrivateKey, kind: str, body: dict[str, Any]
) -> dict[str, Any]:
    """Sign ``body`` as a document of ``kind``."""
    return {"body": body, "signature": b64e(private_key.sign(_message(kind, body)))}


def sign_document_digest(
    private_key: Ed25519PrivateKey, kind: str, body: dict[str, Any]
) -> tuple[dict[str, Any], bytes]:
    """:func:`sign_document` plus :func:`body_digest` of the same body, encoding it once."""
    if kind not in _KINDS:
        raise ValueError(f"unknown document kind {kind!r}")
    canon = canonical_json(body)
    sig = private_key.sign(b"sealtorch/v1 " + kind.encode("ascii") + b"\x00" + canon)
    return {"body": body, "signature": b64e(sig)}, hashlib.sha256(canon).digest()


def verify_document(
    public_key: Ed25519PublicKey, kind: str, doc: object
) -> dict[str, Any]:
    """Check a signed document's shape and signature; returns its body."""
    if not isinstance(doc, dict) or set(doc) != {"body", "signature"}:
        raise GrantError(f"signed {kind} document must be an object with 'body' and 'signature'")
    body = doc["body"]
    if not isinstance(body, dict):
        raise GrantError(f"signed {kind} document body must be an object")
    sig = b64d(doc["signature"], field=f"{kind} signature", max_len=64, exact_len=64)
    try:
        public_key.verify(sig, _message(kind, body))
    except (InvalidSignature, ValueError) as e:
        raise GrantError(
            f"{kind} signature does not verify with the pinned server key; refuse it and check "
            "that the configured key server is the one you trust"
        ) from e
    return body
