"""A small loopback-only HTTP listener for dkeycache health (``/healthz``) and ``/metrics``."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from sealtorch.errors import ConfigError


class HealthServer:
    """Serves ``GET /healthz`` (JSON; 503 when down) and ``GET /metrics`` on 127.0.0.1 only."""

    def __init__(
        self, port: int, snapshot: Callable[[], dict[str, Any]], metrics: Callable[[], bytes]
    ) -> None:
        snap, render = snapshot, metrics

        class Handler(BaseHTTPRequestHandler):
            server_version = "dkeycache"
            sys_version = ""

            def do_GET(self) -> None:
                if self.path == "/healthz":
                    s = snap()
                    body = json.dumps(s, sort_keys=True).encode()
                    self._send(503 if s["state"] == "down" else 200, "application/json", body)
                elif self.path == "/metrics":
                    self._send(200, "text/plain; version=0.0.4", render())
                else:
                    self._send(404, "application/json", b'{"error":{"code":"not_found"}}')

            def _send(self, code: int, ctype: str, body: bytes) -> None:
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                return

        try:
            self._httpd = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        except OSError as e:
            raise ConfigError(f"cannot listen on 127.0.0.1:{port} for health ({e.strerror})") from e
        self._httpd.daemon_threads = True
        self.port = self._httpd.server_address[1]
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True,
                                        name="dkeycache-health")

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
