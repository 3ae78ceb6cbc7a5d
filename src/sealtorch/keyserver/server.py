"""Run dkeyserver: the release and admin listeners (TLS 1.3 only) under uvicorn, optionally
with extra worker processes sharing the release socket; graceful shutdown on SIGTERM/SIGINT."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import ssl
import sys
import warnings
from collections.abc import Iterator
from typing import Any

import uvicorn

from sealtorch._secret import harden_process
from sealtorch.errors import StateRollbackError, TamperError
from sealtorch.keyserver import ops
from sealtorch.keyserver.admin_app import admin_app
from sealtorch.keyserver.app import release_app
from sealtorch.keyserver.bootstrap import load_signing_key, open_store
from sealtorch.keyserver.config import ServerConfig
from sealtorch.keyserver.service import KeyServer

log = logging.getLogger("sealtorch.keyserver")


class _Server(uvicorn.Server):
    """uvicorn server whose signals we handle ourselves (two servers in one loop)."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    s = socket.socket(family, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((host, port))
    s.listen(2048)
    s.set_inheritable(True)
    return s


#: a request's headers must arrive completely within this time of the connection opening or the
#: request's first byte; uvicorn itself bounds idle keep-alive and our app bounds the body
HEADER_DEADLINE_S = 10.0


class _CoalescingTransport:
    """A transport proxy that joins the writes of one event-loop turn into one write: uvicorn
    writes a response's headers and its body separately, which over TLS is two records and
    two sends per answer. Order is kept, and ``close`` sends what is pending first."""

    __slots__ = ("_loop", "_pending", "_t")

    def __init__(self, transport: Any, loop: asyncio.AbstractEventLoop) -> None:
        self._t = transport
        self._loop = loop
        self._pending: list[bytes] = []

    def write(self, data: bytes) -> None:
        if not self._pending:
            self._loop.call_soon(self._flush)
        self._pending.append(data)

    def _flush(self) -> None:
        if self._pending:
            data = b"".join(self._pending)
            self._pending.clear()
            if not self._t.is_closing():
                self._t.write(data)

    def close(self) -> None:
        self._flush()
        self._t.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._t, name)


def _with_header_deadline(base: type[Any]) -> type[Any]:
    """Subclass uvicorn's httptools protocol so that a client that never finishes its request
    headers (a slow-loris) is disconnected instead of holding a connection forever, and so
    that each answer leaves in one write (:class:`_CoalescingTransport`)."""

    class _HeaderDeadlineProtocol(base):
        _header_timer: asyncio.TimerHandle | None = None

        def _arm(self) -> None:
            self._disarm()
            self._header_timer = self.loop.call_later(HEADER_DEADLINE_S, self._header_timeout)

        def _disarm(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _header_timeout(self) -> None:
            self._header_timer = None
            transport = getattr(self, "transport", None)
            if transport is not None and not transport.is_closing():
                log.info("connection closed: request headers not complete within the deadline")
                transport.close()

        def connection_made(self, transport: Any) -> None:
            super().connection_made(_CoalescingTransport(transport, self.loop))
            self._arm()

        def on_message_begin(self) -> None:
            super().on_message_begin()
            self._arm()

        def on_headers_complete(self) -> None:
            self._disarm()
            super().on_headers_complete()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

    return _HeaderDeadlineProtocol


def _uv_config(app: Any, cfg: ServerConfig) -> uvicorn.Config:
    c = uvicorn.Config(app, ssl_certfile=str(cfg.path(cfg.tls_cert)),
                       ssl_keyfile=str(cfg.path(cfg.tls_key)), log_config=None,
                       access_log=False, timeout_graceful_shutdown=5, lifespan="off",
                       server_header=False, timeout_keep_alive=cfg.keepalive_seconds,
                       # clients are identified by their socket address: a forwarded header
                       # from a loopback peer must not pick its own rate-limit bucket
                       proxy_headers=False)
    c.load()
    if hasattr(c.http_protocol_class, "on_headers_complete"):  # httptools (a dependency)
        c.http_protocol_class = _with_header_deadline(c.http_protocol_class)
    else:  # pragma: no cover - only without httptools
        warnings.warn("httptools missing: no request-header deadline", RuntimeWarning,
                      stacklevel=2)
    assert c.ssl is not None
    c.ssl.minimum_version = ssl.TLSVersion.TLSv1_3  # TLS 1.3 only
    return c


async def _serve(servers: list[tuple[_Server, socket.socket]]) -> None:
    loop = asyncio.get_running_loop()

    def stop() -> None:
        for srv, _ in servers:
            srv.should_exit = True

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop)
    await asyncio.gather(*(srv.serve(sockets=[sock]) for srv, sock in servers))


