"""HPKE sealing of keys (RFC 9180 Base mode, DHKEM(X25519, HKDF-SHA256), HKDF-SHA256, AES-256-GCM).

One key per message; the caller binds the message to its context (the grant digest) via ``info``.
Everything goes through ``cryptography.hazmat.primitives.hpke``; nothing here is home-made.
"""

from __future__ import annotations

import functools

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.hpke import AEAD, KDF, KEM, Suite

from sealtorch._secret import Secret
from sealtorch.errors import ProtocolError

#: RFC 9180 KEM id of DHKEM(X25519, HKDF-SHA256); also bound into the report data.
KEM_ID = 0x0020
#: RFC 9180 KDF id (HKDF-SHA256) and AEAD id (AES-256-GCM), for documentation and messages.
KDF_ID = 0x0001
AEAD_ID = 0x0002
PUBLIC_KEY_LEN = 32
_ENC_LEN = 32
_TAG_LEN = 16
#: upper bound of a sealed message we accept (keys are 32 bytes; leave room for small payloads)
MAX_SEALED_LEN = 4096

SUITE = Suite(KEM.X25519, KDF.HKDF_SHA256, AEAD.AES_256_GCM)


def generate_keypair() -> tuple[X25519PrivateKey, bytes]:
    """A fresh ephemeral X25519 key pair; returns the private key and the raw 32-byte public key."""
    sk = X25519PrivateKey.generate()
    return sk, public_bytes(sk)


def public_bytes(private_key: X25519PrivateKey) -> bytes:
    """The raw 32-byte public key of ``private_key``."""
    return private_key.public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )


@functools.cache
def _probe_key() -> X25519PrivateKey:
    """The key :func:`load_public_key` agrees with a public key to see whether the shared
    secret is all zero (a low-order point). Made once per process: the agreed secret is
    thrown away and the key protects nothing, so a new one per check only cost a key
    generation each time."""
    return X25519PrivateKey.generate()


def load_public_key(raw: bytes) -> X25519PublicKey:
    """Parse a raw X25519 public key, refusing wrong lengths and the all-zero point."""
    if len(raw) != PUBLIC_KEY_LEN:
        raise ProtocolError(
            f"HPKE public key must be {PUBLIC_KEY_LEN} bytes (raw X25519); send the raw key"
        )
    if not any(raw):
        raise ProtocolError("HPKE public key is the all-zero point; generate a real key pair")
    pk = X25519PublicKey.from_public_bytes(raw)
    try:  # low-order points give an all-zero shared secret: refuse them here, not mid-seal
        _probe_key().exchange(pk)
    except ValueError as e:
        raise ProtocolError(
            "HPKE public key is a low-order X25519 point; generate a real key pair"
        ) from e
    return pk


def seal(plaintext: bytes | bytearray | Secret, public_key: bytes | X25519PublicKey,
         info: bytes) -> bytes:
    """Encrypt ``plaintext`` to ``public_key`` (raw X25519 bytes, or a key already checked by
    :func:`load_public_key`); returns ``enc || ciphertext``."""
    if not info:
        raise ProtocolError("HPKE info must bind the message to its context (grant digest)")
    pk = public_key if isinstance(public_key, X25519PublicKey) else load_public_key(public_key)
    data = bytes(plaintext)
    try:
        return SUITE.encrypt(data, pk, info=info)
    finally:
        # best effort: the immutable copy cannot be wiped, but drop our reference at once
        del data


def open(sealed: bytes, private_key: X25519PrivateKey, info: bytes, *,
         max_len: int = MAX_SEALED_LEN) -> Secret:
    """Decrypt a message made by :func:`seal`; raises :class:`ProtocolError` on any mismatch.
    ``max_len`` bounds the sealed message (keys by default; a relayed grant is larger)."""
    if not isinstance(sealed, bytes | bytearray) or not (
        _ENC_LEN + _TAG_LEN <= len(sealed) <= max_len
    ):
        raise ProtocolError("sealed key has an impossible length; it was truncated or altered")
    try:
        return Secret(SUITE.decrypt(bytes(sealed), private_key, info=info))
    except (InvalidTag, ValueError) as e:
        raise ProtocolError(
            "sealed key does not open with this private key and grant (wrong recipient, "
            "wrong grant, or tampered ciphertext)"
        ) from e


unseal = open
