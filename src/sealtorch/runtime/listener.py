"""Bind the inference server's TCP socket up front, so that a port in use is found before the
model key is requested (uvicorn then serves on this very socket)."""

from __future__ import annotations

import socket

from sealtorch.errors import ServeError

BACKLOG = 2048


def bind_listener(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port``; raises :class:`ServeError` saying what to do."""
    try:
        family, kind, proto, _, addr = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    except socket.gaierror as e:
        raise ServeError(f"cannot listen on {host}:{port}: the host does not resolve "
                         f"({e.strerror}); pass an address such as 127.0.0.1 to --host") from None
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # not SO_REUSEPORT
        sock.bind(addr)
        sock.listen(BACKLOG)
    except OSError as e:
        sock.close()
        raise ServeError(f"cannot listen on {host}:{port} ({e.strerror}); stop what uses that "
                         "port or pass another --port/--host") from None
    return sock
