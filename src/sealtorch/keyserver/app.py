"""The two ASGI apps of dkeyserver: the release API (anonymous, attested) and the admin API
(tenant-scoped bearer tokens, own listener, /metrics). Handlers parse strictly, enforce body
and rate limits, and never echo input in error bodies."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from collections.abc import Awaitable, Callable
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
    StoreError,
)
from sealtorch.ids import MODEL_ID_RULE, is_model_id
from sealtorch.keyserver import attest, ops
from sealtorch.keyserver.audit import verify_chain
from sealtorch.keyserver.service import KeyServer, Outcome
from sealtorch.keyserver.store import DatabaseUnavailableError, is_connection_error
from sealtorch.protocol import hpke
from sealtorch.protocol.b64 import b64d, b64e
from sealtorch.protocol.canonical import canonical_json
from sealtorch.protocol.messages import (
    MAX_BODY,
    ReleaseRequest,
    StatusRequest,
    error_body,
    parse_json_body,
)
from sealtorch.protocol.signing import KIND_KEY_EXPORT, body_digest, sign_document

log = logging.getLogger("sealtorch.keyserver")
Handler = Callable[[Request], Awaitable[Response]]


def _err(status: int, code: str, message: str | None = None) -> JSONResponse:
    return JSONResponse(error_body(code, message), status_code=status)


#: the answer to any request the database could not serve (down, restarting, disk full)
UNAVAILABLE_MESSAGE = "the key server could not complete the request"


def _db_down(where: str, e: BaseException) -> bool:
    """True, and logged (the error's type only), when ``e`` is the database failing: already
    mapped to :class:`DatabaseUnavailableError`, or a raw driver error."""
    if not (isinstance(e, DatabaseUnavailableError) or is_connection_error(e)):
        return False
    log.error("database unavailable on %s", where,
              extra={"fields": {"error": type(e).__name__}})
    return True


#: a whole request body must arrive within this many seconds (slow-client deadline)
BODY_DEADLINE = 10.0


async def read_body(request: Request) -> bytes:
    """The request body, refusing more than :data:`MAX_BODY` bytes without buffering it all and
    cutting off clients that do not deliver it within :data:`BODY_DEADLINE` seconds."""
    cl = request.headers.get("content-length")
    if cl is not None and (not cl.isdigit() or int(cl) > MAX_BODY):
        raise _TooLarge
    chunks: list[bytes] = []
    total = 0
    try:
        with anyio.fail_after(BODY_DEADLINE):
            async for chunk in request.stream():
                total += len(chunk)
                if total > MAX_BODY:
                    raise _TooLarge
                chunks.append(chunk)
    except TimeoutError:
        raise _TooSlow from None
    return b"".join(chunks)


class _TooLargeError(Exception):
    pass


_TooLarge = _TooLargeError()


class _TooSlowError(Exception):
    pass


_TooSlow = _TooSlowError()


def _too_slow() -> JSONResponse:
    r = _err(408, "too_slow", f"request body not received within {BODY_DEADLINE:.0f} s")
    r.headers["connection"] = "close"
    return r


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


class _ClientGoneError(Exception):
    pass


async def _read_raw_body(scope: dict[str, Any], receive: Any) -> bytes:
    """:func:`read_body` on raw ASGI messages: at most :data:`MAX_BODY` bytes (refused early
    by Content-Length), all of it within :data:`BODY_DEADLINE` seconds."""
    for name, value in scope["headers"]:
        if name == b"content-length" and (not value.isdigit() or int(value) > MAX_BODY):
            raise _TooLarge
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
                    raise _TooLarge
                chunks.append(chunk)
                if not msg.get("more_body", False):
                    break
    except TimeoutError:
        raise _TooSlow from None
    return b"".join(chunks)


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
            if _db_down(scope["path"], e):  # e.g. while counting a malformed request
                status, body, close = 503, error_body("unavailable", UNAVAILABLE_MESSAGE), False
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
    """``/v1/challenge``, ``/v1/release``, ``/v1/status``, ``/healthz``, ``/readyz``."""
    limiter = ops.RateLimiter(ks.config.rate_per_client)
    # a few worker threads are enough (the database serialises writes and the GIL the rest);
    # more threads only add lock convoys and latency under load
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
                obj = parse_json_body(await _read_raw_body(scope, receive))
            except _TooSlowError:
                await anyio.to_thread.run_sync(ks.store.count_anonymous, "too_slow")
                ops.REQUESTS.labels(route, "408").inc()
                return 408, error_body(
                    "too_slow", f"request body not received within {BODY_DEADLINE:.0f} s"), True
            except _TooLargeError:
                await run_in_threadpool(ks.store.count_anonymous, "too_large")
                ops.REQUESTS.labels(route, "413").inc()
                return 413, error_body(
                    "too_large", f"request body larger than {MAX_BODY} bytes"), False
            except ProtocolError:
                await run_in_threadpool(ks.store.count_anonymous, "bad_request")
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
                await run_in_threadpool(ks.store.count_anonymous, "bad_request")
                ops.REQUESTS.labels(route, "400").inc()
                return 400, error_body("bad_request", str(e)), False
            except Exception as e:
                # a store failure (database down, restarting or full) answers like a full disk:
                # 503 'unavailable', with nothing released
                if not _db_down(route, e):
                    if not isinstance(e, StoreError):
                        raise
                    log.exception("store failure on %s", route)
                ops.REQUESTS.labels(route, "503").inc()
                return 503, error_body("unavailable", UNAVAILABLE_MESSAGE), False
            _count(route, out, started)
            return out.status, out.body, False

        return handler

    def do_challenge(obj: dict[str, Any], client: str) -> Outcome:
        if obj:
            raise ProtocolError("challenge request takes an empty JSON object")
        return ks.challenge()

    async def do_release(obj: dict[str, Any], client: str) -> Outcome:
        return await ks.release(ReleaseRequest.from_json(obj), client)

    def do_status(obj: dict[str, Any], client: str) -> Outcome:
        return ks.status(StatusRequest.from_json(obj))

    async def healthz(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def readyz(request: Request) -> Response:
        try:
            await run_in_threadpool(ks.store.audit_head)
        except Exception:
            return _err(503, "unavailable", "database not reachable")
        return JSONResponse({"status": "ready", "server_key_id": ks.server_key_id,
                             "collateral": _collateral_info(ks)})

    fallback = Starlette(routes=[
        Route("/healthz", healthz, methods=["GET"]),
        Route("/readyz", readyz, methods=["GET"]),
        # the POST routes are served by _FastPost; these entries only give other methods 405
        Route("/v1/challenge", _never, methods=["POST"]),
        Route("/v1/release", _never, methods=["POST"]),
        Route("/v1/status", _never, methods=["POST"]),
    ])
    return _FastPost(fallback, {
        "/v1/challenge": guarded("challenge", do_challenge, mode="inline"),
        "/v1/release": guarded("release", do_release, mode="async"),
        "/v1/status": guarded("status", do_status),
    })


async def _never(request: Request) -> Response:  # pragma: no cover - shadowed by _FastPost
    return _err(500, "internal", "internal server error")


def _collateral_info(ks: KeyServer) -> dict[str, Any]:
    """Collateral files and the earliest ``nextUpdate`` among their TCB info / QE identity
    (after it, DCAP verification fails until ``dkeyserver collateral import`` refreshes it)."""
    import datetime
    import json as _json

    d = ks.config.path(ks.config.collateral_dir)
    if not d.is_dir():
        return {"files": 0}
    earliest: datetime.datetime | None = None
    files = [p for p in d.iterdir() if p.is_file()]
    for p in files:
        try:
            obj = _json.loads(p.read_text("utf-8"))
            for key in ("tcb_info", "qe_identity"):
                inner = _json.loads(obj[key])
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


def _model_id(request: Request) -> str:
    mid = request.path_params["model_id"]
    if not is_model_id(mid):
        raise ProtocolError(f"model id must be {MODEL_ID_RULE}")
    return mid


def admin_app(ks: KeyServer) -> Starlette:
    """The tenant-scoped admin API, plus /metrics, /healthz and /readyz."""
    store = ks.store
    limiter = ops.RateLimiter(ks.config.rate_per_token)

    def authed(fn: Callable[[Request, str, str, dict[str, Any]], Any]) -> Handler:
        async def handler(request: Request) -> Response:
            auth = request.headers.get("authorization", "")
            if not auth.startswith("Bearer "):
                return _err(401, "unauthorized", "send 'Authorization: Bearer <token>'")
            try:
                tenant, token_id = await run_in_threadpool(store.authenticate, auth[7:].strip())
            except AuthError as e:
                return _err(401, e.code, str(e))
            except Exception as e:
                if not _db_down(request.url.path, e):
                    raise
                return _err(503, "unavailable", UNAVAILABLE_MESSAGE)
            if not limiter.allow(token_id):
                return _err(429, "rate_limited", "too many requests for this token")
            try:
                raw = await read_body(request)
                obj = parse_json_body(raw) if raw else {}
                result = await run_in_threadpool(fn, request, tenant, token_id, obj)
            except _TooLargeError:
                return _err(413, "too_large", f"request body larger than {MAX_BODY} bytes")
            except _TooSlowError:
                return _too_slow()
            except (ProtocolError, PolicyError) as e:
                return _err(400, e.code, str(e))
            except Exception as e:
                if _db_down(request.url.path, e):
                    return _err(503, "unavailable", UNAVAILABLE_MESSAGE)
                if isinstance(e, StoreError):
                    status = 404 if "not found" in str(e) else 409
                    return _err(status, e.code, str(e))
                if isinstance(e, SealtorchError):
                    return _err(400, e.code, str(e))
                raise
            if isinstance(result, Response):
                return result
            return JSONResponse(result)

        return handler

    def audit(conn: Any, tenant: str, action: str, model_id: str | None = None,
              details: Any = None, cache_id: str | None = None) -> None:
        store.append_audit(conn, actor=f"tenant:{tenant}", action=action, decision="admin",
                           code="ok", tenant=tenant, model_id=model_id, cache_id=cache_id,
                           details=details or {})

    def whoami(req: Request, tenant: str, tid: str, obj: dict[str, Any]) -> Any:
        return {"tenant": tenant, "token_id": tid, "server_key_id": ks.server_key_id}

    def token_create(req: Request, tenant: str, tid: str, obj: dict[str, Any]) -> Any:
        ttl = obj.get("ttl_seconds", 30 * 86400)
        if not isinstance(ttl, int) or not 60 <= ttl <= 366 * 86400:
            raise ProtocolError("ttl_seconds must be an integer between 60 and 31622400")
        with store.tx() as conn:
            new_id, token = store.create_token(conn, tenant, ttl)
            audit(conn, tenant, "token_create", details={"token_id": new_id})
        return {"token_id": new_id, "token": token, "expires_in": ttl}

    def token_revoke(req: Request, tenant: str, tid: str, obj: dict[str, Any]) -> Any:
        target = req.path_params["token_id"]
        with store.tx() as conn:
            if not store.revoke_token(conn, tenant, target):
                raise StoreError("token not found for this tenant")
            audit(conn, tenant, "token_revoke", details={"token_id": target})
        return {"revoked": True}

    def models_list(req: Request, tenant: str, tid: str, obj: dict[str, Any]) -> Any:
        with store.read() as conn:
            return {"models": store.list_models(conn, tenant)}

    def model_add(req: Request, tenant: str, tid: str, obj: dict[str, Any]) -> Any:
        mid = obj.get("model_id")
        if not is_model_id(mid):
            raise ProtocolError(f"model_id must be {MODEL_ID_RULE}")
        kv = obj.get("key_version", 1)
        if not isinstance(kv, int) or isinstance(kv, bool) or not 1 <= kv <= 2**31:
            raise ProtocolError("key_version must be a positive integer")
        generated = obj.get("key") is None
        key = Secret(os.urandom(32)) if generated else Secret(
            b64d(obj.get("key"), field="key", max_len=32, exact_len=32))
        with key, store.tx() as conn:
            store.add_model(conn, tenant, mid, key, kv, exportable=generated)
            audit(conn, tenant, "model_create" if generated else "model_add", mid,
                  {"key_version": kv})
        return {"model_id": mid, "key_version": kv, "generated": generated}

    def model_rotate(req: Request, tenant: str, tid: str, obj: dict[str, Any]) -> Any:
        mid = _model_id(req)
        generated = obj.get("key") is None
        key = Secret(os.urandom(32)) if generated else Secret(
            b64d(obj.get("key"), field="key", max_len=32, exact_len=32))
        with key, store.tx() as conn:
            store._model(conn, tenant, mid)
            kv = store.next_key_version(conn, mid)
            store.add_model(conn, tenant, mid, key, kv, exportable=generated)
            audit(conn, tenant, "model_rotate", mid, {"key_version": kv})
        return {"model_id": mid, "key_version": kv, "generated": generated}

    def model_export(req: Request, tenant: str, tid: str, obj: dict[str, Any]) -> Any:
        mid = _model_id(req)
        kv = obj.get("key_version", 1)
        if not isinstance(kv, int) or isinstance(kv, bool) or kv < 1:
            raise ProtocolError("key_version must be a positive integer")
        pk = b64d(obj.get("public_key"), field="public_key", max_len=32, exact_len=32)
        body = {"format": "sealtorch-key-export/v1", "tenant": tenant, "model_id": mid,
                "key_version": kv, "recipient": b64e(pk), "server_key_id": ks.server_key_id,
                "issued_at": int(time.time())}
        with store.tx() as conn:
            key = store.export_key(conn, tenant, mid, kv)
            with key:
                sealed = hpke.seal(key, pk, body_digest(body))
            audit(conn, tenant, "model_export", mid, {"key_version": kv})
        return {"export": sign_document(ks.signing_key, KIND_KEY_EXPORT, body),
                "sealed_key": b64e(sealed)}

    def version_state(state: str, action: str) -> Callable[..., Any]:
        def fn(req: Request, tenant: str, tid: str, obj: dict[str, Any]) -> Any:
            mid = _model_id(req)
            kv = obj.get("key_version")
            if not isinstance(kv, int) or isinstance(kv, bool) or kv < 1:
                raise ProtocolError("key_version must be a positive integer")
            with store.tx() as conn:
                store.set_version_state(conn, tenant, mid, kv, state)
                audit(conn, tenant, action, mid, {"key_version": kv})
            return {"model_id": mid, "key_version": kv, "state": state}
        return fn

    def model_revoke(req: Request, tenant: str, tid: str, obj: dict[str, Any]) -> Any:
        mid = _model_id(req)
        with store.tx() as conn:
            store.set_model_state(conn, tenant, mid, "revoked")
            audit(conn, tenant, "model_revoke", mid)
        return {"model_id": mid, "state": "revoked"}

    def policy_set(req: Request, tenant: str, tid: str, obj: dict[str, Any]) -> Any:
        mid = _model_id(req)
        doc = obj.get("policy")
        if not isinstance(doc, dict):
            raise ProtocolError("body must be {\"policy\": {...}}")
        pol, version = attest.parse_policy(doc)
        doc = pol.to_dict()  # store the normalised form: it is what grants carry
        with store.tx() as conn:
            store.set_policy(conn, tenant, mid, doc, version)
            audit(conn, tenant, "policy_set", mid, {"version": version,
                                                    "sha256": body_digest(doc).hex()})
        return {"model_id": mid, "policy_version": version}

    def policy_show(req: Request, tenant: str, tid: str, obj: dict[str, Any]) -> Any:
        mid = _model_id(req)
        with store.read() as conn:
            store._model(conn, tenant, mid)
            got = store.get_policy(conn, tenant, mid)
        if got is None:
            raise StoreError("policy not found for this model")
        return {"model_id": mid, "policy": got[0], "policy_version": got[1]}

    def policy_test(req: Request, tenant: str, tid: str, obj: dict[str, Any]) -> Any:
        mid = _model_id(req)
        ev = obj.get("evidence")
        if not isinstance(ev, dict):
            raise ProtocolError("body must be {\"evidence\": {...}}")
        return ks.policy_test(tenant, mid, ev)

    def caches_list(req: Request, tenant: str, tid: str, obj: dict[str, Any]) -> Any:
        with store.read() as conn:
            return {"caches": store.list_caches(conn, tenant)}

    def cache_state(state: str) -> Callable[..., Any]:
        def fn(req: Request, tenant: str, tid: str, obj: dict[str, Any]) -> Any:
            cid = req.path_params["cache_id"]
            if len(cid) != 32 or not all(c in "0123456789abcdef" for c in cid):
                raise ProtocolError("cache id must be 32 lowercase hex characters")
            with store.tx() as conn:
                store.set_approval(conn, tenant, cid, state)
                audit(conn, tenant, f"cache_{'approve' if state == 'approved' else 'revoke'}",
                      cache_id=cid)
            return {"cache_id": cid, "state": state}
        return fn

    def audit_show(req: Request, tenant: str, tid: str, obj: dict[str, Any]) -> Any:
        try:
            after = int(req.query_params.get("after", "0"))
            limit = min(int(req.query_params.get("limit", "100")), 1000)
        except ValueError as e:
            raise ProtocolError("after and limit must be integers") from e
        return {"entries": store.audit_rows(tenant=tenant, after=after, limit=limit)}

    def audit_verify(req: Request, tenant: str, tid: str, obj: dict[str, Any]) -> Any:
        seq, head = store.audit_head()
        problems = verify_chain(store.audit_rows(), head_seq=seq or None,
                                head_hash=head if seq else None)
        signed = ks._signed_head(seq, head)
        return {"ok": not problems, "problems": problems, "audit_head": signed}

    def sim_register(req: Request, tenant: str, tid: str, obj: dict[str, Any]) -> Any:
        if not ks.config.sim:
            raise ProtocolError("sim attestation is disabled in this server's configuration")
        from sealtorch.attestation import sim

        key = obj.get("public_key")
        if not isinstance(key, str) or len(key) > 1024:
            raise ProtocolError("public_key must be PEM, hex or base64 of an Ed25519 key")
        pub = sim.load_platform_public_key(key.strip())
        text = sim.raw_public(pub).hex()
        with store.tx() as conn:
            store.add_sim_platform(conn, tenant, text)
            audit(conn, tenant, "sim_register", details={"fingerprint": sim.fingerprint(pub)})
        ks.invalidate_verifier()
        return {"fingerprint": sim.fingerprint(pub)}

    async def metrics(request: Request) -> Response:
        try:
            ops.AUDIT_SEQ.set(ks.store.audit_head()[0])
        except Exception:  # noqa: S110 - metrics must not fail on a DB hiccup
            pass
        return Response(generate_latest(ops.REGISTRY), media_type=CONTENT_TYPE_LATEST)

    async def healthz(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    return Starlette(routes=[
        Route("/v1/admin/whoami", authed(whoami), methods=["GET"]),
        Route("/v1/admin/tokens", authed(token_create), methods=["POST"]),
        Route("/v1/admin/tokens/{token_id}", authed(token_revoke), methods=["DELETE"]),
        Route("/v1/admin/models", authed(models_list), methods=["GET"]),
        Route("/v1/admin/models", authed(model_add), methods=["POST"]),
        Route("/v1/admin/model-rotate/{model_id:path}", authed(model_rotate), methods=["POST"]),
        Route("/v1/admin/model-export/{model_id:path}", authed(model_export), methods=["POST"]),
        Route("/v1/admin/model-retire/{model_id:path}",
              authed(version_state("retired", "model_retire_version")), methods=["POST"]),
        Route("/v1/admin/model-revoke/{model_id:path}", authed(model_revoke), methods=["POST"]),
        Route("/v1/admin/policy/{model_id:path}", authed(policy_set), methods=["PUT"]),
        Route("/v1/admin/policy/{model_id:path}", authed(policy_show), methods=["GET"]),
        Route("/v1/admin/policy-test/{model_id:path}", authed(policy_test), methods=["POST"]),
        Route("/v1/admin/caches", authed(caches_list), methods=["GET"]),
        Route("/v1/admin/caches/{cache_id}/approve", authed(cache_state("approved")),
              methods=["POST"]),
        Route("/v1/admin/caches/{cache_id}/revoke", authed(cache_state("revoked")),
              methods=["POST"]),
        Route("/v1/admin/audit", authed(audit_show), methods=["GET"]),
        Route("/v1/admin/audit/verify", authed(audit_verify), methods=["GET"]),
        Route("/v1/admin/sim/platforms", authed(sim_register), methods=["POST"]),
        Route("/metrics", metrics, methods=["GET"]),
        Route("/healthz", healthz, methods=["GET"]),
    ])


__all__ = ["admin_app", "canonical_json", "release_app"]
