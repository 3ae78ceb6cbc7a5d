"""Build sealed format v1 files byte by byte, from docs/format.md and `cryptography` alone.

A second writer, independent of sealtorch's: the conformance generator uses it to write valid
files and files that break exactly one reader rule. Every knob a defect needs is a field of
:class:`Recipe`; whatever a defect does not touch is computed as a correct writer would (so
every MAC, tag and signature of an invalid file is valid unless the defect is about it).
Randomness (salt, index nonce) comes from the caller's seeded RNG, so output is reproducible.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import random
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF, HKDFExpand
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

MAGIC = b"SEALTRCH"
ITEMSIZE = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
    "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1,
    "F8_E4M3FNUZ": 1, "F8_E5M2FNUZ": 1, "C64": 8,
}  # fmt: skip


def canonical(obj: Any) -> bytes:
    """Canonical JSON as docs/format.md defines it."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


@dataclass(frozen=True)
class Key:
    """A model key as a key file holds it."""

    model_id: str
    key_version: int
    key: bytes


@dataclass(frozen=True)
class Tensor:
    """A stored tensor (``data`` is its little-endian bytes) or, with ``alias_of``, an alias."""

    name: str
    dtype: str = ""
    shape: tuple[int, ...] = ()
    data: bytes = b""
    alias_of: str | None = None


@dataclass
class Layout:
    """Where the parts of a built file lie (for defects that edit finished bytes)."""

    header_length: int
    index_length: int
    chunk_offsets: list[int]  # file offset of each chunk (ciphertext || tag)
    chunk_lengths: list[int]  # ciphertext + tag bytes of each chunk
    offsets: dict[str, int]  # stream offset of each stored tensor


@dataclass
class Recipe:
    """A file to build; the fields after ``layout`` are deliberate defects (default: none)."""

    key: Key
    tensors: list[Tensor]
    chunk_size: int = 256
    public_index: bool = False
    signer: Ed25519PrivateKey | None = None
    metadata: dict[str, str] = field(default_factory=dict)
    layout: list[str] | None = None  # stream order of stored tensors (default: listing order)
    index_json: Callable[[dict[str, Any]], bytes] | None = None  # the index bytes from its doc
    stream: Callable[[bytearray], bytearray] | None = None  # edits the plaintext stream
    header: dict[str, int] = field(default_factory=dict)  # field values, before the MAC
    model_id: bytes | None = None  # header model id bytes
    last_flags: dict[int, int] = field(default_factory=dict)  # chunk index -> AAD flag byte
    chunk_nonce: Callable[[int], int] | None = None  # chunk index -> index in the nonce
    signed_message: Callable[[bytes], bytes] | None = None  # edits the signed message
    trailer_public: bytes | None = None  # public key written in the trailer
    finish: Callable[[bytearray, Layout], bytearray] | None = None  # edits the file bytes


