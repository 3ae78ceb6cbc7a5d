"""The per-chunk nonce and AAD of the STREAM construction and the public index's MAC
(docs/format.md sections 4.1 and 5): one definition that the writer and the reader both use."""

from __future__ import annotations

import struct

from sealtorch._secret import Secret
from sealtorch.format import keys as fkeys


def chunk_nonce(i: int) -> bytes:
    """Nonce of chunk ``i``: 64-bit big-endian index || 4 zero bytes."""
    return struct.pack(">Q", i) + b"\x00\x00\x00\x00"


def chunk_aad(header_digest: bytes, i: int, last: bool) -> bytes:
    """AAD of chunk ``i``: SHA-256(header) || 64-bit big-endian index || last-chunk flag."""
    return header_digest + struct.pack(">QB", i, 1 if last else 0)


def public_index_mac(index_key: Secret, header_digest: bytes, index_json: bytes) -> bytes:
    """HMAC-SHA256 that authenticates a public index."""
    return fkeys.header_mac(index_key, header_digest + index_json)