def _run(coro: Any) -> None:
    """Run the event loop (uvloop when installed: it roughly halves per-request overhead)."""
    try:
        import uvloop
    except ImportError:
        asyncio.run(coro)
        return
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(coro)


def _make(cfg: ServerConfig) -> KeyServer:
    store, _kek = open_store(cfg)
    ks = KeyServer(cfg, store, load_signing_key(cfg))
    try:  # verify the state now, so a refusing server says why at start, not at first use
        st = store.state()
    except (StateRollbackError, TamperError) as e:
        log.error("REFUSING TO SERVE: %s", e, extra={"fields": {"code": e.code}})
        warnings.warn(f"dkeyserver refuses releases and admin writes: {e}", RuntimeWarning,
                      stacklevel=2)
    else:
        store.watermark.raise_to(st.db_id, st.seq, store.audit_head().seq)
    return ks


RUN_FILE = "run.json"
GIL_SWITCH_INTERVAL = 0.0005  # seconds


def _write_run_file(cfg: ServerConfig, release_port: int, admin_port: int) -> None:
    """Publish the bound ports (useful with port 0) atomically in ``data_dir/run.json``."""
    import json

    tmp = cfg.data_dir / (RUN_FILE + ".tmp")
    tmp.write_text(json.dumps({"pid": os.getpid(), "release_port": release_port,
                               "admin_port": admin_port}))
    os.replace(tmp, cfg.data_dir / RUN_FILE)


def run(cfg: ServerConfig) -> None:
    """Start serving until SIGTERM/SIGINT; the caller prints nothing secret."""
    harden_process()
    ops.setup_logging()
    # the event loop and the group-commit writer thread hand the GIL back and forth around
    # every fsync and socket write; the default 5 ms switch interval turns each hand-over into
    # a convoy that shows up directly in release latency
    sys.setswitchinterval(GIL_SWITCH_INTERVAL)
    if cfg.sim:
        warnings.warn("dkeyserver: sim attestation is ENABLED; it protects nothing",
                      RuntimeWarning, stacklevel=2)
        log.warning("sim attestation is ENABLED: development only, protects nothing")
    if cfg.auto_approve:
        warnings.warn("dkeyserver: auto_approve is ON: any attested cache is admitted without "
                      "'cache approve' (demo/tests only)", RuntimeWarning, stacklevel=2)
        log.warning("auto_approve is ON: caches are admitted without approval (demo/tests only)")
    rel_sock = _bind(cfg.release_host, cfg.release_port)
    adm_sock = _bind(cfg.admin_host, cfg.admin_port)
    children: list[int] = []
    for _ in range(cfg.workers - 1):
        pid = os.fork()
        if pid == 0:  # worker: release listener only
            adm_sock.close()
            try:
                ks = _make(cfg)
                _run(_serve([(_Server(_uv_config(release_app(ks), cfg)), rel_sock)]))
            finally:
                os._exit(0)
        children.append(pid)
    ks = _make(cfg)
    _write_run_file(cfg, rel_sock.getsockname()[1], adm_sock.getsockname()[1])
    log.info("dkeyserver listening", extra={"fields": {
        "release": f"{cfg.release_host}:{rel_sock.getsockname()[1]}",
        "admin": f"{cfg.admin_host}:{adm_sock.getsockname()[1]}",
        "server_key_id": ks.server_key_id, "workers": cfg.workers, "sim": cfg.sim,
        "db": "sqlite" if ks.store.is_sqlite else "postgresql"}})
    try:
        _run(_serve([(_Server(_uv_config(release_app(ks), cfg)), rel_sock),
                            (_Server(_uv_config(admin_app(ks), cfg)), adm_sock)]))
    finally:
        for pid in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        for pid in children:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)
        ks.store.close()
        sys.stdout.flush()
