"""A man in the middle between an inference client and `sealtorch serve`, on loopback.

It forwards every request to the upstream server and every answer back, records every byte it
sees (``captured``), and lets a test rewrite a request before it goes up (``on_request``) or an
answer before it goes down (``on_response``) — what a host, a load balancer or any proxy in
front of the TEE could do. End-to-end protection must not depend on it behaving.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx


@dataclass
class Exchange:
    """One request or answer as the proxy sees it."""

    method: str
    path: str  # with the query string
    headers: dict[str, str]
    body: bytes
    status: int = 0
    upstream: str = ""  # where to forward (a rewrite may send it elsewhere)


@dataclass
class MitmProxy:
    upstream: str
    on_request: Callable[[Exchange], Exchange] | None = None
    on_response: Callable[[Exchange, Exchange], Exchange] | None = None
    captured: bytearray = field(default_factory=bytearray)
    seen: list[tuple[Exchange, Exchange]] = field(default_factory=list)

    def __post_init__(self) -> None:
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def _handle(self) -> None:
                n = int(self.headers.get("Content-Length", "0") or 0)
                body = self.rfile.read(n) if n else b""
                req = Exchange(self.command, self.path, {k.lower(): v for k, v in
                                                         self.headers.items()}, body,
                               upstream=owner.upstream)
                owner.captured += f"{req.method} {req.path}\n".encode() + str(
                    req.headers).encode() + body
                if owner.on_request is not None:
                    req = owner.on_request(req)
                with httpx.Client(timeout=60) as h:
                    r = h.request(req.method, req.upstream + req.path, content=req.body,
                                  headers={k: v for k, v in req.headers.items()
                                           if k in ("content-type", "accept")})
                res = Exchange(req.method, req.path, {k.lower(): v for k, v in
                                                      r.headers.items()}, r.content,
                               r.status_code)
                owner.captured += str(res.headers).encode() + res.body
                if owner.on_response is not None:
                    res = owner.on_response(req, res)
                owner.seen.append((req, res))
                self.send_response(res.status)
                self.send_header("Content-Type", res.headers.get("content-type",
                                                                 "application/json"))
                self.send_header("Content-Length", str(len(res.body)))
                self.end_headers()
                self.wfile.write(res.body)

            do_GET = do_POST = _handle

            def log_message(self, format: str, *args: Any) -> None:
                return

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._httpd.server_address[1]}"
        threading.Thread(target=self._httpd.serve_forever, daemon=True).start()

    def posts(self) -> list[tuple[Exchange, Exchange]]:
        """The POST exchanges seen so far."""
        return [(q, r) for q, r in self.seen if q.method == "POST"]

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
