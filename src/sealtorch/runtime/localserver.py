"""Run an ASGI app with uvicorn on a loopback port in a background thread (tests, benchmarks)."""

from __future__ import annotations

import threading
import time
from types import TracebackType
from typing import Any

from sealtorch.errors import ServeError


class LocalServer:
    """``with LocalServer(app) as srv: httpx.get(srv.url + "/v2/health/live")``."""

    def __init__(self, app: Any, *, host: str = "127.0.0.1", startup_timeout: float = 120.0):
        import uvicorn

        self._config = uvicorn.Config(app, host=host, port=0, log_level="warning",
                                      server_header=False, lifespan="on")
        self._server = uvicorn.Server(self._config)
        self._thread = threading.Thread(target=self._server.run, name="sealtorch-localserver",
                                        daemon=True)
        self._timeout = startup_timeout
        self.host = host
        self.port = 0

    @property
    def url(self) -> str:
        """Base URL of the running server."""
        return f"http://{self.host}:{self.port}"

    def start(self) -> LocalServer:
        """Start and wait until the server listens (and the app's startup finished); on any
        failure, Ctrl-C included, the server thread is stopped before the error propagates."""
        self._thread.start()
        deadline = time.monotonic() + self._timeout
        try:
            while not self._server.started:
                if not self._thread.is_alive():
                    raise ServeError("the local inference server stopped during start-up "
                                     "(see the error uvicorn logged)")
                if time.monotonic() > deadline:
                    raise ServeError(f"the local inference server did not start in "
                                     f"{self._timeout:g} s")
                time.sleep(0.01)
            self.port = self._server.servers[0].sockets[0].getsockname()[1]
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Ask the server to exit and wait for its thread."""
        self._server.should_exit = True
        if self._thread.is_alive():
            self._thread.join(timeout=30)

    def __enter__(self) -> LocalServer:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()
