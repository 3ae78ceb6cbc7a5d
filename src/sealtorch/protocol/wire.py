"""Wire shapes of the key server's requests: one definition for parsing them and for the
OpenAPI document (``keyserver/openapi.py`` generates the spec from these models).

Models are strict (no coercion: ``"1"`` is not an integer), refuse unknown fields, and carry
every constraint the server enforces (base64 lengths, id patterns, list sizes), so a request
the spec allows is one the server accepts. :func:`parse` turns a validation failure into a
:class:`~sealtorch.errors.ProtocolError` that names the field and what was expected, never the
rejected value.
"""

from __future__ import annotations

import base64
from typing import Annotated, Any, Literal, TypeVar, cast

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError

from sealtorch.errors import ProtocolError
from sealtorch.ids import MODEL_ID_MAX, MODEL_ID_PATTERN, MODEL_ID_RULE
from sealtorch.protocol import hpke
from sealtorch.protocol.grant import NONCE_LEN

MAX_MODELS = 32
CACHE_ID_LEN = 32  # hex chars
CACHE_ID_PATTERN = f"^[0-9a-f]{{{CACHE_ID_LEN}}}$"


def b64_pattern(n: int) -> str:
    """The canonical padded standard base64 of exactly ``n`` bytes, as a regular expression
    (the padding bits of the last character must be zero, so each value has one encoding)."""
    full, rest = divmod(n, 3)
    body = f"[A-Za-z0-9+/]{{{4 * full}}}" if full else ""
    if rest == 1:
        body += "[A-Za-z0-9+/][AQgw]=="
    elif rest == 2:
        body += "[A-Za-z0-9+/]{2}[AEIMQUYcgkosw048]="
    return f"^{body}$"


def b64_field(n: int, description: str, **kwargs: Any) -> Any:
    """A base64 field of exactly ``n`` bytes (required unless ``default=`` is given)."""
    return Field(pattern=b64_pattern(n), min_length=4 * -(-n // 3), max_length=4 * -(-n // 3),
                 description=f"{description} (base64, {n} bytes)", **kwargs)


def b64_bytes(text: str) -> bytes:
    """Decode a value that already matched :func:`b64_pattern` (so it cannot fail)."""
    return base64.b64decode(text.encode("ascii"), validate=True)


def _distinct(ids: list[str]) -> list[str]:
    if len(set(ids)) != len(ids):
        raise ValueError("duplicate model id")
    return ids


ModelId = Annotated[str, Field(pattern=MODEL_ID_PATTERN, min_length=1, max_length=MODEL_ID_MAX,
                               description=f"a model id: {MODEL_ID_RULE}")]
CacheId = Annotated[str, Field(pattern=CACHE_ID_PATTERN, min_length=CACHE_ID_LEN,
                               max_length=CACHE_ID_LEN,
                               description=f"a cache id: {CACHE_ID_LEN} lowercase hex characters")]
ModelList = Annotated[list[ModelId],
                      Field(max_length=MAX_MODELS, json_schema_extra={"uniqueItems": True}),
                      AfterValidator(_distinct)]
_MODELS_DESCRIPTION = (f"null (every model the requester is entitled to) or at most "
                       f"{MAX_MODELS} distinct model ids, each {MODEL_ID_RULE}")


class WireModel(BaseModel):
    """Base of every request model: strict types, unknown fields refused, immutable."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class EmptyBody(WireModel):
    """A request that takes no fields: ``{}``."""


class ReleaseBody(WireModel):
    """``POST /v1/release``: evidence bound to a challenge nonce and the requester's HPKE key."""

    evidence: dict[str, Any] = Field(
        description="the attestation evidence JSON object (see docs/attestation.md)")
    public_key: str = b64_field(hpke.PUBLIC_KEY_LEN, "the requester's X25519 HPKE public key")
    nonce: str = b64_field(NONCE_LEN, "the nonce from POST /v1/challenge")
    models: ModelList | None = Field(default=None, description=_MODELS_DESCRIPTION)
    kem_id: Literal[32] = Field(
        default=cast(Literal[32], hpke.KEM_ID),
        description="HPKE KEM id: only 32 (DHKEM X25519 HKDF-SHA256)")


class StatusBody(WireModel):
    """``POST /v1/status``: a poll authenticated with the cache's status key."""

    nonce: str = b64_field(NONCE_LEN, "a random nonce chosen by the cache")
    cache_id: CacheId
    models: ModelList | None = Field(default=None, description=_MODELS_DESCRIPTION)
    mac: str = b64_field(32, "HMAC-SHA256 under the cache's status key over "
                             "'sealtorch-status-request/v1\\0' || canonical JSON of "
                             "{nonce, cache_id, models}")


class _Models(WireModel):
    models: ModelList | None = Field(description=_MODELS_DESCRIPTION)


def parse_models(value: object) -> list[str] | None:
    """``null`` or a list of at most 32 distinct valid model ids (the ``models`` field)."""
    models = parse(_Models, {"models": value}, "models").models
    return list(models) if models is not None else None


W = TypeVar("W", bound=BaseModel)


def parse(model: type[W], obj: object, what: str) -> W:
    """``obj`` validated as ``model``, or a :class:`ProtocolError` naming the first problem."""
    try:
        return model.model_validate(obj)
    except ValidationError as e:
        raise ProtocolError(describe(model, e, what)) from None


def describe(model: type[BaseModel], e: ValidationError, what: str) -> str:
    """A one-line explanation of the first error: where and what was expected, never the
    value (pydantic's own messages can quote it)."""
    err = e.errors(include_url=False, include_input=False)[0]
    loc = [str(x) for x in err["loc"]]
    if err["type"] == "extra_forbidden":
        return f"{what}: unexpected field (allowed: {', '.join(sorted(model.model_fields))})"
    if not loc:
        return f"{what}: expected a JSON object"
    field = model.model_fields.get(loc[0])
    where = loc[0] + "".join(f"[{x}]" for x in loc[1:])
    expected = (field.description if field is not None and field.description else
                "a value of the documented type")
    if err["type"] == "missing":
        return f"{where}: missing; expected {expected}"
    if err["type"] == "value_error":
        return f"{where}: {err['msg'].removeprefix('Value error, ')}"
    return f"{where}: expected {expected}"


__all__ = ["CACHE_ID_LEN", "MAX_MODELS", "CacheId", "EmptyBody", "ModelId", "ReleaseBody",
           "StatusBody", "WireModel", "b64_bytes", "b64_pattern", "parse", "parse_models"]
