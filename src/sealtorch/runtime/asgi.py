"""Raw ASGI plumbing shared by the inference servers' middlewares (end-to-end requests, the
KServe predictor's front): the ASGI types, header lookup, plain responses, and reading a request
body under a size limit, the one rule behind every 413 of the inference servers.

An announced ``Content-Length`` over the limit is refused before a byte is read; a streamed body
is refused as soon as it passes the limit, so a large body never sits in memory whole.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


def header(scope: Scope, name: bytes) -> str:
    """The request header ``name`` (lower case), or ``""``."""
    for k, v in scope.get("headers", ()):
        if k == name:
            return bytes(v).decode("latin-1")
    return ""


async def send_body(send: Send, status: int, body: bytes, media_type: str,
                    headers: dict[str, str] | None = None) -> None:
    """A whole response, never cached by intermediaries."""
    raw = [(b"content-type", media_type.encode("ascii")),
           (b"content-length", str(len(body)).encode("ascii")),
           (b"cache-control", b"no-store")]
    raw += [(k.encode("ascii"), v.encode("ascii")) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})


async def send_json(send: Send, status: int, obj: dict[str, Any],
                    headers: dict[str, str] | None = None) -> None:
    """A JSON response (:func:`send_body`)."""
    await send_body(send, status, json.dumps(obj).encode(), "application/json", headers)


class BodyRefused(Exception):
    """A body that cannot be read: ``status`` 413 (too large), or 400 (a malformed
    ``Content-Length``, or the client went away: ``code`` ``disconnected``)."""

    def __init__(self, status: int, message: str, code: str) -> None:
        super().__init__(message)
        self.status, self.message, self.code = status, message, code


def _too_large(max_bytes: int) -> BodyRefused:
    return BodyRefused(413, f"request body larger than {max_bytes} bytes", "too_large")


def check_content_length(value: str | bytes | None, max_bytes: int) -> None:
    """Refuse an announced length that is not a plain decimal number (400) or is over
    ``max_bytes`` (413); no header is fine (the stream is bounded as it is read)."""
    if not value:
        return
    text = value.decode("latin-1") if isinstance(value, bytes) else value
    if not text.isdigit() or not text.isascii() or len(text) > 15:
        raise BodyRefused(400, "invalid Content-Length header", "bad_length")
    if int(text) > max_bytes:
        raise _too_large(max_bytes)


async def read_body(receive: Receive, max_bytes: int) -> bytes:
    """The whole body from ASGI ``receive``, refused (413) the moment it passes ``max_bytes``."""
    body = bytearray()
    while True:
        msg = await receive()
        if msg["type"] != "http.request":
            raise BodyRefused(400, "the client went away", "disconnected")
        body += msg.get("body", b"")
        if len(body) > max_bytes:
            raise _too_large(max_bytes)
        if not msg.get("more_body", False):
            return bytes(body)
