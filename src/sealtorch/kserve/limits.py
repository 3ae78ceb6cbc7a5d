"""An ASGI middleware in front of KServe's server: bounded request bodies (KServe's reads any
size), and a JSON request without a Content-Type read as JSON (tritonclient sends none; KServe
would take the body for binary tensor data and refuse it for lacking the length header)."""

from __future__ import annotations

import json
from typing import Any

from sealtorch.runtime.attested import ASGIApp, Message, Receive, Scope, Send


class BodyLimit:
    """Answer 413 ``{"error": ...}`` to a body over ``max_bytes`` (announced or streamed), before
    the app sees any of it; smaller bodies are read once and replayed to the app."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def _refuse(self, send: Send) -> None:
        body = json.dumps({"error": f"request body larger than {self.max_bytes} bytes"}).encode()
        await send({"type": "http.response.start", "status": 413,
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
