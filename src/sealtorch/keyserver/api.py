"""Typed request models of the admin API, and the shapes of both listeners' answers.

Requests are parsed with these models (``app.py`` calls :func:`~sealtorch.protocol.wire.parse`),
and ``openapi.py`` generates the spec from them, so the document says exactly what the server
enforces. Response models only document: the server builds its answers in ``service.py`` and
``admin.py``, and the API tests validate live answers against these schemas.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from sealtorch.attestation.sim import PLATFORM_PUBLIC_KEY_PATTERN
from sealtorch.keyserver.admin import MAX_TOKEN_TTL
from sealtorch.protocol import hpke
from sealtorch.protocol.collateral import FORMAT as COLLATERAL_FORMAT
from sealtorch.protocol.collateral import MAX_FILES
from sealtorch.protocol.grant import (
    AUDIT_HEAD_FORMAT,
    CLAIMS_FORMAT,
    GRANT_FORMAT,
    STATUS_FORMAT,
)
from sealtorch.protocol.wire import CacheId, ModelId, WireModel, b64_field

KEY_VERSION_MAX = 2**31
KeyVersion = Annotated[int, Field(ge=1, le=KEY_VERSION_MAX,
                                  description=f"a key version, 1 to {KEY_VERSION_MAX}")]
TokenId = Annotated[str, Field(pattern="^[0-9a-f]{16}$", min_length=16, max_length=16,
                               description="a token id: 16 lowercase hex characters")]
_MODEL_KEY = "the model key; null or absent: the server generates one"


# --- admin requests ------------------------------------------------------------------------
class TokenCreate(WireModel):
    ttl_seconds: int = Field(default=30 * 86400, ge=60, le=MAX_TOKEN_TTL,
                             description=f"token lifetime, 60 to {MAX_TOKEN_TTL} seconds")


class ModelAdd(WireModel):
    model_id: ModelId
    key: str | None = b64_field(32, _MODEL_KEY, default=None)
    key_version: KeyVersion = 1


class ModelRotate(WireModel):
    key: str | None = b64_field(32, _MODEL_KEY, default=None)


class ModelExport(WireModel):
    public_key: str = b64_field(hpke.PUBLIC_KEY_LEN,
                                "the X25519 HPKE public key the key is sealed to")
    key_version: KeyVersion = 1


class ModelRetire(WireModel):
    key_version: KeyVersion


class PolicySet(WireModel):
    policy: dict[str, Any] = Field(description="the model's policy document (docs/policy.md)")


class PolicyTest(WireModel):
    evidence: dict[str, Any] = Field(description="an evidence JSON object to judge (no nonce)")


class SimRegister(WireModel):
    public_key: str = Field(pattern=PLATFORM_PUBLIC_KEY_PATTERN, max_length=200, description=(
        "a sim platform's Ed25519 public key: 64 hex characters, base64 of its 32 bytes, or "
        "its PEM"))


class AuditQuery(BaseModel):
    """Query parameters of ``GET /v1/admin/audit`` (strings on the wire, so not strict)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    after: int = Field(default=0, ge=0, le=2**62, description="entries after this sequence")
    limit: int = Field(default=100, ge=1, le=1000, description="at most this many entries")
    order: Literal["newest", "oldest"] = Field(
        default="newest", description="the newest entries (default) or the oldest ones")


# --- answers -------------------------------------------------------------------------------
B64 = Annotated[str, Field(pattern="^[A-Za-z0-9+/]*={0,2}$")]
Hex64 = Annotated[str, Field(pattern="^[0-9a-f]{64}$")]
CacheState = Literal["approved", "pending", "revoked"]


class Answer(BaseModel):
    """Base of the documented answers: no field beyond those listed."""

    model_config = ConfigDict(extra="forbid")


class ErrorDetail(Answer):
    code: str = Field(max_length=32, description="a short public code")
    message: str = Field(description="what went wrong and what to do; never echoes input")


class AuditHeadBody(Answer):
    format: Literal[AUDIT_HEAD_FORMAT]  # type: ignore[valid-type]
    seq: int = Field(ge=0)
    head: Hex64
    issued_at: int
    server_key_id: Hex64


class SignedAuditHead(Answer):
    body: AuditHeadBody
    signature: B64


class Error(Answer):
    error: ErrorDetail
    audit_head: SignedAuditHead | None = None


class Health(BaseModel):
    status: str


class ChallengeResponse(Answer):
    nonce: B64
    expires_in: int


