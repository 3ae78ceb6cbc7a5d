"""Every route of dkeyserver's two listeners, in one table, and the OpenAPI 3.1 document
generated from it.

``app.py`` builds its routes from :data:`OPERATIONS` (so an undeclared method gets 405 and an
undeclared path 404), parses bodies, queries and path parameters with the models named here,
and answers only the status codes listed here. ``openapi.json`` next to this file is
:func:`document` written out (``python -m sealtorch.keyserver.openapi > openapi.json``); a
test keeps the two equal.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, TypeAdapter
from pydantic.json_schema import models_json_schema

from sealtorch.keyserver import api
from sealtorch.protocol.messages import MAX_BODY
from sealtorch.protocol.wire import CacheId, EmptyBody, ModelId, ReleaseBody, StatusBody

Listener = Literal["release", "admin"]

#: the validator of each path parameter, by name
PATH_PARAMS: dict[str, TypeAdapter[str]] = {
    "model_id": TypeAdapter(ModelId), "cache_id": TypeAdapter(CacheId),
    "token_id": TypeAdapter(api.TokenId),
}

ERRORS: dict[int, str] = {
    400: "malformed request: the message names the field and what was expected",
    401: "no, unknown, expired or revoked admin token",
    403: "the whole request was denied (a public code)",
    404: "no such model, key version, policy, token or cache for this tenant",
    408: "the request body did not arrive within 10 s",
    409: "conflicts with the current state (e.g. the version exists, the id is taken)",
    413: f"request body larger than {MAX_BODY // 1024} KiB",
    429: "rate limited: slow down",
    503: "the key server cannot serve: database unavailable, or its state is tampered with or "
         "rolled back (see the server log)",
}
_BODY_ERRORS = (400, 408, 413)


@dataclass(frozen=True)
class Operation:
    """One route: where it is, what it takes, what it answers."""

    listener: Listener
    method: str
    path: str  # OpenAPI template, e.g. /v1/admin/policy/{model_id}
    op_id: str
    summary: str
    answer: type[BaseModel] | None = None  # None: not JSON (Prometheus text)
    body: type[BaseModel] | None = None
    query: type[BaseModel] | None = None
    errors: tuple[int, ...] = ()

    @property
    def params(self) -> list[str]:
        """Names of the path parameters, in order."""
        return [p.split("}")[0] for p in self.path.split("{")[1:]]

    @property
    def route_path(self) -> str:
        """The Starlette route path (model ids may contain '/')."""
        return self.path.replace("{model_id}", "{model_id:path}")

    @property
    def statuses(self) -> tuple[int, ...]:
        """Every status code this operation may answer."""
        codes = set(self.errors)
        if self.body is not None or self.query is not None or self.params:
            codes.add(400)
        if self.body is not None:
            codes.update(_BODY_ERRORS)
        if self.listener == "admin" and self.op_id not in _UNAUTHENTICATED:
            codes.update((401, 429, 503))
        return (200, *sorted(codes))


_UNAUTHENTICATED = {"admin_metrics", "admin_healthz"}
_R = (429, 503)  # every body route of the release listener
_W = (404, 409)  # admin writes on a named object

OPERATIONS: tuple[Operation, ...] = (
    # --- release listener (anonymous; the evidence is the credential) ---
    Operation("release", "POST", "/v1/challenge", "challenge",
              "a one-time 32-byte nonce (HMAC-stateless, burned on use)",
              api.ChallengeResponse, EmptyBody, errors=_R),
    Operation("release", "POST", "/v1/release", "release",
              "model keys for attested evidence, sealed to its HPKE key", api.ReleaseResponse,
              ReleaseBody, errors=(403, *_R)),
    Operation("release", "POST", "/v1/status", "status",
              "signed revocation status for an enrolled cache", api.StatusResponse, StatusBody,
              errors=(403, *_R)),
    Operation("release", "POST", "/v1/collateral", "collateral",
              "the DCAP collateral files, signed by the server", api.CollateralResponse,
              EmptyBody, errors=_R),
    Operation("release", "GET", "/healthz", "healthz", "the process is up", api.Health),
    Operation("release", "GET", "/readyz", "readyz",
              "the process can serve: database reachable and its state verified", api.Health,
              errors=(503,)),
    # --- admin listener (tenant-scoped bearer tokens) ---
    Operation("admin", "GET", "/v1/admin/whoami", "whoami", "the caller's tenant and token",
              api.WhoAmI),
    Operation("admin", "POST", "/v1/admin/tokens", "token_create",
              "a new admin token for the caller's tenant", api.TokenCreated, api.TokenCreate),
    Operation("admin", "DELETE", "/v1/admin/tokens/{token_id}", "token_revoke",
              "revoke one of the tenant's tokens", api.TokenRevoked, errors=(404,)),
    Operation("admin", "GET", "/v1/admin/models", "models_list", "the tenant's models",
              api.ModelList),
    Operation("admin", "POST", "/v1/admin/models", "model_add",
              "register a model with an imported or server-generated key", api.ModelKeyAdded,
              api.ModelAdd, errors=(409,)),
    Operation("admin", "POST", "/v1/admin/model-rotate/{model_id}", "model_rotate",
              "add the next key version", api.ModelKeyAdded, api.ModelRotate, errors=_W),
    Operation("admin", "POST", "/v1/admin/model-export/{model_id}", "model_export",
              "a server-generated key sealed to the owner, once", api.KeyExport,
              api.ModelExport, errors=_W),
    Operation("admin", "POST", "/v1/admin/model-retire/{model_id}", "model_retire",
              "retire one key version (caches drop it)", api.VersionRetired, api.ModelRetire,
              errors=_W),
    Operation("admin", "POST", "/v1/admin/model-revoke/{model_id}", "model_revoke",
              "revoke the model (caches drop every key)", api.ModelRevoked, EmptyBody,
              errors=_W),
    Operation("admin", "PUT", "/v1/admin/policy/{model_id}", "policy_set",
              "set the model's policy (its version must increase)", api.PolicyStored,
              api.PolicySet, errors=_W),
    Operation("admin", "GET", "/v1/admin/policy/{model_id}", "policy_show",
              "the model's current policy", api.PolicyShown, errors=(404,)),
    Operation("admin", "POST", "/v1/admin/policy-test/{model_id}", "policy_test",
              "whether evidence would get the key, claim by claim (no key released)",
              api.PolicyVerdict, api.PolicyTest, errors=(404,)),
    Operation("admin", "GET", "/v1/admin/caches", "caches_list",
              "caches approved or revoked by the tenant, or that asked for its models",
              api.CacheList),
    Operation("admin", "POST", "/v1/admin/caches/{cache_id}/approve", "cache_approve",
              "approve an enrolled cache for the tenant's models", api.CacheSet, EmptyBody,
              errors=_W),
    Operation("admin", "POST", "/v1/admin/caches/{cache_id}/revoke", "cache_revoke",
              "revoke a cache (it drops the tenant's keys)", api.CacheSet, EmptyBody,
              errors=_W),
    Operation("admin", "GET", "/v1/admin/audit", "audit_show", "the tenant's audit entries",
              api.AuditEntries, query=api.AuditQuery),
    Operation("admin", "GET", "/v1/admin/audit/head", "audit_head",
              "the signed head of the audit chain", api.AuditHeadAnswer),
    Operation("admin", "GET", "/v1/admin/audit/verify", "audit_verify",
              "verify the whole audit chain", api.AuditVerify),
    Operation("admin", "POST", "/v1/admin/sim/platforms", "sim_register",
              "register a sim platform key for the tenant (sim servers only)",
              api.SimRegistered, api.SimRegister, errors=(409,)),
    Operation("admin", "GET", "/metrics", "admin_metrics", "Prometheus metrics"),
    Operation("admin", "GET", "/healthz", "admin_healthz", "the process is up", api.Health),
)


def operations(listener: Listener) -> list[Operation]:
    return [op for op in OPERATIONS if op.listener == listener]


def _ref(model: type[BaseModel]) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{model.__name__}"}


def _strip_titles(obj: Any) -> Any:
    """Drop pydantic's generated ``title`` keys (names, not documentation)."""
    if isinstance(obj, dict):
        return {k: _strip_titles(v) for k, v in obj.items()
                if not (k == "title" and isinstance(v, str))}
    if isinstance(obj, list):
        return [_strip_titles(v) for v in obj]
    return obj


