"""Request/response schemas of the key server's release API (strict parsing, size limits).

Parsers raise :class:`~sealtorch.errors.ProtocolError` naming the field that was wrong, never
echoing its value. See ``docs/keyserver.md`` for the wire format.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from dataclasses import dataclass, field
from typing import Any

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PublicKey

from sealtorch.errors import ProtocolError
from sealtorch.ids import MODEL_ID_RULE, is_model_id
from sealtorch.protocol import hpke
from sealtorch.protocol.b64 import b64d, b64e
from sealtorch.protocol.canonical import canonical_json
from sealtorch.protocol.grant import NONCE_LEN

MAX_BODY = 64 * 1024
MAX_MODELS = 32
MAX_EVIDENCE_JSON = 60 * 1024
CACHE_ID_LEN = 32  # hex chars


def parse_json_body(raw: bytes) -> dict[str, Any]:
    """Parse a request body: size-limited, UTF-8, a JSON object."""
    if len(raw) > MAX_BODY:
        raise ProtocolError(f"request body larger than {MAX_BODY} bytes")
    try:
        obj = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise ProtocolError("request body is not valid UTF-8 JSON") from e
    if not isinstance(obj, dict):
        raise ProtocolError("request body must be a JSON object")
    return obj


def _only(obj: dict[str, Any], allowed: set[str], what: str) -> None:
    extra = set(obj) - allowed
    if extra:
        raise ProtocolError(f"{what}: unexpected fields (allowed: {', '.join(sorted(allowed))})")


def parse_models(value: object) -> list[str] | None:
    """``null`` (all the requester is entitled to) or a list of <= 32 distinct valid model ids."""
    if value is None:
        return None
    if not isinstance(value, list):
        raise ProtocolError("models: expected a list of model ids or null")
    if len(value) > MAX_MODELS:
        raise ProtocolError(f"models: at most {MAX_MODELS} models per request")
    out: list[str] = []
    for m in value:
        if not is_model_id(m):
            raise ProtocolError(f"models: each model id must be {MODEL_ID_RULE}")
        if m in out:
            raise ProtocolError("models: duplicate model id")
        out.append(m)
    return out


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
    def from_json(cls, obj: dict[str, Any]) -> ReleaseRequest:
        _only(obj, {"evidence", "public_key", "nonce", "models", "kem_id"}, "release request")
        ev = obj.get("evidence")
        if not isinstance(ev, dict):
            raise ProtocolError("evidence: expected the evidence JSON object")
        kem_id = obj.get("kem_id", hpke.KEM_ID)
        if kem_id != hpke.KEM_ID or isinstance(kem_id, bool):
            raise ProtocolError("kem_id: only 0x0020 (DHKEM X25519 HKDF-SHA256) is supported")
        raw, key = _x25519(obj.get("public_key"))
        return cls(
            evidence=ev,
            public_key=raw,
            nonce=b64d(obj.get("nonce"), field="nonce", max_len=NONCE_LEN, exact_len=NONCE_LEN),
            models=parse_models(obj.get("models")),
            kem_id=hpke.KEM_ID,
            checked_key=key,
        )


def _x25519(value: object) -> tuple[bytes, X25519PublicKey]:
    """A raw X25519 public key that HPKE can seal to (refused before any nonce is burned)."""
    raw = b64d(value, field="public_key", max_len=hpke.PUBLIC_KEY_LEN,
               exact_len=hpke.PUBLIC_KEY_LEN)
    return raw, hpke.load_public_key(raw)


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
        _only(obj, {"nonce", "cache_id", "models", "mac"}, "status request")
        cid = obj.get("cache_id")
        if not isinstance(cid, str) or len(cid) != CACHE_ID_LEN or not all(
            c in "0123456789abcdef" for c in cid
        ):
            raise ProtocolError(f"cache_id: expected {CACHE_ID_LEN} lowercase hex characters")
        return cls(
            nonce=b64d(obj.get("nonce"), field="nonce", max_len=NONCE_LEN, exact_len=NONCE_LEN),
            cache_id=cid,
            models=parse_models(obj.get("models")),
            mac=b64d(obj.get("mac"), field="mac", max_len=32, exact_len=32),
        )


def error_body(code: str, message: str | None = None) -> dict[str, Any]:
    """The only error body shape: a public code and a fixed, input-free message."""
    return {"error": {"code": code, "message": message or code}}
