"""HTTP plumbing both dkeyserver listeners share: the one error body, the bounded body
reader (size and time), refusals when the server cannot serve, and routes built from the
operation table of ``openapi.py`` (so 404 and 405 answer in the same error shape)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from sealtorch.errors import StateRollbackError, TamperError
from sealtorch.keyserver.db import DatabaseUnavailableError, is_connection_error
from sealtorch.keyserver.openapi import Operation
from sealtorch.protocol.messages import MAX_BODY, error_body

log = logging.getLogger("sealtorch.keyserver")

UNAVAILABLE_MESSAGE = "the key server could not complete the request"
#: a whole request body must arrive within this many seconds (slow-client deadline)
BODY_DEADLINE = 10.0


def error_response(status: int, code: str, message: str | None = None) -> JSONResponse:
    """The one error answer: a public code and a fixed, input-free message."""
    return JSONResponse(error_body(code, message), status_code=status)


def refusal(where: str, e: BaseException) -> tuple[int, str, str] | None:
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


class TooLargeError(Exception):
    """The request body is over :data:`MAX_BODY`."""


class TooSlowError(Exception):
    """The request body did not arrive within :data:`BODY_DEADLINE`."""


class ClientGoneError(Exception):
    """The client disconnected before its body arrived."""


async def read_body(scope: Mapping[str, Any], receive: Any) -> bytes:
    """The request body: at most :data:`MAX_BODY` bytes (refused early by Content-Length),
    all of it within :data:`BODY_DEADLINE` seconds."""
    for name, value in scope["headers"]:
        if name == b"content-length" and (not value.isdigit() or int(value) > MAX_BODY):
            raise TooLargeError
    chunks: list[bytes] = []
    total = 0
    try:
        async with asyncio.timeout(BODY_DEADLINE):
            while True:
                msg = await receive()
                if msg["type"] == "http.disconnect":
                    raise ClientGoneError
                chunk = msg.get("body", b"")
                total += len(chunk)
                if total > MAX_BODY:
                    raise TooLargeError
                chunks.append(chunk)
                if not msg.get("more_body", False):
                    break
    except TimeoutError:
        raise TooSlowError from None
    return b"".join(chunks)


async def _error_page(request: Request, exc: Exception) -> Response:
    """404 and 405 from the router as the one error body shape (405 keeps its Allow header)."""
    status = exc.status_code if isinstance(exc, HTTPException) else 500
    headers = exc.headers if isinstance(exc, HTTPException) else None
    code = {404: "not_found", 405: "method_not_allowed"}.get(status, "internal")
    message = {404: "no such route; see openapi.json",
               405: "method not allowed on this route; see the Allow header"}.get(status)
    return JSONResponse(error_body(code, message), status_code=status, headers=headers)


ERROR_PAGES = {404: _error_page, 405: _error_page}


def _dispatch(handlers: dict[str, Callable[[Request], Awaitable[Response]]]
              ) -> Callable[[Request], Awaitable[Response]]:
    """One endpoint for all methods of a path (so 405 answers list every allowed method)."""
    async def endpoint(request: Request) -> Response:
        return await handlers["GET" if request.method == "HEAD" else request.method](request)

    return endpoint


def routes(ops: list[Operation],
            endpoint: Callable[[Operation], Callable[[Request], Awaitable[Response]]]
            ) -> list[Route]:
    by_path: dict[str, dict[str, Callable[[Request], Awaitable[Response]]]] = {}
    for op in ops:
        by_path.setdefault(op.route_path, {})[op.method] = endpoint(op)
    return [Route(path, _dispatch(h), methods=list(h)) for path, h in by_path.items()]


async def healthz(request: Request) -> Response:
    return JSONResponse({"status": "ok"})
