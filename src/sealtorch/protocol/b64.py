"""Strict base64 (RFC 4648 standard alphabet, padded, canonical) with size limits."""

from __future__ import annotations

import base64
import binascii

from sealtorch.errors import ProtocolError


def b64e(data: bytes | bytearray | memoryview) -> str:
    """Standard padded base64 as ASCII text."""
    return base64.b64encode(bytes(data)).decode("ascii")


def b64d(value: object, *, field: str, max_len: int, exact_len: int | None = None) -> bytes:
    """Decode strict, canonical base64 from ``value``; never echoes the rejected input."""
    if not isinstance(value, str):
        raise ProtocolError(f"{field}: expected a base64 string")
    if len(value) > 4 * ((max_len + 2) // 3):
        raise ProtocolError(f"{field}: longer than the limit of {max_len} bytes")
    try:
        raw = base64.b64decode(value.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError, ValueError) as e:
        raise ProtocolError(f"{field}: not strict base64 (standard alphabet, padded)") from e
    if base64.b64encode(raw).decode("ascii") != value:
        raise ProtocolError(f"{field}: non-canonical base64 encoding")
    if exact_len is not None and len(raw) != exact_len:
        raise ProtocolError(f"{field}: must decode to exactly {exact_len} bytes")
    if len(raw) > max_len:
        raise ProtocolError(f"{field}: longer than the limit of {max_len} bytes")
    return raw
