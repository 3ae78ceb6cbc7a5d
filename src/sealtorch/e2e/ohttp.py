"""Oblivious-HTTP-style encapsulation of inference requests and responses (RFC 9458 layout).

Request (``message/ohttp-req``), as RFC 9458 section 4.3 lays it out::

    hdr     = key_id (1) || kem_id (2) || kdf_id (2) || aead_id (2)
    info    = "sealtorch/v1 message/oip request" || 0x00 || hdr
              || lp(method) || lp(path) || lp(model)          # the associated data
    enc||ct = HPKE SealBase(pkR, info, aad="", inner)           # cryptography's Suite.encrypt
    request = hdr || enc || ct

    inner   = 0x01 || nonce (16) || timestamp_ms (8) || response_secret (32) || OIP JSON body

Response (``message/ohttp-res``), as RFC 9458 section 4.4 lays it out, except that ``secret`` is
the client's per-request ``response_secret`` carried inside the request instead of an HPKE
exporter secret (``cryptography`` offers single-shot HPKE only, with no exporter)::

    salt    = enc || response_nonce (32 random bytes)
    prk     = HKDF-Extract(salt, secret)
    key     = HKDF-Expand(prk, "key", 32); nonce = HKDF-Expand(prk, "nonce", 12)
    response = response_nonce || AES-256-GCM(key, nonce, aad="", inner)

    inner   = 0x01 || status (2) || receipt length (4) || receipt || OIP JSON body

``lp(x)`` is a 4-byte big-endian length then ``x``. Integers are big-endian. The method, path
and model name are bound through HPKE ``info`` (cryptography's public API has no AAD argument;
``info`` is authenticated just the same, as it enters the key schedule).
"""

from __future__ import annotations

import hmac
import os
import struct
from dataclasses import dataclass, field

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from sealtorch._secret import Secret
from sealtorch.errors import EncapsulationError, ProtocolError
from sealtorch.protocol import hpke

MEDIA_REQUEST = "message/ohttp-req"
MEDIA_RESPONSE = "message/ohttp-res"
#: RFC 9458 ``application/ohttp-keys`` (one key configuration, section 3)
MEDIA_KEYS = "application/ohttp-keys"
INFO_LABEL = b"sealtorch/v1 message/oip request"
VERSION = 1
KEM_ID, KDF_ID, AEAD_ID = hpke.KEM_ID, hpke.KDF_ID, hpke.AEAD_ID
HEADER_LEN = 7
ENC_LEN = 32
TAG_LEN = 16
NONCE_LEN = 16  # the request nonce (also the receipt's eat_nonce)
SECRET_LEN = 32  # Nk of AES-256-GCM; RFC 9458: max(Nn, Nk)
RESPONSE_NONCE_LEN = 32  # RFC 9458: max(Nn, Nk)
AEAD_NONCE_LEN = 12
_INNER_REQ = struct.Struct(">B16sQ32s")
_INNER_RES = struct.Struct(">BHI")
MAX_METHOD, MAX_PATH = 16, 512


def _lp(data: bytes) -> bytes:
    return len(data).to_bytes(4, "big") + data


