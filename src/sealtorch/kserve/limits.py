"""An ASGI middleware in front of KServe's server: bounded request bodies (KServe's reads any
size), binary tensor data checked by the shared codec before KServe decodes it (KServe's
decoder answers 500 to sizes that do not match the shapes), and a JSON request without a
Content-Type read as JSON (tritonclient sends none; KServe would take the body for binary
tensor data and refuse it for lacking the length header)."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from sealtorch.runtime.attested import ASGIApp, Message, Receive, Scope, Send

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

    async def _refuse(self, send: Send, status: int = 413, message: str = "") -> None:
        body = json.dumps({"error": message
                           or f"request body larger than {self.max_bytes} bytes"}).encode()
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT"):
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers", ()))
        cl = headers.get(b"content-length", b"")
        if cl and (not cl.isdigit() or len(cl) > 15 or int(cl) > self.max_bytes):
            await self._refuse(send)
            return
        chunks: list[bytes] = []
        size = 0
        while True:
            msg = await receive()
            if msg["type"] != "http.request":
                return  # the client went away
            chunk = bytes(msg.get("body", b""))
            size += len(chunk)
            if size > self.max_bytes:
                await self._refuse(send)
                return
            chunks.append(chunk)
            if not msg.get("more_body", False):
                break
        if self.precheck is not None:
            import anyio

            data = b"".join(chunks)
            problem = await anyio.to_thread.run_sync(self.precheck, scope["path"], headers, data)
            if problem is not None:
                await self._refuse(send, 400, problem)
                return
            chunks = [data]
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                out: dict[str, Any] = {"type": "http.request", "body": b"".join(chunks),
                                       "more_body": False}
                return out
            return await receive()

        if b"content-type" not in headers and b"inference-header-content-length" not in headers:
            scope = dict(scope)
            scope["headers"] = [*scope.get("headers", ()), (b"content-type", b"application/json")]
        await self.app(scope, replay, send)
