"""Seal tensors into a sealed file (format v1, see docs/format.md).

Tensors are laid out back to back (each aligned to 64 bytes) in one plaintext stream that is
encrypted in fixed-size AES-256-GCM chunks. The file is written to a temporary name in the
target directory and renamed into place only when complete.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from sealtorch._outputs import output_file, staged, write_all
from sealtorch._secret import wipe
from sealtorch.errors import IndexError_, InputError
from sealtorch.format import header as hdr
from sealtorch.format import keys as fkeys
from sealtorch.format.dtypes import dtype_name
from sealtorch.format.index import Entry, Index, align, parse_index
from sealtorch.format.inputs import collect
from sealtorch.format.keyfile import ModelKey, read_key_file
from sealtorch.format.signing import load_signing_key, raw_public, signed_message
from sealtorch.format.stream import chunk_aad, chunk_nonce, public_index_mac

DEFAULT_CHUNK_SIZE = 4 << 20
INDEX_NONCE_BYTES = hdr.INDEX_NONCE_BYTES


def _as_bytes_view(t: torch.Tensor) -> np.ndarray:
    """The tensor's bytes as a flat uint8 numpy array (a copy only if it is not contiguous)."""
    flat = t.contiguous().reshape(-1)
    return flat.view(torch.uint8).numpy()


def _layout(tensors: dict[str, torch.Tensor]) -> list[Entry]:
    """Offsets in the plaintext stream: largest tensors first, each 64-byte aligned.

    Largest first, so most chunks lie inside one tensor (decrypted in one call straight into
    it) and the many small tensors (norms, biases) share the last chunks: a loader can start
    decrypting the big leading chunks while it still prepares the small destinations.
    """
    entries = []
    offset = 0
    sizes = {name: t.numel() * t.element_size() for name, t in tensors.items()}
    for name in sorted(sizes, key=lambda n: -sizes[n]):  # stable: ties keep their order
        t, nbytes = tensors[name], sizes[name]
        start = align(offset) if nbytes else 0  # zero-size tensors own no bytes
        entries.append(Entry(name, dtype_name(t.dtype), tuple(t.shape), start, nbytes))
        if nbytes:
            offset = start + nbytes
    return entries


def _check_bool_values(tensors: dict[str, torch.Tensor]) -> None:
    """Refuse a bool tensor whose storage holds a byte other than 0 or 1 (readers refuse it)."""
    for name, t in tensors.items():
        if t.dtype is torch.bool and t.numel() and bool((t.view(torch.uint8) > 1).any()):
            raise InputError(
                f"bool tensor {name!r} holds bytes other than 0 and 1 (made by reinterpreting "
                "other bytes as bool?); normalize it with `t != 0` before sealing"
            )