@dataclass(frozen=True)
class KeyConfig:
    """The server's HPKE key configuration (RFC 9458 section 3: one key, one suite)."""

    key_id: int
    public_key: bytes
    kem_id: int = KEM_ID
    kdf_id: int = KDF_ID
    aead_id: int = AEAD_ID

    def __post_init__(self) -> None:
        if isinstance(self.key_id, bool) or not isinstance(self.key_id, int) or not (
                0 <= self.key_id <= 255):
            raise EncapsulationError("HPKE key id must be an integer 0-255")
        if (self.kem_id, self.kdf_id, self.aead_id) != (KEM_ID, KDF_ID, AEAD_ID):
            raise EncapsulationError(
                "only the HPKE suite DHKEM(X25519, HKDF-SHA256), HKDF-SHA256, AES-256-GCM "
                "(0x0020, 0x0001, 0x0002) is supported")
        if not isinstance(self.public_key, bytes) or len(self.public_key) != hpke.PUBLIC_KEY_LEN:
            raise EncapsulationError(f"HPKE public key must be {hpke.PUBLIC_KEY_LEN} raw bytes")

    def header(self) -> bytes:
        """The 7-byte request header ``hdr``."""
        return struct.pack(">BHHH", self.key_id, self.kem_id, self.kdf_id, self.aead_id)

    def encode(self) -> bytes:
        """The RFC 9458 ``Key Config`` encoding (``application/ohttp-keys`` holds a list)."""
        return (struct.pack(">BH", self.key_id, self.kem_id) + self.public_key
                + struct.pack(">HHH", 4, self.kdf_id, self.aead_id))

    @classmethod
    def decode(cls, raw: bytes) -> KeyConfig:
        """Parse one ``Key Config``; refuses other suites and trailing bytes."""
        n = 3 + hpke.PUBLIC_KEY_LEN
        if not isinstance(raw, bytes) or len(raw) != n + 6:
            raise EncapsulationError("the HPKE key configuration has the wrong length (only "
                                     "X25519 with one symmetric suite is supported)")
        key_id, kem_id = struct.unpack(">BH", raw[:3])
        length, kdf_id, aead_id = struct.unpack(">HHH", raw[n:])
        if length != 4:
            raise EncapsulationError("the HPKE key configuration must list exactly one suite")
        return cls(key_id, raw[3:n], kem_id, kdf_id, aead_id)


def request_info(header: bytes, method: str, path: str, model: str) -> bytes:
    """HPKE ``info`` of a request: label, header and the associated data."""
    parts = []
    for what, v, limit in (("method", method, MAX_METHOD), ("path", path, MAX_PATH),
                           ("model", model, MAX_PATH)):
        if not isinstance(v, str) or not 0 < len(v) <= limit or not v.isascii() or (
                not v.isprintable()):
            raise EncapsulationError(f"request {what} must be 1-{limit} printable ASCII "
                                     "characters")
        parts.append(_lp(v.encode("ascii")))
    return INFO_LABEL + b"\x00" + header + b"".join(parts)


@dataclass
class InnerRequest:
    """A decapsulated request: its nonce and time, the response secret, the OIP body."""

    nonce: bytes
    timestamp_ms: int
    response_secret: Secret = field(repr=False)
    body: bytes = field(repr=False)


@dataclass
class RequestContext:
    """What the client keeps to open the answer to one request (wipe when done)."""

    enc: bytes
    nonce: bytes
    timestamp_ms: int
    response_secret: Secret = field(repr=False)

    def wipe(self) -> None:
        """Zero the response secret."""
        self.response_secret.wipe()


def encapsulate_request(config: KeyConfig, *, method: str, path: str, model: str, body: bytes,
                        timestamp_ms: int) -> tuple[bytes, RequestContext]:
    """Encrypt ``body`` to the server's key; returns the request and the client's context."""
    if isinstance(timestamp_ms, bool) or not 0 <= timestamp_ms < 2**64:
        raise EncapsulationError("request timestamp must be a non-negative 64-bit integer")
    hdr = config.header()
    info = request_info(hdr, method, path, model)
    try:
        pk = hpke.load_public_key(config.public_key)
    except ProtocolError as e:
        raise EncapsulationError(str(e)) from None
    nonce = os.urandom(NONCE_LEN)
    secret = Secret(os.urandom(SECRET_LEN))
    inner = bytearray(_INNER_REQ.size + len(body))  # one copy of the body
    _INNER_REQ.pack_into(inner, 0, VERSION, nonce, timestamp_ms, bytes(secret))
    inner[_INNER_REQ.size:] = body
    try:
        sealed = hpke.SUITE.encrypt(inner, pk, info=info)
    finally:  # the response secret's copy (the body is the caller's own data)
        inner[:_INNER_REQ.size] = bytes(_INNER_REQ.size)
    return hdr + sealed, RequestContext(sealed[:ENC_LEN], nonce, timestamp_ms, secret)


