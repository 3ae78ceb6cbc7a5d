"""The two ASGI apps of dkeyserver: the release API (anonymous, attested) and the admin API
(tenant-scoped bearer tokens, own listener, /metrics). This module only routes, reads bodies
(one reader: bounded size and time), parses request fields and maps errors to answers; the
release logic is ``service.py``, the admin operations ``admin.py``. Error bodies never echo
input."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import anyio
import anyio.to_thread
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from sealtorch._secret import Secret
from sealtorch.errors import (
    AuthError,
    PolicyError,
    ProtocolError,
    SealtorchError,
    StateRollbackError,
    StoreError,
    TamperError,
)
from sealtorch.ids import MODEL_ID_RULE, is_model_id
from sealtorch.keyserver import ops
from sealtorch.keyserver.admin import Admin, Principal
from sealtorch.keyserver.db import DatabaseUnavailableError, is_connection_error
from sealtorch.keyserver.service import UNAUTHORIZED, KeyServer, Outcome
from sealtorch.protocol.b64 import b64d
from sealtorch.protocol.messages import (
    CACHE_ID_LEN,
    MAX_BODY,
    ReleaseRequest,
    StatusRequest,
    error_body,
    parse_json_body,
)

log = logging.getLogger("sealtorch.keyserver")

#: the answer to any request the database could not serve (down, restarting, disk full)
UNAVAILABLE_MESSAGE = "the key server could not complete the request"
#: a whole request body must arrive within this many seconds (slow-client deadline)
BODY_DEADLINE = 10.0


def _err(status: int, code: str, message: str | None = None) -> JSONResponse:
    return JSONResponse(error_body(code, message), status_code=status)


def _refusal(where: str, e: BaseException) -> tuple[int, str, str] | None:
    """(status, code, admin message) when ``e`` says the server cannot serve at all: the
    database is down, or its state is tampered with or older than this server has seen.
    Logged with the error's type (and for state refusals its message: it holds no input)."""
    if isinstance(e, DatabaseUnavailableError) or is_connection_error(e):
        log.error("database unavailable on %s", where,
                  extra={"fields": {"error": type(e).__name__}})
        return 503, "unavailable", str(e) if isinstance(e, DatabaseUnavailableError) \
            else UNAVAILABLE_MESSAGE
    if isinstance(e, StateRollbackError | TamperError):
        log.error("refusing %s: %s", where, e, extra={"fields": {"code": e.code}})
        return 503, e.code, str(e)
    return None


class _TooLargeError(Exception):
    pass


class _TooSlowError(Exception):
    pass


class _ClientGoneError(Exception):
    pass


async def read_body(scope: Mapping[str, Any], receive: Any) -> bytes:
    """The request body: at most :data:`MAX_BODY` bytes (refused early by Content-Length),
    all of it within :data:`BODY_DEADLINE` seconds."""
    for name, value in scope["headers"]:
        if name == b"content-length" and (not value.isdigit() or int(value) > MAX_BODY):
            raise _TooLargeError
    chunks: list[bytes] = []
    total = 0
    try:
        async with asyncio.timeout(BODY_DEADLINE):
            while True:
                msg = await receive()
                if msg["type"] == "http.disconnect":
                    raise _ClientGoneError
                chunk = msg.get("body", b"")
                total += len(chunk)
                if total > MAX_BODY:
                    raise _TooLargeError
                chunks.append(chunk)
                if not msg.get("more_body", False):
                    break
    except TimeoutError:
        raise _TooSlowError from None
    return b"".join(chunks)


def _count(route: str, out: Outcome, started: float) -> None:
    """Metrics of one answered request."""
    ops.REQUESTS.labels(route, str(out.status)).inc()
    ops.LATENCY.labels(route).observe(time.perf_counter() - started)
    for d in out.decisions:
        if d == "release":
            ops.RELEASES.inc()
        else:
            ops.DENIALS.labels(d).inc()


