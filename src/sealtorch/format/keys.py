"""Key derivation for sealed files: model key -> file key -> chunk/index/MAC keys + commitment.

The file key is what a key cache hands to a runtime: it opens exactly one file, and the model
key never has to leave the cache. Every other key is derived from the file key with its own
label, so knowing one derived key reveals nothing about the others.
"""

from __future__ import annotations

import hmac
import struct
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives import hmac as crypto_hmac
from cryptography.hazmat.primitives.kdf.hkdf import HKDF, HKDFExpand

from sealtorch._secret import Secret
from sealtorch.errors import WrongKeyError
from sealtorch.format import rules
from sealtorch.format.header import (
    CIPHER_AES256GCM_STREAM,
    COMMITMENT_BYTES,
    FORMAT_VERSION,
    Header,
)
from sealtorch.format.keyfile import MODEL_KEY_BYTES, ModelKey

FILE_KEY_BYTES = 32
LABEL_FILE_KEY = b"sealtorch/v1 file key"
LABEL_CHUNK_KEY = b"sealtorch/v1 chunk key"
LABEL_INDEX_KEY = b"sealtorch/v1 index key"
LABEL_HEADER_MAC_KEY = b"sealtorch/v1 header mac key"
LABEL_COMMITMENT = b"sealtorch/v1 key commitment"


def file_key_info(
    *, version: int, model_id: str, key_version: int, cipher: int, chunk_size: int
) -> bytes:
    """The HKDF ``info`` of the file key: label and length-prefixed binding of the parameters."""
    mid = model_id.encode("utf-8")
    return (
        LABEL_FILE_KEY
        + struct.pack(">HHII", version, cipher, chunk_size, key_version)
        + struct.pack(">H", len(mid))
        + mid
    )


def _derive_file_key(
    model_key: Secret,
    *,
    salt: bytes,
    model_id: str,
    key_version: int,
    chunk_size: int,
    version: int = FORMAT_VERSION,
    cipher: int = CIPHER_AES256GCM_STREAM,
) -> Secret:
    if len(model_key) != MODEL_KEY_BYTES:
        raise WrongKeyError("a model key must be exactly 32 bytes")
    info = file_key_info(
        version=version,
        model_id=model_id,
        key_version=key_version,
        cipher=cipher,
        chunk_size=chunk_size,
    )
    out = bytearray(FILE_KEY_BYTES)
    HKDF(algorithm=hashes.SHA256(), length=FILE_KEY_BYTES, salt=salt, info=info).derive_into(
        model_key.view(), out
    )
    return Secret.take(out)


def derive_file_key(model_key: ModelKey | Secret, header: Header) -> Secret:
    """Derive the 32-byte file key of the file with ``header`` from its model key.

    With a :class:`ModelKey`, its model id and key version must be the header's
    (:class:`KeyMismatchError` otherwise). A bare :class:`Secret` is trusted to be the right one.
    """
    if isinstance(model_key, ModelKey):
        if model_key.model_id != header.model_id:
            raise rules.KEY_MATCH.fail(
                "the key is for another model id than the sealed file; use the file's key "
                "(see `sealtorch inspect` for its model id)"
            )
        if model_key.key_version != header.key_version:
            raise rules.KEY_MATCH.fail(
                f"the key has key version {model_key.key_version} but the file was sealed "
                f"with key version {header.key_version}"
            )
        secret = model_key.key
    else:
        secret = model_key
    return _derive_file_key(
        secret,
        salt=header.file_salt,
        model_id=header.model_id,
        key_version=header.key_version,
        chunk_size=header.chunk_size,
        version=header.version,
        cipher=header.cipher,
    )


def _expand(file_key: Secret, label: bytes, length: int = 32) -> Secret:
    out = bytearray(length)
    HKDFExpand(algorithm=hashes.SHA256(), length=length, info=label).derive_into(
        file_key.view(), out
    )
    return Secret.take(out)


@dataclass(frozen=True)
class FileKeys:
    """The keys a file key expands to; wipe them with :meth:`wipe` when done."""

    chunk_key: Secret
    index_key: Secret
    header_mac_key: Secret
    commitment: bytes

    def wipe(self) -> None:
        self.chunk_key.wipe()
        self.index_key.wipe()
        self.header_mac_key.wipe()

    def __repr__(self) -> str:
        return "FileKeys(<redacted>)"


def expand_file_key(file_key: Secret) -> FileKeys:
    """Expand the file key into the chunk, index and header-MAC keys and the key commitment."""
    if len(file_key) != FILE_KEY_BYTES:
        raise WrongKeyError("a file key must be exactly 32 bytes")
    commitment = _expand(file_key, LABEL_COMMITMENT, COMMITMENT_BYTES)
    try:
        value = bytes(commitment)
    finally:
        commitment.wipe()
    return FileKeys(
        chunk_key=_expand(file_key, LABEL_CHUNK_KEY),
        index_key=_expand(file_key, LABEL_INDEX_KEY),
        header_mac_key=_expand(file_key, LABEL_HEADER_MAC_KEY),
        commitment=value,
    )


def header_mac(mac_key: Secret, mac_input: bytes) -> bytes:
    """HMAC-SHA256 of the header fields."""
    h = crypto_hmac.HMAC(mac_key.view(), hashes.SHA256())
    h.update(mac_input)
    return h.finalize()


def check_file_key(file_key: Secret, header: Header) -> FileKeys:
    """Check the key commitment (wrong key) and then the header MAC (tampered header).

    Returns the expanded keys so the caller does not derive them twice.
    """
    keys = expand_file_key(file_key)
    if not hmac.compare_digest(keys.commitment, header.key_commitment):
        keys.wipe()
        raise rules.KEY_COMMITMENT.fail(
            f"the key does not open this file (key commitment mismatch for model "
            f"{header.model_id!r}, key version {header.key_version}); use the right key file"
        )
    if not hmac.compare_digest(header_mac(keys.header_mac_key, header.mac_input), header.mac):
        keys.wipe()
        raise rules.HEADER_MAC.fail(
            "header MAC does not verify: the header was modified after sealing"
        )
    return keys


@runtime_checkable
class KeyProvider(Protocol):
    """Gives the file key for a sealed file's public header.

    The loader owns the returned :class:`Secret` and wipes it when it is done.
    """

    def file_key(self, header: Header) -> Secret: ...


class KeyFileProvider:
    """A :class:`KeyProvider` that derives file keys locally from a model key (owner side)."""

    def __init__(self, model_key: ModelKey) -> None:
        self._model_key = model_key

    def __repr__(self) -> str:
        return f"KeyFileProvider(model_id={self._model_key.model_id!r}, key=<redacted>)"

    def file_key(self, header: Header) -> Secret:
        return derive_file_key(self._model_key, header)