def _json(schema: dict[str, Any]) -> dict[str, Any]:
    return {"application/json": {"schema": schema}}


def _operation(op: Operation) -> dict[str, Any]:
    out: dict[str, Any] = {"operationId": op.op_id, "summary": op.summary,
                           "tags": [f"{op.listener} listener"]}
    params: list[dict[str, Any]] = [
        {"name": p, "in": "path", "required": True, "schema": PATH_PARAMS[p].json_schema()}
        for p in op.params]
    if op.query is not None:
        qs = op.query.model_json_schema()
        for name, sch in qs["properties"].items():
            params.append({"name": name, "in": "query", "required": name in qs.get("required",
                                                                                    ()),
                           "description": sch.get("description", ""), "schema": sch})
    if params:
        out["parameters"] = params
    if op.body is not None:
        out["requestBody"] = {"required": op.listener == "release"
                              or bool(op.body.model_json_schema().get("required")),
                              "content": _json(_ref(op.body))}
    responses: dict[str, Any] = {}
    for code in op.statuses:
        if code == 200:
            content = (_json(_ref(op.answer)) if op.answer is not None else
                       {"text/plain": {"schema": {"type": "string"}}})
            responses["200"] = {"description": "OK", "content": content}
        else:
            responses[str(code)] = {"description": ERRORS[code], "content": _json(_ref(api.Error))}
    out["responses"] = responses
    if op.listener == "admin" and op.op_id not in _UNAUTHENTICATED:
        out["security"] = [{"adminToken": []}]
    return out


def document() -> dict[str, Any]:
    """The OpenAPI 3.1 document of both listeners."""
    models: set[type[BaseModel]] = {api.Error}
    for op in OPERATIONS:
        models.update(m for m in (op.answer, op.body) if m is not None)
    ordered = sorted(models, key=lambda m: m.__name__)
    _, defs = models_json_schema([(m, "validation") for m in ordered],
                                 ref_template="#/components/schemas/{model}")
    paths: dict[str, dict[str, Any]] = {}
    for op in OPERATIONS:
        item = paths.setdefault(op.path, {})
        method = op.method.lower()
        if method in item:  # the same route on both listeners (/healthz)
            item[method]["tags"].append(f"{op.listener} listener")
        else:
            item[method] = _operation(op)
    return {
        "openapi": "3.1.0",
        "info": {"title": "sealtorch dkeyserver", "version": "1.0.0",
                 "description": ("Release API (anonymous, attested; tag 'release listener') and "
                                 "admin API (own listener, tenant-scoped bearer tokens; tag "
                                 "'admin listener'). TLS 1.3 only. Generated from the server's "
                                 "request models: what it says is what the server enforces.")},
        "paths": paths,
        "components": {"schemas": _strip_titles(defs.get("$defs", {})),
                       "securitySchemes": {"adminToken": {"type": "http", "scheme": "bearer"}}},
    }


def render() -> str:
    """:func:`document` as the text of ``openapi.json``."""
    return json.dumps(document(), indent=1, sort_keys=True) + "\n"


if __name__ == "__main__":
    sys.stdout.write(render())
