"""The public header of a sealed file: what anyone can read, authenticated by a MAC.

Byte layout (big-endian integers), documented in docs/format.md::

    0   8  magic "SEALTRCH"
    8   2  format version (1)
    10  2  header length H, including the MAC
    12  2  cipher (1 = AES-256-GCM, STREAM chunks)
    14  2  flags (bit 0 public index, bit 1 owner signature)
    16  4  chunk size
    20  4  key version
    24  8  chunk count
    32  8  total length (plaintext tensor-data bytes)
    40  8  index length (bytes of the index section)
    48 32  file salt
    80 32  key commitment
    112 2  model id length L
    114 L  model id (UTF-8)
    114+L 32 header MAC: HMAC-SHA256(header MAC key, bytes 0 .. 114+L)
"""

from __future__ import annotations

import hashlib
import os
import struct
from dataclasses import dataclass
from pathlib import Path

from sealtorch.errors import FormatError, HeaderError
from sealtorch.format import rules
from sealtorch.ids import MODEL_ID_MAX, MODEL_ID_RULE, is_model_id

MAGIC = b"SEALTRCH"
FORMAT_VERSION = 1
CIPHER_AES256GCM_STREAM = 1
CIPHER_NAMES = {CIPHER_AES256GCM_STREAM: "AES-256-GCM-STREAM"}

FLAG_PUBLIC_INDEX = 0x0001
FLAG_SIGNED = 0x0002
KNOWN_FLAGS = FLAG_PUBLIC_INDEX | FLAG_SIGNED

SALT_BYTES = 32
COMMITMENT_BYTES = 32
MAC_BYTES = 32
TAG_BYTES = 16
SIGNATURE_TRAILER_BYTES = 32 + 64  # Ed25519 public key || signature

MIN_CHUNK_SIZE = 256
MAX_CHUNK_SIZE = 1 << 30
MAX_INDEX_LENGTH = 64 << 20
MAX_TOTAL_LENGTH = 1 << 50

INDEX_NONCE_BYTES = 12  # an encrypted index section starts with its GCM nonce

_FIXED = struct.Struct(">8sHHHHIIQQQ32s32sH")  # up to and including the model id length
FIXED_BYTES = _FIXED.size  # 114
MIN_HEADER_BYTES = FIXED_BYTES + 1 + MAC_BYTES  # 147
MAX_HEADER_BYTES = FIXED_BYTES + MODEL_ID_MAX + MAC_BYTES  # 274


