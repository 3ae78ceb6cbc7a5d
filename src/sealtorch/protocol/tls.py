"""TLS 1.3 client contexts for dkeyserver: trust exactly one CA file, and resume sessions.

Resumption (a TLS 1.3 session ticket offered on reconnect) skips the server's certificate and
its signature, most of a full handshake's CPU on the server. It weakens nothing: a session is
only born from a full handshake that verified the server against the pinned CA and name under
this same context (OpenSSL refuses a session of another context), is offered again only to
the same server name, and a server that cannot decrypt the ticket (another server, a restart)
gets a full, verified handshake instead.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import ssl
from collections.abc import Iterator
from typing import Any

#: a session to offer on the connections this task opens (see :func:`offering`)
_OFFER: contextvars.ContextVar[ssl.SSLSession | None] = contextvars.ContextVar(
    "sealtorch_tls_offer", default=None)


class ResumingContext(ssl.SSLContext):
    """A client context that offers, on a new connection to a server name, the last session
    ticket :meth:`remember` kept for that name (or the session given with :func:`offering`)."""

    def _offer(self, server_hostname: Any, session: ssl.SSLSession | None
               ) -> ssl.SSLSession | None:
        if session is not None:
            return session
        offered = _OFFER.get()
        if offered is not None:
            return offered
        store: dict[str, ssl.SSLSession] = self.__dict__.get("_sessions", {})
        return store.get(server_hostname) if isinstance(server_hostname, str) else None

    def wrap_socket(self, sock: Any, server_side: bool = False,
                    do_handshake_on_connect: bool = True, suppress_ragged_eofs: bool = True,
                    server_hostname: Any = None, session: ssl.SSLSession | None = None
                    ) -> ssl.SSLSocket:
        return super().wrap_socket(
            sock, server_side=server_side, do_handshake_on_connect=do_handshake_on_connect,
            suppress_ragged_eofs=suppress_ragged_eofs, server_hostname=server_hostname,
            session=None if server_side else self._offer(server_hostname, session))

    def wrap_bio(self, incoming: ssl.MemoryBIO, outgoing: ssl.MemoryBIO,
                 server_side: bool = False, server_hostname: Any = None,
                 session: ssl.SSLSession | None = None) -> ssl.SSLObject:
        return super().wrap_bio(
            incoming, outgoing, server_side=server_side, server_hostname=server_hostname,
            session=None if server_side else self._offer(server_hostname, session))

    def remember(self, ssl_object: Any) -> None:
        """Keep the session of an established connection of this context (after its first
        answer: TLS 1.3 tickets arrive after the handshake) for the next connection to the
        same server name. A session without a ticket, or of another context, is ignored."""
        if ssl_object is None or getattr(ssl_object, "context", self) is not self:
            return
        name = getattr(ssl_object, "server_hostname", None)
        session = getattr(ssl_object, "session", None)
        if isinstance(name, str) and session is not None and session.has_ticket:
            self.__dict__.setdefault("_sessions", {})[name] = session


@contextlib.contextmanager
def offering(session: ssl.SSLSession | None) -> Iterator[None]:
    """Offer ``session`` on the connections a :class:`ResumingContext` opens in this task or
    thread (asyncio streams take no session argument); ``None`` offers the context's own."""
    token = _OFFER.set(session)
    try:
        yield
    finally:
        _OFFER.reset(token)


def tls_client_context(ca_cert: str | os.PathLike[str] | None) -> ResumingContext:
    """A TLS 1.3-only client context that checks the server name and trusts exactly
    ``ca_cert`` (or, with None, the system's trust store): what
    ``ssl.create_default_context(cafile=ca_cert)`` gives, as a :class:`ResumingContext`, except
    that ``SSLKEYLOGFILE`` is ignored: a key cache must not write its TLS secrets to a file
    because its environment says so."""
    ctx = ResumingContext(ssl.PROTOCOL_TLS_CLIENT)  # CERT_REQUIRED and check_hostname
    if ca_cert is None:
        ctx.load_default_certs(ssl.Purpose.SERVER_AUTH)
    else:
        ctx.load_verify_locations(cafile=str(ca_cert))
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    return ctx


__all__ = ["ResumingContext", "offering", "tls_client_context"]