def stream_of(tensors: list[Tensor], order: list[str] | None) -> tuple[bytearray, dict[str, int]]:
    """The plaintext stream: stored tensors packed in ``order``, 64-byte aligned, zero padded."""
    stored = {t.name: t for t in tensors if t.alias_of is None}
    offsets: dict[str, int] = {}
    stream = bytearray()
    for name in order or list(stored):
        t = stored[name]
        if not t.data:
            offsets[name] = 0
            continue
        start = -(-len(stream) // 64) * 64
        stream += bytes(start - len(stream)) + t.data
        offsets[name] = start
    return stream, offsets


def index_doc(r: Recipe, offsets: dict[str, int]) -> dict[str, Any]:
    """The index object for ``r``'s tensors at ``offsets``."""
    items: list[dict[str, Any]] = []
    for t in r.tensors:
        if t.alias_of is not None:
            items.append({"alias_of": t.alias_of, "name": t.name})
        else:
            items.append(
                {"dtype": t.dtype, "name": t.name, "offset": offsets[t.name], "shape": [*t.shape]}
            )
    return {"format": "sealtorch-index/v1", "metadata": dict(r.metadata), "tensors": items}


def _expand(fk: bytes, label: bytes) -> bytes:
    return HKDFExpand(hashes.SHA256(), 32, label).derive(fk)


def build(r: Recipe, rng: random.Random) -> tuple[bytes, Layout, dict[str, Any]]:
    """The file ``r`` describes, where its parts lie, and its index object (before edits)."""
    stream, offsets = stream_of(r.tensors, r.layout)
    doc = index_doc(r, offsets)
    index_json = r.index_json(doc) if r.index_json else canonical(doc)
    if r.stream:
        stream = r.stream(stream)
    total = len(stream)
    cs = r.chunk_size
    count = max(1, -(-total // cs))
    mid = r.model_id if r.model_id is not None else r.key.model_id.encode()
    flags = (1 if r.public_index else 0) | (2 if r.signer else 0)
    index_length = len(index_json) + (32 if r.public_index else 12 + 16)
    f = {
        "version": 1, "header_length": 146 + len(mid), "cipher": 1, "flags": flags,
        "chunk_size": cs, "key_version": r.key.key_version, "chunk_count": count,
        "total_length": total, "index_length": index_length, "model_id_length": len(mid),
    }  # fmt: skip
    f.update(r.header)
    salt = rng.randbytes(32)
    info = (
        b"sealtorch/v1 file key"
        + struct.pack(">HHII", f["version"], f["cipher"], f["chunk_size"], f["key_version"])
        + struct.pack(">H", len(mid))
        + mid
    )
    fk = HKDF(hashes.SHA256(), 32, salt, info).derive(r.key.key)
    fields = (
        struct.pack(
            ">8sHHHHIIQQQ",
            MAGIC, f["version"], f["header_length"], f["cipher"], f["flags"], f["chunk_size"],
            f["key_version"], f["chunk_count"], f["total_length"], f["index_length"],
        )
        + salt
        + _expand(fk, b"sealtorch/v1 key commitment")
        + struct.pack(">H", f["model_id_length"])
        + mid
    )
    mac_key = _expand(fk, b"sealtorch/v1 header mac key")
    header = fields + hmac.new(mac_key, fields, "sha256").digest()
    hd = hashlib.sha256(header).digest()
    index_key = _expand(fk, b"sealtorch/v1 index key")
    if r.public_index:
        section = index_json + hmac.new(index_key, hd + index_json, "sha256").digest()
    else:
        nonce = rng.randbytes(12)
        section = nonce + AESGCM(index_key).encrypt(nonce, index_json, hd)
    aead = AESGCM(_expand(fk, b"sealtorch/v1 chunk key"))
    out = bytearray(header + section)
    chunk_offsets, chunk_lengths, tags = [], [], b""
    for i in range(count):
        last = r.last_flags.get(i, 1 if i == count - 1 else 0)
        n = r.chunk_nonce(i) if r.chunk_nonce else i
        ct = aead.encrypt(
            struct.pack(">Q", n) + bytes(4), bytes(stream[i * cs : (i + 1) * cs]),
            hd + struct.pack(">QB", i, last),
        )  # fmt: skip
        chunk_offsets.append(len(out))
        chunk_lengths.append(len(ct))
        tags += ct[-16:]
        out += ct
    if r.signer is not None:
        message = (
            b"sealtorch/v1 signature\x00"
            + hd
            + hashlib.sha256(section).digest()
            + hashlib.sha256(tags).digest()
        )
        if r.signed_message:
            message = r.signed_message(message)
        public = r.signer.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
        out += (r.trailer_public or public) + r.signer.sign(message)
    layout = Layout(len(header), len(section), chunk_offsets, chunk_lengths, offsets)
    if r.finish:
        out = r.finish(out, layout)
    return bytes(out), layout, doc


def key_file(k: Key, created: str) -> bytes:
    """A ``sealtorch-key/v1`` key file for ``k``."""
    import base64

    doc = {
        "created": created,
        "format": "sealtorch-key/v1",
        "key": base64.b64encode(k.key).decode(),
        "key_version": k.key_version,
        "model_id": k.model_id,
    }
    return (json.dumps(doc, indent=2, sort_keys=True) + "\n").encode()
