"""Where a local runtime reaches dkeycache: a Unix socket path or a loopback ``tcp://`` address.

The Unix socket is the default. The loopback TCP listener exists for SGX, where Gramine's Unix
sockets do not cross enclave boundaries; the local protocol's security does not depend on the
transport (the runtime's evidence binds the cache's key and every file key is HPKE-sealed to the
runtime's session key), but a loopback-only rule keeps the listener off every network.
"""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass

from sealtorch.errors import ConfigError, ServiceUnavailableError

TCP_SCHEME = "tcp://"


@dataclass(frozen=True)
class TcpAddress:
    """A loopback IP literal and a port (0 = let the kernel choose, for listeners only)."""

    host: str
    port: int

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{TCP_SCHEME}{host}:{self.port}"

    @property
    def family(self) -> socket.AddressFamily:
        return socket.AF_INET6 if ":" in self.host else socket.AF_INET


def parse_tcp(value: object, *, what: str, allow_port_zero: bool = False) -> TcpAddress:
    """Parse ``HOST:PORT`` (``[::1]:PORT`` for IPv6); HOST must be a loopback IP literal.

    Hostnames are refused (``localhost`` may resolve anywhere the resolver says); the error
    never repeats the rejected value.
    """
    usage = f"{what} must look like 127.0.0.1:PORT or [::1]:PORT (loopback only)"
    if not isinstance(value, str) or len(value) > 64:
        raise ConfigError(usage)
    host, sep, port_s = value.rpartition(":")
    if not sep or not port_s.isascii() or not port_s.isdigit() or len(port_s) > 5:
        raise ConfigError(usage)
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        if ":" not in host:
            raise ConfigError(usage)
    elif ":" in host:
        raise ConfigError(usage)
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        raise ConfigError(usage + "; hostnames are not accepted") from None
    if not ip.is_loopback:
        raise ConfigError(
            f"{what} must be a loopback address: the local protocol serves runtimes on this "
            "host only and must never listen on a network interface"
        )
    port = int(port_s)
    if not (0 if allow_port_zero else 1) <= port <= 65535:
        raise ConfigError(usage)
    return TcpAddress(str(ip), port)


def parse_endpoint(value: str) -> str | TcpAddress:
    """A client endpoint: ``tcp://127.0.0.1:PORT`` (loopback) or a Unix socket path."""
    if not isinstance(value, str) or not value:
        raise ConfigError("the key cache address must be a socket path or tcp://127.0.0.1:PORT")
    if value.startswith(TCP_SCHEME):
        return parse_tcp(value[len(TCP_SCHEME):], what="the key cache address")
    return value


def connect(endpoint: str | TcpAddress, timeout: float) -> socket.socket:
    """Open a stream connection to the cache (raises :class:`ServiceUnavailableError`)."""
    if isinstance(endpoint, TcpAddress):
        s = socket.socket(endpoint.family, socket.SOCK_STREAM)
        target: object = (endpoint.host, endpoint.port)
    else:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        target = endpoint
    s.settimeout(timeout)
    try:
        s.connect(target)  # type: ignore[arg-type]
        if isinstance(endpoint, TcpAddress):
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except OSError as e:
        s.close()
        raise ServiceUnavailableError(
            f"cannot connect to the key cache at {endpoint} ({type(e).__name__}); is dkeycache "
            "running (with this listener) and is this user allowed to use it?"
        ) from e
    return s
