"""A man in the middle between a key cache and the real dkeyserver, for attack tests.

It terminates TLS with its own loopback CA (as an attacker who broke or replaced the transport
would), forwards every request to the real server over its real TLS, and lets a test rewrite the
JSON answer of ``/v1/release`` before the client sees it. Key confidentiality and grant integrity
must not depend on TLS, so every rewrite has to be caught by the client's grant checks.
"""

from __future__ import annotations

import json
import shutil
import ssl
import tempfile
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx

from sealtorch.keyserver.tlsutil import make_loopback_tls
from sealtorch.protocol.release_client import tls_client_context

Rewrite = Callable[[dict[str, Any]], dict[str, Any]]


class MitmProxy:
    """Forwards to ``upstream``; ``rewrite`` (if set) edits each /v1/release answer."""

    def __init__(self, upstream: str, upstream_ca: Path) -> None:
        self.rewrite: Rewrite | None = None
        self.rewritten = 0
        self._dir = Path(tempfile.mkdtemp(prefix="mitm-tls-"))
        make_loopback_tls(self._dir / "tls")
        self.ca_cert = self._dir / "tls" / "ca.crt"
        upstream_ctx = tls_client_context(upstream_ca)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3
        ctx.load_cert_chain(self._dir / "tls" / "server.crt", self._dir / "tls" / "server.key")
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                n = int(self.headers.get("Content-Length", "0"))
                body = self.rfile.read(n)
                with httpx.Client(verify=upstream_ctx, timeout=30) as h:
                    r = h.post(upstream + self.path, content=body,
                               headers={"content-type": "application/json"})
                data = r.content
                if self.path == "/v1/release" and r.status_code == 200 and owner.rewrite:
                    data = json.dumps(owner.rewrite(r.json())).encode()
                    owner.rewritten += 1
                self.send_response(r.status_code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: Any) -> None:
                return

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.socket = ctx.wrap_socket(self._httpd.socket, server_side=True)
        self._httpd.daemon_threads = True
        self.url = f"https://127.0.0.1:{self._httpd.server_address[1]}"
        threading.Thread(target=self._httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        shutil.rmtree(self._dir, ignore_errors=True)  # its TLS private key
