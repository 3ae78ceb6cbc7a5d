"""Signed grants, status documents and audit heads, and the pinned-key verifier for them.

A grant is what the key server signs when it releases one key version of one model to one
attested requester; the key itself travels next to it, HPKE-sealed with the grant digest as
``info``. :class:`GrantVerifier` is what a cache or runtime uses: it trusts only the pinned
release-signing key and never goes back to a lower policy version than one it has seen.
"""

from __future__ import annotations

import hmac
import threading
from dataclasses import dataclass, field
from typing import Any, Final

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from sealtorch._secret import Secret
from sealtorch.errors import GrantError
from sealtorch.ids import MODEL_ID_RULE, is_model_id
from sealtorch.protocol import hpke
from sealtorch.protocol.b64 import b64d, b64e
from sealtorch.protocol.signing import (
    KIND_AUDIT_HEAD,
    KIND_CLAIMS,
    KIND_GRANT,
    KIND_STATUS,
    body_digest,
    key_id,
    load_public_key,
    raw_public_key,
    sign_document,
    sign_document_digest,
    verify_document,
)

GRANT_FORMAT: Final = "sealtorch-grant/v1"
STATUS_FORMAT: Final = "sealtorch-status/v1"
AUDIT_HEAD_FORMAT: Final = "sealtorch-audit-head/v1"
CLAIMS_FORMAT: Final = "sealtorch-claims/v1"
NONCE_LEN = 32
_MAX_INT = 2**53


def _int(body: dict[str, Any], name: str, *, lo: int = 0, hi: int = _MAX_INT) -> int:
    v = body.get(name)
    if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
        raise GrantError(f"field {name!r} must be an integer in [{lo}, {hi}]")
    return v


def _str(body: dict[str, Any], name: str, *, max_len: int = 256) -> str:
    v = body.get(name)
    if not isinstance(v, str) or not 0 < len(v) <= max_len:
        raise GrantError(f"field {name!r} must be a non-empty string of at most {max_len} chars")
    return v


@dataclass(frozen=True)
class Grant:
    """The verified body of a grant (what the server signed)."""

    tenant: str
    model_id: str
    key_version: int
    nonce: bytes
    requester_key: bytes
    kem_id: int
    evidence_digest: str
    cache_id: str
    policy: dict[str, Any]
    policy_version: int
    lease_seconds: int
    revocation_epoch: int
    issued_at: int
    server_key_id: str
    state_seq: int = 0

    def body(self) -> dict[str, Any]:
        """The JSON body exactly as signed."""
        return {
            "format": GRANT_FORMAT,
            "tenant": self.tenant,
            "model_id": self.model_id,
            "key_version": self.key_version,
            "nonce": b64e(self.nonce),
            "requester_key": b64e(self.requester_key),
            "kem_id": self.kem_id,
            "evidence_digest": self.evidence_digest,
            "cache_id": self.cache_id,
            "policy": self.policy,
            "policy_version": self.policy_version,
            "lease_seconds": self.lease_seconds,
            "revocation_epoch": self.revocation_epoch,
            "issued_at": self.issued_at,
            "server_key_id": self.server_key_id,
            "state_seq": self.state_seq,
        }

    def digest(self) -> bytes:
        """SHA-256 of the canonical body; the HPKE ``info`` of the key sealed with this grant."""
        return body_digest(self.body())

    @classmethod
    def from_body(cls, body: dict[str, Any]) -> Grant:
        """Parse and type-check a grant body (signature already checked by the caller)."""
        if body.get("format") != GRANT_FORMAT:
            raise GrantError(f"grant format must be {GRANT_FORMAT!r}")
        expected = set(cls(**_EMPTY).body())
        if set(body) != expected:
            raise GrantError("grant has missing or unexpected fields")
        policy = body.get("policy")
        if not isinstance(policy, dict):
            raise GrantError("grant policy must be a JSON object")
        model_id = _str(body, "model_id", max_len=128)
        if not is_model_id(model_id):
            raise GrantError(f"grant model_id is not a valid model id ({MODEL_ID_RULE})")
        g = cls(
            tenant=_str(body, "tenant", max_len=64),
            model_id=model_id,
            key_version=_int(body, "key_version", lo=1),
            nonce=b64d(body.get("nonce"), field="grant nonce", max_len=NONCE_LEN,
                       exact_len=NONCE_LEN),
            requester_key=b64d(body.get("requester_key"), field="grant requester_key",
                               max_len=hpke.PUBLIC_KEY_LEN, exact_len=hpke.PUBLIC_KEY_LEN),
            kem_id=_int(body, "kem_id", hi=0xFFFF),
            evidence_digest=_str(body, "evidence_digest", max_len=128),
            cache_id=_str(body, "cache_id", max_len=128),
            policy=policy,
            policy_version=_int(body, "policy_version", lo=1),
            lease_seconds=_int(body, "lease_seconds", lo=1, hi=30 * 86400),
            revocation_epoch=_int(body, "revocation_epoch"),
            issued_at=_int(body, "issued_at"),
            server_key_id=_str(body, "server_key_id", max_len=64),
            state_seq=_int(body, "state_seq"),
        )
        return g