def chunk_count_for(total_length: int, chunk_size: int) -> int:
    """Number of chunks for ``total_length`` plaintext bytes (at least one, possibly empty)."""
    return max(1, -(-total_length // chunk_size))


@dataclass(frozen=True)
class Header:
    """A parsed, not yet authenticated header; ``raw`` is its exact bytes (MAC included)."""

    version: int
    cipher: int
    flags: int
    chunk_size: int
    key_version: int
    chunk_count: int
    total_length: int
    index_length: int
    file_salt: bytes
    key_commitment: bytes
    model_id: str
    mac: bytes
    raw: bytes

    @property
    def header_length(self) -> int:
        return len(self.raw)

    @property
    def public_index(self) -> bool:
        return bool(self.flags & FLAG_PUBLIC_INDEX)

    @property
    def signed(self) -> bool:
        return bool(self.flags & FLAG_SIGNED)

    @property
    def cipher_name(self) -> str:
        return CIPHER_NAMES[self.cipher]

    @property
    def mac_input(self) -> bytes:
        """The bytes the header MAC covers: every header byte before the MAC."""
        return self.raw[:-MAC_BYTES]

    @property
    def chunks_offset(self) -> int:
        """File offset of chunk 0."""
        return self.header_length + self.index_length

    def chunk_plain_length(self, i: int) -> int:
        """Plaintext length of chunk ``i``."""
        if i < self.chunk_count - 1:
            return self.chunk_size
        return self.total_length - (self.chunk_count - 1) * self.chunk_size

    def chunk_offset(self, i: int) -> int:
        """File offset of chunk ``i`` (ciphertext followed by its 16-byte tag)."""
        return self.chunks_offset + i * (self.chunk_size + TAG_BYTES)

    @property
    def chunks_length(self) -> int:
        return self.total_length + self.chunk_count * TAG_BYTES

    @property
    def file_length(self) -> int:
        """The exact length a file with this header must have."""
        sig = SIGNATURE_TRAILER_BYTES if self.signed else 0
        return self.chunks_offset + self.chunks_length + sig

    def digest(self) -> bytes:
        """SHA-256 of the exact header bytes (bound into every chunk's AAD)."""
        return hashlib.sha256(self.raw).digest()

    def describe(self) -> dict[str, object]:
        """JSON-safe summary of the public fields (for ``sealtorch inspect``)."""
        return {
            "format_version": self.version,
            "model_id": self.model_id,
            "key_version": self.key_version,
            "cipher": self.cipher_name,
            "chunk_size": self.chunk_size,
            "chunk_count": self.chunk_count,
            "total_length": self.total_length,
            "index_length": self.index_length,
            "public_index": self.public_index,
            "signed": self.signed,
            "file_salt": self.file_salt.hex(),
            "header_sha256": self.digest().hex(),
            "file_length": self.file_length,
        }


def encode_header_fields(
    *,
    flags: int,
    chunk_size: int,
    key_version: int,
    chunk_count: int,
    total_length: int,
    index_length: int,
    file_salt: bytes,
    key_commitment: bytes,
    model_id: str,
) -> bytes:
    """Encode every header field except the MAC (the MAC is appended by the writer)."""
    mid = model_id.encode("utf-8")
    fixed = _FIXED.pack(
        MAGIC,
        FORMAT_VERSION,
        FIXED_BYTES + len(mid) + MAC_BYTES,
        CIPHER_AES256GCM_STREAM,
        flags,
        chunk_size,
        key_version,
        chunk_count,
        total_length,
        index_length,
        file_salt,
        key_commitment,
        len(mid),
    )
    return fixed + mid


def header_length_from_prefix(prefix: bytes | memoryview) -> int:
    """Check magic, version and header length in the first 12 bytes (R-1 .. R-4)."""
    prefix = bytes(prefix[:12])
    if len(prefix) < 8 or prefix[:8] != MAGIC:
        raise rules.MAGIC.fail(
            "not a sealtorch sealed file (magic bytes missing); seal it with `sealtorch seal`"
        )
    if len(prefix) < 12:
        raise rules.PREFIX.fail("the file ends inside the header (truncated copy?)")
    version, length = struct.unpack(">HH", prefix[8:12])
    if version != FORMAT_VERSION:
        raise rules.VERSION.fail(
            f"sealed format version {version} is not supported by this release (reads "
            f"version {FORMAT_VERSION}); upgrade sealtorch"
        )
    if not MIN_HEADER_BYTES <= length <= MAX_HEADER_BYTES:
        raise rules.HEADER_LENGTH.fail(
            f"header length field is out of range ({MIN_HEADER_BYTES} .. {MAX_HEADER_BYTES})"
        )
    return length


def parse_header(raw: bytes | memoryview) -> Header:
    """Parse exactly one header (R-1 .. R-14: structure and consistency, not the MAC).

    ``raw`` must be the whole header; a file reader checks that the file holds it first
    (:func:`read_header_bytes`).
    """
    raw = bytes(raw)
    length = header_length_from_prefix(raw)
    if len(raw) < length:
        raise HeaderError("header is truncated: fewer bytes than its header length field says")
    if len(raw) > length:
        raise HeaderError("header bytes are longer than their header length field says")
    (
        _magic,
        version,
        _length,
        cipher,
        flags,
        chunk_size,
        key_version,
        chunk_count,
        total_length,
        index_length,
        salt,
        commitment,
        mid_len,
    ) = _FIXED.unpack_from(raw)
    if cipher not in CIPHER_NAMES:
        raise rules.CIPHER.fail(
            f"cipher id {cipher} is not supported by this release; upgrade sealtorch"
        )
    if flags & ~KNOWN_FLAGS:
        raise rules.FLAGS.fail("header has unknown flags; upgrade sealtorch")
    if FIXED_BYTES + mid_len + MAC_BYTES != length:
        raise rules.MODEL_ID_LENGTH.fail("header model id length does not match the header length")
    if not MIN_CHUNK_SIZE <= chunk_size <= MAX_CHUNK_SIZE:
        raise rules.CHUNK_SIZE.fail(
            f"header chunk size is out of range ({MIN_CHUNK_SIZE} .. {MAX_CHUNK_SIZE})"
        )
    if key_version == 0:
        raise rules.KEY_VERSION.fail("header key version must be at least 1")
    if total_length > MAX_TOTAL_LENGTH:
        raise rules.TOTAL_LENGTH.fail("header total length is out of range (at most 2^50)")
    if chunk_count != chunk_count_for(total_length, chunk_size):
        raise rules.CHUNK_COUNT.fail(
            "header chunk count does not match its total length and chunk size"
        )
    least = MAC_BYTES if flags & FLAG_PUBLIC_INDEX else INDEX_NONCE_BYTES + TAG_BYTES
    if not least < index_length <= MAX_INDEX_LENGTH:
        raise rules.INDEX_LENGTH.fail(
            f"header index length is out of range ({least + 1} .. {MAX_INDEX_LENGTH} for "
            "this index mode)"
        )
    model_id = raw[FIXED_BYTES : FIXED_BYTES + mid_len].decode("latin-1")
    if not is_model_id(model_id):
        raise rules.MODEL_ID.fail(f"header model id is not a valid model id ({MODEL_ID_RULE})")
    return Header(
        version=version,
        cipher=cipher,
        flags=flags,
        chunk_size=chunk_size,
        key_version=key_version,
        chunk_count=chunk_count,
        total_length=total_length,
        index_length=index_length,
        file_salt=salt,
        key_commitment=commitment,
        model_id=model_id,
        mac=raw[-MAC_BYTES:],
        raw=raw,
    )


def read_header_bytes(fd: int, size: int) -> bytes:
    """The header bytes of the open file ``fd`` of ``size`` bytes (R-1 .. R-5)."""
    length = header_length_from_prefix(os.pread(fd, 12, 0))
    if size < length:
        raise rules.HEADER_PRESENT.fail("the file ends inside the header (truncated copy?)")
    return os.pread(fd, length, 0)


def read_header(path: str | os.PathLike[str]) -> Header:
    """Read and parse the header of the sealed file at ``path`` (without authenticating it)."""
    p = Path(path)
    try:
        fd = os.open(p, os.O_RDONLY)
    except OSError as e:
        raise FormatError(f"{p}: cannot open sealed file ({e.strerror})") from None
    try:
        raw = read_header_bytes(fd, os.fstat(fd).st_size)
    except OSError as e:
        raise FormatError(f"{p}: cannot read sealed file ({e.strerror})") from None
    finally:
        os.close(fd)
    return parse_header(raw)