def decapsulate_request(data: bytes, private_key: X25519PrivateKey, config: KeyConfig, *,
                        method: str, path: str, model: str) -> tuple[InnerRequest, bytes]:
    """Open a request made by :func:`encapsulate_request`; returns it and its ``enc``.

    Anything that does not open (another key, another method/path/model, a modified byte)
    raises :class:`EncapsulationError` without saying which part differed.
    """
    if len(data) < HEADER_LEN + ENC_LEN + TAG_LEN + _INNER_REQ.size:
        raise EncapsulationError("the encapsulated request is too short")
    hdr = data[:HEADER_LEN]
    if hdr[0] != config.key_id:
        raise EncapsulationError("the request is encrypted to another key id than this "
                                 "server's; fetch its attestation again")
    if hdr[1:] != config.header()[1:]:
        raise EncapsulationError("the request uses another HPKE suite than this server's")
    info = request_info(hdr, method, path, model)
    try:
        inner = hpke.SUITE.decrypt(memoryview(data)[HEADER_LEN:], private_key, info=info)
    except (InvalidTag, ValueError):
        raise EncapsulationError(
            "the request does not open with this server's key for this method, path and "
            "model (modified, truncated, or sent to another endpoint)") from None
    version, nonce, ts, secret = _INNER_REQ.unpack_from(inner)
    if version != VERSION:
        raise EncapsulationError("unknown inner request version")
    return (InnerRequest(nonce, ts, Secret(secret), inner[_INNER_REQ.size:]),
            bytes(data[HEADER_LEN:HEADER_LEN + ENC_LEN]))


def _response_keys(secret: Secret, enc: bytes, response_nonce: bytes) -> tuple[bytes, bytes]:
    salt = bytes(enc) + response_nonce
    key = HKDF(hashes.SHA256(), SECRET_LEN, salt, b"key").derive(secret.view())
    nonce = HKDF(hashes.SHA256(), AEAD_NONCE_LEN, salt, b"nonce").derive(secret.view())
    return key, nonce


def encapsulate_response(secret: Secret, enc: bytes, *, status: int, body: bytes,
                         receipt: bytes) -> bytes:
    """Encrypt the inner response (status, receipt, body) to the request's response secret."""
    if not 100 <= status <= 599:
        raise EncapsulationError("response status must be an HTTP status code")
    inner = _INNER_RES.pack(VERSION, status, len(receipt)) + receipt + body
    response_nonce = os.urandom(RESPONSE_NONCE_LEN)
    key, nonce = _response_keys(secret, enc, response_nonce)
    return response_nonce + AESGCM(key).encrypt(nonce, inner, None)


@dataclass(frozen=True)
class InnerResponse:
    """A decapsulated response."""

    status: int
    receipt: bytes
    body: bytes = field(repr=False)


def decapsulate_response(ctx: RequestContext, data: bytes) -> InnerResponse:
    """Open a response to the request ``ctx`` describes; raises :class:`EncapsulationError`."""
    if len(data) < RESPONSE_NONCE_LEN + TAG_LEN + _INNER_RES.size:
        raise EncapsulationError("the encapsulated response is too short")
    key, nonce = _response_keys(ctx.response_secret, ctx.enc, data[:RESPONSE_NONCE_LEN])
    try:
        inner = AESGCM(key).decrypt(nonce, data[RESPONSE_NONCE_LEN:], None)
    except InvalidTag:
        raise EncapsulationError(
            "the response does not open with this request's key: it was modified in transit "
            "or answers another request; refusing it") from None
    version, status, n = _INNER_RES.unpack_from(inner)
    end = _INNER_RES.size + n
    if version != VERSION or end > len(inner) or not 100 <= status <= 599:
        raise EncapsulationError("the inner response is malformed")
    return InnerResponse(status, inner[_INNER_RES.size:end], inner[end:])


def same_bytes(a: bytes, b: bytes) -> bool:
    """Constant-time equality (for digests and nonces)."""
    return hmac.compare_digest(a, b)