_EMPTY: dict[str, Any] = {
    "tenant": "", "model_id": "", "key_version": 0, "nonce": b"", "requester_key": b"",
    "kem_id": 0, "evidence_digest": "", "cache_id": "", "policy": {}, "policy_version": 0,
    "lease_seconds": 0, "revocation_epoch": 0, "issued_at": 0, "server_key_id": "",
    "state_seq": 0,
}


def sign_grant(signing_key: Ed25519PrivateKey, grant: Grant) -> dict[str, Any]:
    """The signed grant document ``{"body", "signature"}``."""
    return sign_document(signing_key, KIND_GRANT, grant.body())


def sign_grant_digest(signing_key: Ed25519PrivateKey, grant: Grant
                      ) -> tuple[dict[str, Any], bytes]:
    """The signed grant document and :meth:`Grant.digest`, encoding the body once."""
    return sign_document_digest(signing_key, KIND_GRANT, grant.body())


@dataclass(frozen=True)
class ModelStatus:
    """Per-model state in a status document."""

    state: str  # "active" | "revoked"
    key_versions: tuple[int, ...]
    policy_version: int


@dataclass(frozen=True)
class Status:
    """A verified, nonce-bound status document (revocation poll answer)."""

    nonce: bytes
    cache_id: str
    revocation_epoch: int
    cache_state: str  # "approved" | "pending" | "revoked" | "unknown"
    models: dict[str, ModelStatus]
    issued_at: int
    server_key_id: str
    state_seq: int = 0

    def body(self) -> dict[str, Any]:
        return {
            "format": STATUS_FORMAT,
            "nonce": b64e(self.nonce),
            "cache_id": self.cache_id,
            "revocation_epoch": self.revocation_epoch,
            "cache_state": self.cache_state,
            "models": {
                m: {"state": s.state, "key_versions": list(s.key_versions),
                    "policy_version": s.policy_version}
                for m, s in sorted(self.models.items())
            },
            "issued_at": self.issued_at,
            "server_key_id": self.server_key_id,
            "state_seq": self.state_seq,
        }

    @classmethod
    def from_body(cls, body: dict[str, Any]) -> Status:
        if body.get("format") != STATUS_FORMAT:
            raise GrantError(f"status format must be {STATUS_FORMAT!r}")
        raw_models = body.get("models")
        if not isinstance(raw_models, dict):
            raise GrantError("status models must be an object")
        models: dict[str, ModelStatus] = {}
        for m, s in raw_models.items():
            if not isinstance(s, dict) or s.get("state") not in ("active", "revoked"):
                raise GrantError("status model entry is malformed")
            kv = s.get("key_versions")
            if not isinstance(kv, list) or not all(
                isinstance(v, int) and not isinstance(v, bool) for v in kv
            ):
                raise GrantError("status key_versions must be a list of integers")
            models[m] = ModelStatus(s["state"], tuple(kv), _int(s, "policy_version"))
        cache_state = _str(body, "cache_state", max_len=16)
        return cls(
            nonce=b64d(body.get("nonce"), field="status nonce", max_len=NONCE_LEN,
                       exact_len=NONCE_LEN),
            cache_id=_str(body, "cache_id", max_len=128),
            revocation_epoch=_int(body, "revocation_epoch"),
            cache_state=cache_state,
            models=models,
            issued_at=_int(body, "issued_at"),
            server_key_id=_str(body, "server_key_id", max_len=64),
            state_seq=_int(body, "state_seq"),
        )


