"""An ASGI middleware in front of KServe's server: bounded request bodies (KServe's reads any
size), binary tensor data checked by the shared codec before KServe decodes it (KServe's
decoder answers 500 to sizes that do not match the shapes), and a JSON request without a
Content-Type read as JSON (tritonclient sends none; KServe would take the body for binary
tensor data and refuse it for lacking the length header)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from sealtorch.runtime.asgi import (
    ASGIApp,
    BodyRefused,
    Message,
    Receive,
    Scope,
    Send,
    check_content_length,
    read_body,
    send_json,
)

#: ``precheck(path, headers, body)``: what is wrong with a request, or None
Precheck = Callable[[str, dict[bytes, bytes], bytes], "str | None"]


class BodyLimit:
    """Answer 413 ``{"error": ...}`` to a body over ``max_bytes`` (announced or streamed), before
    the app sees any of it; smaller bodies are read once, given to ``precheck`` (400 with its
    message if it finds one) and replayed to the app."""

    def __init__(self, app: ASGIApp, max_bytes: int, precheck: Precheck | None = None) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.precheck = precheck

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT"):
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers", ()))
        try:
            check_content_length(headers.get(b"content-length"), self.max_bytes)
            data = await read_body(receive, self.max_bytes)
        except BodyRefused as e:
            if e.code != "disconnected":
                await send_json(send, e.status, {"error": e.message})
            return
        if self.precheck is not None:
            import anyio

            problem = await anyio.to_thread.run_sync(self.precheck, scope["path"], headers, data)
            if problem is not None:
                await send_json(send, 400, {"error": problem})
                return
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                out: dict[str, Any] = {"type": "http.request", "body": data,
                                       "more_body": False}
                return out
            return await receive()

        if b"content-type" not in headers and b"inference-header-content-length" not in headers:
            scope = dict(scope)
            scope["headers"] = [*scope.get("headers", ()), (b"content-type", b"application/json")]
        await self.app(scope, replay, send)
