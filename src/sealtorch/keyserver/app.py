"""The release listener of dkeyserver (anonymous, attested): routing, body parsing and error
mapping only; the release logic is ``service.py``. Error bodies never echo input."""

from __future__ import annotations

import json
import time
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import anyio.to_thread
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PublicKey
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from sealtorch.errors import ProtocolError, StoreError
from sealtorch.keyserver import ops
from sealtorch.keyserver.http import (
    BODY_DEADLINE,
    ERROR_PAGES,
    UNAVAILABLE_MESSAGE,
    ClientGoneError,
    TooLargeError,
    TooSlowError,
    error_response,
    healthz,
    log,
    read_body,
    refusal,
    routes,
)
from sealtorch.keyserver.openapi import operations
from sealtorch.keyserver.service import UNAUTHORIZED, KeyServer, Outcome
from sealtorch.protocol import hpke
from sealtorch.protocol.messages import (
    MAX_BODY,
    ReleaseRequest,
    StatusRequest,
    error_body,
    parse_json_body,
)
from sealtorch.protocol.wire import EmptyBody, parse


def _count(route: str, out: Outcome, started: float) -> None:
    """Metrics of one answered request."""
    ops.REQUESTS.labels(route, str(out.status)).inc()
    ops.LATENCY.labels(route).observe(time.perf_counter() - started)
    for d in out.decisions:
        if d == "release":
            ops.RELEASES.inc()
        else:
            ops.DENIALS.labels(d).inc()


#: built once: ``json.dumps`` with options builds a new encoder for every answer
_ENCODER = json.JSONEncoder(ensure_ascii=False, allow_nan=False, indent=None,
                            separators=(",", ":"))


def _json_bytes(obj: Any) -> bytes:
    """The exact encoding Starlette's JSONResponse uses (compact, UTF-8, no NaN)."""
    return _ENCODER.encode(obj).encode("utf-8")


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
        except ClientGoneError:
            return
        except Exception as e:
            refused = refusal(scope["path"], e)  # e.g. while counting a malformed request
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
            ops.set_route(route)  # this request's task (and its threads) count crypto here
            client = scope["client"][0] if scope.get("client") else "unknown"
            if not limiter.allow(client):
                ops.REQUESTS.labels(route, "429").inc()
                return 429, error_body("rate_limited", "too many requests; slow down"), False
            try:
                obj = parse_json_body(await read_body(scope, receive))
            except TooSlowError:
                await ks.anonymous("too_slow", "body not received in time", client, status=408)
                ops.REQUESTS.labels(route, "408").inc()
                return 408, error_body(
                    "too_slow", f"request body not received within {BODY_DEADLINE:.0f} s"), True
            except TooLargeError:
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
                refused = refusal(route, e)
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
        parse(EmptyBody, obj, "challenge request")
        return ks.challenge()

    async def do_release(obj: dict[str, Any], client: str) -> Outcome:
        return await ks.release(ReleaseRequest.from_json(obj, check_key=_checked_key), client)

    async def do_status(obj: dict[str, Any], client: str) -> Outcome:
        req = StatusRequest.from_json(obj)
        out = await ks.status(req)
        if out is None:
            return await ks.anonymous(UNAUTHORIZED, "status poll without the cache's status key",
                                      client)
        return out

    def do_collateral(obj: dict[str, Any], client: str) -> Outcome:
        parse(EmptyBody, obj, "collateral request")
        return ks.collateral()

    async def readyz(request: Request) -> Response:
        try:
            st = await run_in_threadpool(ks.store.state)
        except Exception as e:
            refused = refusal("/readyz", e)
            code = refused[1] if refused else "unavailable"
            return error_response(503, code, "the key server cannot serve: see its log")
        return JSONResponse({"status": "ready", "server_key_id": ks.server_key_id,
                             "state_seq": st.seq, "collateral": _collateral_info(ks)})

    posts = {"challenge": guarded("challenge", do_challenge, mode="inline"),
             "release": guarded("release", do_release, mode="async"),
             "status": guarded("status", do_status, mode="async"),
             "collateral": guarded("collateral", do_collateral)}
    gets = {"healthz": healthz, "readyz": readyz}
    release_ops = operations("release")
    # the POST routes are served by _FastPost; their Starlette entries only answer other
    # methods with 405
    fallback = Starlette(routes=routes(release_ops, lambda op: gets.get(op.op_id, _never)),
                         exception_handlers=ERROR_PAGES)
    return _FastPost(fallback, {op.path: posts[op.op_id] for op in release_ops
                                if op.method == "POST"})


def _checked_key(raw: bytes) -> X25519PublicKey:
    """The release request's X25519 key, checked (not low-order), its CPU counted as crypto."""
    return ops.crypto("hpke_key_check", hpke.load_public_key, raw)


async def _never(request: Request) -> Response:  # pragma: no cover - shadowed by _FastPost
    return error_response(500, "internal", "internal server error")


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


__all__ = ["release_app"]