def seal(
    obj: Any,
    path: str | os.PathLike[str],
    key: ModelKey | str | os.PathLike[str],
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    public_index: bool = False,
    sign_key: Ed25519PrivateKey | str | os.PathLike[str] | None = None,
    metadata: dict[str, str] | None = None,
    progress: Callable[[int, int], None] | None = None,
    overwrite: bool = False,
) -> hdr.Header:
    """Seal ``obj`` (nn.Module, state_dict, or a .pt/.pth/.safetensors path) to ``path``.

    ``key`` is a :class:`ModelKey` or a key file path. ``progress(done, total)`` is called with
    plaintext bytes after each chunk. An existing ``path`` (also a symlink) is replaced only
    with ``overwrite=True``. Returns the new file's header.
    """
    output_file(path, overwrite=overwrite, flag="--force (overwrite=True)")
    mk = key if isinstance(key, ModelKey) else read_key_file(key)
    if (
        not isinstance(chunk_size, int)
        or not hdr.MIN_CHUNK_SIZE <= chunk_size <= hdr.MAX_CHUNK_SIZE
    ):
        raise InputError(
            f"chunk size must be between {hdr.MIN_CHUNK_SIZE} and {hdr.MAX_CHUNK_SIZE} bytes"
        )
    signer: Ed25519PrivateKey | None
    if sign_key is None or isinstance(sign_key, Ed25519PrivateKey):
        signer = sign_key
    else:
        signer = load_signing_key(sign_key)
    collected = collect(obj)
    meta = dict(collected.metadata)
    if metadata:
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
            raise InputError("metadata must map strings to strings")
        meta.update(metadata)
    _check_bool_values(collected.tensors)
    entries = _layout(collected.tensors)
    index = Index({e.name: e for e in entries}, collected.aliases, meta, collected.order)
    total = index.total_length
    chunk_count = hdr.chunk_count_for(total, chunk_size)
    index_json = index.to_json()
    try:  # what a reader would refuse is never written: the reader's own rules decide
        parse_index(index_json, total)
    except IndexError_ as e:
        raise InputError(f"cannot seal this input: {e}") from None
    if public_index:
        index_length = len(index_json) + hdr.MAC_BYTES
    else:
        index_length = INDEX_NONCE_BYTES + len(index_json) + hdr.TAG_BYTES
    if index_length > hdr.MAX_INDEX_LENGTH:
        raise InputError("too many tensors: the tensor index exceeds 64 MiB")

    salt = os.urandom(hdr.SALT_BYTES)
    file_key = fkeys._derive_file_key(
        mk.key, salt=salt, model_id=mk.model_id, key_version=mk.key_version, chunk_size=chunk_size
    )
    keys = fkeys.expand_file_key(file_key)
    file_key.wipe()
    flags = (hdr.FLAG_PUBLIC_INDEX if public_index else 0) | (hdr.FLAG_SIGNED if signer else 0)
    try:
        fields = hdr.encode_header_fields(
            flags=flags,
            chunk_size=chunk_size,
            key_version=mk.key_version,
            chunk_count=chunk_count,
            total_length=total,
            index_length=index_length,
            file_salt=salt,
            key_commitment=keys.commitment,
            model_id=mk.model_id,
        )
        header = hdr.parse_header(fields + fkeys.header_mac(keys.header_mac_key, fields))
        digest = header.digest()
        if public_index:
            index_section = index_json + public_index_mac(keys.index_key, digest, index_json)
        else:
            nonce = os.urandom(INDEX_NONCE_BYTES)
            index_section = nonce + AESGCM(keys.index_key.view()).encrypt(nonce, index_json, digest)
        _write(
            Path(path), header, index_section, collected.tensors, entries, keys, signer, progress,
            overwrite,
        )
    finally:
        keys.wipe()
    return header


def _write(
    path: Path,
    header: hdr.Header,
    index_section: bytes,
    tensors: dict[str, torch.Tensor],
    entries: list[Entry],
    keys: fkeys.FileKeys,
    signer: Ed25519PrivateKey | None,
    progress: Callable[[int, int], None] | None,
    overwrite: bool,
) -> None:
    digest = header.digest()
    aead = AESGCM(keys.chunk_key.view())
    cs = header.chunk_size
    plain = bytearray(min(cs, max(header.total_length, 1)))
    cipher = bytearray(len(plain) + hdr.TAG_BYTES)
    tags = hashlib.sha256()
    try:
        with staged(path, overwrite=overwrite) as (fd, _):
            os.fchmod(fd, 0o644)
            write_all(fd, header.raw)
            write_all(fd, index_section)
            views = [(e, _as_bytes_view(tensors[e.name])) for e in entries if e.nbytes]
            pos = 0  # next entry that may overlap the current chunk
            for i in range(header.chunk_count):
                start = i * cs
                n = header.chunk_plain_length(i)
                buf = np.frombuffer(plain, dtype=np.uint8, count=n)
                buf[:] = 0
                while pos < len(views) and views[pos][0].end <= start:
                    pos += 1
                j = pos
                while j < len(views) and views[j][0].offset < start + n:
                    e, src = views[j]
                    a, b = max(e.offset, start), min(e.end, start + n)
                    buf[a - start : b - start] = src[a - e.offset : b - e.offset]
                    j += 1
                last = i == header.chunk_count - 1
                out = memoryview(cipher)[: n + hdr.TAG_BYTES]
                aead.encrypt_into(
                    chunk_nonce(i), memoryview(plain)[:n], chunk_aad(digest, i, last), out
                )
                tags.update(out[n:])
                write_all(fd, out)
                if progress is not None:
                    progress(start + n, header.total_length)
            if signer is not None:
                message = signed_message(
                    digest, hashlib.sha256(index_section).digest(), tags.digest()
                )
                write_all(fd, raw_public(signer.public_key()) + signer.sign(message))
    finally:
        wipe(plain)