def _json_bytes(obj: Any) -> bytes:
    """The exact encoding Starlette's JSONResponse uses (compact, UTF-8, no NaN)."""
    return json.dumps(obj, ensure_ascii=False, allow_nan=False, indent=None,
                      separators=(",", ":")).encode("utf-8")


Answer = tuple[int, Any, bool]  # status, JSON body, close the connection


class _FastPost:
    """Raw ASGI for the hot ``POST`` routes of the release listener (challenge, release,
    status): one body read, one handler, one JSON answer, without the Starlette request,
    response, router and middleware layers that a release would otherwise cross twice.
    Every other request (health, readiness, 404/405) goes to the Starlette app."""

    def __init__(self, fallback: Starlette, routes: dict[str, Callable[..., Awaitable[Answer]]]
                 ) -> None:
        self.fallback = fallback
        self.routes = routes

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        handler = (self.routes.get(scope["path"])
                   if scope["type"] == "http" and scope["method"] == "POST" else None)
        if handler is None:
            await self.fallback(scope, receive, send)
            return
        try:
            status, body, close = await handler(scope, receive)
        except _ClientGoneError:
            return
        except Exception as e:
            refused = _refusal(scope["path"], e)  # e.g. while counting a malformed request
            if refused is not None:
                status, body, close = refused[0], error_body(refused[1], UNAVAILABLE_MESSAGE), False
            else:
                log.exception("unexpected failure on %s", scope["path"])
                status, body, close = 500, error_body("internal", "internal server error"), False
        data = _json_bytes(body)
        headers = [(b"content-type", b"application/json"),
                   (b"content-length", str(len(data)).encode("ascii"))]
        if close:
            headers.append((b"connection", b"close"))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": data})


