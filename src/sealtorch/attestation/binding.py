"""Report-data binding: tie evidence to one nonce, one ephemeral public key and one audience.

``report_data = SHA-512(lp("sealtorch/v1") || lp(role) || lp(nonce) || lp(kem_id) ||
lp(public_key) || lp(audience))`` where ``lp(x)`` is a 4-byte big-endian length then ``x``; the
length prefixes make the encoding unambiguous (no two field splits give the same bytes).
"""

from __future__ import annotations

import hashlib
import hmac
from typing import TYPE_CHECKING

from sealtorch.errors import BindingError

if TYPE_CHECKING:
    from sealtorch.attestation.claims import Claims

LABEL = b"sealtorch/v1"
ROLES = ("remote", "local")
KEM_X25519_SHA256 = 0x0020
KEM_IDS = (KEM_X25519_SHA256,)
NONCE_LEN = 32
PUBLIC_KEY_LEN = {KEM_X25519_SHA256: 32}
AUDIENCE_LEN = 32


def _lp(data: bytes) -> bytes:
    return len(data).to_bytes(4, "big") + data


def encode(role: str, nonce: bytes, kem_id: int, public_key: bytes, audience: bytes) -> bytes:
    """The length-prefixed encoding that is hashed (validated; exposed for tests)."""
    if role not in ROLES:
        raise BindingError(f"binding role must be one of {', '.join(ROLES)}")
    if not isinstance(nonce, bytes | bytearray) or len(nonce) != NONCE_LEN:
        raise BindingError(f"binding nonce must be {NONCE_LEN} bytes")
    if kem_id not in KEM_IDS:
        raise BindingError("binding KEM id is not supported (only 0x0020, X25519-HKDF-SHA256)")
    if not isinstance(public_key, bytes | bytearray) or len(public_key) != PUBLIC_KEY_LEN[kem_id]:
        raise BindingError(f"binding public key must be {PUBLIC_KEY_LEN[kem_id]} bytes")
    if not isinstance(audience, bytes | bytearray) or len(audience) != AUDIENCE_LEN:
        raise BindingError(f"binding audience must be a {AUDIENCE_LEN}-byte digest")
    return b"".join(
        (
            _lp(LABEL),
            _lp(role.encode("ascii")),
            _lp(bytes(nonce)),
            _lp(kem_id.to_bytes(2, "big")),
            _lp(bytes(public_key)),
            _lp(bytes(audience)),
        )
    )


def report_data(role: str, nonce: bytes, kem_id: int, public_key: bytes, audience: bytes) -> bytes:
    """The 64-byte report data a requester asks its attester for."""
    return hashlib.sha512(encode(role, nonce, kem_id, public_key, audience)).digest()


def check(
    claims: Claims | bytes,
    *,
    role: str,
    nonce: bytes,
    kem_id: int,
    public_key: bytes,
    audience: bytes,
) -> None:
    """Recompute the binding and compare it with the evidence's report data in constant time.

    Accepts verified :class:`Claims` (or their raw 64-byte report data); raises
    :class:`BindingError` when they differ.
    """
    got = claims if isinstance(claims, bytes | bytearray) else claims.report_data
    expected = report_data(role, nonce, kem_id, public_key, audience)
    if len(got) != len(expected) or not hmac.compare_digest(bytes(got), expected):
        raise BindingError(
            "evidence report data does not bind this nonce, role, public key and audience; "
            "request a fresh nonce and attest again"
        )
