"""Typed requests of the key server's release API, parsed from the wire models of
:mod:`sealtorch.protocol.wire` (strict parsing, size limits).

Parsers raise :class:`~sealtorch.errors.ProtocolError` naming the field that was wrong, never
echoing its value. See ``docs/keyserver.md`` for the wire format.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PublicKey

from sealtorch.errors import ProtocolError
from sealtorch.protocol import hpke
from sealtorch.protocol.b64 import b64e
from sealtorch.protocol.canonical import canonical_json
from sealtorch.protocol.wire import ReleaseBody, StatusBody, b64_bytes, parse

MAX_BODY = 64 * 1024


def _number(text: str) -> int | float:
    """A JSON number with a fraction or exponent: JSON has one number type, so ``3.0`` is the
    integer 3 (as JSON Schema says), while ``3.5`` stays a float (refused where an integer is
    expected). Only exactly representable values (|x| <= 2**53) become integers."""
    value = float(text)
    return int(value) if value.is_integer() and abs(value) <= 2**53 else value


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")  # NaN, Infinity, -Infinity: Python extensions


def parse_json_body(raw: bytes) -> dict[str, Any]:
    """Parse a request body: size-limited, UTF-8, a JSON object."""
    if len(raw) > MAX_BODY:
        raise ProtocolError(f"request body larger than {MAX_BODY} bytes")
    try:
        obj = json.loads(raw.decode("utf-8"), parse_float=_number,
                         parse_constant=_no_constant)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise ProtocolError("request body is not valid UTF-8 JSON") from e
    if not isinstance(obj, dict):
        raise ProtocolError("request body must be a JSON object")
    return obj


@dataclass(frozen=True)
class ReleaseRequest:
    """``POST /v1/release``."""

    evidence: dict[str, Any]
    public_key: bytes
    nonce: bytes
    models: list[str] | None
    kem_id: int = hpke.KEM_ID
    #: ``public_key`` as checked by :func:`hpke.load_public_key` at parse time (reused when
    #: sealing, so the low-order check runs once per request)
    checked_key: X25519PublicKey | None = field(default=None, compare=False, repr=False)

    def recipient(self) -> bytes | X25519PublicKey:
        """What to seal to: the checked key object when parsed here, else the raw bytes."""
        return self.checked_key if self.checked_key is not None else self.public_key

    def to_json(self) -> dict[str, Any]:
        return {"evidence": self.evidence, "public_key": b64e(self.public_key),
                "nonce": b64e(self.nonce), "models": self.models, "kem_id": self.kem_id}

    @classmethod
    def from_json(cls, obj: dict[str, Any], *,
                  check_key: Callable[[bytes], X25519PublicKey] = hpke.load_public_key
                  ) -> ReleaseRequest:
        """Parse a request body (:class:`~sealtorch.protocol.wire.ReleaseBody`); the public key
        is checked as an X25519 point here (``check_key``: :func:`hpke.load_public_key`, or a
        caller's wrapper of it that accounts its cost), before any nonce is burned."""
        body = parse(ReleaseBody, obj, "release request")
        raw = b64_bytes(body.public_key)
        return cls(evidence=body.evidence, public_key=raw, nonce=b64_bytes(body.nonce),
                   models=list(body.models) if body.models is not None else None,
                   kem_id=body.kem_id, checked_key=check_key(raw))


STATUS_KEY_LEN = 32
_STATUS_MAC_TAG = b"sealtorch-status-request/v1\x00"
_STATUS_KEY_INFO = b"sealtorch/v1 status key\x00"


def status_key_info(cache_id: str, release_nonce: bytes) -> bytes:
    """HPKE ``info`` of the status key sealed into a release answer: bound to the cache id
    and to the release's nonce."""
    return _STATUS_KEY_INFO + cache_id.encode("ascii") + b"\x00" + release_nonce


@dataclass(frozen=True)
class StatusRequest:
    """``POST /v1/status``: a cache-chosen random nonce, the cache id and optional model ids,
    authenticated with the cache's status key (HMAC-SHA256; the key server seals that key to
    the cache's attested HPKE key in every release answer, so only the enrolled cache has it)."""

    nonce: bytes
    cache_id: str
    models: list[str] | None = None
    mac: bytes = b""

    def signed_part(self) -> bytes:
        """What :attr:`mac` covers."""
        return _STATUS_MAC_TAG + canonical_json(
            {"nonce": b64e(self.nonce), "cache_id": self.cache_id, "models": self.models})

    def authenticated(self, status_key: bytes | bytearray | memoryview) -> StatusRequest:
        """This request with its MAC under ``status_key``."""
        tag = hmac.new(bytes(status_key), self.signed_part(), hashlib.sha256).digest()
        return StatusRequest(self.nonce, self.cache_id, self.models, tag)

    def check_mac(self, status_key: bytes | bytearray | memoryview) -> bool:
        """Constant-time check of :attr:`mac`."""
        want = hmac.new(bytes(status_key), self.signed_part(), hashlib.sha256).digest()
        return hmac.compare_digest(want, self.mac)

    def to_json(self) -> dict[str, Any]:
        return {"nonce": b64e(self.nonce), "cache_id": self.cache_id, "models": self.models,
                "mac": b64e(self.mac)}

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> StatusRequest:
        """Parse a request body (:class:`~sealtorch.protocol.wire.StatusBody`)."""
        body = parse(StatusBody, obj, "status request")
        return cls(nonce=b64_bytes(body.nonce), cache_id=body.cache_id,
                   models=list(body.models) if body.models is not None else None,
                   mac=b64_bytes(body.mac))


def error_body(code: str, message: str | None = None) -> dict[str, Any]:
    """The only error body shape: a public code and a fixed, input-free message."""
    return {"error": {"code": code, "message": message or code}}