def release_app(ks: KeyServer) -> Any:
    """``/v1/challenge``, ``/v1/release``, ``/v1/status``, ``/v1/collateral``, ``/healthz``,
    ``/readyz``."""
    limiter = ops.RateLimiter(ks.config.rate_per_client)
    # a few worker threads are enough (the database serialises writes and the GIL the rest)
    threads = anyio.CapacityLimiter(8)

    def guarded(route: str, fn: Callable[[dict[str, Any], str], Any], *,
                mode: str = "thread") -> Callable[..., Awaitable[Answer]]:
        """Wrap ``fn``: rate limit, bounded body, strict JSON, public error codes. ``mode``:
        ``thread`` (blocking database work), ``inline`` (cheap, CPU only) or ``async``."""
        async def handler(scope: dict[str, Any], receive: Any) -> Answer:
            started = time.perf_counter()
            client = scope["client"][0] if scope.get("client") else "unknown"
            if not limiter.allow(client):
                ops.REQUESTS.labels(route, "429").inc()
                return 429, error_body("rate_limited", "too many requests; slow down"), False
            try:
                obj = parse_json_body(await read_body(scope, receive))
            except _TooSlowError:
                await ks.anonymous("too_slow", "body not received in time", client, status=408)
                ops.REQUESTS.labels(route, "408").inc()
                return 408, error_body(
                    "too_slow", f"request body not received within {BODY_DEADLINE:.0f} s"), True
            except _TooLargeError:
                await ks.anonymous("too_large", "body too large", client, status=413)
                ops.REQUESTS.labels(route, "413").inc()
                return 413, error_body(
                    "too_large", f"request body larger than {MAX_BODY} bytes"), False
            except ProtocolError:
                await ks.anonymous("bad_request", "not a JSON object", client, status=400)
                ops.REQUESTS.labels(route, "400").inc()
                return 400, error_body("bad_request", "request body must be a JSON object"), False
            try:
                if mode == "async":
                    out = await fn(obj, client)
                elif mode == "inline":
                    out = fn(obj, client)
                else:
                    out = await anyio.to_thread.run_sync(fn, obj, client, limiter=threads)
            except ProtocolError as e:
                await ks.anonymous("bad_request", e.code, client, status=400)
                ops.REQUESTS.labels(route, "400").inc()
                return 400, error_body("bad_request", str(e)), False
            except Exception as e:
                refused = _refusal(route, e)
                if refused is None:
                    if not isinstance(e, StoreError):
                        raise
                    log.exception("store failure on %s", route)
                    refused = (503, "unavailable", "")
                ops.REQUESTS.labels(route, str(refused[0])).inc()
                return refused[0], error_body(refused[1], UNAVAILABLE_MESSAGE), False
            _count(route, out, started)
            return out.status, out.body, False

        return handler

    def do_challenge(obj: dict[str, Any], client: str) -> Outcome:
        if obj:
            raise ProtocolError("challenge request takes an empty JSON object")
        return ks.challenge()

    async def do_release(obj: dict[str, Any], client: str) -> Outcome:
        return await ks.release(ReleaseRequest.from_json(obj), client)

    async def do_status(obj: dict[str, Any], client: str) -> Outcome:
        req = StatusRequest.from_json(obj)
        out = await anyio.to_thread.run_sync(ks.status, req, limiter=threads)
        if out is None:
            return await ks.anonymous(UNAUTHORIZED, "status poll without the cache's status key",
                                      client)
        return out

    def do_collateral(obj: dict[str, Any], client: str) -> Outcome:
        if obj:
            raise ProtocolError("collateral request takes an empty JSON object")
        return ks.collateral()

    async def healthz(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def readyz(request: Request) -> Response:
        try:
            st = await run_in_threadpool(ks.store.state)
        except Exception as e:
            refused = _refusal("/readyz", e)
            code = refused[1] if refused else "unavailable"
            return _err(503, code, "the key server cannot serve: see its log")
        return JSONResponse({"status": "ready", "server_key_id": ks.server_key_id,
                             "state_seq": st.seq, "collateral": _collateral_info(ks)})

    fallback = Starlette(routes=[
        Route("/healthz", healthz, methods=["GET"]),
        Route("/readyz", readyz, methods=["GET"]),
        # the POST routes are served by _FastPost; these entries only give other methods 405
        Route("/v1/challenge", _never, methods=["POST"]),
        Route("/v1/release", _never, methods=["POST"]),
        Route("/v1/status", _never, methods=["POST"]),
        Route("/v1/collateral", _never, methods=["POST"]),
    ])
    return _FastPost(fallback, {
        "/v1/challenge": guarded("challenge", do_challenge, mode="inline"),
        "/v1/release": guarded("release", do_release, mode="async"),
        "/v1/status": guarded("status", do_status, mode="async"),
        "/v1/collateral": guarded("collateral", do_collateral),
    })


async def _never(request: Request) -> Response:  # pragma: no cover - shadowed by _FastPost
    return _err(500, "internal", "internal server error")


def _collateral_info(ks: KeyServer) -> dict[str, Any]:
    """Collateral files and the earliest ``nextUpdate`` among their TCB info / QE identity
    (after it, DCAP verification fails until ``dkeyserver collateral import`` refreshes it)."""
    import datetime

    d = ks.config.path(ks.config.collateral_dir)
    if not d.is_dir():
        return {"files": 0}
    earliest: datetime.datetime | None = None
    files = [p for p in d.iterdir() if p.is_file()]
    for p in files:
        try:
            obj = json.loads(p.read_text("utf-8"))
            for key in ("tcb_info", "qe_identity"):
                inner = json.loads(obj[key])
                body = inner.get("tcbInfo") or inner.get("enclaveIdentity") or inner
                t = datetime.datetime.fromisoformat(body["nextUpdate"].replace("Z", "+00:00"))
                earliest = t if earliest is None or t < earliest else earliest
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            continue
    out: dict[str, Any] = {"files": len(files)}
    if earliest is not None:
        out["next_update"] = earliest.isoformat()
        out["expired"] = earliest < datetime.datetime.now(datetime.UTC)
    return out


# --- admin request fields ----------------------------------------------------------------
def _model_id(value: object, what: str = "model id") -> str:
    if not is_model_id(value):
        raise ProtocolError(f"{what} must be {MODEL_ID_RULE}")
    return value


def _positive(obj: dict[str, Any], name: str, default: int | None = None) -> int:
    v = obj.get(name, default)
    if not isinstance(v, int) or isinstance(v, bool) or not 1 <= v <= 2**31:
        raise ProtocolError(f"{name} must be a positive integer")
    return v


def _key(obj: dict[str, Any]) -> Secret | None:
    """A model key from the body (``null``/absent: the server generates one)."""
    if obj.get("key") is None:
        return None
    return Secret(b64d(obj.get("key"), field="key", max_len=32, exact_len=32))


def _cache_id(value: str) -> str:
    if len(value) != CACHE_ID_LEN or not all(c in "0123456789abcdef" for c in value):
        raise ProtocolError(f"cache id must be {CACHE_ID_LEN} lowercase hex characters")
    return value


AdminFn = Callable[[Admin, Principal, Request, dict[str, Any]], Any]


def admin_app(ks: KeyServer) -> Starlette:
    """The tenant-scoped admin API, plus /metrics and /healthz."""
    admin = Admin(ks)
    limiter = ops.RateLimiter(ks.config.rate_per_token)

    def authed(fn: AdminFn) -> Callable[[Request], Awaitable[Response]]:
        async def handler(request: Request) -> Response:
            auth = request.headers.get("authorization", "")
            if not auth.startswith("Bearer "):
                return _err(401, "unauthorized", "send 'Authorization: Bearer <token>'")
            try:
                p = await run_in_threadpool(admin.authenticate, auth[7:].strip())
                if not limiter.allow(p.token_id):
                    return _err(429, "rate_limited", "too many requests for this token")
                raw = await read_body(request.scope, request.receive)
                obj = parse_json_body(raw) if raw else {}
                result = await run_in_threadpool(fn, admin, p, request, obj)
            except AuthError as e:
                return _err(401, e.code, str(e))
            except _TooLargeError:
                return _err(413, "too_large", f"request body larger than {MAX_BODY} bytes")
            except _TooSlowError:
                r = _err(408, "too_slow", f"request body not received within {BODY_DEADLINE:.0f} s")
                r.headers["connection"] = "close"
                return r
            except (ProtocolError, PolicyError) as e:
                return _err(400, e.code, str(e))
            except Exception as e:
                refused = _refusal(request.url.path, e)
                if refused is not None:
                    return _err(refused[0], refused[1], refused[2])
                if isinstance(e, StoreError):
                    return _err(404 if "not found" in str(e) else 409, e.code, str(e))
                if isinstance(e, SealtorchError):
                    return _err(400, e.code, str(e))
                raise
            return result if isinstance(result, Response) else JSONResponse(result)

        return handler

    def path_model(req: Request) -> str:
        return _model_id(req.path_params["model_id"])

    def model_add(a: Admin, p: Principal, req: Request, obj: dict[str, Any]) -> Any:
        return a.model_add(p, _model_id(obj.get("model_id"), "model_id"), _key(obj),
                           _positive(obj, "key_version", 1))

    def model_export(a: Admin, p: Principal, req: Request, obj: dict[str, Any]) -> Any:
        pk = b64d(obj.get("public_key"), field="public_key", max_len=32, exact_len=32)
        return a.model_export(p, path_model(req), _positive(obj, "key_version", 1), pk)

    def policy_set(a: Admin, p: Principal, req: Request, obj: dict[str, Any]) -> Any:
        doc = obj.get("policy")
        if not isinstance(doc, dict):
            raise ProtocolError("body must be {\"policy\": {...}}")
        return a.policy_set(p, path_model(req), doc)

    def policy_test(a: Admin, p: Principal, req: Request, obj: dict[str, Any]) -> Any:
        ev = obj.get("evidence")
        if not isinstance(ev, dict):
            raise ProtocolError("body must be {\"evidence\": {...}}")
        return a.policy_test(p, path_model(req), ev)

    def audit_show(a: Admin, p: Principal, req: Request, obj: dict[str, Any]) -> Any:
        try:
            after = int(req.query_params.get("after", "0"))
            limit = min(int(req.query_params.get("limit", "100")), 1000)
        except ValueError as e:
            raise ProtocolError("after and limit must be integers") from e
        return a.audit_show(p, after, limit, req.query_params.get("order") != "oldest")

    def sim_register(a: Admin, p: Principal, req: Request, obj: dict[str, Any]) -> Any:
        key = obj.get("public_key")
        if not isinstance(key, str) or len(key) > 1024:
            raise ProtocolError("public_key must be PEM, hex or base64 of an Ed25519 key")
        return a.sim_register(p, key)

    def token_create(a: Admin, p: Principal, req: Request, obj: dict[str, Any]) -> Any:
        ttl = obj.get("ttl_seconds", 30 * 86400)
        if not isinstance(ttl, int) or isinstance(ttl, bool):
            raise ProtocolError("ttl_seconds must be an integer")
        return a.token_create(p, ttl)

    async def metrics(request: Request) -> Response:
        try:
            ops.AUDIT_SEQ.set((await run_in_threadpool(ks.store.audit_head)).seq)
        except Exception:  # noqa: S110 - metrics must not fail on a DB hiccup
            pass
        return Response(generate_latest(ops.REGISTRY), media_type=CONTENT_TYPE_LATEST)

    async def healthz(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    m = "{model_id:path}"
    return Starlette(routes=[
        Route("/v1/admin/whoami", authed(lambda a, p, r, o: a.whoami(p)), methods=["GET"]),
        Route("/v1/admin/tokens", authed(token_create), methods=["POST"]),
        Route("/v1/admin/tokens/{token_id}",
              authed(lambda a, p, r, o: a.token_revoke(p, r.path_params["token_id"])),
              methods=["DELETE"]),
        Route("/v1/admin/models", authed(lambda a, p, r, o: a.models_list(p)), methods=["GET"]),
        Route("/v1/admin/models", authed(model_add), methods=["POST"]),
        Route(f"/v1/admin/model-rotate/{m}",
              authed(lambda a, p, r, o: a.model_rotate(p, path_model(r), _key(o))),
              methods=["POST"]),
        Route(f"/v1/admin/model-export/{m}", authed(model_export), methods=["POST"]),
        Route(f"/v1/admin/model-retire/{m}",
              authed(lambda a, p, r, o: a.version_retire(p, path_model(r),
                                                         _positive(o, "key_version"))),
              methods=["POST"]),
        Route(f"/v1/admin/model-revoke/{m}",
              authed(lambda a, p, r, o: a.model_revoke(p, path_model(r))), methods=["POST"]),
        Route(f"/v1/admin/policy/{m}", authed(policy_set), methods=["PUT"]),
        Route(f"/v1/admin/policy/{m}", authed(lambda a, p, r, o: a.policy_show(p, path_model(r))),
              methods=["GET"]),
        Route(f"/v1/admin/policy-test/{m}", authed(policy_test), methods=["POST"]),
        Route("/v1/admin/caches", authed(lambda a, p, r, o: a.caches_list(p)), methods=["GET"]),
        Route("/v1/admin/caches/{cache_id}/approve",
              authed(lambda a, p, r, o: a.cache_set(p, _cache_id(r.path_params["cache_id"]),
                                                    "approved")), methods=["POST"]),
        Route("/v1/admin/caches/{cache_id}/revoke",
              authed(lambda a, p, r, o: a.cache_set(p, _cache_id(r.path_params["cache_id"]),
                                                    "revoked")), methods=["POST"]),
        Route("/v1/admin/audit", authed(audit_show), methods=["GET"]),
        Route("/v1/admin/audit/head", authed(lambda a, p, r, o: a.audit_head()),
              methods=["GET"]),
        Route("/v1/admin/audit/verify", authed(lambda a, p, r, o: a.audit_verify()),
              methods=["GET"]),
        Route("/v1/admin/sim/platforms", authed(sim_register), methods=["POST"]),
        Route("/metrics", metrics, methods=["GET"]),
        Route("/healthz", healthz, methods=["GET"]),
    ])


__all__ = ["admin_app", "release_app"]
