"""The admin listener of dkeyserver: tenant-scoped bearer tokens, each request parsed with
its operation's models (``openapi.py``), the operation itself in ``admin.py``."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, ValidationError
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from sealtorch._secret import Secret
from sealtorch.errors import (
    AuthError,
    NotFoundError,
    PolicyError,
    ProtocolError,
    SealtorchError,
    StoreError,
)
from sealtorch.keyserver import api, ops
from sealtorch.keyserver.admin import Admin, Principal
from sealtorch.keyserver.http import (
    BODY_DEADLINE,
    ERROR_PAGES,
    TooLargeError,
    TooSlowError,
    error_response,
    healthz,
    read_body,
    refusal,
    routes,
)
from sealtorch.keyserver.openapi import PATH_PARAMS, Operation, operations
from sealtorch.keyserver.service import KeyServer
from sealtorch.protocol.messages import MAX_BODY, parse_json_body
from sealtorch.protocol.wire import b64_bytes, parse

W = TypeVar("W", bound=BaseModel)


@dataclass(frozen=True)
class Call:
    """One admin request, authenticated and parsed with its operation's models."""

    principal: Principal
    params: dict[str, str]
    body: BaseModel | None
    query: BaseModel | None

    def body_as(self, model: type[W]) -> W:
        if not isinstance(self.body, model):  # pragma: no cover - the table pairs them
            raise TypeError(f"expected a {model.__name__} body")
        return self.body

    def query_as(self, model: type[W]) -> W:
        if not isinstance(self.query, model):  # pragma: no cover - the table pairs them
            raise TypeError(f"expected {model.__name__} parameters")
        return self.query


def _key(text: str | None) -> Secret | None:
    """A model key from a request (``None``: the server generates one)."""
    return None if text is None else Secret(b64_bytes(text))


def _param(name: str, value: str) -> str:
    """A path parameter validated with its :data:`~openapi.PATH_PARAMS` type."""
    adapter = PATH_PARAMS[name]
    try:
        return adapter.validate_python(value)
    except ValidationError:
        raise ProtocolError(f"{name}: expected {adapter.json_schema().get('description')}"
                            ) from None


def _admin_handlers() -> dict[str, Callable[[Admin, Call], Any]]:
    """What each admin operation of :data:`~openapi.OPERATIONS` does."""
    def model(c: Call) -> str:
        return c.params["model_id"]

    def model_add(a: Admin, c: Call) -> Any:
        b = c.body_as(api.ModelAdd)
        return a.model_add(c.principal, b.model_id, _key(b.key), b.key_version)

    def model_export(a: Admin, c: Call) -> Any:
        b = c.body_as(api.ModelExport)
        return a.model_export(c.principal, model(c), b.key_version, b64_bytes(b.public_key))

    def audit_show(a: Admin, c: Call) -> Any:
        q = c.query_as(api.AuditQuery)
        return a.audit_show(c.principal, q.after, q.limit, q.order == "newest")

    return {
        "whoami": lambda a, c: a.whoami(c.principal),
        "token_create": lambda a, c: a.token_create(
            c.principal, c.body_as(api.TokenCreate).ttl_seconds),
        "token_revoke": lambda a, c: a.token_revoke(c.principal, c.params["token_id"]),
        "models_list": lambda a, c: a.models_list(c.principal),
        "model_add": model_add,
        "model_rotate": lambda a, c: a.model_rotate(
            c.principal, model(c), _key(c.body_as(api.ModelRotate).key)),
        "model_export": model_export,
        "model_retire": lambda a, c: a.version_retire(
            c.principal, model(c), c.body_as(api.ModelRetire).key_version),
        "model_revoke": lambda a, c: a.model_revoke(c.principal, model(c)),
        "policy_set": lambda a, c: a.policy_set(
            c.principal, model(c), c.body_as(api.PolicySet).policy),
        "policy_show": lambda a, c: a.policy_show(c.principal, model(c)),
        "policy_test": lambda a, c: a.policy_test(
            c.principal, model(c), c.body_as(api.PolicyTest).evidence),
        "caches_list": lambda a, c: a.caches_list(c.principal),
        "cache_approve": lambda a, c: a.cache_set(c.principal, c.params["cache_id"], "approved"),
        "cache_revoke": lambda a, c: a.cache_set(c.principal, c.params["cache_id"], "revoked"),
        "audit_show": audit_show,
        "audit_head": lambda a, c: a.audit_head(),
        "audit_verify": lambda a, c: a.audit_verify(),
        "sim_register": lambda a, c: a.sim_register(
            c.principal, c.body_as(api.SimRegister).public_key),
    }


def admin_app(ks: KeyServer) -> Starlette:
    """The tenant-scoped admin API, plus /metrics and /healthz."""
    admin = Admin(ks)
    limiter = ops.RateLimiter(ks.config.rate_per_token)
    handlers = _admin_handlers()

    def parse_call(op: Operation, p: Principal, request: Request, raw: bytes) -> Call:
        params = {name: _param(name, request.path_params[name]) for name in op.params}
        if op.body is None and raw:
            raise ProtocolError("this request takes no body")
        body = (parse(op.body, parse_json_body(raw) if raw else {}, "request body")
                if op.body is not None else None)
        query = (parse(op.query, dict(request.query_params), "query")
                 if op.query is not None else None)
        return Call(p, params, body, query)

    def authed(op: Operation) -> Callable[[Request], Awaitable[Response]]:
        fn = handlers[op.op_id]

        async def handler(request: Request) -> Response:
            auth = request.headers.get("authorization", "")
            if not auth.startswith("Bearer "):
                return error_response(401, "unauthorized", "send 'Authorization: Bearer <token>'")
            try:
                p = await run_in_threadpool(admin.authenticate, auth[7:].strip())
                if not limiter.allow(p.token_id):
                    return error_response(429, "rate_limited", "too many requests for this token")
                call = parse_call(op, p, request, await read_body(request.scope,
                                                                  request.receive))
                result = await run_in_threadpool(fn, admin, call)
            except AuthError as e:
                return error_response(401, e.code, str(e))
            except TooLargeError:
                return error_response(413, "too_large",
                                      f"request body larger than {MAX_BODY} bytes")
            except TooSlowError:
                r = error_response(408, "too_slow",
                                   f"request body not received within {BODY_DEADLINE:.0f} s")
                r.headers["connection"] = "close"
                return r
            except (ProtocolError, PolicyError) as e:
                return error_response(400, e.code, str(e))
            except Exception as e:
                refused = refusal(request.url.path, e)
                if refused is not None:
                    return error_response(refused[0], refused[1], refused[2])
                if isinstance(e, NotFoundError):
                    return error_response(404, e.code, str(e))
                if isinstance(e, StoreError):
                    return error_response(409, e.code, str(e))
                if isinstance(e, SealtorchError):
                    return error_response(400, e.code, str(e))
                raise
            return JSONResponse(result)

        return handler

    async def metrics(request: Request) -> Response:
        try:
            ops.AUDIT_SEQ.set((await run_in_threadpool(ks.store.audit_head)).seq)
        except Exception:  # noqa: S110 - metrics must not fail on a DB hiccup
            pass
        return Response(generate_latest(ops.REGISTRY), media_type=CONTENT_TYPE_LATEST)

    def endpoint(op: Operation) -> Callable[[Request], Awaitable[Response]]:
        if op.op_id == "admin_metrics":
            return metrics
        if op.op_id == "admin_healthz":
            return healthz
        return authed(op)

    return Starlette(routes=routes(operations("admin"), endpoint),
                     exception_handlers=ERROR_PAGES)



__all__ = ["admin_app"]