def sign_status(signing_key: Ed25519PrivateKey, status: Status) -> dict[str, Any]:
    return sign_document(signing_key, KIND_STATUS, status.body())


@dataclass(frozen=True)
class AuditHead:
    """The signed head of the server's hash-chained audit log."""

    seq: int
    head: str  # hex SHA-256 of the last entry
    issued_at: int
    server_key_id: str

    def body(self) -> dict[str, Any]:
        return {"format": AUDIT_HEAD_FORMAT, "seq": self.seq, "head": self.head,
                "issued_at": self.issued_at, "server_key_id": self.server_key_id}

    @classmethod
    def from_body(cls, body: dict[str, Any]) -> AuditHead:
        if body.get("format") != AUDIT_HEAD_FORMAT:
            raise GrantError(f"audit head format must be {AUDIT_HEAD_FORMAT!r}")
        return cls(_int(body, "seq"), _str(body, "head", max_len=64), _int(body, "issued_at"),
                   _str(body, "server_key_id", max_len=64))


def sign_audit_head(signing_key: Ed25519PrivateKey, head: AuditHead) -> dict[str, Any]:
    return sign_document(signing_key, KIND_AUDIT_HEAD, head.body())


@dataclass(frozen=True)
class ClaimsDocument:
    """What the key server verified about a cache's evidence, signed for the cache itself:
    a confidential VM's cache judges its own local runtimes (all of them share the VM's
    identity) by these claims, verified with the owner's collateral and clock."""

    nonce: bytes
    requester_key: bytes
    cache_id: str
    claims: dict[str, Any]
    issued_at: int
    server_key_id: str

    def body(self) -> dict[str, Any]:
        return {"format": CLAIMS_FORMAT, "nonce": b64e(self.nonce),
                "requester_key": b64e(self.requester_key), "cache_id": self.cache_id,
                "claims": self.claims, "issued_at": self.issued_at,
                "server_key_id": self.server_key_id}

    @classmethod
    def from_body(cls, body: dict[str, Any]) -> ClaimsDocument:
        if body.get("format") != CLAIMS_FORMAT:
            raise GrantError(f"claims document format must be {CLAIMS_FORMAT!r}")
        claims = body.get("claims")
        if not isinstance(claims, dict):
            raise GrantError("claims document carries no claims object")
        return cls(
            nonce=b64d(body.get("nonce"), field="claims nonce", max_len=NONCE_LEN,
                       exact_len=NONCE_LEN),
            requester_key=b64d(body.get("requester_key"), field="claims requester_key",
                               max_len=hpke.PUBLIC_KEY_LEN, exact_len=hpke.PUBLIC_KEY_LEN),
            cache_id=_str(body, "cache_id", max_len=128), claims=claims,
            issued_at=_int(body, "issued_at"),
            server_key_id=_str(body, "server_key_id", max_len=64),
        )


def sign_claims(signing_key: Ed25519PrivateKey, doc: ClaimsDocument) -> dict[str, Any]:
    return sign_document(signing_key, KIND_CLAIMS, doc.body())


