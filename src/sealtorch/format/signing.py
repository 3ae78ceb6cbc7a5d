"""Optional Ed25519 owner signatures over a sealed file (header, index and all chunk tags)."""

from __future__ import annotations

import os
from pathlib import Path

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from sealtorch.errors import KeyFileError, SignatureError
from sealtorch.format import rules

SIGNATURE_LABEL = b"sealtorch/v1 signature\x00"


def signed_message(header_digest: bytes, index_digest: bytes, tags_digest: bytes) -> bytes:
    """What the owner signs: label || SHA-256(header) || SHA-256(index section) || SHA-256(tags)."""
    return SIGNATURE_LABEL + header_digest + index_digest + tags_digest


def raw_public(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def load_signing_key(path: str | os.PathLike[str]) -> Ed25519PrivateKey:
    """Read an unencrypted PEM (PKCS#8) Ed25519 private key."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise KeyFileError(f"{path}: cannot read signing key ({e.strerror})") from None
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise KeyFileError(f"{path}: not an unencrypted PEM private key") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise KeyFileError(f"{path}: signing key must be Ed25519")
    return key


def load_public_key(value: str | os.PathLike[str] | bytes | Ed25519PublicKey) -> Ed25519PublicKey:
    """An Ed25519 public key from an object, 32 raw bytes, a PEM file, or a 64-char hex string."""
    if isinstance(value, Ed25519PublicKey):
        return value
    if isinstance(value, bytes):
        if len(value) != 32:
            raise SignatureError("an Ed25519 public key is 32 bytes")
        return Ed25519PublicKey.from_public_bytes(value)
    text = str(value)
    if len(text) == 64 and all(c in "0123456789abcdefABCDEF" for c in text):
        return Ed25519PublicKey.from_public_bytes(bytes.fromhex(text))
    try:
        data = Path(text).read_bytes()
    except OSError as e:
        raise SignatureError(f"cannot read the signer public key file ({e.strerror})") from None
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise SignatureError("signer public key file is not a PEM public key") from None
    if not isinstance(key, Ed25519PublicKey):
        raise SignatureError("signer public key must be Ed25519")
    return key


def verify(public_raw: bytes, signature: bytes, message: bytes) -> None:
    """Verify an owner signature; :class:`SignatureError` if it does not."""
    try:
        Ed25519PublicKey.from_public_bytes(public_raw).verify(signature, message)
    except (InvalidSignature, ValueError):
        raise rules.SIGNATURE.fail(
            "owner signature does not verify: the file was modified or re-signed"
        ) from None