class GrantBody(Answer):
    format: Literal[GRANT_FORMAT]  # type: ignore[valid-type]
    tenant: str
    model_id: str
    key_version: int = Field(ge=1)
    nonce: B64
    requester_key: B64
    kem_id: Literal[32]
    evidence_digest: str
    cache_id: CacheId
    policy: dict[str, Any]
    policy_version: int = Field(ge=1)
    lease_seconds: int = Field(ge=1)
    revocation_epoch: int = Field(ge=0)
    issued_at: int
    server_key_id: Hex64
    state_seq: int = Field(ge=0)


class SignedGrant(Answer):
    body: GrantBody
    signature: B64


class Grant(Answer):
    grant: SignedGrant
    sealed_key: B64


class Denial(Answer):
    model_id: str
    code: Literal["denied", "not_approved", "revoked"]


class ClaimsBody(Answer):
    format: Literal[CLAIMS_FORMAT]  # type: ignore[valid-type]
    nonce: B64
    requester_key: B64
    cache_id: CacheId
    claims: dict[str, Any] = Field(
        description="what the server verified about the cache's evidence")
    issued_at: int
    server_key_id: Hex64


class SignedClaims(Answer):
    body: ClaimsBody
    signature: B64


class ReleaseResponse(Answer):
    grants: list[Grant]
    denials: list[Denial]
    audit_head: SignedAuditHead
    cache_id: CacheId
    cache_state: CacheState
    state_seq: int = Field(ge=0, description=(
        "the server state sequence the answer was decided at; a client refuses answers from "
        "older state than it has seen"))
    status_key: B64 = Field(description=(
        "HPKE-sealed (to the request's public_key, info 'sealtorch/v1 status key\\0' || "
        "cache_id || 0x00 || nonce) 32-byte key that authenticates this cache's status polls"))
    claims: SignedClaims


class ModelStatus(Answer):
    state: Literal["active", "revoked"]
    key_versions: list[int]
    policy_version: int


class StatusBodyAnswer(Answer):
    format: Literal[STATUS_FORMAT]  # type: ignore[valid-type]
    nonce: B64
    cache_id: str
    revocation_epoch: int
    cache_state: CacheState
    models: dict[str, ModelStatus]
    issued_at: int
    server_key_id: Hex64
    state_seq: int = Field(ge=0)


class SignedStatus(Answer):
    body: StatusBodyAnswer
    signature: B64


class StatusResponse(Answer):
    status: SignedStatus


class CollateralBody(Answer):
    format: Literal[COLLATERAL_FORMAT]  # type: ignore[valid-type]
    files: list[str] = Field(max_length=MAX_FILES)
    issued_at: int
    server_key_id: Hex64


class SignedCollateral(Answer):
    body: CollateralBody
    signature: B64


class CollateralResponse(Answer):
    collateral: SignedCollateral


class WhoAmI(Answer):
    tenant: str
    token_id: str
    server_key_id: Hex64


class TokenCreated(Answer):
    token_id: str
    token: str = Field(description="the bearer token, shown once")
    expires_in: int


class TokenRevoked(Answer):
    revoked: bool


class KeyVersionInfo(Answer):
    key_version: int
    state: Literal["active", "retired"]
    exportable: bool


class ModelInfo(Answer):
    model_id: str
    state: Literal["active", "revoked"]
    key_versions: list[KeyVersionInfo]
    policy_version: int | None


class ModelList(Answer):
    models: list[ModelInfo]


class ModelKeyAdded(Answer):
    model_id: str
    key_version: int
    generated: bool = Field(description="true when the server generated the key")


class KeyExport(Answer):
    export: dict[str, Any] = Field(description="the signed key-export document")
    sealed_key: B64


class VersionRetired(Answer):
    model_id: str
    key_version: int
    state: Literal["retired"]


class ModelRevoked(Answer):
    model_id: str
    state: Literal["revoked"]


class PolicyStored(Answer):
    model_id: str
    policy_version: int


class PolicyShown(Answer):
    model_id: str
    policy: dict[str, Any]
    policy_version: int


class PolicyVerdict(BaseModel):
    allowed: bool
    reasons: list[str]


class CacheInfo(Answer):
    cache_id: CacheId
    tee: str
    platform_id: str | None
    measurement: str
    first_seen: int
    last_seen: int
    state: CacheState


class CacheList(Answer):
    caches: list[CacheInfo]


class CacheSet(Answer):
    cache_id: CacheId
    state: Literal["approved", "revoked"]
    summary: CacheState = Field(description="the cache's state across every tenant")


class AuditEntries(Answer):
    entries: list[dict[str, Any]]


class AuditHeadAnswer(Answer):
    audit_head: SignedAuditHead


class AuditVerify(Answer):
    ok: bool
    problems: list[str]
    audit_head: SignedAuditHead


class SimRegistered(Answer):
    fingerprint: str


__all__ = [name for name, v in list(globals().items())
           if isinstance(v, type) and issubclass(v, BaseModel) and v.__module__ == __name__]