@dataclass
class GrantVerifier:
    """Verify grants, status documents and audit heads against the pinned server key.

    Keeps, per model id, the highest policy version seen and refuses anything lower, and the
    highest server state sequence seen and refuses documents from older state, so a host cannot
    replay an older (looser) policy and a restored key-server database is not believed. Thread-safe.
    """

    pinned_public_key: Ed25519PublicKey | bytes | str
    _pub: Ed25519PublicKey = field(init=False, repr=False)
    _seen: dict[str, int] = field(default_factory=dict, init=False, repr=False)
    _state_seq: int = field(default=0, init=False, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)

    def __post_init__(self) -> None:
        self._pub = load_public_key(self.pinned_public_key)

    @property
    def pinned_key(self) -> Ed25519PublicKey:
        return self._pub

    @property
    def server_key_id(self) -> str:
        """Hex SHA-256 of the pinned key (the *audience* bound into report data)."""
        return key_id(raw_public_key(self._pub))

    def _check_policy_version(self, model_id: str, version: int, *, record: bool) -> None:
        with self._lock:
            seen = self._seen.get(model_id, 0)
            if version < seen:
                raise GrantError(
                    f"policy version {version} of model {model_id!r} is lower than version "
                    f"{seen} already seen; refusing a rollback"
                )
            if record:
                self._seen[model_id] = version

    def check_state_seq(self, seq: int) -> None:
        """Refuse an answer decided at older server state than one already seen."""
        with self._lock:
            if seq < self._state_seq:
                raise GrantError(
                    f"the key server answered from state {seq}, older than state "
                    f"{self._state_seq} already seen: its database was restored or rolled back; "
                    "refusing the answer")
            self._state_seq = seq

    def verify(
        self,
        doc: object,
        *,
        nonce: bytes,
        requester_key: bytes,
        model_id: str | None = None,
    ) -> Grant:
        """Check signature, nonce, requester key, server key id and policy version."""
        grant = Grant.from_body(verify_document(self._pub, KIND_GRANT, doc))
        if not hmac.compare_digest(grant.nonce, nonce):
            raise GrantError("grant is bound to another nonce; it answers a different request")
        if not hmac.compare_digest(grant.requester_key, requester_key):
            raise GrantError("grant is bound to another requester key; it is not for this TEE")
        if not hmac.compare_digest(grant.server_key_id, self.server_key_id):
            raise GrantError("grant names another server key id than the pinned key")
        if model_id is not None and grant.model_id != model_id:
            raise GrantError("grant is for another model than the one requested")
        self.check_state_seq(grant.state_seq)
        self._check_policy_version(grant.model_id, grant.policy_version, record=True)
        return grant

    def open_key(self, grant: Grant, sealed_key: bytes, private_key: X25519PrivateKey) -> Secret:
        """Open the HPKE-sealed key that came with a verified grant."""
        key = hpke.open(sealed_key, private_key, grant.digest())
        if len(key) != 32:
            key.wipe()
            raise GrantError("released key has the wrong length (expected 32 bytes)")
        return key

    def verify_status(self, doc: object, *, nonce: bytes, cache_id: str | None = None) -> Status:
        """Check a status document's signature and that it answers *our* nonce."""
        status = Status.from_body(verify_document(self._pub, KIND_STATUS, doc))
        if not hmac.compare_digest(status.nonce, nonce):
            raise GrantError("status document is bound to another nonce (replayed or stale)")
        if cache_id is not None and status.cache_id != cache_id:
            raise GrantError("status document is for another cache id")
        if not hmac.compare_digest(status.server_key_id, self.server_key_id):
            raise GrantError("status document names another server key id")
        self.check_state_seq(status.state_seq)
        for m, s in status.models.items():
            if s.state == "active":  # revoked entries carry no policy version (0)
                self._check_policy_version(m, s.policy_version, record=True)
        return status

    def verify_audit_head(self, doc: object) -> AuditHead:
        """Check a signed audit head."""
        return AuditHead.from_body(verify_document(self._pub, KIND_AUDIT_HEAD, doc))

    def verify_claims(self, doc: object, *, nonce: bytes, requester_key: bytes,
                      cache_id: str) -> ClaimsDocument:
        """Check a claims document: signed by the pinned key, for this request and cache."""
        cd = ClaimsDocument.from_body(verify_document(self._pub, KIND_CLAIMS, doc))
        if not hmac.compare_digest(cd.nonce, nonce):
            raise GrantError("claims document is bound to another nonce")
        if not hmac.compare_digest(cd.requester_key, requester_key):
            raise GrantError("claims document is about another requester key")
        if cd.cache_id != cache_id:
            raise GrantError("claims document is for another cache id")
        if not hmac.compare_digest(cd.server_key_id, self.server_key_id):
            raise GrantError("claims document names another server key id")
        return cd
